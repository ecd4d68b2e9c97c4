"""Tokenize sources into ArrayRecord shards, dropping exact duplicates and low-quality documents.

    python -m tpullm.data.prepare --input=web=/data/cc/*.jsonl --input=code=python_stdlib \
        --tokenizer=/data/tok.model --out=/data/prepared --shards=8

writes, for each input NAME=SOURCE (NAME defaults to the source's folder or file name):
    /data/prepared/NAME/shard-00000-of-00008.arrayrecord ...   one record per kept document: its
                                                               token ids, little-endian uint16
                                                               (int32 when the vocab needs it)
    /data/prepared/NAME/manifest.json                          tokenizer, shards, and the report
and prints what it kept, dropped and why, per source. Point the pipeline at the folders:
    data.corpus = "/data/prepared/web"   or   data.sources = {"web": {"path": ..., "weight": 0.8}, ...}

Documents are tokenized by a pool of processes (all cores by default); deduplication happens in
the main process in input order (the first copy is kept, also across inputs), so the output is the
same for any number of workers. A document is dropped, and counted under its reason, when it has
fewer than --min_chars characters, more than --max_chars (0: no limit), or more than --max_non_text
of control characters and U+FFFD replacements (binary files, mojibake). Broken UTF-8 is kept with
replacements and counted; unreadable records (bad JSON, missing field) and empty documents are
counted by the reader (sources.Counts).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import re
import time
from typing import Iterator, Sequence

import numpy as np

from tpullm.data.sources import MANIFEST, TOKENS_FORMAT, Counts, SourceSpec, expand_glob, iter_texts, parse_spec
from tpullm.data.tokenizer import load_tokenizer

# Control characters other than tab/newline/carriage return, C1 controls, and the replacement
# character that decoding broken UTF-8 leaves: what binary data and mojibake are made of.
_NON_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ufffe\uffff]")
_CHUNK_BYTES = 1 << 20  # documents sent to a worker at a time (~1 MB of text)


@dataclasses.dataclass(frozen=True)
class Filters:
    min_chars: int = 32
    max_chars: int = 0  # 0: no limit
    max_non_text: float = 0.1  # share of characters

    def reason(self, text: str) -> str | None:
        """Why `text` is dropped, or None to keep it."""
        n = len(text)
        if n < self.min_chars:
            return f"shorter than {self.min_chars} chars"
        if self.max_chars and n > self.max_chars:
            return f"longer than {self.max_chars} chars"
        if len(_NON_TEXT.findall(text)) > self.max_non_text * n:
            return f"over {self.max_non_text:.0%} non-text chars"
        return None


# --------------------------------------------------------------------------- worker side

_worker: dict = {}


def _init_worker(tokenizer_name: str, filters: Filters) -> None:
    _worker["tokenizer"] = load_tokenizer(tokenizer_name)
    _worker["filters"] = filters


def _process_chunk(texts: Sequence[str]) -> list[tuple[str | None, bytes, np.ndarray | None]]:
    """(drop reason or None, 16-byte digest of the text, token ids [n] int32 or None) per text."""
    filters, tokenizer = _worker["filters"], _worker["tokenizer"]
    reasons = [filters.reason(t) for t in texts]
    kept = [t for t, r in zip(texts, reasons) if r is None]
    encoded = iter(tokenizer.encode_batch(kept))
    return [
        (
            r,
            hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
            next(encoded) if r is None else None,
        )
        for t, r in zip(texts, reasons)
    ]


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- main side


@dataclasses.dataclass
class SourceResult:
    name: str
    spec: str
    read: Counts
    kept: int = 0
    tokens: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def lines(self) -> list[str]:
        dropped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        mean = self.tokens / self.kept if self.kept else 0
        return [
            f"{self.name} ({self.spec})",
            f"  read:    {self.read.summary(self.name).split(': ', 1)[1]}",
            f"  kept:    {self.kept:,} documents, {self.tokens:,} tokens ({mean:,.0f} per document)",
            f"  dropped: {dropped}",
        ]


class _ShardWriter:
    """Round-robin over `shards` ArrayRecord files, so every shard gets a fair slice of the input."""

    def __init__(self, folder: str, shards: int, dtype: np.dtype):
        from array_record.python.array_record_module import ArrayRecordWriter

        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, "shard-*.arrayrecord")):
            os.remove(stale)
        self.names = [f"shard-{i:05d}-of-{shards:05d}.arrayrecord" for i in range(shards)]
        # group_size 1: each record readable on its own (the pipeline reads documents at random).
        self.writers = [ArrayRecordWriter(os.path.join(folder, n), "group_size:1") for n in self.names]
        self.documents = [0] * shards
        self.tokens = [0] * shards
        self.dtype = dtype
        self.count = 0

    def write(self, ids: np.ndarray) -> None:
        i = self.count % len(self.writers)
        self.writers[i].write(ids.astype(self.dtype).tobytes())
        self.documents[i] += 1
        self.tokens[i] += int(ids.size)
        self.count += 1

    def close(self) -> list[dict]:
        for w in self.writers:
            w.close()
        return [{"path": n, "documents": d, "tokens": t} for n, d, t in zip(self.names, self.documents, self.tokens)]


def prepare(
    specs: Sequence[SourceSpec],
    tokenizer_name: str,
    out: str,
    shards: int = 4,
    workers: int = 0,
    filters: Filters = Filters(),
    log=print,
) -> list[SourceResult]:
    """Writes out/NAME/ shards and manifest for each spec; returns what happened to each."""
    if shards <= 0:
        raise ValueError(f"shards={shards} must be positive")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"input names {names} repeat; name them with --input=NAME=SOURCE")
    for spec in specs:  # fail on a missing input before any worker starts or any file is written
        if spec.kind == "arrayrecord":
            raise ValueError(f"input {spec.name} ({spec.path}) is already tokenized; prepare reads text sources")
        if spec.kind in ("text", "jsonl", "parquet"):
            expand_glob(spec.path, f"input {spec.name}")
    tokenizer = load_tokenizer(tokenizer_name)
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<i4")
    workers = workers or os.cpu_count() or 1
    pool = (
        multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_name, filters))
        if workers > 1
        else None
    )
    if pool is None:
        _init_worker(tokenizer_name, filters)
    seen: set[bytes] = set()
    results = []
    try:
        for spec in specs:
            start = time.perf_counter()
            result = SourceResult(spec.name, spec.path, Counts())
            writer = _ShardWriter(os.path.join(out, spec.name), shards, dtype)
            chunks = _chunks(text for _, text in iter_texts(spec, result.read))
            outputs = pool.imap(_process_chunk, chunks) if pool else map(_process_chunk, chunks)
            for chunk in outputs:
                for reason, digest, ids in chunk:
                    if reason is None and digest in seen:
                        reason = "exact duplicates"
                    if reason is not None:
                        result.dropped[reason] += 1
                        continue
                    seen.add(digest)
                    writer.write(ids)
                    result.kept += 1
                    result.tokens += int(ids.size)
            manifest = {
                "format": TOKENS_FORMAT,
                "dtype": dtype.str,
                "documents": result.kept,
                "tokens": result.tokens,
                "tokenizer": {
                    "name": tokenizer_name,
                    "fingerprint": tokenizer.fingerprint,
                    "vocab_size": tokenizer.vocab_size,
                },
                "shards": writer.close(),
                "source": spec.path,
                "filters": dataclasses.asdict(filters),
                "read": result.read.as_dict(),
                "dropped": dict(result.dropped),
            }
            with open(os.path.join(out, spec.name, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=2)
            if result.kept == 0:
                log(f"WARNING: nothing of {spec.name} was kept")
            log(
                "\n".join(result.lines()) + f"\n  wrote {os.path.join(out, spec.name)} in "
                f"{time.perf_counter() - start:.1f}s"
            )
            results.append(result)
    finally:
        if pool:
            pool.close()
            pool.join()
    return results


def _main(argv):
    from absl import app, flags

    from tpullm.errors import check_writable

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not f.input or not f.out:
        raise app.UsageError("--input (repeatable: [NAME=]SOURCE) and --out are required")
    check_writable(f.out, "--out")
    specs = []
    for item in f.input:
        name, _, path = item.partition("=") if "=" in item.split("/")[0] else ("", "", item)
        specs.append(parse_spec(path, name=name, field=f.field))
    prepare(
        specs,
        f.tokenizer,
        f.out,
        shards=f.shards,
        workers=f.workers,
        filters=Filters(f.min_chars, f.max_chars, f.max_non_text),
    )


def main():
    from absl import flags

    from tpullm import cli

    flags.DEFINE_multi_string(
        "input", None, "[NAME=]SOURCE, repeatable: python_stdlib, a text glob, *.jsonl, *.parquet, hf:NAME."
    )
    flags.DEFINE_string("field", "text", "The text field of JSONL / Parquet / Hugging Face records.")
    flags.DEFINE_string("tokenizer", "bytes", "bytes, or the path of a sentencepiece .model.")
    flags.DEFINE_string("out", None, "Folder to write NAME/ shards and manifests into.")
    flags.DEFINE_integer("shards", 4, "ArrayRecord files per source.")
    flags.DEFINE_integer("workers", 0, "Tokenizing processes (0: all cores).")
    flags.DEFINE_integer("min_chars", Filters.min_chars, "Drop documents shorter than this.")
    flags.DEFINE_integer("max_chars", Filters.max_chars, "Drop documents longer than this (0: no limit).")
    flags.DEFINE_float(
        "max_non_text", Filters.max_non_text, "Drop documents with a larger share of control characters and U+FFFD."
    )
    cli.run(_main)


if __name__ == "__main__":
    main()
