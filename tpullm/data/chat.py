"""Supervised fine-tuning examples: chat and prompt/completion JSONL, rendered with a chat template,
tokenized with a per-token flag saying which tokens the loss trains on.

Formats (`data.format`):
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    prompt_completion  {"prompt": "...", "completion": "..."}  (rendered as one user turn and its answer)

Templates (`data.chat_template`), for messages system S, user U, assistant A:
    chatml   <|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\nU<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n
             then eos (bos first with data.add_bos). Trained: A<|im_end|>\n of every assistant turn, and the
             final eos when the conversation ends with an answer: the whole turn end, so a model sampled
             after an answer writes <|im_end|>\n and stops at eos.
    llama2   <s>[INST] <<SYS>>\\nS\\n<</SYS>>\\n\\nU [/INST] A </s><s>[INST] U2 [/INST] A2 </s>
             (<s>, </s>: the tokenizer's bos and eos ids; contents stripped, as Meta's and Hugging Face's).
             Trained: "A </s>" of every assistant turn. User and assistant turns must alternate.

Only trained tokens count in the loss: an example of tokens s_0..s_{n-1} has inputs s_0..s_{n-2},
targets s_1..s_{n-1}, and loss_mask 1 where the target is trained, so the first answer token
(predicted from the template's last prompt token) counts, the prompt never does.

An example longer than data.seq_len positions is dropped and counted (`Counts.bad`, reported at
the start of a run): cutting it would train on an answer without its end, or without its prompt.
Shorter examples are never cut: the pipeline packs them whole, several to a row.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tpullm.config import CHAT_TEMPLATES as TEMPLATES
from tpullm.data.sources import Counts, SourceSpec, iter_jsonl_records, unit_hash

ROLES = ("system", "user", "assistant")


class BOS:
    """A piece standing for the tokenizer's bos id."""


class EOS:
    """A piece standing for the tokenizer's eos id."""


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str | type  # text, or BOS / EOS
    trained: bool  # whether the loss trains on predicting these tokens


class BadRecord(ValueError):
    """A record that is not an example; its message is the reason counted."""


def messages_of(record, fmt: str) -> list[dict]:
    """The messages [{"role", "content"}] of one JSONL record of format `fmt`, checked."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadRecord("'prompt' or 'completion' missing or not text")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRecord("'messages' missing or not a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise BadRecord(f"a message is not {{'role': one of {ROLES}, 'content': text}}")
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRecord("a system message after the first")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no assistant answer to train on")
    return messages


def _chatml(messages: list[dict], add_bos: bool) -> list[Piece]:
    pieces = [Piece(BOS, False)] if add_bos else []
    for m in messages:
        pieces.append(Piece(f"<|im_start|>{m['role']}\n", False))
        if m["role"] == "assistant":
            pieces.append(Piece(m["content"] + "<|im_end|>\n", True))
        else:
            pieces.append(Piece(m["content"] + "<|im_end|>\n", False))
    pieces.append(Piece(EOS, messages[-1]["role"] == "assistant"))
    return pieces


def _llama2(messages: list[dict]) -> list[Piece]:
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2):
        raise BadRecord("llama2 turns not alternating user/assistant from a user turn")
    pieces = []
    for i, m in enumerate(messages):
        content = m["content"]
        if i == 0 and system:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            pieces += [Piece(BOS, False), Piece(f"[INST] {content.strip()} [/INST]", False)]
        else:
            pieces += [Piece(" ", False), Piece(content.strip() + " ", True), Piece(EOS, True)]
    return pieces


def render(messages: list[dict], template: str, add_bos: bool = False) -> list[Piece]:
    """The pieces of a conversation in `template` (see the module doc)."""
    if template == "chatml":
        return _chatml(messages, add_bos)
    if template == "llama2":
        return _llama2(messages)
    raise ValueError(f"chat template {template!r} is not one of {TEMPLATES}")


def render_text(pieces: list[Piece], bos: str = "<s>", eos: str = "</s>") -> str:
    """The pieces as one string, bos and eos spelt out: what a Hugging Face chat template prints."""
    return "".join(bos if p.text is BOS else eos if p.text is EOS else p.text for p in pieces)


def tokenize(pieces: list[Piece], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int32, trained [n] bool): each piece encoded on its own, so a token never straddles
    a trained and an untrained piece."""
    ids, trained = [], []
    for p in pieces:
        if p.text is BOS or p.text is EOS:
            piece_ids = np.array([tokenizer.bos_id if p.text is BOS else tokenizer.eos_id], np.int32)
        else:
            piece_ids = np.asarray(tokenizer.encode_array(p.text), np.int32)
        ids.append(piece_ids)
        trained.append(np.full(piece_ids.size, p.trained))
    return np.concatenate(ids), np.concatenate(trained)


def example_array(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """[n - 1, 4] int32 (input, target, offset, loss mask) of a tokenized example, as packing takes it."""
    n = ids.size - 1
    out = np.empty((n, 4), np.int32)
    out[:, 0], out[:, 1] = ids[:-1], ids[1:]
    out[:, 2] = np.arange(n, dtype=np.int32)
    out[:, 3] = trained[1:]
    return out


class ChatExamples:
    """A JSONL source of SFT examples, rendered and tokenized when read, held in memory: what the
    pipeline asks of a source (len, unit_hashes for the split, describe), with `example(i)`, the
    masked example, in place of a document's tokens."""

    def __init__(self, spec: SourceSpec, names: list[str], arrays: list[np.ndarray], counts: Counts):
        self.spec, self.names, self.arrays, self.counts = spec, names, arrays, counts

    def __len__(self) -> int:
        return len(self.arrays)

    def example(self, i: int) -> np.ndarray:
        """[n, 4] int32 (input, target, offset, loss mask) of example i."""
        return self.arrays[i]

    def unit_hashes(self) -> np.ndarray:
        return np.array([unit_hash(n) for n in self.names], dtype=np.float64)

    def describe(self) -> str:
        trained = sum(int(a[:, 3].sum()) for a in self.arrays)
        total = sum(a.shape[0] for a in self.arrays)
        return f"{self.counts.summary(self.spec.name)}; {trained:,} of {total:,} target tokens trained"


def _examples(spec: SourceSpec, to_array, seq_len: int, counts: Counts):
    for name, record in iter_jsonl_records(spec, counts):
        try:
            array = to_array(record)
        except BadRecord as e:
            counts.bad[str(e)] += 1
            continue
        if array.shape[0] > seq_len:
            counts.bad[f"longer than data.seq_len={seq_len} (dropped)"] += 1
            continue
        counts.documents += 1
        yield name, array


def open_examples(spec: SourceSpec, data_config, tokenizer, to_array=None) -> ChatExamples:
    """Reads a JSONL source of `data.format` examples into memory (see the module doc). `to_array(record)`
    makes a record's example (raising BadRecord for a bad one); by default the SFT formats'."""
    fmt, template = data_config.format, data_config.get("chat_template", "chatml")
    if spec.kind != "jsonl":
        raise ValueError(f"data.format={fmt!r} reads JSONL files; source {spec.name} is {spec.kind} ({spec.path})")
    counts = Counts()
    add_bos = bool(data_config.get("add_bos", False))
    if to_array is None:

        def to_array(record):
            return example_array(*tokenize(render(messages_of(record, fmt), template, add_bos), tokenizer))

    pairs = list(_examples(spec, to_array, data_config.seq_len, counts))
    names, arrays = [n for n, _ in pairs], [a for _, a in pairs]
    if not arrays:
        raise ValueError(f"source {spec.name} ({spec.path}) has no {fmt} examples: {counts.summary(spec.name)}")
    return ChatExamples(spec, names, arrays, counts)
