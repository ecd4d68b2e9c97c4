"""Where documents come from: source specs, streaming readers with counts, random-access sources.

A source is named by one string, its kind told by its form:
    python_stdlib                   the interpreter's standard library (.py files)
    data/**/*.txt                   text files, one document each (any glob that is not below)
    data/*.jsonl (.json, .ndjson, .gz)   JSON lines, the document in `field`
    data/*.parquet                  Parquet files, the document in column `field`
    prepared/web (a folder with manifest.json) or shards/*.arrayrecord
                                    ArrayRecord shards of pre-tokenized documents (`prepare`)
    hf:NAME                         a Hugging Face dataset (`datasets` is imported only then)

Reading never drops anything silently: `Counts` tallies files, documents, bytes, broken UTF-8
(decoded with U+FFFD and kept), empty documents (skipped) and bad records (invalid JSON, a
missing or non-text field), each with its reason; a glob that matches nothing fails with its name.

The pipeline needs random access (a global shuffle, a per-process share), so text sources are
held in memory (`TextDocuments`); a corpus larger than memory goes
through `python -m tpullm.data.prepare` into ArrayRecord shards (`TokenShards`), read lazily.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import hashlib
import json
import os
from typing import Iterator

import numpy as np

from tpullm.data.corpus import PYTHON_STDLIB, corpus_files, decode_utf8

KINDS = ("python_stdlib", "text", "jsonl", "parquet", "arrayrecord", "hf")
MANIFEST = "manifest.json"
TOKENS_FORMAT = "tpullm.tokens.v1"  # one record = one document's token ids, little-endian `dtype`
_JSONL_EXTS = (".jsonl", ".json", ".ndjson")
_ARRAYRECORD_EXTS = (".arrayrecord", ".array_record")
_ENTRY_KEYS = ("path", "weight", "field", "kind", "hf_config", "hf_split", "hf_data_files", "max_bytes")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str  # how reports and the mixture call it
    kind: str  # one of KINDS
    path: str  # glob, folder, "python_stdlib", or the HF dataset name (without "hf:")
    weight: float = 1.0  # share of training tokens in a mixture (normalized over sources)
    field: str = "text"  # JSONL / Parquet / HF: where the document's text is
    max_bytes: int = 0  # text kinds: stop after the record that brings bytes read to this (0: all)
    hf_config: str = ""
    hf_split: str = "train"
    hf_data_files: str = ""


def _default_name(kind: str, path: str) -> str:
    if kind == "python_stdlib":
        return PYTHON_STDLIB
    if kind == "hf":
        return path.rstrip("/").split("/")[-1]
    # The last path component without glob characters, without its extensions: data/web/*.jsonl -> web.
    parts = [p for p in path.rstrip("/").split("/") if p and not any(c in p for c in "*?[")]
    return (parts[-1].split(".")[0] if parts else "corpus") or "corpus"


def detect_kind(path: str) -> str:
    if path == PYTHON_STDLIB:
        return "python_stdlib"
    if path.startswith("hf:"):
        return "hf"
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if os.path.isfile(os.path.join(expanded, MANIFEST)):
            return "arrayrecord"
        raise ValueError(
            f"{path!r} is a folder without {MANIFEST}: name files with a glob such as "
            f"'{path.rstrip('/')}/**/*.txt', or point at a folder written by tpullm.data.prepare"
        )
    stem = path.rstrip("*")  # data/*.jsonl* names .jsonl and .jsonl.gz files
    stem = stem[:-3] if stem.endswith(".gz") else stem
    if stem.endswith(_JSONL_EXTS):
        return "jsonl"
    if stem.endswith(".parquet"):
        return "parquet"
    if stem.endswith(_ARRAYRECORD_EXTS):
        return "arrayrecord"
    return "text"


def parse_spec(path: str, name: str = "", kind: str = "", **fields) -> SourceSpec:
    """The SourceSpec of a source string (see the module doc); `fields` as in SourceSpec."""
    if not path:
        raise ValueError("a data source needs a path: python_stdlib, a glob, a prepared folder or hf:NAME")
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise ValueError(f"source kind {kind!r} is not one of {KINDS}")
    if kind == "hf" and path.startswith("hf:"):
        path = path[3:]
    return SourceSpec(name=name or _default_name(kind, path), kind=kind, path=path, **fields)


def specs_from_config(data) -> list[SourceSpec]:
    """The sources of a config's `data` section, sorted by name (a config round-tripped through
    JSON may reorder keys; the mixture must not change with it).

    `data.sources` (name -> {path, weight, field, ...}) is a mixture; when empty, `data.corpus`
    is the one source.
    """
    field = data.get("text_field", "text")
    max_bytes = data.get("max_bytes", 0)
    mixture = data.get("sources", None) or {}
    if not mixture:
        return [parse_spec(data.corpus, field=field, max_bytes=max_bytes)]
    specs = []
    for name in sorted(mixture.keys()):
        entry = dict(mixture[name])
        unknown = sorted(set(entry) - set(_ENTRY_KEYS))
        if unknown or "path" not in entry:
            raise ValueError(
                f"data.sources.{name} = {entry}: every source needs a path; allowed keys are "
                f"{_ENTRY_KEYS}" + (f" (unknown: {unknown})" if unknown else "")
            )
        weight = float(entry.pop("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.sources.{name}.weight={weight} must be positive (drop the source instead)")
        entry.setdefault("field", field)
        entry.setdefault("max_bytes", max_bytes)
        specs.append(parse_spec(entry.pop("path"), name=name, weight=weight, **entry))
    return specs


class Counts:
    """What reading a source found; each record read lands in exactly one of documents, empty,
    bad (with its reason)."""

    def __init__(self):
        self.files = self.documents = self.bytes = self.broken_utf8 = self.empty = 0
        self.bad = collections.Counter()  # reason -> records

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "broken_utf8": self.broken_utf8,
            "empty": self.empty,
            "bad": dict(self.bad),
        }

    def summary(self, name: str) -> str:
        bad = "".join(f", {n} {reason}" for reason, n in sorted(self.bad.items()))
        return (
            f"{name}: {self.files} files, {self.documents} documents, {self.bytes / 1e6:.1f} MB, "
            f"{self.broken_utf8} not valid UTF-8 (replaced), {self.empty} empty (skipped){bad}"
        )


def expand_glob(pattern: str, what: str) -> list[str]:
    """Sorted files matching `pattern` (** recurses); a clear error when there are none."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(
            f"{what} {pattern!r} matches no files (use ** for subfolders; relative globs start in {os.getcwd()})"
        )
    return paths


def _keep(text: str, counts: Counts) -> bool:
    if text.strip():
        counts.documents += 1
        return True
    counts.empty += 1
    return False


def _iter_text_files(spec: SourceSpec, counts: Counts) -> Iterator[tuple[str, str]]:
    for name, path in corpus_files(spec.path):
        if spec.max_bytes and counts.bytes >= spec.max_bytes:
            return
        raw = path.read_bytes()
        counts.files += 1
        counts.bytes += len(raw)
        text, broken = decode_utf8(raw)
        counts.broken_utf8 += broken
        if _keep(text, counts):
            yield name, text


def _text_of_record(value, field: str, counts: Counts) -> str | None:
    """The text in a record's field, or None with the reason counted."""
    if value is None:
        counts.bad[f"without '{field}'"] += 1
        return None
    if isinstance(value, bytes):
        value, broken = decode_utf8(value)
        counts.broken_utf8 += broken
    if not isinstance(value, str):
        counts.bad[f"'{field}' not text"] += 1
        return None
    return value if _keep(value, counts) else None


def iter_jsonl_records(spec: SourceSpec, counts: Counts) -> Iterator[tuple[str, object]]:
    """(path:line, parsed JSON value) of every line of a JSONL source; blank lines count as empty,
    lines that do not parse as bad. The caller counts what it keeps (documents) or rejects."""
    for path in expand_glob(spec.path, "JSONL source"):
        counts.files += 1
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if spec.max_bytes and counts.bytes >= spec.max_bytes:
                    return
                counts.bytes += len(raw)
                if not raw.strip():
                    counts.empty += 1
                    continue
                line, broken = decode_utf8(raw)
                counts.broken_utf8 += broken
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    counts.bad["invalid JSON"] += 1
                    continue
                yield f"{path}:{line_no}", record


def _iter_jsonl(spec: SourceSpec, counts: Counts) -> Iterator[tuple[str, str]]:
    for name, record in iter_jsonl_records(spec, counts):
        value = record.get(spec.field) if isinstance(record, dict) else None
        text = _text_of_record(value, spec.field, counts)
        if text is not None:
            yield name, text


def _iter_parquet(spec: SourceSpec, counts: Counts) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("Parquet sources need pyarrow: pip install pyarrow") from e
    for path in expand_glob(spec.path, "Parquet source"):
        counts.files += 1
        pf = pq.ParquetFile(path)
        if spec.field not in pf.schema_arrow.names:
            raise ValueError(
                f"{path} has no column {spec.field!r} (columns: {pf.schema_arrow.names}); set the "
                f"source's field (data.text_field or data.sources.<name>.field)"
            )
        row = 0
        for batch in pf.iter_batches(columns=[spec.field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if spec.max_bytes and counts.bytes >= spec.max_bytes:
                    return
                counts.bytes += (
                    len(value.encode("utf-8"))
                    if isinstance(value, str)
                    else (len(value) if isinstance(value, bytes) else 0)
                )
                text = _text_of_record(value, spec.field, counts)
                if text is not None:
                    yield f"{path}:{row}", text
                row += 1


def _iter_hf(spec: SourceSpec, counts: Counts) -> Iterator[tuple[str, str]]:
    try:
        import datasets  # optional and heavy: imported only when a source asks for it
    except ImportError as e:
        raise ImportError(f"source hf:{spec.path} needs the Hugging Face datasets package: pip install datasets") from e
    ds = datasets.load_dataset(
        spec.path, spec.hf_config or None, split=spec.hf_split, data_files=spec.hf_data_files or None
    )
    if spec.field not in ds.column_names:
        raise ValueError(
            f"hf:{spec.path} has no column {spec.field!r} (columns: {ds.column_names}); set the source's field"
        )
    counts.files += 1
    row = 0
    for batch in ds.select_columns([spec.field]).iter(batch_size=1024):
        for value in batch[spec.field]:
            if spec.max_bytes and counts.bytes >= spec.max_bytes:
                return
            counts.bytes += len(value.encode("utf-8")) if isinstance(value, str) else 0
            text = _text_of_record(value, spec.field, counts)
            if text is not None:
                yield f"hf:{spec.path}:{spec.hf_split}:{row}", text
            row += 1


def iter_texts(spec: SourceSpec, counts: Counts) -> Iterator[tuple[str, str]]:
    """(document name, text) of every document of a text source, streaming, in a fixed order."""
    readers = {
        "python_stdlib": _iter_text_files,
        "text": _iter_text_files,
        "jsonl": _iter_jsonl,
        "parquet": _iter_parquet,
        "hf": _iter_hf,
    }
    if spec.kind not in readers:
        raise ValueError(f"source {spec.name} ({spec.kind}) holds token ids, not text")
    return readers[spec.kind](spec, counts)


# --------------------------------------------------------------------------- random access


def unit_hash(name: str) -> float:
    """A hash of `name` in [0, 1), the same in every process (Python's hash() is salted)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _unit_hash_indices(key: str, n: int) -> np.ndarray:
    """[n] floats in [0, 1): a hash of (key, i) for i < n, vectorized (splitmix64), the same on
    every machine. Splits millions of pre-tokenized records in milliseconds."""
    base = np.uint64(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    with np.errstate(over="ignore"):
        z = base + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


class TextDocuments:
    """A text source read into memory: documents by index, tokenized on access."""

    def __init__(self, spec: SourceSpec, names: list[str], texts: list[str], counts: Counts):
        self.spec, self.names, self.texts, self.counts = spec, names, texts, counts

    def __len__(self) -> int:
        return len(self.texts)

    def tokens(self, i: int, tokenizer) -> np.ndarray:
        """Token ids [n] int32 of document i, without specials."""
        return tokenizer.encode_array(self.texts[i])

    def unit_hashes(self) -> np.ndarray:
        """[n] floats in [0, 1) from each document's name, for the train/val split: a document
        keeps its side when files are added or max_bytes changes."""
        return np.array([unit_hash(n) for n in self.names], dtype=np.float64)

    def describe(self) -> str:
        return self.counts.summary(self.spec.name)


class TokenShards:
    """ArrayRecord shards of token ids, one document per record, opened lazily (in each worker)."""

    def __init__(self, spec: SourceSpec, tokenizer):
        if os.path.isdir(os.path.expanduser(spec.path)):
            folder = os.path.expanduser(spec.path)
            with open(os.path.join(folder, MANIFEST)) as f:
                self.manifest = json.load(f)
            self.paths = [os.path.join(folder, s["path"]) for s in self.manifest["shards"]]
        else:  # bare shards (written by another tool): int32 ids unless told otherwise
            self.paths = expand_glob(spec.path, "ArrayRecord source")
            self.manifest = {"format": TOKENS_FORMAT, "dtype": "int32", "tokenizer": None}
        if self.manifest.get("format") != TOKENS_FORMAT:
            raise ValueError(f"{spec.path}: format {self.manifest.get('format')!r} is not {TOKENS_FORMAT!r}")
        made_with = self.manifest.get("tokenizer")
        if made_with and made_with["fingerprint"] != tokenizer.fingerprint:
            raise ValueError(
                f"source {spec.name} ({spec.path}) was tokenized with {made_with['name']} "
                f"({made_with['fingerprint']}), "
                f"but data.tokenizer is {tokenizer.fingerprint}: set data.tokenizer={made_with['name']!r} or "
                f"re-run tpullm.data.prepare with this tokenizer"
            )
        self.spec = spec
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._reader = None
        shards = self.manifest.get("shards")
        self._lengths = (
            [int(s["documents"]) for s in shards] if shards else [len(self._open_shard(p)) for p in self.paths]
        )
        self._starts = np.cumsum([0] + self._lengths)  # [shards + 1] first global index of each shard

    @staticmethod
    def _open_shard(path):
        import grain  # array_record's reader, with grain's random-access interface

        return grain.sources.ArrayRecordDataSource([path])

    def __getstate__(self):  # readers hold file handles; workers reopen them
        return {k: v for k, v in self.__dict__.items() if k != "_reader"} | {"_reader": None}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def tokens(self, i: int, tokenizer=None) -> np.ndarray:
        if self._reader is None:
            import grain

            self._reader = grain.sources.ArrayRecordDataSource(self.paths)
        ids = np.frombuffer(self._reader[i], dtype=self.dtype).astype(np.int32)
        if ids.size == 0:
            raise ValueError(f"record {i} of {self.spec.path} is empty; documents must have at least one token")
        return ids

    def unit_hashes(self) -> np.ndarray:
        return np.concatenate([_unit_hash_indices(os.path.basename(p), n) for p, n in zip(self.paths, self._lengths)])

    def mean_tokens(self) -> float | None:
        docs, tokens = self.manifest.get("documents"), self.manifest.get("tokens")
        return tokens / docs if docs and tokens else None

    def describe(self) -> str:
        return f"{self.spec.name}: {len(self.paths)} ArrayRecord shards, {len(self):,} documents" + (
            f", {self.manifest['tokens']:,} tokens" if self.manifest.get("tokens") else ""
        )


def open_source(spec: SourceSpec, tokenizer) -> TextDocuments | TokenShards:
    """A random-access source: text sources are read into memory (with their Counts)."""
    if spec.kind == "arrayrecord":
        return TokenShards(spec, tokenizer)
    counts = Counts()
    names, texts = [], []
    for name, text in iter_texts(spec, counts):
        names.append(name)
        texts.append(text)
    if not texts:
        raise ValueError(f"source {spec.name} ({spec.path}) has no documents: {counts.summary(spec.name)}")
    return TextDocuments(spec, names, texts, counts)


def split_indices(source, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices of a source, the one train/validation split rule: a document
    is held out when the hash of its name (`unit_hashes`) is below val_fraction. If that leaves
    validation empty while val_fraction > 0 (tiny sources), the last training document moves
    over, as long as training keeps one."""
    hashes = source.unit_hashes()
    held_out = hashes < val_fraction
    train, val = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    if val_fraction > 0 and val.size == 0 and train.size > 1:
        train, val = train[:-1], train[-1:]
    return train, val
