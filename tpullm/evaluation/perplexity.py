"""Perplexity and bits per byte of held-out documents.

Every token of every document is scored once (rolling windows of the scorer's length, each document
after the eos id, as the harness scores whole texts), so the numbers depend only on the documents and
the window length, never on batch size or how documents share rows. Bits per byte divide the summed
negative log-likelihood (in bits) by the documents' UTF-8 bytes, which compares models with
different tokenizers.
"""

from __future__ import annotations

import math

import numpy as np

from tpullm.data import sources
from tpullm.evaluation.scoring import Scorer


def held_out_documents(path: str, tokenizer, val_fraction: float | None, max_documents: int = 0) -> list[list[int]]:
    """Token ids of a source's documents (any source the data pipeline reads): its validation split by the
    pipeline's rule when val_fraction is given (the documents a run with that fraction never trained on),
    else all of them; the first max_documents (0: all)."""
    source = sources.open_source(sources.parse_spec(path), tokenizer)
    indices = sources.split_indices(source, val_fraction)[1] if val_fraction else np.arange(len(source))
    if max_documents:
        indices = indices[:max_documents]
    return [source.tokens(int(i), tokenizer).tolist() for i in indices]


def perplexity(scorer: Scorer, tokenizer, documents: list[list[int]]) -> dict:
    """{documents, tokens, bytes, nll (nats per token), perplexity, bits_per_byte} over `documents`."""
    documents = [d for d in documents if d]
    if not documents:
        raise ValueError("no non-empty documents to score")
    total = -sum(scorer.rolling(documents, tokenizer.eos_id))  # nats
    tokens = sum(len(d) for d in documents)
    n_bytes = sum(len(tokenizer.decode(d).encode("utf-8")) for d in documents)
    return dict(
        documents=len(documents),
        tokens=tokens,
        bytes=n_bytes,
        nll=total / tokens,
        perplexity=math.exp(total / tokens),
        bits_per_byte=total / math.log(2) / n_bytes,
    )
