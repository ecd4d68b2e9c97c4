"""Mixing sources by weight, and accounting for what each one contributed.

Weights are shares of training *tokens*, as in LLaMA's data table (CommonCrawl 67%, C4 15%, ...).
grain mixes *documents*, so a source of long documents gets a document weight of
weight / mean document length: each source then supplies about `weight` of the tokens, however
long its documents are.

Every document travels through the pipeline with a key (source, epoch, index) in one int64, so
the batches say which documents they started (for the effective epochs of each source, and for
tests that check no document repeats within an epoch) without a side channel from the worker
processes.
"""

from __future__ import annotations

import numpy as np

SOURCE_BITS, EPOCH_BITS, DOC_BITS = 7, 20, 36  # 128 sources, 1M epochs, 68G documents per source
_DOC_MASK = (1 << DOC_BITS) - 1
_EPOCH_MASK = (1 << EPOCH_BITS) - 1


def document_key(source: int, epoch: int, doc: int) -> int:
    """One int64 (non-negative) naming document `doc` of `source` in its `epoch`-th pass."""
    if not (0 <= source < 1 << SOURCE_BITS and 0 <= epoch < 1 << EPOCH_BITS and 0 <= doc < 1 << DOC_BITS):
        raise ValueError(f"document key out of range: source {source}, epoch {epoch}, document {doc}")
    return (source << (EPOCH_BITS + DOC_BITS)) | (epoch << DOC_BITS) | doc


def decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, epoch, doc) arrays of document keys [n] int64."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys >> (EPOCH_BITS + DOC_BITS), (keys >> DOC_BITS) & _EPOCH_MASK, keys & _DOC_MASK


def document_weights(token_weights: list[float], mean_tokens: list[float]) -> list[float]:
    """Per-document mixing weights [n_sources] that give each source `token_weights` (normalized)
    of the tokens, for sources whose documents average `mean_tokens` tokens."""
    total = sum(token_weights)
    weights = [w / total / max(m, 1.0) for w, m in zip(token_weights, mean_tokens)]
    # grain turns weights into integers scaled so the smallest is 100: keep them comparable.
    top = max(weights)
    return [w / top for w in weights]


class Accounting:
    """Documents started and tokens delivered per source, in this process; checkpointed with
    the iterator so a resumed run keeps counting where it stopped."""

    def __init__(self, names: list[str], shard_documents: list[int], weights: list[float]):
        self.names = names
        self.shard_documents = shard_documents  # training documents of each source in this process
        self.weights = [w / sum(weights) for w in weights]
        self.documents = np.zeros(len(names), dtype=np.int64)
        self.tokens = np.zeros(len(names), dtype=np.int64)

    def update(self, started_keys: np.ndarray, source_tokens: np.ndarray) -> None:
        """started_keys [n] int64: documents whose first token is in the batch;
        source_tokens [n_sources] int64: loss tokens of the batch from each source."""
        self.documents += np.bincount(decode_keys(started_keys)[0], minlength=len(self.names))
        self.tokens += source_tokens

    def epochs(self) -> dict[str, float]:
        """Effective epochs per source: documents started / documents in this process's share
        (the shares are equal up to one document, so process 0 speaks for the run)."""
        return {n: float(d) / s for n, d, s in zip(self.names, self.documents, self.shard_documents)}

    def token_shares(self) -> dict[str, float]:
        total = max(int(self.tokens.sum()), 1)
        return {n: float(t) / total for n, t in zip(self.names, self.tokens)}

    def summary(self) -> str:
        shares, epochs = self.token_shares(), self.epochs()
        return "; ".join(
            f"{n}: {shares[n]:.1%} of tokens (weight {w:.1%}), {epochs[n]:.3f} epochs"
            for n, w in zip(self.names, self.weights)
        )

    def state(self) -> dict:
        return {"documents": self.documents.tolist(), "tokens": self.tokens.tolist()}

    def set_state(self, state: dict) -> None:
        self.documents = np.asarray(state["documents"], dtype=np.int64)
        self.tokens = np.asarray(state["tokens"], dtype=np.int64)
