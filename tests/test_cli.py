"""The command line: user errors as one line without a traceback, quiet library logs, writable
outputs checked first, sampling parameters checked, the compilation cache flag."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpullm import cli
from tpullm.data.tokenizer import SentencePieceTokenizer
from tpullm.errors import UserError, check_writable
from tpullm.inference.sampling import check_sampling, filter_logits, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
SMOKE = "--config=configs/demo.py:smoke"


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *must_mention):
    """Exit status 1, nothing on stderr but one line naming the command, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert ": error: " in lines[0], lines[0]
    for word in must_mention:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- the entry points


def test_bad_learning_rate_stops_with_one_line_naming_the_key_and_the_fix(tmp_path):
    proc = run("-m", "tpullm.train", SMOKE, f"--workdir={tmp_path / 'run'}", "--config.optimizer.learning_rate=-1")
    line = assert_one_line_error(
        proc,
        "tpullm.train: error: optimizer.learning_rate=-1.0",
        "must be > 0",
        "--config.optimizer.learning_rate=0.0003",
    )
    assert "data:" not in proc.stdout, proc.stdout  # stopped before reading any data
    assert not os.path.exists(tmp_path / "run" / "config.json"), line


def test_unknown_override_names_the_full_key_and_the_nearest_valid_one(tmp_path):
    proc = run("-m", "tpullm.train", SMOKE, f"--workdir={tmp_path}", "--config.train.batchsize=8")
    assert_one_line_error(proc, "config.train.batchsize", "did you mean config.train.batch_size")
    proc = run("-m", "tpullm.info", SMOKE, "--config.trian.steps=8")
    assert_one_line_error(proc, "config.trian.steps", "config.train.steps")


def test_unwritable_workdir_fails_in_one_line_before_any_data_is_read(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file cannot hold a workdir")
    proc = run("-m", "tpullm.train", SMOKE, f"--workdir={blocker / 'run'}")
    assert_one_line_error(proc, "--workdir", str(blocker / "run"), "not writable")
    assert proc.stdout == "", proc.stdout  # no data source was described, so none was read


def test_unwritable_output_of_prepare_and_export_fails_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run("-m", "tpullm.data.prepare", "--input=python_stdlib", f"--out={blocker / 'out'}")
    assert_one_line_error(proc, "tpullm.data.prepare: error: --out", "not writable")
    proc = run("-m", "tpullm.export", f"--workdir={tmp_path}", f"--out={blocker / 'sub' / 'out'}")
    assert_one_line_error(proc, "tpullm.export: error:", "not writable")


@pytest.mark.parametrize(
    "args, must_mention",
    [
        (["-m", "tpullm.train", SMOKE, "--workdir=/tmp/x", "--config.train.steps=abc"], ["config.train.steps", "abc"]),
        (["-m", "tpullm.train", SMOKE, "--workdir=/tmp/x", "--no_such_flag=1"], ["no_such_flag"]),
        (["-m", "tpullm.train", SMOKE], ["--workdir"]),  # a required flag
        (
            ["-m", "tpullm.info", "--config=configs/demo.py:nonsense"],
            ["unknown variant 'nonsense'", "configs/demo.py:"],
        ),
        (["-m", "tpullm.info", "--config=configs/no_such_file.py"], ["configs/no_such_file.py", "No such file"]),
        (["-m", "tpullm.sample", "--workdir=/nonexistent/run"], ["/nonexistent/run"]),  # a missing file
        (["-m", "tpullm.sample", "--workdir=/tmp/x", "stray_argument"], ["stray_argument"]),  # absl's UsageError
    ],
)
def test_user_errors_are_one_line_without_traceback(args, must_mention):
    assert_one_line_error(run(*args), *must_mention)


def test_sample_rejects_top_p_zero_before_loading_anything(tmp_path):
    proc = run("-m", "tpullm.sample", f"--workdir={tmp_path}", "--top_p=0")
    assert_one_line_error(proc, "top_p=0.0", "(0, 1]")


def test_sample_rejects_beams_with_several_samples_before_loading_anything(tmp_path):
    proc = run("-m", "tpullm.sample", f"--workdir={tmp_path}", "--beams=3", "--num_samples=2")
    assert_one_line_error(proc, "beams=3", "num_samples=1")


def program(body: str) -> str:
    """A script whose `main` runs under cli.run."""
    return "from tpullm import cli\n" + textwrap.dedent(body) + "\ncli.run(main)\n"


@pytest.mark.parametrize(
    "error, user",
    [
        ("UserError('the value is wrong')", True),
        ("FileNotFoundError('no such file: x')", True),
        ("PermissionError('not allowed: x')", True),
        ("ValueError('an internal bug')", False),
        ("RuntimeError('an internal bug')", False),
        ("KeyError('an internal bug')", False),
    ],
)
def test_only_user_errors_lose_their_traceback(error, user):
    proc = run(
        "-c",
        program(f"""
        from tpullm.errors import UserError
        def main(argv):
            raise {error}
        """),
    )
    assert proc.returncode != 0
    if user:
        assert_one_line_error(proc, error.split("'")[1])
    else:
        assert "Traceback" in proc.stderr and "an internal bug" in proc.stderr


def test_library_logs_are_quiet_unless_verbosity_is_given():
    script = program("""
        import logging
        from absl import logging as absl_logging
        def main(argv):
            logging.getLogger("orbax").info("library info line")
            absl_logging.info("absl info line")
            logging.getLogger("jax").warning("library warning line")
        """)
    quiet = run("-c", script)
    assert quiet.returncode == 0, quiet.stderr
    assert "info line" not in quiet.stderr and "library warning line" in quiet.stderr
    loud = run("-c", script, "--verbosity=0")
    assert "library info line" in loud.stderr and "absl info line" in loud.stderr


def test_warn_prints_one_line_that_stands_out():
    proc = run(
        "-c",
        program("""
        from tpullm.errors import warn
        def main(argv):
            print("progress")
            warn("something to look at")
        """),
    )
    assert proc.stdout == "progress\n" and proc.stderr == "WARNING: something to look at\n"


def test_one_line_keeps_the_last_line_and_place_of_a_config_file_traceback():
    message = (
        "flag --config=configs/x.py: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
        '  File "/lib/config_flags.py", line 684, in parse\n    config = f()\n'
        '  File "configs/x.py", line 26, in get_config\n    raise ValueError("bad")\nValueError: bad\n'
    )
    assert cli.one_line(message) == "flag --config=configs/x.py: ValueError: bad (configs/x.py:26)"
    assert cli.one_line("first\n  second") == "first second"


# ----------------------------------------------------------------------------- helpers


def test_check_writable_creates_the_directory_and_refuses_what_it_cannot_write(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_writable(str(target)) == str(target) and target.is_dir()
    assert list(target.iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not writable"):
        check_writable(str(tmp_path / "file" / "sub"), "--out")
    assert check_writable("gs://bucket/run") == "gs://bucket/run"  # left to the first write
    assert not os.path.exists("gs:")


def test_a_file_that_is_not_a_sentencepiece_model_is_a_user_error(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a sentencepiece model"):
        SentencePieceTokenizer.load(str(path))


def test_compilation_cache_flag_and_off_switch(tmp_path):
    before = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_enable_compilation_cache,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    try:
        assert cli.enable_compilation_cache(str(tmp_path)) == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == cli.MIN_CACHED_COMPILE_SECONDS
        assert cli.enable_compilation_cache("none") is None and not jax.config.jax_enable_compilation_cache
    finally:
        for name, value in zip(
            ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs"),
            before,
        ):
            jax.config.update(name, value)


# ----------------------------------------------------------------------------- sampling parameters


@pytest.mark.parametrize(
    "kwargs, must_mention",
    [
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=-0.5), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k=-1"),
    ],
)
def test_sampling_parameters_that_cannot_work_are_refused(kwargs, must_mention):
    logits = jnp.zeros((1, 8))
    for call in (lambda: sample(jax.random.key(0), logits, **kwargs), lambda: filter_logits(logits, **kwargs)):
        with pytest.raises(UserError, match=must_mention):
            call()
    with pytest.raises(UserError, match="max_new_tokens"):
        check_sampling(1.0, 0, 1.0, max_new_tokens=-1)


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = jax.random.normal(jax.random.key(1), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(2), 64)
    drawn = np.stack([np.asarray(sample(k, logits, temperature=1.0, top_p=1e-6)) for k in keys])
    np.testing.assert_array_equal(drawn, np.broadcast_to(np.argmax(logits, axis=-1), drawn.shape))
    # and the edges of the accepted ranges still work: greedy, all tokens, top_k 0
    np.testing.assert_array_equal(sample(keys[0], logits, temperature=0.0), np.argmax(logits, axis=-1))
    assert np.isfinite(np.asarray(filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0))).all()
