"""The grain input pipeline: sources -> per-process share -> shuffle -> mix -> tokenize -> pack -> batch.

    sources = DataSources(config.data, tokenizer)
    batches = make_pipeline(config.data, tokenizer, batch_size_per_process, seed, jax.process_index(),
                            jax.process_count(), sources=sources)
    batch = next(batches)      # FIELDS -> [batch_size_per_process, seq_len] numpy arrays
    state = batches.get_state()  # JSON; batches.set_state(state) resumes exactly there
    batches.epochs()           # {source: effective epochs so far}

Per source (all grain MapDatasets, so any element is computed from its index alone):
  training document indices (hash split, `sources.split_indices`) -> this process's share
  [process_index::process_count] -> an endless stream of (source, epoch, document), each epoch
  a new permutation of the share (`EpochShuffle`). Sources are then mixed (`MapDataset.mix`,
  weights per document from the token weights, see mixture.py), tokenized (`DocumentToExample`),
  packed into rows (`ConcatThenSplitIterDataset`; SFT examples whole, `FirstFitPackIterDataset`),
  shuffled within windows of rows (`RowShuffleIterDataset`), batched and turned into training fields (`PackedToBatch`);
  `mp_prefetch` runs all of it in worker processes when the machine has cores to spare.

Guarantees (tests/test_data_pipeline.py checks them):
  - Within an epoch of a source, each process sees each document of its share once, and the
    shares of the processes partition the source: across all processes, no document repeats
    and none is lost. No token is lost to packing (documents continue into the next row).
  - The batches depend only on (config, seed, process_index, process_count, num_workers): a run
    restored with `set_state` after step k sees exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import atexit
import json
import os
import weakref

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from tpullm.data.chat import open_examples as open_chat
from tpullm.data.mixture import Accounting, document_weights
from tpullm.data.packing import (
    FIELDS,
    KEY,
    PACKED,
    DocumentToExample,
    PackedRows,
    PackedToBatch,
    document_example,
    pack_examples,
    unigram_entropy,
)
from tpullm.data.preference import open_pairs
from tpullm.data.shuffle import EpochShuffle, RowShuffleIterDataset
from tpullm.data.sources import TokenShards, open_source, specs_from_config, split_indices

STATE_VERSION = 1
# SFT examples are packed whole by first fit into this many rows at a time: more rows leave less
# padding (each row is emitted when an example fits none of them) at a little memory.
PACKING_BINS = 16


def default_num_workers() -> int:
    """Prefetch processes for this machine: none below 8 cores (the training step needs them, and
    the main process alone delivers 0.5M tokens/s with sentencepiece, millions with bytes: far more
    than a small host's step consumes; see benchmarks/input_pipeline.py), then one per 8 cores,
    at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores < 8 else min(16, cores // 8)


def _ensure_absl_flags_parsed():
    """grain reads absl flags when iterating; outside an absl app (tests, notebooks) they are not
    parsed yet, which would raise, so mark them parsed (keeping their defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class DataSources:
    """The opened sources of a config with their train/val split; open once per process and
    share between the pipeline, validation rows and the entropy baseline."""

    def __init__(self, data_config, tokenizer):
        self.specs = specs_from_config(data_config)
        self.val_fraction = data_config.get("val_fraction", 0.0)
        self.add_bos = bool(data_config.get("add_bos", False))
        self.format = data_config.get("format", "text")
        self.chat_template = data_config.get("chat_template", "chatml") if self.format != "text" else ""
        self.tokenizer = tokenizer
        open_examples = {"text": None, "preference": open_pairs}.get(self.format, open_chat)
        self.sources = [
            open_examples(spec, data_config, tokenizer) if open_examples else open_source(spec, tokenizer)
            for spec in self.specs
        ]
        self.train_ids, self.val_ids = zip(*(split_indices(s, self.val_fraction) for s in self.sources))
        for spec, ids in zip(self.specs, self.train_ids):
            if ids.size == 0:
                raise ValueError(
                    f"source {spec.name} has no training documents left after holding out "
                    f"data.val_fraction={self.val_fraction}"
                )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def describe(self) -> list[str]:
        """One line per source: what reading found, and the split."""
        return [
            f"{src.describe()}; {tr.size} train / {va.size} validation documents"
            for src, tr, va in zip(self.sources, self.train_ids, self.val_ids)
        ]

    def _example(self, k: int, i: int) -> np.ndarray:
        """[n, 4] (input, target, offset, loss mask) of document i of source k, as the pipeline packs it."""
        src = self.sources[k]
        if hasattr(src, "example"):
            return src.example(int(i))
        ids = src.tokens(int(i), self.tokenizer)
        return document_example(ids, self.tokenizer.eos_id, self.tokenizer.bos_id, self.add_bos)

    def mean_tokens(self, k: int, sample: int = 64) -> float:
        """Mean tokens per training document of source k (exact for prepared shards with a
        manifest, else over up to `sample` evenly spaced documents)."""
        src = self.sources[k]
        if isinstance(src, TokenShards) and src.mean_tokens():
            return src.mean_tokens()
        ids = self.train_ids[k]
        picks = ids[np.linspace(0, ids.size - 1, min(sample, ids.size)).astype(int)]
        return float(np.mean([self._example(k, i).shape[0] for i in picks]))

    def validation_rows(self, seq_len: int, max_rows: int = 0) -> PackedRows:
        """The validation documents packed into rows, the same every time: one document of each
        source in turn (so a capped set still samples every source), with max_rows > 0 stopping
        once that many rows are filled. SFT examples are packed whole, as in training."""
        examples, total = [], 0
        for j in range(max(ids.size for ids in self.val_ids)):
            for k, ids in enumerate(self.val_ids):
                if j < ids.size and not (max_rows and total >= max_rows * seq_len):
                    examples.append(self._example(k, ids[j]))
                    total += examples[-1].shape[0]
        rows = pack_examples(examples, seq_len, self.tokenizer.pad_id, split=self.format == "text")
        return PackedRows(**{f: getattr(rows, f)[: max_rows or None] for f in FIELDS})

    def unigram_entropy(self, max_tokens: int = 20_000_000) -> float:
        """Entropy (nats/token) of the trained targets' frequencies (eos ends each document), over
        the first max_tokens tokens of each source in order: the loss of a context-free model."""
        targets = []
        for k, ids in enumerate(self.train_ids):
            total = 0
            for i in ids:
                if total >= max_tokens:
                    break
                example = self._example(k, i)
                targets.append(example[example[:, 3] > 0, 1])
                total += example.shape[0]
        return unigram_entropy(targets)


def make_pipeline(
    data_config,
    tokenizer,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    sources: DataSources | None = None,
    num_workers: int | None = None,
    debug: bool = False,
) -> "Pipeline":
    """This process's infinite stream of training batches, each FIELDS -> [batch_size, seq_len].

    batch_size is per process (the global batch / process_count). process_index/count default
    to jax's; pass them to simulate processes in one. num_workers: prefetch processes (None:
    data.num_workers, where -1 means default_num_workers()); batches depend on it, so a resumed
    run must use the same. debug keeps per-token document_keys/document_offsets in the batches.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} (per process) must be positive")
    sources = sources or DataSources(data_config, tokenizer)
    seq_len = data_config.seq_len
    if num_workers is None:
        num_workers = data_config.get("num_workers", -1)
    if num_workers < 0:
        num_workers = default_num_workers()

    streams, shares = [], []
    for k, (spec, ids) in enumerate(zip(sources.specs, sources.train_ids)):
        share = ids[process_index::process_count]  # a strided share: balanced even when files are sorted by size
        if share.size == 0:
            raise ValueError(
                f"source {spec.name} has {ids.size} training documents, fewer than the "
                f"{process_count} processes; every process needs at least one"
            )
        # An endless stream of (source, epoch, document): each epoch a new order of the share.
        streams.append(grain.MapDataset.range(share.size).repeat(None).map_with_index(EpochShuffle(k, share, seed)))
        shares.append(int(share.size))
    weights = [spec.weight for spec in sources.specs]
    if len(streams) == 1:
        ds = streams[0]
    else:
        ds = grain.MapDataset.mix(
            streams, document_weights(weights, [sources.mean_tokens(k) for k in range(len(streams))])
        )
    ds = ds.map(DocumentToExample(sources.sources, tokenizer, sources.add_bos))
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=int(data_config.get("read_threads", 2)), prefetch_buffer_size=64)
    )
    lengths = {PACKED: seq_len, KEY: seq_len}
    if sources.format == "text":
        it = ConcatThenSplitIterDataset(it, length_struct=lengths, meta_features=(KEY,))
    else:  # SFT examples whole, several to a row (data/chat.py drops those longer than a row)
        it = FirstFitPackIterDataset(
            it, length_struct=lengths, num_packing_bins=PACKING_BINS, shuffle_bins=False, meta_features=(KEY,)
        )
    window = int(data_config.get("shuffle_window_tokens", 1 << 20)) // seq_len  # rows
    if window > 1:
        # Consecutive rows come from the same few documents when documents are long (a stdlib
        # file is ~60 rows of 256), so a batch would be one or two documents: shuffle rows within
        # windows. Sized in tokens, the window holds the same memory (~20 bytes a token) and takes
        # the same time to fill (first batch, and replay on restore) whatever seq_len is; the
        # README's Data section gives the measured effect of the window size.
        it = RowShuffleIterDataset(it, window, seed)
    it = it.batch(batch_size, drop_remainder=True)
    it = it.map(PackedToBatch(tokenizer.pad_id, len(streams), debug))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))

    fingerprint = {
        "sources": [[s.name, s.kind, s.path, n, s.weight] for s, n in zip(sources.specs, shares)],
        "tokenizer": tokenizer.fingerprint,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "process_index": process_index,
        "process_count": process_count,
        "num_workers": num_workers,
        "add_bos": sources.add_bos,
        "val_fraction": sources.val_fraction,
        "shuffle_window_rows": window,
    }
    if sources.format != "text":  # only then, so the fingerprints of pre-training runs stay as they were
        fingerprint |= {"format": sources.format, "chat_template": sources.chat_template}
    return Pipeline(it, Accounting(sources.names, shares, weights), fingerprint)


def _to_json(x):
    """grain states hold tuples, which JSON would turn into lists that ConcatThenSplit's
    set_state then misreads (it compares slices with a tuple); tag them to restore them exactly."""
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_json(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _from_json(x):
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_from_json(v) for v in x["__tuple__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


# Pipelines still open at exit are closed then, so worker processes stop with the run.
_OPEN: "weakref.WeakSet[Pipeline]" = weakref.WeakSet()
atexit.register(lambda: [p.close() for p in list(_OPEN)])


class Pipeline(grain.DatasetIterator):
    """The training batch iterator; a grain DatasetIterator, so orbax can also checkpoint it
    per process through `grain.checkpoint.CheckpointSave`/`CheckpointRestore`."""

    def __init__(self, dataset, accounting: Accounting, fingerprint: dict):
        _ensure_absl_flags_parsed()
        iterator = iter(dataset)
        super().__init__(iterator)
        self._iterator = iterator
        self.accounting = accounting
        self.fingerprint = fingerprint
        self.step = 0  # batches handed out
        self.last_documents = np.zeros(0, np.int64)  # keys of the documents the last batch started
        _OPEN.add(self)

    @property
    def num_workers(self) -> int:
        return self.fingerprint["num_workers"]

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise ValueError("this data pipeline was closed; make a new one (make_pipeline)")
        # Plain arrays: with several workers grain hands out shared-memory arrays, whose segments
        # stay allocated while anything refers to them.
        batch = {k: np.array(v) for k, v in next(self._iterator).items()}
        self.last_documents = batch.pop("_documents")
        self.accounting.update(self.last_documents, batch.pop("_source_tokens"))
        self.step += 1
        return batch

    def skip(self, steps: int) -> None:
        """Advances `steps` batches (to resume a checkpoint saved without iterator state)."""
        for _ in range(steps):
            next(self)

    def epochs(self) -> dict[str, float]:
        """Effective epochs of each source so far, in this process's share."""
        return self.accounting.epochs()

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "fingerprint": self.fingerprint,
            "accounting": self.accounting.state(),
            "grain": _to_json(self._iterator.get_state()),
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} is not {STATE_VERSION}")
        saved = json.loads(json.dumps(state["fingerprint"]))
        now = json.loads(json.dumps(self.fingerprint))
        if saved != now:
            diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
            raise ValueError(
                "the checkpoint's data iterator was built differently, so its batches would not continue the "
                f"run's: {', '.join(f'{k} was {a!r}, is now {b!r}' for k, (a, b) in diff.items())}. Restore with "
                "the same data config, batch size, seed, process count and data.num_workers, or start the data "
                "iterator afresh with skip(step) (same batches only if nothing above changed)"
            )
        self._iterator.set_state(_from_json(state["grain"]))
        self.accounting.set_state(state["accounting"])
        self.step = state["step"]

    def close(self) -> None:
        """Stops the worker processes; idempotent. Dropping grain's iterators here, while the
        interpreter is intact, keeps their own finalizers from failing at exit."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
            self._parents = ()
