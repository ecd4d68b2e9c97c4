"""Supervised fine-tuning data (tpullm/data/chat.py): templates, answer-only masks, packing, the loss."""

import json

import jax
import numpy as np
import pytest

from tpullm import models
from tpullm.config import ConfigError, ModelConfig, default_config, validate
from tpullm.data import ByteTokenizer, DataSources, make_pipeline
from tpullm.data.chat import example_array, messages_of, render, render_text, tokenize
from tpullm.data.mixture import decode_keys
from tpullm.data.packing import pack_examples
from tpullm.training.loss import cross_entropy_sums

SYSTEM, U1, A1, U2, A2 = "Be brief.", "What is 2+2?", "4", "And 3+3?", "It is 6."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": U1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": U2},
    {"role": "assistant", "content": A2},
]
# The templates as their model cards' tokenizer_config.json ship them.
HF_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}"
)
HF_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}{% set content = "
    "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
CHATML_BY_HAND = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\nIt is 6.<|im_end|>\n"
)
LLAMA2_BY_HAND = (
    "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 </s><s>[INST] And 3+3? [/INST] It is 6. </s>"
)


def test_chatml_renders_as_written_by_hand_then_eos():
    assert render_text(render(CONVERSATION, "chatml")) == CHATML_BY_HAND + "</s>"
    assert render_text(render(CONVERSATION, "chatml", add_bos=True)) == "<s>" + CHATML_BY_HAND + "</s>"


def test_llama2_renders_as_written_by_hand():
    assert render_text(render(CONVERSATION, "llama2")) == LLAMA2_BY_HAND


def test_templates_equal_hugging_face_apply_chat_template():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    for template, hf_template, drop_last in (("chatml", HF_CHATML, 1), ("llama2", HF_LLAMA2, 0)):
        hf = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=hf_template
        )
        expected = hf.apply_chat_template(CONVERSATION, tokenize=False)
        pieces = render(CONVERSATION, template)
        assert render_text(pieces[: len(pieces) - drop_last]) == expected  # chatml's eos is ours, after the text


def trained_targets(template):
    """(example [n, 4], rendered text): the conversation tokenized in bytes."""
    pieces = render(CONVERSATION, template)
    return example_array(*tokenize(pieces, ByteTokenizer())), render_text(pieces, "\x01", "\x02")


@pytest.mark.parametrize(
    "template, answers",
    [("chatml", [A1 + "<|im_end|>\n", A2 + "<|im_end|>\n\x02"]), ("llama2", [A1 + " \x02", A2 + " \x02"])],
)
def test_mask_covers_exactly_the_answer_tokens(template, answers):
    example, text = trained_targets(template)
    # By hand: in bytes, with bos/eos as one character each, target j is the text's character j + 1;
    # each answer (with its end of turn) trains the targets of its own characters, found in the text.
    expected = np.zeros(len(text) - 1, bool)
    start = 0
    for answer in answers:
        start = text.index(answer, start)
        expected[start - 1 : start - 1 + len(answer)] = True
        start += len(answer)
    assert example.shape[0] == len(text) - 1
    np.testing.assert_array_equal(example[:, 3] > 0, expected)
    # The first answer token is trained, predicted from the prompt's last token.
    first = text.index(answers[0])
    assert example[first - 1, 3] == 1 and example[first - 2, 3] == 0
    assert ByteTokenizer().decode(example[example[:, 3] > 0, 1]) == "".join(answers).replace("\x02", "")


def test_prompt_completion_is_one_user_turn_and_its_answer():
    messages = messages_of({"prompt": "Say hi", "completion": "hi"}, "prompt_completion")
    text = render_text(render(messages, "chatml"))
    assert text == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n</s>"


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps"]
    return [
        {
            "prompt": " ".join(rng.choice(words, rng.integers(1, 4))),
            "completion": " ".join(rng.choice(words, rng.integers(1, 6))),
        }
        for _ in range(n)
    ]


def data_config(path, fmt="prompt_completion", seq_len=128, **overrides):
    c = default_config().data
    c.update(corpus=path, format=fmt, seq_len=seq_len, val_fraction=0.0, num_workers=0, **overrides)
    return c


def test_malformed_and_too_long_records_are_counted_not_silent(tmp_path):
    records = pairs(5) + [{"prompt": "p", "completion": "x" * 200}, {"prompt": "no completion"}]
    path = write_jsonl(tmp_path / "sft.jsonl", records, extra_lines=["{not json", ""])
    sources = DataSources(data_config(path), ByteTokenizer())
    counts = sources.sources[0].counts
    assert len(sources.sources[0]) == 5 and counts.documents == 5 and counts.empty == 1
    assert counts.bad == {
        "invalid JSON": 1,
        "'prompt' or 'completion' missing or not text": 1,
        "longer than data.seq_len=128 (dropped)": 1,
    }
    assert "1 longer than data.seq_len=128 (dropped)" in sources.describe()[0]


def test_chat_records_checked(tmp_path):
    bad = [
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}, A1_MSG]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] + bad)
    sources = DataSources(data_config(path, "chat", seq_len=256, chat_template="llama2"), ByteTokenizer())
    assert len(sources.sources[0]) == 1
    assert sum(sources.sources[0].counts.bad.values()) == 4


A1_MSG = {"role": "assistant", "content": A1}


ROW = 256  # the loss tests' row length: two or three examples to a row
TINY = ModelConfig(
    vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=ROW,
    compute_dtype="float32", param_dtype="float32",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model():
    model = models.build(TINY)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    forward = jax.jit(lambda p, t, s, q: model.apply({"params": p}, t, s, q))
    return lambda rows: np.asarray(forward(params, rows.tokens, rows.segment_ids, rows.positions), np.float64)


def test_sft_loss_equals_hand_computed_completion_cross_entropy(tmp_path, tiny_model):
    records = pairs(6)
    sources = DataSources(data_config(write_jsonl(tmp_path / "sft.jsonl", records)), ByteTokenizer())
    examples = [sources.sources[0].example(i) for i in range(len(records))]
    rows = pack_examples(examples, ROW, split=False)
    assert rows.segment_ids.max() > 1  # several examples share a row
    sum_ce = float(cross_entropy_sums(tiny_model(rows), rows.targets, rows.loss_mask)[1])

    # By hand, one example at a time on its own: the rendered bytes, and the completion's bytes
    # (with <|im_end|>\n, then eos) as the only targets, scored by a numpy log-softmax.
    expected = 0.0
    for r in records:
        prompt = f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        answer = f"{r['completion']}<|im_end|>\n"
        ids = np.array(list((prompt + answer).encode()) + [-1], np.int32) + 3  # eos = 2
        one = pack_examples([np.stack([ids[:-1], ids[1:], np.arange(ids.size - 1), np.ones(ids.size - 1)], 1)], ROW)
        logits = tiny_model(one)[0, : ids.size - 1]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        counted = range(len(prompt) - 1, len(prompt) + len(answer))  # the answer's bytes, then eos
        expected -= sum(log_probs[j, ids[j + 1]] for j in counted)
    assert sum_ce == pytest.approx(expected, rel=1e-5)


def test_packed_equals_unpacked(tmp_path, tiny_model):
    sources = DataSources(data_config(write_jsonl(tmp_path / "sft.jsonl", pairs(9, seed=1))), ByteTokenizer())
    examples = [sources.sources[0].example(i) for i in range(9)]
    packed = pack_examples(examples, ROW, split=False)
    unpacked = [pack_examples([e], ROW) for e in examples]
    assert packed.n_rows < len(examples)
    sums = cross_entropy_sums(tiny_model(packed), packed.targets, packed.loss_mask)
    one_by_one = [cross_entropy_sums(tiny_model(u), u.targets, u.loss_mask) for u in unpacked]
    assert float(sums[3]) == sum(float(s[3]) for s in one_by_one)  # the same tokens count
    assert float(sums[1]) == pytest.approx(sum(float(s[1]) for s in one_by_one), rel=1e-5)


def test_pipeline_packs_examples_whole_with_their_masks(tmp_path):
    records = pairs(40, seed=2)
    c = data_config(write_jsonl(tmp_path / "sft.jsonl", records), shuffle_window_tokens=0)
    tok = ByteTokenizer()
    sources = DataSources(c, tok)
    source = sources.sources[0]
    pipeline = make_pipeline(c, tok, 4, 0, 0, 1, sources=sources, debug=True)
    seen = 0
    for _ in range(6):
        batch = next(pipeline)
        keys, offsets = batch["document_keys"], batch["document_offsets"]
        for b, s in zip(*np.nonzero(keys >= 0)):
            doc = int(decode_keys(keys[b, s : s + 1])[2][0])
            example = source.example(doc)
            assert batch["tokens"][b, s] == example[offsets[b, s], 0]
            assert batch["targets"][b, s] == example[offsets[b, s], 1]
            assert batch["loss_mask"][b, s] == example[offsets[b, s], 3]
        # Whole examples: each segment starts at the example's first token and ends at its last.
        starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
        assert (offsets[starts] == 0).all()
        ends = np.diff(batch["segment_ids"], append=0, axis=1) != 0
        ends &= batch["segment_ids"] > 0
        for b, s in zip(*np.nonzero(ends)):
            doc = int(decode_keys(keys[b, s : s + 1])[2][0])
            assert offsets[b, s] == source.example(doc).shape[0] - 1
        seen += int(starts.sum())
    assert seen >= 4 * 6
    pipeline.close()


def test_bad_format_or_template_is_one_clear_line():
    c = default_config()
    c.data.format = "chatty"
    one_line = r"^data.format='chatty' is not one of \('text', 'chat', 'prompt_completion', 'preference'\)$"
    with pytest.raises(ConfigError, match=one_line):
        validate(c)
    c = default_config()
    c.data.chat_template = "vicuna"
    with pytest.raises(ConfigError, match="data.chat_template='vicuna' is not one of"):
        validate(c)


def test_stdlib_pairs_take_the_docstring_as_prompt_and_the_rest_as_answer():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "sft", "stdlib_pairs.py")
    spec = importlib.util.spec_from_file_location("stdlib_pairs", path)
    stdlib_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stdlib_pairs)
    source = (
        "class A:\n"
        "    @staticmethod\n"
        "    def double(x):\n"
        '        """Return twice x.\n\n        Longer notes.\n        """\n'
        "        return 2 * x\n"
        "def only_doc():\n"
        '    """Nothing to answer with."""\n'
    )
    assert list(stdlib_pairs._pairs_of_file(source)) == [
        ("Return twice x.", "@staticmethod\ndef double(x):\n    return 2 * x")
    ]


def test_sft_demo_config_validates(tmp_path):
    from configs import sft_demo

    c = sft_demo.get_config()
    assert (c.data.format, c.data.chat_template) == ("prompt_completion", "chatml")
    c.train.init_from = str(tmp_path)
    validate(c)
