"""Speculative decoding speed on trained weights: a target of the demo's shape (configs/demo.py: LLaMA-style,
width 256, 4 layers) alone (`Generator`) against `SpeculativeGenerator` with a draft of one layer (a quarter of
the layers, 3.6x fewer params), both trained briefly on the same data (the Python standard library's source).

    JAX_PLATFORMS=cpu python benchmarks/speculative.py [--workdir=/tmp/tpullm_speculative] [--steps=200]

The two runs train once (`python -m tpullm.train`, a few minutes each on a 2-core CPU) into --workdir/target and
--workdir/draft; reruns find their checkpoints and skip training. Prompts are --prompt_tokens bytes of standard
library files at line starts. For batch 1 and --batch, greedy and sampled (temperature 0.8): tokens/s counts
generated tokens over wall-clock time (prefill included), median of --repeats calls timed in turns with the other
decoding of the same row (so the shared machine's load changes hit both alike), after warm-up calls;
the acceptance rate is the share of drafted tokens the target accepted, the kept rate the share kept (a batch's
round keeps as many drafts as the row that accepted fewest).
"""

import os
import statistics
import subprocess
import sys
import time

import jax
from absl import app, flags

from tpullm import data
from tpullm.checkpoint import load_model
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams
from tpullm.inference.speculative import SpeculativeGenerator

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/tpullm_speculative", "Where the target and draft runs train.")
_STEPS = flags.DEFINE_integer("steps", 200, "Training steps of each run (batch 16 x 256 tokens).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 192, "Prompt length (bytes of source).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Draft tokens per round (k).")
_BATCH = flags.DEFINE_integer("batch", 8, "The larger batch measured besides batch 1.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAFT_SHAPE = ("--config.model.num_layers=1",)


def trained(workdir: str, overrides=()) -> str:
    """`workdir` holding a demo-config run of --steps steps, training it first unless its checkpoint exists."""
    steps = _STEPS.value
    if not os.path.isdir(os.path.join(workdir, "checkpoints", str(steps))):
        command = [
            sys.executable,
            "-m",
            "tpullm.train",
            "--config=configs/demo.py",
            f"--workdir={workdir}",
            f"--config.train.steps={steps}",
            f"--config.train.checkpoint_every={steps}",
            f"--config.train.eval_every={steps}",
            "--config.train.sample_tokens=0",
            *overrides,
        ]
        print("training:", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return workdir


def source_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: standard library files from a line start a third of the way in."""
    prompts = []
    for path in data.python_stdlib_files()[::37]:
        text = path.read_text(errors="replace")
        start = text.find("\n", len(text) // 3) + 1
        tokens = tokenizer.encode(text[start:])
        if start and len(tokens) >= length:
            prompts.append(tokens[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"fewer than {count} standard library files have {length} tokens")


def timed_in_turns(fns, repeats: int) -> list[float]:
    """Median seconds of each of `fns`, called in turns `repeats` times after warm-up calls (compilation; the
    first seconds of a process also run slower)."""
    for fn in fns * 3:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn_times, fn in zip(times, fns):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv):
    del argv
    quiet = dict(log=lambda message: None)
    target, config, target_params = load_model(trained(os.path.join(_WORKDIR.value, "target")), **quiet)
    draft, _, draft_params = load_model(trained(os.path.join(_WORKDIR.value, "draft"), DRAFT_SHAPE), **quiet)
    new, k = _NEW.value, _DRAFT_TOKENS.value
    prompts = source_prompts(data.load_tokenizer(config.data.tokenizer), _BATCH.value, _PROMPT_TOKENS.value)
    max_length = _PROMPT_TOKENS.value + new
    count = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
    print(
        f"target {count(target_params):,} params, draft {count(draft_params):,} params, {_STEPS.value} training "
        f"steps each; {jax.devices()[0].platform}, prompts of {_PROMPT_TOKENS.value} tokens, {new} new tokens, "
        f"k={k}; tokens/s (median of {_REPEATS.value})"
    )
    print("| sampling | batch | target alone tok/s | speculative tok/s | speed-up | acceptance rate | kept rate |")
    print("|---|---|---|---|---|---|---|")
    generator = Generator(target, target_params, max_length)
    speculative = SpeculativeGenerator(target, target_params, draft, draft_params, max_length, k=k)
    for name, sampling in (("greedy", SamplingParams(temperature=0.0)), ("t=0.8", SamplingParams(temperature=0.8))):
        for batch in (1, _BATCH.value):
            rows = prompts[:batch]
            tokens = batch * new
            alone, drafted = (
                tokens / seconds
                for seconds in timed_in_turns(
                    [
                        lambda: generator.generate(rows, new, sampling),
                        lambda: speculative.generate(rows, new, sampling),
                    ],
                    _REPEATS.value,
                )
            )
            result = speculative.generate(rows, new, sampling)
            print(
                f"| {name} | {batch} | {alone:.1f} | {drafted:.1f} | {drafted / alone:.2f}x | "
                f"{result.acceptance_rate:.2f} | {result.kept_rate:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
