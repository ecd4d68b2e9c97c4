"""Text in, text out: continue a batch of prompts with a tokenizer (any object with encode, decode and
eos_id, e.g. tpullm.data.load_tokenizer's), for the sample command and the end-of-training sample."""

from tpullm.errors import UserError, warn
from tpullm.inference.beam import beam_search
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams, check_sampling
from tpullm.inference.speculative import SpeculativeGenerator


def complete_texts(
    model,
    params,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    sampling: SamplingParams,
    train_length: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    draft=None,
    draft_tokens: int = 4,
    log=print,
    stream=None,
) -> list[str]:
    """Each text's continuation (decoded new tokens), all texts decoded as one batch: sampled, or with
    num_beams > 1 the best beam of a beam search (tpullm/inference/beam.py; `sampling` unused). With
    `draft` (a (model, params) pair with the target's vocabulary) by speculative decoding with
    `draft_tokens` drafts a round, logging each text's acceptance rate. `stream(piece)`, for
    one sampled text, gets the text each new token adds while decoding runs.

    A model with learned positions cannot see past its position table (model.max_length): such prompts
    keep their last tokens. RoPE models continue past their training length (`train_length`), with a warning.
    """
    check_sampling(sampling.temperature, sampling.top_k, sampling.top_p, max_new_tokens, sampling.min_p)
    prompts = [tokenizer.encode(text) for text in texts]
    if not all(prompts):
        raise UserError("a prompt is empty: give at least one token to condition on")
    cfg = model.config
    if cfg.positions == "learned":
        table = cfg.max_length - (draft_tokens if draft else 0)  # drafts take positions past the last kept token
        if max_new_tokens >= table:
            raise UserError(
                f"max_new_tokens={max_new_tokens} must be below the model's learned position table "
                f"(model.max_length={cfg.max_length}{f' less {draft_tokens} draft tokens' if draft else ''})"
            )
        keep = table - max_new_tokens
        if any(len(p) > keep for p in prompts):
            warn(
                f"prompts longer than {keep} tokens keep their last {keep}: the model has {cfg.max_length} "
                f"learned positions and max_new_tokens={max_new_tokens}"
            )
            prompts = [p[-keep:] for p in prompts]
    max_length = max(len(p) for p in prompts) + max_new_tokens
    if max_length > train_length:
        warn(f"prompt and generated tokens reach {max_length} tokens, beyond the training length {train_length}")
    if draft:
        speculative = SpeculativeGenerator(model, params, *draft, max_length=max_length, k=draft_tokens)
        result = speculative.generate(prompts, max_new_tokens, sampling, tokenizer.eos_id)
        for i, rate in enumerate(result.acceptance_rates):
            log(f"text {i}: speculative decoding accepted {rate:.1%} of the draft's tokens")
        return [tokenizer.decode(c.tokens) for c in result.completions]
    generator = Generator(model, params, max_length=max_length)
    if num_beams > 1:
        beams = beam_search(generator, prompts, max_new_tokens, num_beams, length_penalty, eos_id=tokenizer.eos_id)
        return [tokenizer.decode(best.tokens) for best, *_ in beams]
    on_token = None
    if stream is not None:
        if len(prompts) != 1 or draft or num_beams > 1:
            raise UserError("streaming shows one sampled text: give one prompt, no draft and no beams")
        on_token = streamer(tokenizer, stream)
    completions = generator.generate(prompts, max_new_tokens, sampling, eos_id=tokenizer.eos_id, on_token=on_token)
    return [tokenizer.decode(c.tokens) for c in completions]


def streamer(tokenizer, write):
    """An on_token for one row that calls write(piece) with the text each new token adds; a piece that
    ends inside a multi-byte character (decoded as U+FFFD) waits for the token that completes it."""
    tokens, shown = [], [0]

    def on_token(row, token):
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):
            write(text[shown[0] :])
            shown[0] = len(text)

    return on_token
