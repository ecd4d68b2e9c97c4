"""Data: tokenizers, sources, preprocessing, and the grain input pipeline.

- `load_tokenizer("bytes" | "x.model")`; `python -m tpullm.data.tokenizer train ...`
- `python -m tpullm.data.prepare ...`: corpus -> deduplicated, filtered ArrayRecord token shards
- `DataSources(config.data, tokenizer)` and `make_pipeline(...)`: the training batches of one
  process (grain: shuffle, per-process share, mixture, packing, prefetch workers), checkpointable
  with `get_state`/`set_state`; `DataSources.validation_rows` for evaluation.
- `synthetic.random_packed_batch(...)`: random documents packed like a training batch, for tests and
  benchmarks
"""

from __future__ import annotations

from tpullm.data.corpus import python_stdlib_files
from tpullm.data.packing import PackedRows, pack_documents, unigram_entropy

__all__ = [
    "ByteTokenizer",
    "DataSources",
    "PackedRows",
    "Pipeline",
    "SentencePieceTokenizer",
    "default_num_workers",
    "load_tokenizer",
    "make_pipeline",
    "pack_documents",
    "python_stdlib_files",
    "unigram_entropy",
]

# Loaded on first use: the pipeline imports grain and jax (seconds), and `python -m
# tpullm.data.tokenizer` must not find its own module imported already by this package.
_LAZY = {
    "ByteTokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "DataSources": "pipeline",
    "Pipeline": "pipeline",
    "default_num_workers": "pipeline",
    "make_pipeline": "pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tpullm.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
