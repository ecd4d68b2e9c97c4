"""Tests of tpullm.data.tokenizer: training, loading and using sentencepiece models."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

from tpullm.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer, train_sentencepiece

WORDS = (
    "def return class import self value print for while if else elif lambda yield with as try "
    "except raise pass None True False range len list dict tuple"
).split()


def make_texts(n, seed=0):
    """n code-like documents of a few lines each (deterministic)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.integers(1, 8)):
            indent = "    " * int(rng.integers(0, 3))
            lines.append(indent + " ".join(rng.choice(WORDS, size=rng.integers(2, 10))) + f" = {rng.integers(1000)}")
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(make_texts(200)):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    proto, counts = train_sentencepiece(make_texts(200), vocab_size=300, model_type="bpe")
    assert counts["lines"] > 200
    path = tmp_path_factory.mktemp("tok") / "bpe300.model"
    path.write_bytes(proto)
    return str(path)


TRICKY = "  def f(x):\n\treturn 'héllo wörld ✓ 日本語 🙂'   \n\n\n  x=12345\r\n"


def test_train_cli_writes_a_model_with_the_specials(corpus_dir, tmp_path):
    out = tmp_path / "cli.model"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpullm.data.tokenizer",
            "train",
            f"--input={corpus_dir}/*.txt",
            "--vocab_size=300",
            "--model_type=unigram",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "200 documents" in result.stdout and "vocab_size 300" in result.stdout
    tok = load_tokenizer(str(out))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 300)
    assert [tok.piece(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<0x00>"]
    assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_round_trip_is_exact_and_unseen_characters_fall_back_to_bytes(spm_path):
    tok = load_tokenizer(spm_path)
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY  # whitespace, tabs, \r, newlines and non-ASCII survive
    # The emoji never occurs in training: its 4 UTF-8 bytes become 4 byte pieces (ids 4..259).
    emoji = tok.encode("🙂")
    assert [tok.piece(i) for i in emoji] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    # Learned merges make the training language shorter than its bytes.
    text = make_texts(1, seed=5)[0]
    assert len(tok.encode(text)) < 0.9 * len(text.encode())
    # Specials are never produced by encoding and are skipped by decode.
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(tok.encode(" ".join(make_texts(20))))
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == TRICKY


def test_encode_batch_and_array_agree_with_encode(spm_path):
    texts = make_texts(10, seed=3) + ["", TRICKY]
    for tok in (load_tokenizer(spm_path), ByteTokenizer()):
        batch = tok.encode_batch(texts, num_threads=2)
        assert len(batch) == len(texts)
        for text, ids in zip(texts, batch):
            assert ids.dtype == np.int32
            assert ids.tolist() == tok.encode(text) == tok.encode_array(text).tolist()


def test_sentencepiece_tokenizer_pickles(spm_path):
    tok = load_tokenizer(spm_path)
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.fingerprint == tok.fingerprint and copy.fingerprint.startswith("sentencepiece:")
    assert copy.encode(TRICKY) == tok.encode(TRICKY)
    assert ByteTokenizer().fingerprint != tok.fingerprint


def test_existing_model_without_pad_pads_with_unk(tmp_path):
    """A LLaMA-style model: unk=0, bos=1, eos=2 and no pad piece."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_texts(100)),
        model_writer=model,
        vocab_size=100,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=False,
        minloglevel=2,
    )
    path = tmp_path / "llama_like.model"
    path.write_bytes(model.getvalue())
    tok = load_tokenizer(str(path))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 100)
    assert tok.decode(tok.encode("def f")) == "def f"


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model.*tpullm.data.tokenizer train"):
        load_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="'bytes'"):
        load_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="vocab_size=200 leaves no room"):
        train_sentencepiece(make_texts(5), vocab_size=200)
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(make_texts(5), vocab_size=300, model_type="wordpiece")
