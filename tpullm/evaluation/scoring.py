"""Log-likelihood scoring of (context, continuation) requests, packed many to a row.

    scorer = Scorer(model, params, length=512)
    scores = scorer.score([(context_ids, continuation_ids), ...])   # [Score(logprob, greedy), ...]
    totals = scorer.rolling([doc_ids, ...], prefix_id=eos)          # whole documents' log-likelihoods

The model runs as the decoder does for generation (the plain layer scan, dropless experts), so a
request's score does not depend on which requests share its row or batch. Rows go through one
compiled function in batches of `batch_rows`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tpullm.errors import UserError
from tpullm.evaluation.requests import pack, rolling_windows, truncated
from tpullm.inference.generate import decoding_model
from tpullm.models.transformer import Decoder


@dataclasses.dataclass(frozen=True)
class Score:
    """A continuation's summed log-probability, and whether every token was the model's argmax."""

    logprob: float
    greedy: bool


class Scorer:
    def __init__(self, model: Decoder, params, length: int, batch_rows: int = 8):
        self.model, self.params = decoding_model(model, params)
        self.length, self.batch_rows = length, batch_rows
        self._run = jax.jit(self._token_scores)

    def _token_scores(self, params, tokens, targets, segment_ids, positions):
        """Each position's log-probability of its target and whether it is the argmax: [rows, length] twice."""
        logits = self.model.apply({"params": params}, tokens, segment_ids=segment_ids, positions=positions)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))  # [rows, length, vocab]
        target = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        return target, jnp.argmax(logprobs, axis=-1) == targets

    def score(self, requests: list[tuple[list[int], list[int]]], one_per_row: bool = False) -> list[Score]:
        """Scores every request (contexts longer than the rows lose their oldest tokens; see `truncated`).
        `one_per_row` gives each request a row of its own (the unpacked baseline; same scores)."""
        if not requests:
            return []
        rows = pack([truncated(c, x, self.length) for c, x in requests], self.length, one_per_row)
        vocab = self.model.config.vocab_size
        if rows.tokens.max() >= vocab or rows.targets.max() >= vocab or min(rows.tokens.min(), rows.targets.min()) < 0:
            raise UserError(
                f"token ids outside the model's vocabulary of {vocab}: the tokenizer does not match the model"
            )
        n = len(rows.tokens)
        padded = -(-n // self.batch_rows) * self.batch_rows
        arrays = [np.pad(a, [(0, padded - n), (0, 0)]) for a in (rows.tokens, rows.targets)]
        arrays += [np.pad(a, [(0, padded - n), (0, 0)]) for a in (rows.segment_ids, rows.positions)]
        logprob, greedy = [], []
        for start in range(0, padded, self.batch_rows):
            batch = [a[start : start + self.batch_rows] for a in arrays]
            lp, g = jax.device_get(self._run(self.params, *batch))
            logprob.append(lp)
            greedy.append(g)
        logprob, greedy = np.concatenate(logprob), np.concatenate(greedy)
        return [
            Score(float(logprob[r, a:b].astype(np.float64).sum()), bool(greedy[r, a:b].all())) for r, a, b in rows.spans
        ]

    def rolling(self, documents: list[list[int]], prefix_id: int) -> list[float]:
        """Each document's total log-likelihood, every token scored once (`rolling_windows`)."""
        windows = [rolling_windows(doc, prefix_id, self.length) for doc in documents]
        scores = self.score([w for doc in windows for w in doc])
        totals, at = [], 0
        for doc in windows:
            totals.append(sum(s.logprob for s in scores[at : at + len(doc)]))
            at += len(doc)
        return totals
