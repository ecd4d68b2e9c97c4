"""Tests of tpullm.data: tokenizer, corpus reading and split, packing, batches, baseline entropy."""

import math

import numpy as np
import pytest

from tpullm.data import ByteTokenizer, PackedRows, load_tokenizer, pack_documents, python_stdlib_files, unigram_entropy
from tpullm.data.sources import Counts, SourceSpec, TextDocuments, iter_texts, open_source, parse_spec, split_indices
from tpullm.data.synthetic import random_packed_batch

EOS = 2


# --- tokenizer ---------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_non_ascii():
    tok = load_tokenizer("bytes")
    text = "def f(x):\n    return 'héllo wörld ✓ 日本語 🙂'\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(tok.offset <= i < tok.vocab_size for i in ids)
    assert ids[:3] == [ord("d") + 3, ord("e") + 3, ord("f") + 3]
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


def test_byte_tokenizer_specials():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
    ids = [tok.bos_id] + tok.encode("ab") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "ab"
    # A cut multi-byte character (as a sampled model may emit) decodes with a replacement.
    assert tok.decode(tok.encode("é")[:1] + tok.encode("x")) == "\ufffdx"


def test_load_tokenizer_unknown_name():
    with pytest.raises(ValueError, match="'bytes'"):
        load_tokenizer("sentencepiece")


# --- corpus -------------------------------------------------------------------------------


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_documents(corpus: str, max_bytes: int = 0) -> tuple[list[tuple[str, str]], Counts]:
    """(name, text) of every document of a text corpus, and what reading found."""
    counts = Counts()
    return list(iter_texts(parse_spec(corpus, max_bytes=max_bytes), counts)), counts


def test_read_documents_counts_broken_and_empty(tmp_path):
    _write(tmp_path, "a.txt", "good text é\n".encode())
    _write(tmp_path, "sub/b.txt", b"bad \xff\xfe bytes\n")
    _write(tmp_path, "sub/deeper/c.txt", b"")
    _write(tmp_path, "d.txt", b"  \n")
    docs, counts = read_documents(str(tmp_path / "**" / "*.txt"))
    names = [name.replace(str(tmp_path), "") for name, _ in docs]
    assert names == ["/a.txt", "/sub/b.txt"]
    assert docs[0][1] == "good text é\n"
    assert docs[1][1] == "bad \ufffd\ufffd bytes\n"
    assert (counts.files, counts.documents, counts.broken_utf8, counts.empty) == (4, 2, 1, 2)
    assert counts.bytes == len("good text é\n".encode()) + len(b"bad \xff\xfe bytes\n") + 3
    line = counts.summary("corpus")
    assert "\n" not in line and "2 documents" in line and "1 not valid UTF-8" in line


def test_read_documents_missing_glob_names_it(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(FileNotFoundError) as err:
        read_documents(pattern)
    assert pattern in str(err.value) and "python_stdlib" in str(err.value)


def test_read_documents_max_bytes_is_deterministic(tmp_path):
    for i in range(5):
        _write(tmp_path, f"f{i}.txt", b"x" * 100)
    docs, counts = read_documents(str(tmp_path / "*.txt"), max_bytes=250)
    assert [name[-6:] for name, _ in docs] == ["f0.txt", "f1.txt", "f2.txt"]
    assert counts.bytes == 300 and counts.files == 3


def test_python_stdlib_corpus_exists():
    files = python_stdlib_files()
    assert files == sorted(files)
    parts = {p for f in files for p in f.parts}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    assert any(f.name == "argparse.py" for f in files)
    source = open_source(parse_spec("python_stdlib", max_bytes=1_200_000), ByteTokenizer())
    assert source.counts.bytes > 1_000_000 and source.counts.documents == len(source) > 10
    assert all(not name.startswith("/") for name in source.names)  # names relative to the stdlib root


def named_documents(names: list[str]) -> TextDocuments:
    return TextDocuments(SourceSpec(name="docs", kind="text", path=""), names, ["x"] * len(names), Counts())


def test_split_indices_stable_and_disjoint():
    names = [f"doc{i}.py" for i in range(1000)]
    train, val = split_indices(named_documents(names), 0.1)
    assert train.size + val.size == 1000
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert 50 < val.size < 150
    again = split_indices(named_documents(names), 0.1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    # A document's side depends on its name only, not on the other documents.
    subset = names[::-1][:500]
    _, val2 = split_indices(named_documents(subset), 0.1)
    assert {subset[i] for i in val2} == {names[i] for i in val if i >= 500}
    train0, val0 = split_indices(named_documents(names), 0.0)
    assert train0.tolist() == list(range(1000)) and val0.size == 0


def test_split_indices_never_leaves_val_empty():
    train, val = split_indices(named_documents(["a", "b"]), 1e-9)
    assert val.tolist() == [1] and train.tolist() == [0]


# --- packing ------------------------------------------------------------------------------


def test_pack_documents_layout():
    docs = [[10, 11, 12], [20, 21, 22, 23, 24, 25], [30]]
    rows = pack_documents(docs, seq_len=4, eos_id=EOS)
    assert isinstance(rows, PackedRows) and rows.tokens.shape == (3, 4)
    for name in ("tokens", "targets", "segment_ids", "positions"):
        assert getattr(rows, name).dtype == np.int32
    assert rows.loss_mask.dtype == np.float32
    np.testing.assert_array_equal(rows.tokens, [[10, 11, 12, 20], [21, 22, 23, 24], [25, 30, 0, 0]])
    np.testing.assert_array_equal(rows.targets, [[11, 12, EOS, 21], [22, 23, 24, 25], [EOS, EOS, 0, 0]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 2], [1, 1, 1, 1], [1, 2, 0, 0]])
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.loss_mask, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    assert rows.num_target_tokens == 10


def test_pack_documents_every_token_once_in_order():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 259, size=n).tolist() for n in rng.integers(1, 50, size=40)]
    docs.insert(5, [])  # an empty document contributes nothing
    rows = pack_documents(docs, seq_len=16, eos_id=EOS)
    mask = rows.loss_mask.astype(bool)
    assert int(mask.sum()) == sum(map(len, docs))
    np.testing.assert_array_equal(rows.tokens[mask], np.concatenate([d for d in docs if d]))
    # Regroup the stream by segment: each segment is a run of one document, in order.
    seg_key = rows.segment_ids + 1000 * np.arange(rows.n_rows)[:, None]
    flat_tokens, flat_targets, flat_keys = rows.tokens[mask], rows.targets[mask], seg_key[mask]
    expected_targets = np.concatenate([d[1:] + [EOS] for d in docs if d])
    np.testing.assert_array_equal(flat_targets, expected_targets)
    # Positions count from 0 within each segment.
    flat_pos = rows.positions[mask]
    change = np.r_[True, flat_keys[1:] != flat_keys[:-1]]
    assert (flat_pos[change] == 0).all() and (np.diff(flat_pos)[~change[1:]] == 1).all()
    # Padding has pad tokens and targets, segment 0.
    assert (rows.tokens[~mask] == 0).all() and (rows.targets[~mask] == 0).all()
    assert (rows.segment_ids[~mask] == 0).all() and (rows.segment_ids[mask] > 0).all()
    assert len(flat_tokens) == len(flat_targets)


def test_pack_documents_exact_fit_has_no_padding():
    rows = pack_documents([[5, 6], [7, 8]], seq_len=2, eos_id=EOS)
    assert rows.n_rows == 2 and rows.loss_mask.all()
    np.testing.assert_array_equal(rows.targets, [[6, EOS], [8, EOS]])


# --- baseline -----------------------------------------------------------------------------


def test_unigram_entropy_uniform_is_log_k():
    k = 37
    docs = [list(range(3, 3 + k)), list(range(3 + k - 1, 2, -1))]
    assert unigram_entropy(docs) == pytest.approx(math.log(k))
    assert unigram_entropy([[5, 5, 5]]) == pytest.approx(0.0)
    # With eos: K symbols once each plus one eos per document, here K+1 equally likely symbols.
    assert unigram_entropy([list(range(3, 3 + k - 1)), [3 + k - 1]], eos_id=EOS) == pytest.approx(
        -(k / (k + 2)) * math.log(1 / (k + 2)) - (2 / (k + 2)) * math.log(2 / (k + 2))
    )


# --- random packed batches ----------------------------------------------------------------------


def test_random_packed_batch_is_a_packed_training_batch():
    batch = random_packed_batch(6, 32, vocab=50, seed=3)
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (6, 32) for v in batch.values()) and batch["loss_mask"].dtype == np.float32
    real = batch["segment_ids"] > 0
    np.testing.assert_array_equal(batch["loss_mask"], real)
    assert (batch["tokens"][real] >= 1).all() and (batch["tokens"][real] < 49).all()
    assert not real[-1].all() and real[:-1].all()  # only the last row has padding
    assert (batch["segment_ids"].max(axis=1) >= 1).all() and batch["segment_ids"].max() > 1
    # Positions restart at 0 with each segment and count up inside it.
    starts = np.diff(batch["segment_ids"], axis=1, prepend=0) != 0
    assert (batch["positions"][starts & real] == 0).all()
    inside = ~starts & real
    assert (batch["positions"][inside] == np.roll(batch["positions"], 1, axis=1)[inside] + 1).all()
    uneven = random_packed_batch(6, 32, vocab=50, seed=3, uneven_loss_mask=True)
    assert (uneven["loss_mask"] <= batch["loss_mask"]).all() and uneven["loss_mask"].sum() < batch["loss_mask"].sum()
    np.testing.assert_array_equal(uneven["tokens"], batch["tokens"])
