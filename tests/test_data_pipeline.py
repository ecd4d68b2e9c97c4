"""Tests of the grain input pipeline (tpullm.data.pipeline): packing convention, every document
exactly once per epoch across simulated processes, exact resume, mixtures, tokenizers, sources."""

import collections
import json

import numpy as np
import pytest

from tpullm.config import default_config
from tpullm.data import DataSources, make_pipeline
from tpullm.data import prepare as prepare_lib
from tpullm.data.mixture import decode_keys
from tpullm.data.packing import FIELDS
from tpullm.data.sources import parse_spec
from tpullm.data.tokenizer import ByteTokenizer, load_tokenizer, train_sentencepiece

EOS = ByteTokenizer.eos_id


def write_docs(folder, n, seed=0, lengths=(1, 120), name="doc", ext="txt"):
    """n files of random lowercase text with lengths in [lengths); returns their texts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        size = int(rng.integers(*lengths))
        texts.append("".join(rng.choice(list("abcdefghij klmnop\n"), size=size)).strip() or "x")
        (folder / f"{name}{i:03d}.{ext}").write_text(texts[-1])
    return texts


def config(corpus="", **overrides):
    c = default_config().data
    # Windows of 16 rows: the row shuffle at work, without filling 8192-row windows from tiny corpora.
    c.update(dict(corpus=corpus, seq_len=32, val_fraction=0.1, num_workers=0, shuffle_window_tokens=16 * 32))
    c.update(overrides)
    return c


def run(pipeline, steps):
    return [next(pipeline) for _ in range(steps)]


def collect(pipeline, done, max_steps=3000):
    """Runs a debug pipeline until done(pieces, started) holds; returns (pieces, started):
    pieces {document key: {offset: (token, target)}} of every token delivered, started the keys
    of the documents started, in order."""
    pieces, started = collections.defaultdict(dict), []
    for _ in range(max_steps):
        batch = next(pipeline)
        valid = batch["document_keys"] >= 0
        for key, offset, token, target in zip(
            batch["document_keys"][valid],
            batch["document_offsets"][valid],
            batch["tokens"][valid],
            batch["targets"][valid],
        ):
            assert offset not in pieces[key], "a token was delivered twice"
            pieces[key][offset] = (token, target)
        started.extend(pipeline.last_documents.tolist())
        if done(pieces, started):
            return pieces, started
    raise AssertionError(f"not done within {max_steps} steps")


def complete(got, eos=EOS):
    """Whether a document's pieces {offset: (token, target)} are all there: offsets 0..m, and the
    last one predicts eos."""
    return len(got) == max(got) + 1 and got[max(got)][1] == eos


def completed(pieces, epoch=0, source=0, eos=EOS):
    """{doc: pieces} of the documents of `source` whose `epoch` pass was delivered completely."""
    return {
        int(d): v
        for k, v in pieces.items()
        for s, e, d in [tuple(x[0] for x in decode_keys([k]))]
        if s == source and e == epoch and complete(v, eos)
    }


def started_in(started, epoch=0, source=0):
    s, e, d = decode_keys(started)
    return d[(s == source) & (e == epoch)].tolist()


# --- packing convention ----------------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [False, True])
def test_batches_follow_the_packing_convention(tmp_path, add_bos):
    write_docs(tmp_path, 30)
    tok = ByteTokenizer()
    p = make_pipeline(
        config(str(tmp_path / "*.txt"), add_bos=add_bos),
        tok,
        batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
        debug=True,
    )
    ends = 0
    for batch in run(p, 5):
        assert set(batch) == set(FIELDS) | {"document_keys", "document_offsets"}
        for name in FIELDS:
            assert batch[name].shape == (4, 32)
            assert batch[name].dtype == (np.float32 if name == "loss_mask" else np.int32)
        seg, pos = batch["segment_ids"], batch["positions"]
        keys, off = batch["document_keys"], batch["document_offsets"]
        np.testing.assert_array_equal(batch["loss_mask"], seg > 0)
        assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) >= 0).all()  # 1, 2, ... per row
        new = np.concatenate([np.ones((4, 1), bool), np.diff(seg, axis=1) > 0], axis=1)
        assert (pos[new] == 0).all() and (np.diff(pos, axis=1)[~new[:, 1:]] == 1).all()
        assert (np.diff(keys, axis=1)[~new[:, 1:]] == 0).all()  # a segment is one document
        # Inside a segment the target is the next input; a document's last target is eos.
        same = ~new[:, 1:]
        np.testing.assert_array_equal(batch["targets"][:, :-1][same], batch["tokens"][:, 1:][same])
        last = np.zeros_like(new)  # the last token of each segment piece ...
        last[:, :-1] = new[:, 1:]
        last[:, -1] = True
        ends += (last & (batch["targets"] == EOS)).sum()  # ... that predicts eos ends its document
        assert (batch["targets"][~last] != EOS).all()
        if add_bos:  # every document starts with bos, which predicts the first text token
            assert (batch["tokens"][off == 0] == tok.bos_id).all()
        else:
            assert (batch["tokens"] >= tok.offset).all()
    assert ends > 0


def test_every_token_of_every_document_once_in_order_and_targets_are_right(tmp_path):
    texts = write_docs(tmp_path, 25)
    tok = ByteTokenizer()
    sources = DataSources(config(str(tmp_path / "*.txt")), tok)
    p = make_pipeline(
        config(str(tmp_path / "*.txt")), tok, 4, seed=1, process_index=0, process_count=1, sources=sources, debug=True
    )
    n = sources.train_ids[0].size
    pieces, _ = collect(p, lambda pieces, _: len(completed(pieces)) == n)
    epoch0 = completed(pieces)
    assert sorted(epoch0) == sorted(sources.train_ids[0].tolist())
    for doc, got in epoch0.items():
        expected = tok.encode_array(texts[int(sources.sources[0].names[doc][-7:-4])])
        assert sorted(got) == list(range(expected.size))
        np.testing.assert_array_equal([got[o][0] for o in range(expected.size)], expected)
        np.testing.assert_array_equal([got[o][1] for o in range(expected.size)], list(expected[1:]) + [EOS])


# --- processes and epochs ----------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_processes_partition_each_epoch_no_document_twice_none_lost(tmp_path, process_count):
    write_docs(tmp_path, 41)
    tok = ByteTokenizer()
    c = config(str(tmp_path / "*.txt"))
    sources = DataSources(c, tok)
    train = set(sources.train_ids[0].tolist())
    seen = collections.Counter()  # document -> times started in epoch 0, over all processes
    shares = []
    for index in range(process_count):
        p = make_pipeline(
            c, tok, 2, seed=3, process_index=index, process_count=process_count, sources=sources, debug=True
        )
        share = sources.train_ids[0][index::process_count].size
        _, started = collect(p, lambda _, started: len(started_in(started)) == share)
        shares.append(set(started_in(started)))
        seen.update(started_in(started))
        assert set(decode_keys(started)[2].tolist()) <= train  # validation documents never reach training
    assert set(seen) == train and set(seen.values()) == {1}
    assert sum(len(s) for s in shares) == len(train)  # disjoint shares
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_each_epoch_is_a_new_order_and_the_seed_matters(tmp_path):
    write_docs(tmp_path, 30)
    c = config(str(tmp_path / "*.txt"))
    p = make_pipeline(c, ByteTokenizer(), 2, seed=0, process_index=0, process_count=1, debug=True)
    n = DataSources(c, ByteTokenizer()).train_ids[0].size
    _, started = collect(p, lambda _, started: len(started_in(started)) == len(started_in(started, epoch=1)) == n)
    orders = [started_in(started, epoch=e) for e in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    q = make_pipeline(c, ByteTokenizer(), 2, seed=1, process_index=0, process_count=1)
    assert not np.array_equal(next(q)["tokens"], make_pipeline(c, ByteTokenizer(), 2, 0, 0, 1).__next__()["tokens"])
    assert 2.0 <= p.epochs()[tmp_path.name] < 3.0


# --- checkpointable state -----------------------------------------------------------------------


def _mixture_config(tmp_path):
    write_docs(tmp_path / "a", 23, seed=1)
    (tmp_path / "b").mkdir()
    texts = write_docs(tmp_path / "b_raw", 17, seed=2, lengths=(50, 300))
    (tmp_path / "b" / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return config(
        sources={
            "a": dict(path=str(tmp_path / "a" / "*.txt"), weight=0.3),
            "b": dict(path=str(tmp_path / "b" / "*.jsonl"), weight=0.7),
        }
    )


@pytest.mark.parametrize(
    "num_workers,resume_steps", [(0, range(0, 30, 3)), (1, (9,)), pytest.param(2, (1, 7, 22), marks=pytest.mark.slow)]
)
def test_resume_from_step_k_sees_the_batches_of_an_uninterrupted_run(tmp_path, num_workers, resume_steps):
    c = _mixture_config(tmp_path)
    tok = ByteTokenizer()
    sources = DataSources(c, tok)

    def pipeline():
        return make_pipeline(
            c, tok, 3, seed=5, process_index=1, process_count=2, sources=sources, num_workers=num_workers
        )

    reference = pipeline()
    batches, epochs = [], []
    for _ in range(30):
        batches.append(next(reference))
        epochs.append(reference.epochs())
    reference.close()
    for k in resume_steps:
        p = pipeline()
        run(p, k)
        state = json.loads(json.dumps(p.get_state()))  # what a checkpoint stores
        p.close()
        resumed = pipeline()
        resumed.set_state(state)
        assert resumed.step == k and resumed.epochs() == (epochs[k - 1] if k else {"a": 0.0, "b": 0.0})
        for expected in batches[k : k + 8]:
            got = next(resumed)
            for name in FIELDS:
                np.testing.assert_array_equal(got[name], expected[name])
        resumed.close()


@pytest.mark.slow
def test_worker_processes_keep_each_epoch_a_partition(tmp_path):
    """With prefetch workers each worker packs its own slice of the stream; across workers and
    processes an epoch still holds every document once."""
    write_docs(tmp_path, 37)
    tok = ByteTokenizer()
    c = config(str(tmp_path / "*.txt"))
    sources = DataSources(c, tok)
    train = set(sources.train_ids[0].tolist())
    seen = collections.Counter()
    for index in range(2):
        p = make_pipeline(c, tok, 2, seed=3, process_index=index, process_count=2, sources=sources, num_workers=2)
        started = []
        share = len(sources.train_ids[0][index::2])
        while decode_keys(started)[1].tolist().count(1) < share:  # until the epoch after is complete too
            next(p)
            started.extend(p.last_documents.tolist())
        p.close()
        _, epoch, doc = decode_keys(started)
        seen.update(doc[epoch == 0].tolist())
    assert set(seen) == train and set(seen.values()) == {1}


def test_resume_when_rows_end_exactly_at_document_ends(tmp_path):
    """Then grain's packer has no remainder, a state whose JSON form it misreads unless the
    pipeline restores the tuples in it (grain 0.2.18)."""
    for i in range(12):
        (tmp_path / f"d{i:02d}.txt").write_text(chr(97 + i) * 16)  # two documents fill a row of 32
    c = config(str(tmp_path / "*.txt"), val_fraction=0.0)
    reference = run(make_pipeline(c, ByteTokenizer(), 1, 0, 0, 1), 12)
    for k in (1, 4, 9):
        p = make_pipeline(c, ByteTokenizer(), 1, 0, 0, 1)
        run(p, k)
        resumed = make_pipeline(c, ByteTokenizer(), 1, 0, 0, 1)
        resumed.set_state(json.loads(json.dumps(p.get_state())))
        np.testing.assert_array_equal(next(resumed)["tokens"], reference[k]["tokens"])


def test_set_state_refuses_a_differently_built_pipeline(tmp_path):
    write_docs(tmp_path, 20)
    c = config(str(tmp_path / "*.txt"))
    state = make_pipeline(c, ByteTokenizer(), 4, 0, 0, 1).get_state()
    with pytest.raises(ValueError, match="batch_size was 4, is now 8"):
        make_pipeline(c, ByteTokenizer(), 8, 0, 0, 1).set_state(state)
    with pytest.raises(ValueError, match="process_count was 1, is now 2"):
        make_pipeline(c, ByteTokenizer(), 4, 0, 0, 2).set_state(state)


def test_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    write_docs(tmp_path / "docs", 20)
    c = config(str(tmp_path / "docs" / "*.txt"))
    p = make_pipeline(c, ByteTokenizer(), 4, 0, 0, 1)
    run(p, 3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data"))
    manager.save(
        3,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.arange(4.0)}), data=grain.checkpoint.CheckpointSave(p)
        ),
    )
    manager.wait_until_finished()
    expected = next(p)
    q = make_pipeline(c, ByteTokenizer(), 4, 0, 0, 1)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(q)))
    assert q.step == 3
    np.testing.assert_array_equal(next(q)["tokens"], expected["tokens"])


# --- mixtures -------------------------------------------------------------------------------------


def test_mixture_delivers_token_shares_by_weight_and_reports_epochs(tmp_path):
    write_docs(tmp_path / "short", 200, seed=1, lengths=(5, 30))
    write_docs(tmp_path / "long", 40, seed=2, lengths=(300, 600))
    c = config(
        seq_len=64,
        val_fraction=0.0,
        sources={
            "short": dict(path=str(tmp_path / "short" / "*.txt"), weight=0.25),
            "long": dict(path=str(tmp_path / "long" / "*.txt"), weight=0.75),
        },
    )
    p = make_pipeline(c, ByteTokenizer(), 4, seed=0, process_index=0, process_count=1, debug=True)
    tokens = collections.Counter()
    starts = collections.Counter()
    for _ in range(150):
        batch = next(p)
        keys = batch["document_keys"][batch["document_keys"] >= 0]
        tokens.update(decode_keys(keys)[0].tolist())
        starts.update(decode_keys(p.last_documents)[0].tolist())
    total = sum(tokens.values())
    # Sources are sorted by name: 0 = long, 1 = short. Weights are shares of tokens, not documents.
    assert abs(tokens[0] / total - 0.75) < 0.03 and abs(tokens[1] / total - 0.25) < 0.03
    assert p.accounting.token_shares() == pytest.approx({"long": tokens[0] / total, "short": tokens[1] / total})
    assert p.epochs() == pytest.approx({"long": starts[0] / 40, "short": starts[1] / 200})
    assert p.epochs()["short"] > 1.0  # the small source repeats, as LLaMA's Wikipedia did
    # The epochs planned from the weights and each source's estimated size (mean tokens x documents).
    sources = DataSources(c, ByteTokenizer())
    weights = {"long": 0.75, "short": 0.25}
    planned = {
        name: 150 * 4 * 64 * weights[name] / (sources.mean_tokens(k) * sources.train_ids[k].size)
        for k, name in enumerate(sources.names)
    }
    assert planned == pytest.approx(p.epochs(), rel=0.15)
    assert "long: 75." in p.accounting.summary() or "long: 7" in p.accounting.summary()


# --- tokenizers and sources -----------------------------------------------------------------------


def test_python_stdlib_with_bytes_through_the_pipeline():
    c = default_config().data
    c.update(max_bytes=300_000, num_workers=0)
    tok = load_tokenizer("bytes")
    sources = DataSources(c, tok)
    assert sources.names == ["python_stdlib"] and "python_stdlib:" in sources.describe()[0]
    batch = next(make_pipeline(c, tok, 2, 0, 0, 1, sources=sources))
    assert batch["tokens"].shape == (2, c.seq_len)
    rows = sources.validation_rows(c.seq_len, max_rows=3)
    assert rows.n_rows == 3 and rows.loss_mask.all()
    assert 1.0 < sources.unigram_entropy() < np.log(tok.vocab_size)


def test_sentencepiece_tokenizer_through_the_pipeline(tmp_path):
    texts = write_docs(tmp_path / "docs", 30, lengths=(20, 200))
    model = tmp_path / "tok.model"
    model.write_bytes(train_sentencepiece(texts * 3, vocab_size=300)[0])
    c = config(str(tmp_path / "docs" / "*.txt"), tokenizer=str(model))
    tok = load_tokenizer(c.tokenizer)
    sources = DataSources(c, tok)
    p = make_pipeline(c, tok, 2, 0, 0, 1, sources=sources, debug=True)
    n = sources.train_ids[0].size
    pieces, _ = collect(p, lambda pieces, _: len(completed(pieces, eos=tok.eos_id)) == n)
    for doc, got in completed(pieces, eos=tok.eos_id).items():
        ids = [got[o][0] for o in range(len(got))]
        assert tok.decode(ids) == texts[int(sources.sources[0].names[doc][-7:-4])]


def test_prepared_shards_mix_with_text_in_the_pipeline(tmp_path):
    texts = write_docs(tmp_path / "raw", 30, lengths=(40, 100))
    prepare_lib.prepare(
        [parse_spec(str(tmp_path / "raw" / "*.txt"), name="web")],
        "bytes",
        str(tmp_path / "out"),
        shards=2,
        workers=1,
        filters=prepare_lib.Filters(min_chars=1),
        log=lambda _: None,
    )
    write_docs(tmp_path / "code", 10, seed=4)
    c = config(
        val_fraction=0.0,
        sources={
            "web": dict(path=str(tmp_path / "out" / "web"), weight=0.5),
            "code": dict(path=str(tmp_path / "code" / "*.txt"), weight=0.5),
        },
    )
    tok = ByteTokenizer()
    sources = DataSources(c, tok)
    assert "web: 2 ArrayRecord shards, 30 documents" in "\n".join(sources.describe())
    p = make_pipeline(c, tok, 2, 0, 0, 1, sources=sources, debug=True)
    pieces, _ = collect(p, lambda pieces, _: len(completed(pieces, source=1)) == 30)  # sorted: code, web
    web = completed(pieces, source=1).values()
    assert {tok.decode(np.array([v[o][0] for o in range(len(v))])) for v in web} == set(texts)


def test_validation_rows_interleave_the_sources_held_out_documents(tmp_path):
    a = write_docs(tmp_path / "a", 30, seed=1, name="a")
    b = write_docs(tmp_path / "b", 30, seed=2, name="b")
    c = config(
        val_fraction=0.3,
        sources={"a": dict(path=str(tmp_path / "a" / "*.txt")), "b": dict(path=str(tmp_path / "b" / "*.txt"))},
    )
    tok = ByteTokenizer()
    sources = DataSources(c, tok)
    va, vb = (
        [texts[int(sources.sources[k].names[i][-7:-4])] for i in sources.val_ids[k]] for k, texts in ((0, a), (1, b))
    )
    assert va and vb
    order = [t for pair in zip(va, vb) for t in pair] + va[len(vb) :] + vb[len(va) :]
    rows = sources.validation_rows(c.seq_len)
    mask = rows.loss_mask.astype(bool)
    np.testing.assert_array_equal(rows.tokens[mask], np.concatenate([tok.encode_array(t) for t in order]))
    capped = sources.validation_rows(c.seq_len, max_rows=2)
    assert capped.n_rows == 2 and capped.loss_mask.all()
