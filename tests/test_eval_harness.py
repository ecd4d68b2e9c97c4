"""The LM Evaluation Harness with tpullm's model against the harness with its own `hf` model, on the same
random weights and the same byte tokenizer, on a multiple-choice task this test writes (offline)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

from tpullm import models  # noqa: E402
from tpullm.data.tokenizer import ByteTokenizer  # noqa: E402
from tpullm.evaluation.harness import TpullmLM  # noqa: E402
from tpullm.interop import from_hf  # noqa: E402

LENGTH = 96
WORDS = "red green blue cat dog bird sun moon tree river stone cloud".split()


def byte_level_hf_tokenizer():
    """A transformers tokenizer with ByteTokenizer's ids (byte b -> b + 3; pad, bos, eos = 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = {}, 0
    for b in range(256):  # GPT-2's reversible byte -> unicode map
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chars[b]: b + 3 for b in range(256)}}
    tokenizer = Tokenizer(BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def write_task(directory, n_docs=24):
    """A multiple-choice task of random word lists (choices of different lengths, so acc_norm differs)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for _ in range(n_docs):
                query = " ".join(rng.choice(WORDS, 5)) + " then"
                choices = [" " + " ".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(4)]
                f.write(json.dumps({"query": query, "choices": choices, "gold": int(rng.integers(4))}) + "\n")
    with open(os.path.join(directory, "tiny_mc.yaml"), "w") as f:
        f.write(
            f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {directory}/train.jsonl
    test: {directory}/test.jsonl
training_split: train
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
        )


def test_harness_scores_equal_the_harness_hf_model_on_the_same_weights(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    write_task(str(tmp_path))
    config = transformers.LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=LENGTH,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    cfg, params = from_hf(hf_model)
    ours = TpullmLM(model=models.build(cfg), params=params, tokenizer=ByteTokenizer(), max_length=LENGTH, batch_rows=4)
    theirs = HFLM(pretrained=hf_model, tokenizer=byte_level_hf_tokenizer(), batch_size=8, max_length=LENGTH)

    def evaluate(lm, shots):
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=["tiny_mc"],
            num_fewshot=shots,
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            fewshot_random_seed=3,
            bootstrap_iters=0,
            log_samples=True,
        )
        samples = [s["filtered_resps"] for s in results["samples"]["tiny_mc"]]
        return results["results"]["tiny_mc"], samples

    for shots in (0, 2):
        (ours_metrics, ours_samples), (hf_metrics, hf_samples) = evaluate(ours, shots), evaluate(theirs, shots)
        for metric in ("acc,none", "acc_norm,none"):
            assert ours_metrics[metric] == hf_metrics[metric], (shots, metric)
        # every choice's log-likelihood, not just the argmax
        ours_ll = np.array([[ll for ll, _ in doc] for doc in ours_samples], np.float64)
        hf_ll = np.array([[ll for ll, _ in doc] for doc in hf_samples], np.float64)
        np.testing.assert_allclose(ours_ll, hf_ll, atol=1e-3)


def test_generate_until_and_rolling_go_through_the_generator_and_the_scorer():
    import jax
    from lm_eval.api.instance import Instance

    from tpullm.config import ModelConfig
    from tpullm.inference.generate import Generator
    from tpullm.inference.sampling import SamplingParams

    cfg = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=2, mlp_dim=64, max_length=64)
    model = models.build(cfg)
    params = models.init_params(model, jax.random.key(1))
    tokenizer = ByteTokenizer()
    lm = TpullmLM(model=model, params=params, tokenizer=tokenizer, max_length=64, generate_batch=2)
    contexts = ["red cat", "blue", "a tree by the river"]
    greedy = Generator(model, params, max_length=64).generate(
        [tokenizer.encode(c) for c in contexts], 12, SamplingParams(temperature=0), eos_id=tokenizer.eos_id
    )
    texts = [tokenizer.decode(c.tokens) for c in greedy]
    until = texts[0][3:5]  # a string the first continuation contains, so the cut is tested
    requests = [
        Instance("generate_until", {}, (c, {"until": [until], "max_gen_toks": 12}), i) for i, c in enumerate(contexts)
    ]
    assert lm.generate_until(requests, disable_tqdm=True) == [t.split(until)[0] for t in texts]
    assert len(lm.generate_until(requests[:1], disable_tqdm=True)[0]) == 3
    documents = ["def f(x):\n    return x * 2\n" * 4, "import os\n"]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), 0) for d in documents])
    expected = lm.scorer.rolling([tokenizer.encode(d) for d in documents], tokenizer.eos_id)
    np.testing.assert_allclose(rolling, expected, rtol=1e-6)
    assert all(r < 0 for r in rolling)
