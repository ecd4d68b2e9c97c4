"""Tests of tpullm.data.sources and tpullm.data.prepare: reading every kind of source with
counts, and tokenizing into deduplicated, filtered ArrayRecord shards."""

import gzip
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from tpullm.data import prepare as prepare_lib
from tpullm.data.sources import (
    Counts,
    TokenShards,
    detect_kind,
    iter_texts,
    open_source,
    parse_spec,
    specs_from_config,
    split_indices,
)
from tpullm.data.tokenizer import ByteTokenizer


def _texts(spec):
    counts = Counts()
    return list(iter_texts(spec, counts)), counts


# --- sources -------------------------------------------------------------------------------


def test_text_glob_counts_broken_and_empty_and_fails_on_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("good text é\n")
    (tmp_path / "sub" / "b.txt").write_bytes(b"bad \xff bytes\n")
    (tmp_path / "sub" / "c.txt").write_bytes(b" \n")
    docs, counts = _texts(parse_spec(str(tmp_path / "**" / "*.txt")))
    assert [t for _, t in docs] == ["good text é\n", "bad \ufffd bytes\n"]
    assert (counts.files, counts.documents, counts.broken_utf8, counts.empty) == (3, 2, 1, 1)
    assert "1 not valid UTF-8" in counts.summary("x") and "1 empty" in counts.summary("x")
    with pytest.raises(FileNotFoundError, match="nothing"):
        _texts(parse_spec(str(tmp_path / "nothing" / "*.txt")))
    with pytest.raises(ValueError, match="folder without manifest.json.*glob"):
        parse_spec(str(tmp_path))


def test_jsonl_counts_every_bad_record_with_its_reason(tmp_path):
    lines = [
        json.dumps({"text": "first"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 7}),
        json.dumps({"text": "   "}),
        "",
        json.dumps(["a list"]),
        json.dumps({"text": "second"}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    (tmp_path / "c.jsonl").write_bytes(json.dumps({"text": "x"}).encode()[:-3] + b'\xff"}\n')
    spec = parse_spec(str(tmp_path / "*.jsonl*"))
    assert spec.kind == "jsonl" and spec.name == tmp_path.name
    docs, counts = _texts(spec)
    assert [t for _, t in docs] == ["first", "second", "zipped", "\ufffd"]
    assert docs[0][0].endswith("a.jsonl:1") and docs[1][0].endswith("a.jsonl:8")
    assert counts.bad == {"invalid JSON": 1, "without 'text'": 2, "'text' not text": 1}
    assert (counts.files, counts.documents, counts.empty, counts.broken_utf8) == (3, 4, 2, 1)


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one", None, "", "two"], "n": [1, 2, 3, 4]}), tmp_path / "p.parquet")
    docs, counts = _texts(parse_spec(str(tmp_path / "*.parquet"), field="content"))
    assert [t for _, t in docs] == ["one", "two"] and docs[1][0].endswith("p.parquet:3")
    assert (counts.documents, counts.empty, counts.bad["without 'content'"]) == (2, 1, 1)
    with pytest.raises(ValueError, match="no column 'text'.*content"):
        _texts(parse_spec(str(tmp_path / "*.parquet")))


def test_hugging_face_source_is_optional(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a doc", "", "b doc"]))
    spec = parse_spec("hf:json", hf_data_files=str(tmp_path / "d.jsonl"))
    assert spec.kind == "hf" and spec.path == "json"
    docs, counts = _texts(spec)
    assert [t for _, t in docs] == ["a doc", "b doc"] and counts.empty == 1


def test_kinds_names_and_mixture_config(tmp_path):
    assert [
        detect_kind(p)
        for p in ("python_stdlib", "hf:c4", "x/*.jsonl.gz", "x/*.parquet", "s/*.arrayrecord", "x/**/*.py")
    ] == ["python_stdlib", "hf", "jsonl", "parquet", "arrayrecord", "text"]
    assert parse_spec("/data/web/*.jsonl").name == "web" and parse_spec("/data/books.jsonl").name == "books"
    data = ml_collections.ConfigDict(
        dict(
            corpus="python_stdlib",
            text_field="body",
            max_bytes=5,
            sources={"zeta": dict(path="a/*.txt", weight=2.0), "alpha": dict(path="b/*.jsonl", field="content")},
        )
    )
    specs = specs_from_config(data)
    assert [(s.name, s.kind, s.weight, s.field, s.max_bytes) for s in specs] == [
        ("alpha", "jsonl", 1.0, "content", 5),
        ("zeta", "text", 2.0, "body", 5),
    ]
    data.sources.zeta.weight = 0.0
    with pytest.raises(ValueError, match="zeta.weight=0.0 must be positive"):
        specs_from_config(data)
    data.sources = {"web": dict(paht="x")}
    with pytest.raises(ValueError, match="needs a path.*unknown: \\['paht'\\]"):
        specs_from_config(data)


def test_split_is_stable_and_never_leaves_validation_empty(tmp_path):
    for i in range(200):
        (tmp_path / f"d{i:03d}.txt").write_text(f"document {i}\n")
    source = open_source(parse_spec(str(tmp_path / "*.txt")), ByteTokenizer())
    train, val = split_indices(source, 0.1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(200)) and 5 < val.size < 40
    assert all(np.array_equal(a, b) for a, b in zip(split_indices(source, 0.1), (train, val)))
    train, val = split_indices(source, 1e-9)
    assert val.tolist() == [199] and train.size == 199


# --- prepare -------------------------------------------------------------------------------


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def raw(tmp_path):
    good = [f"document number {i} " + "word " * (i % 13 + 5) for i in range(40)]
    junk = "binary \x00\x01\x02\x03\x04\x05\x06\x07\x08\x0e\x0f\x10\x11\x12 " + "\ufffd" * 20
    web = good[:30] + [good[3], "too short", junk]
    _write_jsonl(tmp_path / "web.jsonl", web)
    (tmp_path / "web.jsonl").write_text((tmp_path / "web.jsonl").read_text() + "{bad json\n")
    (tmp_path / "books").mkdir()
    for i, text in enumerate(good[25:]):  # 5 documents also in web
        (tmp_path / "books" / f"{i:02d}.txt").write_text(text)
    (tmp_path / "books" / "broken.txt").write_bytes(b"broken \xff utf-8 but otherwise a fine long document")
    return tmp_path, good


def test_prepare_drops_duplicates_and_junk_and_reports_why(raw):
    tmp_path, good = raw
    specs = [parse_spec(str(tmp_path / "web.jsonl")), parse_spec(str(tmp_path / "books" / "*.txt"))]
    results = prepare_lib.prepare(specs, "bytes", str(tmp_path / "out"), shards=3, workers=1, log=lambda _: None)
    web, books = results
    assert (web.kept, books.kept) == (30, 11)
    assert web.dropped == {"exact duplicates": 1, "shorter than 32 chars": 1, "over 10% non-text chars": 1}
    assert web.read.bad == {"invalid JSON": 1}
    assert books.dropped == {"exact duplicates": 5} and books.read.broken_utf8 == 1
    # The manifest keeps the report: what was read, kept and dropped, and why.
    manifest = json.loads((tmp_path / "out" / "web" / "manifest.json").read_text())
    assert manifest["documents"] == 30 and manifest["dropped"] == web.dropped
    assert manifest["read"]["bad"] == {"invalid JSON": 1}
    # The shards hold the kept documents' token ids, round-robin over the shards, in input order.
    source = TokenShards(parse_spec(str(tmp_path / "out" / "web")), ByteTokenizer())
    assert len(source) == 30 and source.manifest["dtype"] == "<u2" and len(source.paths) == 3
    order = [i * 3 + s for s in range(3) for i in range(10)]  # global record index -> input index
    tok = ByteTokenizer()
    for record, index in enumerate(order):
        np.testing.assert_array_equal(source.tokens(record), tok.encode_array(good[index]))
    assert source.manifest["tokens"] == sum(len(t.encode()) for t in good[:30])
    assert source.mean_tokens() == source.manifest["tokens"] / 30


def test_prepare_cli_with_worker_processes_matches_one_process(raw, tmp_path):
    folder, _ = raw
    args = [f"--input=web={folder}/web.jsonl", f"--input={folder}/books/*.txt", "--tokenizer=bytes", "--shards=2"]
    subprocess.run(
        [sys.executable, "-m", "tpullm.data.prepare", *args, f"--out={tmp_path}/a", "--workers=2"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    specs = [parse_spec(str(folder / "web.jsonl"), name="web"), parse_spec(str(folder / "books" / "*.txt"))]
    prepare_lib.prepare(specs, "bytes", str(tmp_path / "b"), shards=2, workers=1, log=lambda _: None)
    for name in ("web", "books"):
        for shard in ("shard-00000-of-00002.arrayrecord", "shard-00001-of-00002.arrayrecord"):
            a, b = (tmp_path / d / name / shard for d in "ab")
            assert a.read_bytes() == b.read_bytes()


def test_prepared_shards_refuse_another_tokenizer(raw, tmp_path):
    folder, _ = raw
    prepare_lib.prepare(
        [parse_spec(str(folder / "web.jsonl"))], "bytes", str(tmp_path / "p"), workers=1, log=lambda _: None
    )

    class Other(ByteTokenizer):
        fingerprint = "sentencepiece:0123"

    with pytest.raises(ValueError, match="tokenized with bytes.*data.tokenizer='bytes'"):
        TokenShards(parse_spec(str(tmp_path / "p" / "web")), Other())
    assert os.path.isfile(tmp_path / "p" / "web" / "manifest.json")
