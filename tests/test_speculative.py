"""Speculative decoding (tpullm/inference/speculative.py) for batches of prompts: greedy output against the target's
own Generator row for row, and sampled tokens against the target's distribution from full forward passes (a
chi-square test, for one row and for each row of a batch)."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from scipy import stats

from tpullm import models
from tpullm.errors import UserError
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams, filter_logits
from tpullm.inference.speculative import SpeculativeGenerator
from tpullm.inference.text import complete_texts
from tpullm.models import kv_cache

GREEDY = SamplingParams(temperature=0.0)
TARGETS = {
    "llama": dict(num_kv_heads=2),
    "mistral": dict(num_kv_heads=1, sliding_window=5),  # a window shorter than prompt + generated tokens
    "mixtral": dict(num_kv_heads=2, num_experts=4, experts_per_token=2),
    "gpt2": dict(positions="learned", norm="layernorm", norm_bias=True, mlp="gelu", qkv_bias=True, tie_embeddings=True),
}


def target_of(family, vocab, **kw):
    shape = dict(vocab_size=vocab, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, init_std=0.3, max_length=128)
    model = models.build({**shape, **TARGETS[family], **kw})
    return model, models.init_params(model, jax.random.key(0))


def first_layer_draft(model, params):
    """The target cut to its first layer (same embeddings and head): smaller, and often but not always agreeing."""
    draft = models.build(dataclasses.replace(model.config, num_layers=1))
    return draft, {**params, "layers": jax.tree.map(lambda x: x[:1], params["layers"])}


def random_small_draft(model):
    """An unrelated model a quarter of the target's width with the same vocabulary."""
    cfg = dict(vocab_size=model.config.vocab_size, embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32, init_std=0.3)
    draft = models.build(cfg)
    return draft, models.init_params(draft, jax.random.key(1))


def prompt_of(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_several_tokens_decoded_at_once_and_rewound_equal_the_full_forward_pass(family):
    model, params = target_of(family, vocab=96)
    tokens = np.array([prompt_of(16, 96, seed=3)])
    other = tokens.copy()
    other[0, 9:] = prompt_of(7, 96, seed=4)  # a different continuation after the first 9 tokens
    full, full_other = (np.asarray(model.apply({"params": params}, t)) for t in (tokens, other))
    k = 4
    _, variables = model.apply(
        {"params": params},
        tokens[:, :7],
        cache="prefill",
        cache_slots=kv_cache.slots(model.config, 16) + k,
        mutable=["cache"],
    )
    logits, variables = model.apply(
        {"params": params, **variables},
        tokens[:, 7:12],
        positions=np.arange(7, 12)[None],
        cache="decode",
        mutable=["cache"],
    )  # 5 = k + 1 tokens, like a verification
    np.testing.assert_allclose(logits, full[:, 7:12], atol=1e-4)
    # Keep tokens 7 and 8, drop 9-11, and continue differently: the dropped keys must not be seen.
    cache = kv_cache.rewind(variables["cache"], 9)
    logits, _ = model.apply(
        {"params": params, "cache": cache},
        other[:, 9:14],
        positions=np.arange(9, 14)[None],
        cache="decode",
        mutable=["cache"],
    )
    np.testing.assert_allclose(logits, full_other[:, 9:14], atol=1e-4)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_greedy_batch_equals_the_targets_greedy_output_row_for_row(family):
    model, params = target_of(family, vocab=96)
    prompts = [prompt_of(n, 96, seed) for seed, n in enumerate((11, 3, 17))]
    expected = Generator(model, params, max_length=40).generate(prompts, 20, GREEDY)
    rates = {}
    for name, (draft, draft_params) in {
        "first layer": first_layer_draft(model, params),
        "random small": random_small_draft(model),
    }.items():
        result = SpeculativeGenerator(model, params, draft, draft_params, 40, k=3).generate(prompts, 20, GREEDY)
        for completion, reference in zip(result.completions, expected, strict=True):
            assert completion.tokens == reference.tokens, name
            np.testing.assert_allclose(completion.logprobs, reference.logprobs, atol=1e-4)
            assert completion.finish_reason == "length"
        rates[name] = result
    # The first-layer draft is partly right: rounds end both on a rejection and on k acceptances.
    first_layer = rates["first layer"]
    assert 0 < first_layer.acceptance_rate < 1 and all(0 <= r <= 1 for r in first_layer.acceptance_rates)
    # A round keeps only as many drafts as the row that accepted fewest.
    assert first_layer.kept_rate <= first_layer.acceptance_rate


def test_rows_stop_on_their_own_eos_like_the_generator():
    model, params = target_of("llama", vocab=96)
    draft, draft_params = first_layer_draft(model, params)
    prompts = [prompt_of(n, 96, seed) for seed, n in ((2, 7), (5, 12), (6, 4))]
    tokens = Generator(model, params, max_length=40).generate(prompts, 20, GREEDY)[0].tokens
    eos = tokens[5]
    expected = Generator(model, params, max_length=40).generate(prompts, 20, GREEDY, eos_id=eos)
    result = SpeculativeGenerator(model, params, draft, draft_params, 40, k=4).generate(prompts, 20, GREEDY, eos)
    assert [(c.tokens, c.finish_reason) for c in result.completions] == [(c.tokens, c.finish_reason) for c in expected]
    assert result.completions[0].finish_reason == "eos" and len(result.completions[0].tokens) <= 5
    assert len({len(c.tokens) for c in result.completions}) == 3  # each row stopped at its own point


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, seed=3)])
def test_a_draft_equal_to_the_target_is_always_accepted(sampling):
    model, params = target_of("mistral", vocab=96)
    prompts = [prompt_of(9, 96), prompt_of(4, 96, seed=1)]
    result = SpeculativeGenerator(model, params, model, params, 40, k=4).generate(prompts, 17, sampling)
    assert result.acceptance_rate == result.kept_rate == 1.0 and result.acceptance_rates == [1.0, 1.0]
    assert [len(c.tokens) for c in result.completions] == [17, 17]


def reference_distributions(model, params, prompt, sampling, vocab):
    """The target's probabilities of the first three new tokens by full forward passes (no cache):
    p(t1) [vocab], p(t2 | t1) [vocab, vocab], p(t3 | t1, t2) [vocab, vocab, vocab], after the same filters."""

    def probs(rows):  # rows: [n, length] -> the next token's distribution [n, vocab]
        logits = model.apply({"params": params}, np.asarray(rows, np.int32))[:, -1, :vocab]
        filtered = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        return np.asarray(jax.nn.softmax(filtered, axis=-1), np.float64)

    first = probs([prompt])[0]
    second = probs([prompt + [a] for a in range(vocab)])
    third = probs([prompt + [a, b] for a, b in itertools.product(range(vocab), repeat=2)]).reshape(vocab, vocab, vocab)
    return first, second, third


def chi_square_p_value(observed, expected):
    """Pearson's test, cells expected below 5 pooled into one (expected rescaled to the observed total: the
    float32 probabilities sum to 1 only up to rounding)."""
    observed, expected = np.ravel(observed), np.ravel(expected)
    expected = expected * observed.sum() / expected.sum()
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return stats.chisquare(observed[keep], expected[keep]).pvalue


def assert_follows_the_target(tokens, model, params, prompt, sampling, vocab):
    """tokens: [samples, 3] continuations of `prompt`: the pairs (t1, t2) and the third tokens are distributed
    as the target's full forward passes say (chi-square)."""
    samples = len(tokens)
    first, second, third = reference_distributions(model, params, prompt, sampling, vocab)
    pairs = first[:, None] * second  # [vocab, vocab] p(t1, t2)
    observed_pairs = np.zeros((vocab, vocab))
    np.add.at(observed_pairs, (tokens[:, 0], tokens[:, 1]), 1)
    assert chi_square_p_value(observed_pairs, samples * pairs) > 1e-3
    third_marginal = np.einsum("ab,abc->c", pairs, third)  # p(t3)
    assert chi_square_p_value(np.bincount(tokens[:, 2], minlength=vocab), samples * third_marginal) > 1e-3


def sampling_target(family, vocab):
    return target_of(family, vocab, init_std=0.1, **({"sliding_window": 3} if family == "mistral" else {}))


@pytest.mark.parametrize(
    "family,sampling",
    [
        ("llama", SamplingParams(temperature=1.0, seed=5)),
        ("mistral", SamplingParams(temperature=0.8, top_k=6, seed=6)),  # window 3 < the 6-token prompt
    ],
)
def test_sampled_tokens_follow_the_targets_distribution(family, sampling):
    vocab, samples = 8, 4000
    model, params = sampling_target(family, vocab)
    draft, draft_params = random_small_draft(model)
    prompt = prompt_of(6, vocab, seed=4)
    generator = SpeculativeGenerator(model, params, draft, draft_params, 16, k=2)
    runs = generator.generate_repeats([prompt], 3, sampling, repeats=samples)
    tokens = np.array([run.completions[0].tokens for run in runs])  # [samples, 3]
    rate = np.mean([run.acceptance_rate for run in runs])
    assert tokens.shape == (samples, 3) and 0 < rate < 1
    assert_follows_the_target(tokens, model, params, prompt, sampling, vocab)


def test_each_row_of_a_batch_follows_the_targets_distribution():
    """Rows of different lengths share rounds that keep as many drafts as the row that accepted fewest: every
    row's tokens still follow the target's distribution for its own prompt."""
    vocab, samples = 8, 3000
    sampling = SamplingParams(temperature=1.0, seed=7)
    model, params = sampling_target("llama", vocab)
    draft, draft_params = random_small_draft(model)
    prompts = [prompt_of(6, vocab, seed=4), prompt_of(3, vocab, seed=5), prompt_of(5, vocab, seed=6)]
    generator = SpeculativeGenerator(model, params, draft, draft_params, 16, k=2)
    runs = generator.generate_repeats(prompts, 3, sampling, repeats=samples)
    # The rule bites: rows accepted drafts that their round did not keep.
    assert np.mean([run.kept_rate for run in runs]) < np.mean([run.acceptance_rate for run in runs]) < 1
    for row, prompt in enumerate(prompts):
        tokens = np.array([run.completions[row].tokens for run in runs])  # [samples, 3]
        assert_follows_the_target(tokens, model, params, prompt, sampling, vocab)


def test_draft_vocabulary_must_match():
    model, params = target_of("llama", vocab=96)
    draft = models.build(dict(vocab_size=64, embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32))
    with pytest.raises(UserError, match="vocab_size"):
        SpeculativeGenerator(model, params, draft, models.init_params(draft, jax.random.key(1)), 40)


class DigitTokenizer:
    """Text of digits 0-9 as ids 0-9 (eos 10): enough of a tokenizer for complete_texts."""

    eos_id = 10

    def encode(self, text):
        return [int(c) for c in text]

    def decode(self, ids):
        return "".join(str(i) for i in ids)


def test_complete_texts_with_a_draft_equals_without_when_greedy():
    model, params = target_of("llama", vocab=12)
    texts = ["31415", "2718281"]
    plain = complete_texts(model, params, DigitTokenizer(), texts, 12, GREEDY, train_length=64)
    logged = []
    drafted = complete_texts(
        model,
        params,
        DigitTokenizer(),
        texts,
        12,
        GREEDY,
        train_length=64,
        draft=first_layer_draft(model, params),
        draft_tokens=3,
        log=logged.append,
    )
    assert drafted == plain and len(logged) == 2 and all("accepted" in line for line in logged)
