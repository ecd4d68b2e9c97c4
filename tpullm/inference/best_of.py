"""Best-of-N: sample n continuations of every prompt in one batch and keep each prompt's most likely one,
by mean log-probability per token (the default: a sum favours short continuations) or by the total."""

from tpullm.errors import UserError
from tpullm.inference.generate import Completion, Generator
from tpullm.inference.sampling import SamplingParams


def mean_logprob(completion: Completion) -> float:
    return sum(completion.logprobs) / max(len(completion.logprobs), 1)


def total_logprob(completion: Completion) -> float:
    return sum(completion.logprobs)


def best_of(
    generator: Generator,
    prompts: list[list[int]],
    n: int,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_id: int | None = None,
    stop_ids=(),
    length_normalize: bool = True,
) -> list[Completion]:
    """One completion per prompt: the best of its n samples (rows i*n .. i*n+n-1 of one batch), by mean
    log-probability per token, or by the total with length_normalize=False."""
    if n < 1:
        raise UserError(f"n={n} must be >= 1")
    candidates = generator.generate([p for p in prompts for _ in range(n)], max_new_tokens, sampling, eos_id, stop_ids)
    score = mean_logprob if length_normalize else total_logprob
    return [max(candidates[i * n : (i + 1) * n], key=score) for i in range(len(prompts))]
