"""Packing token documents into fixed-shape rows, and the batches a training step reads.

Convention (one row = one training sequence of `seq_len` positions):
  - A document of tokens t_0..t_{L-1} contributes L positions: inputs t_0..t_{L-1} and targets
    t_1..t_{L-1}, eos. Every position of a document has a real target, and eos is what the
    model learns to emit at a document's end (and what stops sampling). There is no bos.
  - Documents are laid end to end; a document that does not fit in the rest of a row continues
    in the next row as a new segment. Its targets are computed before the cut, so the last
    position of a row still predicts the document's next token: no token is lost to packing.
  - segment_ids number the documents inside a row 1, 2, 3...; 0 is padding. Attention must not
    cross segments (the model builds its mask from them). A new segment also starts wherever an
    example's offset is 0 again: a preference pair (data/preference.py) is one example, its
    chosen then its rejected sequence, packed whole but two segments that never see each other.
  - positions count from 0 at each segment start, so a continued document restarts at 0 at the
    row start. Positions therefore stay < seq_len (learned position tables need that), and a
    continuation cannot attend to its earlier part in the previous row anyway.
  - Only the last row has padding: pad_id tokens and targets, segment 0, position 0, loss_mask 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from tpullm.data.mixture import EPOCH_BITS, decode_keys, document_key

FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class PackedRows:
    tokens: np.ndarray  # [n_rows, seq_len] int32 inputs
    targets: np.ndarray  # [n_rows, seq_len] int32 next token of the same document
    segment_ids: np.ndarray  # [n_rows, seq_len] int32, 1.. per document in the row, 0 padding
    positions: np.ndarray  # [n_rows, seq_len] int32, 0-based within the segment
    loss_mask: np.ndarray  # [n_rows, seq_len] float32, 1 where the target is real and trained

    @property
    def n_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def __len__(self) -> int:
        return self.n_rows

    @property
    def num_target_tokens(self) -> int:
        """Positions that count in the loss (all but the last row's padding)."""
        return int(self.loss_mask.sum())

    def take(self, rows) -> dict[str, np.ndarray]:
        """The fields of `rows` (an index array or slice) as a batch dict, each [len(rows), seq_len]."""
        return {f: getattr(self, f)[rows] for f in FIELDS}


def document_example(ids: np.ndarray, eos_id: int, bos_id: int = 0, add_bos: bool = False) -> np.ndarray:
    """[n, 4] int32 (input, target, offset in the document, loss mask) of a document's ids [n]
    (without specials): inputs t_0..t_{n-1}, targets t_1..t_{n-1}, eos, every target trained;
    with add_bos, inputs bos, t_0..t_{n-1} and targets t_0..t_{n-1}, eos."""
    n = ids.size + add_bos
    example = np.empty((n, 4), dtype=np.int32)
    if add_bos:
        example[0, 0] = bos_id
        example[1:, 0] = ids
        example[:-1, 1] = ids
    else:
        example[:, 0] = ids
        example[:-1, 1] = ids[1:]
    example[-1, 1] = eos_id
    example[:, 2] = np.arange(n, dtype=np.int32)
    example[:, 3] = 1
    return example


def segments(new_segment: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions), int32 [rows, seq_len], of rows whose segments start where
    `new_segment` is set (`valid`: the non-padding positions, both [rows, seq_len] bool)."""
    segment_ids = np.cumsum(new_segment, axis=1, dtype=np.int32) * valid
    # Position = column - column where the current segment started (a running max of starts).
    cols = np.arange(new_segment.shape[1], dtype=np.int32)
    seg_start = np.maximum.accumulate(np.where(new_segment, cols, 0).astype(np.int32), axis=1)
    return segment_ids, ((cols - seg_start) * valid).astype(np.int32)


def pack_examples(examples: Sequence[np.ndarray], seq_len: int, pad_id: int = 0, split: bool = True) -> PackedRows:
    """Packs examples ([n_i, 4] (input, target, offset, loss mask), as `document_example` makes)
    into rows of seq_len, in order. split=True continues an example that does not fit in the rest
    of a row in the next one (see the module doc); split=False starts it on a new row instead
    (padding the rest), so every example keeps its whole context (examples must fit in a row)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    examples = [e for e in examples if e.shape[0]]  # an empty document has no position to predict from
    lengths = np.array([e.shape[0] for e in examples], dtype=np.int64)  # [n_examples]
    if split:
        starts = np.cumsum(lengths) - lengths  # [n_examples] stream index of each example's first token
    else:
        if lengths.size and lengths.max() > seq_len:
            raise ValueError(f"an example of {lengths.max()} positions does not fit in a row of seq_len={seq_len}")
        starts, at = np.zeros(lengths.size, np.int64), 0
        for i, n in enumerate(lengths):
            if at % seq_len + n > seq_len:
                at += seq_len - at % seq_len
            starts[i], at = at, at + n
    end = int(starts[-1] + lengths[-1]) if lengths.size else 0
    n_rows = math.ceil(end / seq_len)
    size = n_rows * seq_len

    # The stream of all examples, [n_rows * seq_len]: pad_id, target pad_id, loss 0 where none.
    stream = np.zeros((size, 4), dtype=np.int32)
    stream[:, :2] = pad_id
    valid = np.zeros(size, dtype=bool)
    new_segment = np.zeros(size, dtype=bool)
    if examples:
        index = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
        stream[index] = np.concatenate(examples)
        valid[index] = True
        new_segment[starts] = True
        new_segment |= valid & (stream[:, 2] == 0)  # the rejected half of a preference pair

    stream = stream.reshape(n_rows, seq_len, 4)
    valid, new_segment = valid.reshape(n_rows, seq_len), new_segment.reshape(n_rows, seq_len)
    new_segment[:, 0] |= valid[:, 0]  # an example continuing from the previous row is a new segment
    segment_ids, positions = segments(new_segment, valid)
    return PackedRows(
        tokens=stream[..., 0],
        targets=stream[..., 1],
        segment_ids=segment_ids,
        positions=positions,
        loss_mask=(valid & (stream[..., 3] > 0)).astype(np.float32),
    )


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int, pad_id: int = 0) -> PackedRows:
    """Packs documents (token ids without specials) into rows of seq_len; see the module doc."""
    docs = (np.asarray(t, dtype=np.int32).ravel() for t in token_lists)
    return pack_examples([document_example(d, eos_id) for d in docs if d.size], seq_len, pad_id)


def unigram_entropy(token_lists: Sequence[Sequence[int]], eos_id: int | None = None) -> float:
    """Entropy in nats per token of the corpus' token frequencies: the loss of the best model
    that ignores context, which a trained model must beat. With eos_id, each document also
    counts one eos, as packing appends it."""
    counts = np.zeros(0, dtype=np.int64)
    for t in token_lists:
        c = np.bincount(np.asarray(t, dtype=np.int64).ravel())
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
    if eos_id is not None:
        n_docs = sum(1 for t in token_lists if len(t))
        if counts.size <= eos_id:
            counts = np.pad(counts, (0, eos_id + 1 - counts.size))
        counts[eos_id] += n_docs
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


# --------------------------------------------------------------------------- the grain pipeline
# The pipeline packs with grain's ConcatThenSplitIterDataset, which cuts documents at row ends
# like `pack_documents` (segment ids 1.. per piece, positions restarting at 0 in every piece),
# but packs whatever features it is given. So each document enters as one [n, 4] feature
# (input, target, offset in the document, loss mask): its targets are computed before any cut, and a
# piece continued in the next row still predicts the right tokens. The document's key rides
# along as a "meta" feature (never cut; one entry per segment). SFT examples (data/chat.py) are
# packed whole instead, by grain's FirstFitPackIterDataset (`pack_examples(split=False)` here):
# an answer continued in another row would lose its prompt.

PACKED = "ids"  # the [n, 4] feature grain packs
KEY = "key"  # the document key (mixture.document_key), a meta feature


class DocumentToExample:
    """(source, epoch, doc) -> {"ids": [n, 4] int32 (input, target, offset, loss mask), "key": int64}.

    A source with an `example(doc)` method (SFT examples, data/chat.py) gives its masked example;
    any other source's tokens become a document every target of which is trained."""

    def __init__(self, sources, tokenizer, add_bos: bool):
        self.sources, self.tokenizer, self.add_bos = sources, tokenizer, add_bos

    def __call__(self, item):
        source, epoch, doc = item
        src = self.sources[source]
        if hasattr(src, "example"):
            example = src.example(doc)
        else:
            ids = src.tokens(doc, self.tokenizer)  # [n] without specials
            if ids.size == 0:  # sources drop empty documents when reading; this would be a bug
                raise ValueError(f"document {doc} of source {source} has no tokens")
            example = document_example(ids, self.tokenizer.eos_id, self.tokenizer.bos_id, self.add_bos)
        # The key's epoch only feeds accounting and tests: saturate rather than stop a long run
        # that repeats a tiny source a million times.
        epoch = min(epoch, (1 << EPOCH_BITS) - 1)
        return {PACKED: example, KEY: np.int64(document_key(source, epoch, doc))}


class PackedToBatch:
    """A batch of grain's packed rows -> the training batch (FIELDS, each [batch, seq_len]) plus
    bookkeeping the Pipeline removes before handing it out:
      _documents [n] int64: keys of the documents that start in this batch (not continuations);
      _source_tokens [n_sources] int64: loss tokens from each source.
    With debug=True it keeps, per token, document_keys (-1 on padding) and document_offsets."""

    def __init__(self, pad_id: int, num_sources: int, debug: bool = False):
        self.pad_id, self.num_sources, self.debug = pad_id, num_sources, debug

    def __call__(self, batch):
        ids = batch[PACKED]  # [b, s, 4]
        packed = batch[f"{PACKED}_segment_ids"].astype(np.int32)  # [b, s] grain's: 1.. per piece, 0 = padding
        valid = packed > 0
        trained = valid & (ids[..., 3] > 0)
        # Key of each token's document: the meta feature holds one key per packed piece, in order.
        keys = np.take_along_axis(batch[KEY], np.maximum(packed - 1, 0), axis=1)  # [b, s]
        offsets = ids[..., 2]
        piece_start = valid & (packed != np.pad(packed[:, :-1], ((0, 0), (1, 0))))  # [b, s]
        # A segment per piece, and one more where a preference pair's rejected sequence starts (offset 0
        # inside a piece): the positions then restart there too, as in `pack_examples`.
        segment_ids, positions = segments(piece_start | (valid & (offsets == 0)), valid)
        out = {
            "tokens": np.where(valid, ids[..., 0], self.pad_id).astype(np.int32),
            "targets": np.where(valid, ids[..., 1], self.pad_id).astype(np.int32),
            "segment_ids": segment_ids,
            "positions": positions,
            "loss_mask": trained.astype(np.float32),
            "_documents": keys[piece_start & (offsets == 0)],
            "_source_tokens": np.bincount(decode_keys(keys[trained])[0], minlength=self.num_sources).astype(np.int64),
        }
        if self.debug:
            out["document_keys"] = np.where(valid, keys, -1)
            out["document_offsets"] = np.where(valid, offsets, -1)
        return out
