"""Generate text from the newest checkpoint of a training run.

    python -m tpullm.sample --workdir=/tmp/tpullm_demo --prompt="def " --temperature=0.8 --top_k=40
    python -m tpullm.sample --workdir=/tmp/tpullm_demo --prompts_file=prompts.jsonl --num_samples=4
    python -m tpullm.sample --workdir=/tmp/tpullm_demo --prompt="def " --beams=4 --length_penalty=1.0
    python -m tpullm.sample --workdir=/tmp/tpullm_demo --draft_workdir=/tmp/tpullm_small --draft_tokens=4

All prompts (and their samples) are decoded together as one batch with the KV cache
(tpullm/inference/generate.py; with --beams=N, N > 1, beam search instead of sampling,
tpullm/inference/beam.py); each continuation is printed after its prompt. A single sampled text streams
to the terminal token by token as it is decoded. With --draft_workdir (a
smaller model trained with the same tokenizer) the batch is decoded by speculative decoding
(tpullm/inference/speculative.py), which keeps the target's distribution; each text's acceptance rate goes
to stderr.
"""

import json
import sys

from absl import app, flags

from tpullm import cli, data
from tpullm.checkpoint import load_model
from tpullm.errors import UserError
from tpullm.inference.sampling import SamplingParams, check_sampling
from tpullm.inference.text import complete_texts

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Text to continue.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file",
    None,
    "JSONL file with a 'prompt' field per line; replaces --prompt, all prompts decoded as one batch.",
)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Continuations per prompt.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "How many tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens whose mass reaches p.")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Keep tokens at least min_p times as likely as the most likely (0: all).")
_DRAFT_WORKDIR = flags.DEFINE_string("draft_workdir", None, "A smaller run's workdir: its model drafts tokens.")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Tokens the draft proposes per round (with --draft_workdir).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BEAMS = flags.DEFINE_integer("beams", 1, "Beam search with this many beams when > 1 (the sampling flags unused).")
_LENGTH_PENALTY = flags.DEFINE_float(
    "length_penalty", 1.0, "Beam search: a hypothesis scores sum_logprobs / length ** length_penalty."
)
flags.mark_flag_as_required("workdir")

SEPARATOR = "\n" + "=" * 40 + "\n"


def read_prompts(path: str) -> list[str]:
    """The 'prompt' field of every non-blank line of a JSONL file."""
    prompts = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{number}: each line must be a JSON object with a 'prompt' field") from None
    if not prompts:
        raise UserError(f"{path} has no prompts")
    return prompts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Checked before loading a checkpoint.
    check_sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MAX_NEW.value, _MIN_P.value)
    if _NUM_SAMPLES.value < 1:
        raise UserError(f"num_samples={_NUM_SAMPLES.value} must be >= 1")
    if _BEAMS.value < 1:
        raise UserError(f"beams={_BEAMS.value} must be >= 1")
    if _BEAMS.value > 1 and _NUM_SAMPLES.value > 1:
        raise UserError(f"beam search (beams={_BEAMS.value}) gives one continuation per prompt: use num_samples=1")
    if _DRAFT_TOKENS.value < 1:
        raise UserError(f"draft_tokens={_DRAFT_TOKENS.value} must be >= 1")
    if _BEAMS.value > 1 and _DRAFT_WORKDIR.value:
        raise UserError("--beams and --draft_workdir do not combine: speculative decoding samples or decodes greedily")
    prompts = read_prompts(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else [_PROMPT.value]
    # Which step was loaded goes to stderr: stdout holds the text alone.
    model, config, params = load_model(_WORKDIR.value, _STEP.value, log=lambda m: print(m, file=sys.stderr))
    draft = None
    if _DRAFT_WORKDIR.value:
        draft_model, _, draft_params = load_model(_DRAFT_WORKDIR.value, log=lambda m: print(m, file=sys.stderr))
        draft = (draft_model, draft_params)
    sampling = SamplingParams(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _MIN_P.value, _SEED.value)
    texts = [p for p in prompts for _ in range(_NUM_SAMPLES.value)]
    streamed = []  # one sampled text goes to the terminal token by token
    if len(texts) == 1 and _BEAMS.value == 1 and not draft:
        print(texts[0], end="", flush=True)

        def stream(piece):
            print(piece, end="", flush=True)
            streamed.append(piece)

    else:
        stream = None
    continuations = complete_texts(
        model,
        params,
        data.load_tokenizer(config.data.tokenizer),
        texts,
        _MAX_NEW.value,
        sampling,
        train_length=config.data.seq_len,
        num_beams=_BEAMS.value,
        length_penalty=_LENGTH_PENALTY.value,
        draft=draft,
        draft_tokens=_DRAFT_TOKENS.value,
        log=lambda m: print(m, file=sys.stderr),
        stream=stream,
    )
    if stream is not None:
        print(continuations[0][len("".join(streamed)) :])  # what the stream held back, and the newline
        return
    print(SEPARATOR.join(prompt + text for prompt, text in zip(texts, continuations)))


if __name__ == "__main__":
    cli.run(main, compilation_cache=True)
