"""Tokenizers: text <-> token ids, and training a sentencepiece model.

Two kinds, one interface (pad_id, bos_id, eos_id, vocab_size, fingerprint, encode, encode_array,
encode_batch, decode):
  - `ByteTokenizer` ("bytes"): raw UTF-8 bytes; no file, no training, exact round trip; its 259
    ids fit the demo model's vocab.
  - `SentencePieceTokenizer` (a path to a `.model`): any sentencepiece model, ours or an existing
    one such as LLaMA's. Ours are trained with byte fallback (no text is ever <unk>), identity
    normalization and no dummy prefix (code keeps its exact whitespace), and pad=0, bos=1, eos=2,
    unk=3 like the byte tokenizer.

    python -m tpullm.data.tokenizer train --input='data/**/*.txt' --vocab_size=8000 \
        --model_type=bpe --out=/tmp/tok.model

`--input` takes any source `tpullm.data.sources` reads (a text glob, *.jsonl, *.parquet,
python_stdlib, hf:NAME).
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from tpullm.config import ConfigError
from tpullm.errors import UserError, check_writable

TOKENIZERS = ("bytes", "/path/to/sentencepiece.model")
MODEL_TYPES = ("bpe", "unigram")
# Lines longer than this (bytes) are left out of sentencepiece training (minified code, data
# blobs); they are still encoded fine later, through the pieces and byte fallback.
MAX_TRAIN_LINE_BYTES = 16384


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad=0, bos=1, eos=2, byte b -> b + 3 (vocab_size 259)."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    offset = 3  # ids below this are the specials
    vocab_size = 256 + offset
    fingerprint = "bytes"  # what pre-tokenized shards record, to refuse a different tokenizer

    def encode(self, text: str) -> list[int]:
        """The ids of `text`'s UTF-8 bytes, without special tokens."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array [n_bytes]: no Python int per byte, so whole corpora encode fast."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        """[encode_array(t) for t in texts]; one int32 array [n_i] per text."""
        del num_threads  # a byte copy is already memory-bound
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids are skipped, and byte runs that are not valid UTF-8
        (a sampled model may emit any sequence) become U+FFFD instead of raising."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).ravel()
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
        return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece model behind the ByteTokenizer interface.

    Pickles as its model bytes, so grain's worker processes and `prepare`'s pool rebuild it.
    A model without a pad piece (LLaMA's has pad_id -1) pads with unk, else 0: padding sits
    only where segment_ids is 0 and loss_mask is 0, so any valid id does.
    """

    def __init__(self, model_proto: bytes, path: str = "<bytes>"):
        import sentencepiece as spm  # a compiled extension: load only when a model is asked for

        self.path = path
        self._proto = model_proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise UserError(
                f"{path} is not a sentencepiece model (it does not parse as one); set data.tokenizer "
                f"to 'bytes' or to a .model file written by sentencepiece"
            ) from e
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(
                f"sentencepiece model {path} has no eos piece; training needs one to mark "
                f"document ends (train one with `python -m tpullm.data.tokenizer train`)"
            )
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self._sp.unk_id(), 0)
        self.fingerprint = "sentencepiece:" + hashlib.sha256(model_proto).hexdigest()[:16]

    @classmethod
    def load(cls, path: str) -> "SentencePieceTokenizer":
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"sentencepiece model {path!r} not found; set data.tokenizer to 'bytes' or to an existing "
                f".model file (train one with `python -m tpullm.data.tokenizer train --input=... --out={path}`)"
            )
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def __getstate__(self):
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["path"])

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[np.ndarray]:
        """One int32 array per text; sentencepiece splits the list over `num_threads` C++ threads."""
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts), num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids (pad, bos, eos, unk's surface aside) are skipped."""
        ids = [int(i) for i in ids]
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size and not self._sp.is_control(i)])

    def piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def load_tokenizer(name: str) -> Tokenizer:
    """ "bytes", or the path of a sentencepiece `.model` file."""
    if name == "bytes":
        return ByteTokenizer()
    if name.endswith(".model") or os.path.isfile(os.path.expanduser(name)):
        return SentencePieceTokenizer.load(name)
    raise ConfigError(
        f"unknown tokenizer {name!r}; data.tokenizer must be 'bytes' or the path of a "
        f"sentencepiece .model file (allowed: {TOKENIZERS})"
    )


def _training_lines(texts: Iterable[str], counts: dict) -> Iterator[str]:
    """The non-blank lines of `texts` (sentencepiece learns from lines; newlines themselves are
    then encoded through byte fallback, as in LLaMA's tokenizer)."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line.encode("utf-8")) > MAX_TRAIN_LINE_BYTES:
                counts["long_lines"] += 1
                continue
            counts["lines"] += 1
            yield line


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, model_type: str = "bpe", max_lines: int = 5_000_000, num_threads: int = 0
) -> tuple[bytes, dict]:
    """(model bytes, counts) of a sentencepiece model trained on the lines of `texts`.

    Specials: pad=0, bos=1, eos=2, unk=3, then 256 byte pieces (byte fallback), then the learned
    pieces, so vocab_size must exceed 260. Training keeps a random sample of `max_lines` lines
    (memory), drawn by sentencepiece from the whole input.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of {MODEL_TYPES}")
    if vocab_size <= 4 + 256:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for learned pieces: 4 specials and 256 byte "
            f"pieces come first; use vocab_size > 260 (e.g. 8000 to 32000)"
        )
    counts = {"lines": 0, "long_lines": 0}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, counts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            pad_id=0,
            bos_id=1,
            eos_id=2,
            unk_id=3,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            max_sentence_length=MAX_TRAIN_LINE_BYTES,
            input_sentence_size=max_lines,
            shuffle_input_sentence=True,
            hard_vocab_limit=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece training failed on {counts['lines']} lines: {e}. With little text, "
            f"lower --vocab_size (sentencepiece needs enough distinct pieces)"
        ) from e
    if counts["lines"] == 0:
        raise ValueError("no non-blank lines to train on; check --input")
    return model.getvalue(), counts


# --------------------------------------------------------------------------- command line


def _main(argv):
    from absl import app, flags

    from tpullm.data import sources

    f = flags.FLAGS
    if len(argv) != 2 or argv[1] != "train":
        raise app.UsageError(
            "usage: python -m tpullm.data.tokenizer train --input=GLOB --vocab_size=N "
            "--model_type=bpe|unigram --out=PATH.model"
        )
    if not f.input or not f.out:
        raise app.UsageError("--input and --out are required")
    out = os.path.expanduser(f.out)
    check_writable(os.path.dirname(os.path.abspath(out)), "the directory of --out")
    spec = sources.parse_spec(f.input, field=f.field)
    report = sources.Counts()
    texts = (text for _, text in sources.iter_texts(spec, report))
    proto, counts = train_sentencepiece(texts, f.vocab_size, f.model_type, f.max_lines)
    with open(out, "wb") as fh:
        fh.write(proto)
    tok = SentencePieceTokenizer(proto, out)
    print(f"read {report.summary(spec.name)}")
    print(
        f"trained on {counts['lines']:,} lines ({counts['long_lines']:,} longer than {MAX_TRAIN_LINE_BYTES} "
        f"bytes left out); wrote {out}: {f.model_type}, vocab_size {tok.vocab_size}, pad/bos/eos/unk "
        f"= {tok.pad_id}/{tok.bos_id}/{tok.eos_id}/3, byte fallback; set data.tokenizer={out!r} and "
        f"model.vocab_size >= {tok.vocab_size}"
    )


def main():
    from absl import flags

    from tpullm import cli

    flags.DEFINE_string(
        "input", None, "Text to train on: a glob of text files, *.jsonl, *.parquet, python_stdlib, hf:NAME."
    )
    flags.DEFINE_string("field", "text", "The text field of JSONL / Parquet / Hugging Face records.")
    flags.DEFINE_integer("vocab_size", 8000, "Pieces in the model, including 4 specials and 256 bytes.")
    flags.DEFINE_enum("model_type", "bpe", list(MODEL_TYPES), "Sentencepiece algorithm.")
    flags.DEFINE_integer("max_lines", 5_000_000, "Lines sampled for training (memory bound).")
    flags.DEFINE_string("out", None, "Path of the .model file to write.")
    cli.run(_main)


if __name__ == "__main__":
    main()
