"""Generate text from the newest checkpoint of a training run.

python -m tpullm.sample --workdir=/tmp/tpullm_demo --prompt="def " --temperature=0.8 --top_k=40
"""

import sys

import jax
from absl import app, flags

from tpullm import cli, data
from tpullm.checkpoint import load_model
from tpullm.errors import warn
from tpullm.inference.sampling import check_sampling, generate

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text to continue.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "How many tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens whose mass reaches p.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    check_sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MAX_NEW.value)  # before loading a checkpoint
    # Which step was loaded goes to stderr: stdout holds the text alone.
    model, config, params = load_model(_WORKDIR.value, _STEP.value, log=lambda m: print(m, file=sys.stderr))
    tokenizer = data.load_tokenizer(config.data.tokenizer)
    prompt = tokenizer.encode(_PROMPT.value)
    if len(prompt) > config.data.seq_len:
        warn(
            f"the prompt is {len(prompt)} tokens; the model sees only the last {config.data.seq_len} "
            f"(data.seq_len, its training length)"
        )
    new = generate(
        model,
        params,
        prompt,
        _MAX_NEW.value,
        jax.random.key(_SEED.value),
        context=config.data.seq_len,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        eos_id=tokenizer.eos_id,
    )
    print(_PROMPT.value + tokenizer.decode(new))


if __name__ == "__main__":
    cli.run(main, compilation_cache=True)
