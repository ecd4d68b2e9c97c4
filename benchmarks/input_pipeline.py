"""Input-pipeline throughput next to what the demo model's training step consumes, on this machine.

    JAX_PLATFORMS=cpu python benchmarks/input_pipeline.py --config=configs/demo.py
    JAX_PLATFORMS=cpu python benchmarks/input_pipeline.py --spm_model=/data/tok.model --workers=0,2

Prints:
  1. tokenizer encode speed (MB of UTF-8 text per second) on the Python stdlib: bytes, and a
     sentencepiece model (trained here on the stdlib with --vocab_size unless --spm_model is given),
     one document per call and `encode_batch` over all cores;
  2. `prepare` throughput (stdlib -> sentencepiece ArrayRecord shards, all cores);
  3. pipeline tokens/s (`make_pipeline`, the config's batch and seq_len, one process) for
     stdlib + bytes, stdlib + sentencepiece, and the prepared shards, for each --workers value;
  4. the train step's tokens/s (jitted as the loop does, on a real batch), and for each pipeline
     the ratio to it: the pipeline must deliver at least 5x what training consumes.
Tokens/s counts every position of a batch (batch x seq_len), as the loop's tokens/s does.
"""

import os
import statistics
import tempfile
import time

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from tpullm import config as config_lib
from tpullm import data
from tpullm.data import prepare as prepare_lib
from tpullm.data import sources as sources_lib
from tpullm.data import tokenizer as tok_lib
from tpullm.parallel import rules
from tpullm.training import loop
from tpullm.training.step import make_train_step

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_SPM = flags.DEFINE_string("spm_model", "", "A sentencepiece .model to use (default: train one here).")
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Vocabulary of the sentencepiece model trained here.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1"], "data.num_workers values to time the pipeline with.")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "Time each pipeline for about this long (after warm-up).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Train steps timed (after compilation).")
_TOKENIZE_MB = flags.DEFINE_float("tokenize_mb", 4.0, "MB of stdlib text for the tokenizer timing.")


def stdlib_texts(max_bytes):
    spec = sources_lib.parse_spec("python_stdlib", max_bytes=int(max_bytes))
    return [t for _, t in sources_lib.iter_texts(spec, sources_lib.Counts())]


def encode_mb_per_s(tok, texts, batch: bool) -> float:
    nbytes = sum(len(t.encode()) for t in texts)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        if batch:
            tok.encode_batch(texts, num_threads=os.cpu_count() or 1)
        else:
            for t in texts:
                tok.encode_array(t)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e6


def pipeline_tokens_per_s(data_config, tokenizer, batch_size, seed, workers, seconds) -> tuple[float, float]:
    """(tokens/s, seconds to the first batch) of one process's pipeline."""
    start = time.perf_counter()
    sources = data.DataSources(data_config, tokenizer)
    pipeline = data.make_pipeline(data_config, tokenizer, batch_size, seed, 0, 1, sources=sources, num_workers=workers)
    for _ in range(3):  # worker start-up and the first documents
        next(pipeline)
    first = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(pipeline)
        steps += 1
    elapsed = time.perf_counter() - start
    pipeline.close()
    return steps * batch_size * data_config.seq_len / elapsed, first


def train_tokens_per_s(config, tokenizer) -> float:
    """Tokens/s of the train step jitted as loop.train does it, on a batch from the pipeline."""
    model_cfg = config_lib.validate(config)
    setup = loop.build(config, model_cfg)
    sharding = rules.batch_sharding(setup.mesh)
    t = config.train
    pipeline = data.make_pipeline(config.data, tokenizer, t.batch_size, t.seed, 0, 1, num_workers=0)
    batch = loop.put_batch(next(pipeline), sharding)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        step = jax.jit(
            make_train_step(setup.model, setup.optimizer, setup.schedule, config.optimizer.z_loss, t.grad_accum_steps),
            in_shardings=(setup.state_shardings, sharding),
            out_shardings=(setup.state_shardings, None),
            donate_argnums=0,
        )
        state = setup.init_state(jax.random.key(0))
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
        times = []
        for _ in range(_TRAIN_STEPS.value):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return t.batch_size * config.data.seq_len / statistics.median(times)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    b, seq_len = config.train.batch_size, config.data.seq_len
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{cores} cores (load average {load:.1f}); batch {b} x {seq_len}; default data.num_workers here: "
        f"{data.default_num_workers()}"
    )
    tmp = tempfile.mkdtemp(prefix="tpullm_bench_")

    texts = stdlib_texts(_TOKENIZE_MB.value * 1e6)
    spm_path = _SPM.value
    if not spm_path:
        start = time.perf_counter()
        proto, counts = tok_lib.train_sentencepiece(stdlib_texts(4e6), _VOCAB.value, "bpe")
        spm_path = os.path.join(tmp, f"stdlib_bpe{_VOCAB.value}.model")
        with open(spm_path, "wb") as f:
            f.write(proto)
        print(
            f"trained a {_VOCAB.value}-piece BPE model on {counts['lines']:,} stdlib lines in "
            f"{time.perf_counter() - start:.1f}s"
        )
    byte_tok, spm_tok = tok_lib.ByteTokenizer(), tok_lib.load_tokenizer(spm_path)
    nbytes = sum(len(t.encode()) for t in texts)
    ratio = sum(len(ids) for ids in spm_tok.encode_batch(texts)) / nbytes
    print(f"\ntokenizer encode, {nbytes / 1e6:.1f} MB of stdlib source ({len(texts)} documents):")
    print(f"  {'':44} {'MB/s':>8} {'tokens/s':>12}")
    for name, tok, tpb in (("bytes", byte_tok, 1.0), (f"sentencepiece ({ratio:.2f} tok/byte)", spm_tok, ratio)):
        for batch in (False, True):
            mbs = encode_mb_per_s(tok, texts, batch)
            label = f"{name}, {'encode_batch' if batch else 'per document'}"
            print(f"  {label:44} {mbs:>8.1f} {mbs * 1e6 * tpb:>12,.0f}")

    start = time.perf_counter()
    spec = sources_lib.parse_spec("python_stdlib", max_bytes=config.data.max_bytes)
    [result] = prepare_lib.prepare([spec], spm_path, os.path.join(tmp, "prepared"), log=lambda _: None)
    seconds = time.perf_counter() - start
    print(
        f"\nprepare: python_stdlib -> {result.kept} documents, {result.tokens:,} tokens in {seconds:.1f}s "
        f"({result.read.bytes / 1e6 / seconds:.1f} MB/s with {cores} workers, start-up included)"
    )

    train = train_tokens_per_s(config, byte_tok)
    print(
        f"\ntrain step of {_CONFIG.value.model.num_layers}-layer demo model: {train:,.0f} tokens/s "
        f"(median of {_TRAIN_STEPS.value} steps)"
    )

    runs = [
        ("stdlib + bytes", {}, byte_tok),
        ("stdlib + sentencepiece", {"tokenizer": spm_path}, spm_tok),
        ("prepared shards (sp)", {"tokenizer": spm_path, "corpus": os.path.join(tmp, "prepared", spec.name)}, spm_tok),
    ]
    print(f"\npipeline, one process, about {_SECONDS.value:.0f}s each:")
    print(f"  {'':24} {'workers':>7} {'first batch s':>13} {'tokens/s':>12} {'x training':>10}")
    for name, overrides, tok in runs:
        for workers in (int(w) for w in _WORKERS.value):
            c = config.data.copy_and_resolve_references()
            c.update(overrides)
            rate, first = pipeline_tokens_per_s(c, tok, b, 0, workers, _SECONDS.value)
            verdict = "ok" if rate >= 5 * train else "BELOW 5x"
            print(f"  {name:24} {workers:>7} {first:>13.1f} {rate:>12,.0f} {rate / train:>9.0f}x {verdict}")


if __name__ == "__main__":
    app.run(main)
