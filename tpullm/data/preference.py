"""Preference pairs for DPO and reward models: JSONL records {"prompt", "chosen", "rejected"}.

The prompt is text (one user turn) or a list of chat messages ({"role", "content"}, ending with a
user turn); each response is rendered as the assistant's answer to it with the run's chat template
(data/chat.py), so chosen and rejected share the prompt's tokens and only the response tokens
(answer-only, as SFT trains them) are in the loss mask.

A pair is one example: its chosen sequence, then its rejected one, the offset column restarting at 0
at the rejected part. The packer keeps an example whole, so a pair is never split across rows, and
the batch starts a new segment (and positions at 0) wherever the offset is 0 (data/packing.py): the
two sequences never attend to each other, and pair k of a row is segments (2k-1, 2k)
(training/pairs.py reads them). A pair longer than data.seq_len is dropped and counted, as SFT's are.
"""

from __future__ import annotations

import functools

import numpy as np

from tpullm.data.chat import BadRecord, ChatExamples, example_array, messages_of, open_examples, render, tokenize
from tpullm.data.sources import SourceSpec


def pair_example(record, template: str, tokenizer, add_bos: bool) -> np.ndarray:
    """[n_chosen + n_rejected, 4] int32 (input, target, offset, loss mask): the chosen sequence's
    example (chat.example_array), then the rejected one's, whose offsets restart at 0."""
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if (
        not isinstance(prompt, list)
        or not prompt
        or not isinstance(prompt[-1], dict)
        or prompt[-1].get("role") != "user"
    ):
        raise BadRecord("'prompt' is neither text nor a list of messages ending with a user turn")
    arrays = []
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise BadRecord(f"'{key}' missing or not text")
        messages = messages_of({"messages": prompt + [{"role": "assistant", "content": record[key]}]}, "chat")
        arrays.append(example_array(*tokenize(render(messages, template, add_bos), tokenizer)))
    return np.concatenate(arrays)


def open_pairs(spec: SourceSpec, data_config, tokenizer) -> ChatExamples:
    """Reads a JSONL source of preference pairs into memory, one example per pair (see the module doc)."""
    to_array = functools.partial(
        pair_example,
        template=data_config.get("chat_template", "chatml"),
        tokenizer=tokenizer,
        add_bos=bool(data_config.get("add_bos", False)),
    )
    return open_examples(spec, data_config, tokenizer, to_array)
