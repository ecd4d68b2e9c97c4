"""Beam search (tpullm/inference/beam.py) against greedy decoding, Hugging Face `generate(num_beams=...)`
and the model's own log-probabilities from full forward passes."""

import json
import sys

import jax
import numpy as np
import pytest
from multidevice import results_on_devices

from tpullm import models
from tpullm.errors import UserError
from tpullm.inference.beam import beam_search
from tpullm.inference.generate import Generator
from tpullm.inference.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
NEW = 10


def sum_logprob(model, params, prompt, tokens):
    """The summed log-probability of `tokens` after `prompt`, from one forward pass without a cache."""
    ids = np.array([prompt + tokens])
    log_probs = jax.nn.log_softmax(model.apply({"params": params}, ids)[0], axis=-1)
    return sum(float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def build_tiny_llama():
    """A tiny Llama (2 key/value heads, so a tensor=2 mesh splits them) and three prompts."""
    model = models.build(
        dict(vocab_size=96, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, init_std=0.3)
    )
    params = models.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 96, n).tolist() for n in (9, 3, 5)]
    return model, params, prompts


@pytest.fixture(scope="module")
def tiny_llama():
    model, params, prompts = build_tiny_llama()
    return model, params, Generator(model, params, max_length=32), prompts


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_one_beam_is_greedy(tiny_llama, early_stopping):
    _, _, generator, prompts = tiny_llama
    greedy = generator.generate(prompts, NEW, GREEDY)
    eos = greedy[0].tokens[4]
    for eos_id, reference in ((None, greedy), (eos, generator.generate(prompts, NEW, GREEDY, eos_id=eos))):
        beams = beam_search(generator, prompts, NEW, 1, eos_id=eos_id, early_stopping=early_stopping)
        for [best], completion in zip(beams, reference):
            assert best.tokens == completion.tokens
            assert best.finish_reason == completion.finish_reason
    assert reference[0].finish_reason == "eos"


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (2.0, True), (0.5, False), (1.5, "never")])
def test_scores_are_length_normalised_sums_of_logprobs(tiny_llama, length_penalty, early_stopping):
    model, params, generator, prompts = tiny_llama
    free = beam_search(generator, prompts, NEW, 4, length_penalty)
    eos = free[1][0].tokens[2]
    beams = beam_search(generator, prompts, NEW, 4, length_penalty, eos_id=eos, early_stopping=early_stopping)
    assert any(h.finish_reason == "eos" for hypotheses in beams for h in hypotheses)
    for prompt, hypotheses in zip(prompts + prompts, free + beams):
        scores = [h.score for h in hypotheses]
        assert scores == sorted(scores, reverse=True) and len(hypotheses) == 4
        for h in hypotheses:
            counted = h.tokens + ([eos] if h.finish_reason == "eos" else [])
            expected = sum_logprob(model, params, prompt, counted) / len(counted) ** length_penalty
            assert h.score == pytest.approx(expected, abs=1e-4)
    assert not any(eos in h.tokens for hypotheses in beams for h in hypotheses)


def test_bad_requests_are_refused(tiny_llama):
    _, _, generator, prompts = tiny_llama
    with pytest.raises(UserError, match="num_beams=0"):
        beam_search(generator, prompts, NEW, 0)
    with pytest.raises(UserError, match="exceeds max_length"):
        beam_search(generator, prompts, 30, 2)
    with pytest.raises(UserError, match="early_stopping='sometimes'"):
        beam_search(generator, prompts, NEW, 2, early_stopping="sometimes")


# ----------------------------------------------------------------------------- Hugging Face generate


def _hf_beams(hf_model, prompt, n, num_beams, length_penalty, early_stopping, eos_id):
    """HF's best beam's new tokens (cut before eos) and its score."""
    return _hf_hypotheses(hf_model, prompt, n, num_beams, length_penalty, early_stopping, eos_id, 1)[0]


def _hf_hypotheses(hf_model, prompt, n, num_beams, length_penalty, early_stopping, eos_id, count):
    """HF's `count` best hypotheses, best first: (new tokens cut before eos, score) each."""
    import torch

    hf_model.generation_config.eos_token_id = eos_id
    hf_model.generation_config.pad_token_id = 0 if eos_id is None else eos_id
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=0,
            num_beams=num_beams,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            num_return_sequences=count,
            return_dict_in_generate=True,
            output_scores=True,
        )
    hypotheses = []
    for sequence, score in zip(out.sequences, out.sequences_scores):
        new = sequence[len(prompt) :].tolist()
        hypotheses.append(((new[: new.index(eos_id)] if eos_id in new else new), float(score)))
    return hypotheses


@pytest.fixture(scope="module")
def hf_llama():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_hf_parity import VOCAB as HF_VOCAB
    from test_hf_parity import build_hf

    from tpullm.interop import from_hf

    hf_model = build_hf("llama")
    cfg, params = from_hf(hf_model)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(2, HF_VOCAB, n).tolist() for n in (11, 4, 7)]
    return hf_model, Generator(models.build(cfg), params, max_length=40), prompts


@pytest.mark.parametrize(
    "num_beams, length_penalty, early_stopping",
    [(3, 1.0, False), (4, 2.0, True), (2, 0.5, False), (2, 0.5, "never"), (2, -0.5, "never")],
)
def test_beam_search_equals_hugging_face_generate(hf_llama, num_beams, length_penalty, early_stopping):
    hf_model, generator, prompts = hf_llama
    new = 16
    free = [_hf_beams(hf_model, p, new, num_beams, length_penalty, early_stopping, None) for p in prompts]
    eos = free[0][0][5]  # a token the best beam picks: with it as eos, hypotheses end early
    for eos_id in (None, eos):
        ours = beam_search(generator, prompts, new, num_beams, length_penalty, eos_id, early_stopping)
        for prompt, [best, *_] in zip(prompts, ours):
            tokens, score = _hf_beams(hf_model, prompt, new, num_beams, length_penalty, early_stopping, eos_id)
            assert best.tokens == tokens
            assert best.score == pytest.approx(score, abs=1e-4)
    assert any(best.finish_reason == "eos" for best, *_ in ours)


def test_never_stopping_early_equals_hugging_face_where_it_changes_the_search(hf_llama):
    """early_stopping="never" searches on while the best running beam could still win at max_new_tokens. With an
    eos for which that finds other hypotheses than HF's default (False), every hypothesis equals HF's in both."""
    hf_model, generator, prompts = hf_llama
    num_beams, length_penalty, new = 3, 1.0, 16
    free = beam_search(generator, prompts, new, num_beams, length_penalty)
    candidates = sorted({t for hypotheses in free for h in hypotheses for t in h.tokens})

    def search(eos, early_stopping):
        return beam_search(generator, prompts, new, num_beams, length_penalty, eos, early_stopping)

    eos = next(e for e in candidates if search(e, False) != search(e, "never"))
    for early_stopping in (False, "never"):
        for prompt, ours in zip(prompts, search(eos, early_stopping)):
            theirs = _hf_hypotheses(hf_model, prompt, new, num_beams, length_penalty, early_stopping, eos, num_beams)
            assert [h.tokens for h in ours] == [tokens for tokens, _ in theirs]
            np.testing.assert_allclose([h.score for h in ours], [score for _, score in theirs], atol=1e-4)


# ----------------------------------------------------------------------------- mesh


def _mesh_worker(out_path):
    from jax.sharding import Mesh

    from tpullm.config import MESH_AXES

    model, params, prompts = build_tiny_llama()
    shape = {**{a: 1 for a in MESH_AXES}, "data": 2, "tensor": 2}
    mesh = Mesh(np.array(jax.devices()[:4]).reshape([shape[a] for a in MESH_AXES]), MESH_AXES)
    results = {}
    for name, generator in (("one_device", Generator(model, params, 32)), ("mesh", Generator(model, params, 32, mesh))):
        beams = beam_search(generator, prompts, NEW, 3, length_penalty=1.5)
        results[name] = [[(h.tokens, h.score) for h in hypotheses] for hypotheses in beams]
    with open(out_path, "w") as f:
        json.dump(results, f)


def test_beam_search_on_a_mesh_equals_one_device(tmp_path_factory):
    results = results_on_devices(tmp_path_factory, __file__, timeout=900)
    for ours, reference in zip(results["mesh"], results["one_device"]):
        assert [tokens for tokens, _ in ours] == [tokens for tokens, _ in reference]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in reference], atol=1e-4)


if __name__ == "__main__":
    _mesh_worker(sys.argv[1])
