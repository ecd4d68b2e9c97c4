"""Log-likelihood scoring (tpullm/evaluation): against torch, packed against unpacked, rolling windows
against the training loss, and the limits of a row."""

import dataclasses

import jax
import numpy as np
import pytest

from tpullm import models
from tpullm.config import ModelConfig
from tpullm.errors import UserError
from tpullm.evaluation.requests import pack, rolling_windows, truncated
from tpullm.evaluation.scoring import Scorer
from tpullm.training.loss import cross_entropy_sums

TINY = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_length=64)


def random_requests(rng, n, vocab, longest=20):
    return [
        (rng.integers(1, vocab, rng.integers(1, longest)).tolist(), rng.integers(1, vocab, rng.integers(1, 6)).tolist())
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny():
    model = models.build(TINY)
    return model, models.init_params(model, jax.random.key(0))


def test_scores_equal_a_direct_torch_computation_on_an_hf_llama():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_hf_parity import VOCAB, build_hf

    from tpullm.interop import from_hf

    hf_model = build_hf("llama")
    cfg, params = from_hf(hf_model)
    rng = np.random.default_rng(0)
    requests = random_requests(rng, 12, VOCAB)
    # two continuations that are the model's own greedy choices, so is-greedy is tested both ways
    for context in ([5, 9, 13], [7] * 6):
        with torch.no_grad():
            ids = list(context)
            for _ in range(3):
                ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
        requests.append((context, ids[len(context) :]))
    scores = Scorer(models.build(cfg), params, length=32, batch_rows=2).score(requests)
    for (context, continuation), score in zip(requests, scores):
        with torch.no_grad():
            logits = hf_model(torch.tensor([context + continuation])).logits[0].double()
        logprobs = torch.log_softmax(logits, -1)[len(context) - 1 : -1]
        targets = torch.tensor(continuation)
        expected = float(logprobs.gather(1, targets[:, None]).sum())
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.greedy == bool((logprobs.argmax(-1) == targets).all())
    assert [s.greedy for s in scores[-2:]] == [True, True] and not all(s.greedy for s in scores[:-2])


def test_packed_scores_equal_one_request_per_row_whatever_the_batch(tiny):
    model, params = tiny
    requests = random_requests(np.random.default_rng(1), 30, TINY.vocab_size)
    packed_rows = pack(requests, 32)
    tokens = sum(len(c) + len(x) - 1 for c, x in requests)
    assert len(packed_rows.tokens) <= -(-tokens // 32) + 1, "the rows should be nearly full"
    packed = Scorer(model, params, length=32, batch_rows=4).score(requests)
    alone = Scorer(model, params, length=32, batch_rows=1).score(requests, one_per_row=True)
    np.testing.assert_allclose([s.logprob for s in packed], [s.logprob for s in alone], atol=1e-4)
    assert [s.greedy for s in packed] == [s.greedy for s in alone]


def test_rolling_loglikelihood_equals_the_summed_cross_entropy_of_its_windows(tiny):
    """A 70-token document in rows of 32: three windows, each conditioned as the harness does."""
    model, params = tiny
    doc = np.random.default_rng(2).integers(3, TINY.vocab_size, 70).tolist()
    windows = rolling_windows(doc, prefix_id=2, length=32)
    assert [len(x) for _, x in windows] == [32, 32, 6]
    assert sum((x for _, x in windows), []) == doc  # every token predicted exactly once
    assert [len(c) + len(x) - 1 for c, x in windows] == [32, 32, 32]  # each window fills a row
    [total] = Scorer(model, params, length=32).rolling([doc], prefix_id=2)
    expected = 0.0
    for context, continuation in windows:
        ids = np.array(context + continuation)
        logits = model.apply({"params": params}, ids[None, :-1])
        mask = np.zeros((1, len(ids) - 1), np.float32)
        mask[0, len(context) - 1 :] = 1
        expected -= float(cross_entropy_sums(logits, ids[None, 1:], mask)[1])
    assert total == pytest.approx(expected, rel=1e-5)


def test_contexts_lose_their_oldest_tokens_and_long_continuations_are_refused(tiny):
    model, params = tiny
    context, continuation = list(range(3, 50)), [7, 8, 9]
    assert truncated(context, continuation, 32) == (context[-30:], continuation)
    scorer = Scorer(model, params, length=32)
    [long], [cut] = scorer.score([(context, continuation)]), scorer.score([(context[-30:], continuation)])
    assert long == cut
    with pytest.raises(UserError, match="continuation of 40 tokens cannot be scored in rows of 32"):
        scorer.score([([1], list(range(3, 43)))])
    with pytest.raises(UserError, match="at least one context token"):
        scorer.score([([], [5])])


def test_perplexity_is_the_mean_token_nll_and_ignores_batch_and_packing(tiny, tmp_path):
    from tpullm.data.tokenizer import ByteTokenizer
    from tpullm.evaluation.perplexity import held_out_documents, perplexity

    model = models.build(dataclasses.replace(TINY, vocab_size=259))
    params = models.init_params(model, jax.random.key(0))
    with pytest.raises(UserError, match="outside the model's vocabulary of 64"):
        Scorer(*tiny, length=32).score([([1], [200])])
    for i, text in enumerate(["def f(x):\n    return x\n" * 3, "import os\n", "class A:\n    pass\n" * 5]):
        (tmp_path / f"doc{i}.txt").write_text(text)
    tokenizer = ByteTokenizer()
    documents = held_out_documents(str(tmp_path / "*.txt"), tokenizer, val_fraction=None)
    assert sorted(len(d) for d in documents) == [10, 69, 90]
    results = [perplexity(Scorer(model, params, length=32, batch_rows=b), tokenizer, documents) for b in (1, 3)]
    assert results[0]["nll"] == pytest.approx(results[1]["nll"], rel=1e-6)
    alone = sum(-Scorer(model, params, length=32).rolling([d], tokenizer.eos_id)[0] for d in documents)
    r = results[0]
    assert r["tokens"] == r["bytes"] == 169  # one byte per token
    assert r["nll"] == pytest.approx(alone / 169, rel=1e-6)
    assert r["perplexity"] == pytest.approx(np.exp(r["nll"])) and r["bits_per_byte"] == pytest.approx(
        r["nll"] / np.log(2)
    )
