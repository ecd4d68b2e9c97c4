"""DPO and reward models on preference pairs (tpullm/data/preference.py, tpullm/training/dpo.py,
tpullm/training/reward.py): trl's DPO numbers, the pair data, the Bradley-Terry loss."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tpullm import models
from tpullm.config import ConfigError, ModelConfig, default_config, validate
from tpullm.data import ByteTokenizer, DataSources, make_pipeline
from tpullm.data.chat import example_array
from tpullm.data.packing import pack_examples
from tpullm.data.preference import pair_example
from tpullm.training import init_from, pairs
from tpullm.training.dpo import DPO, sequence_log_probs
from tpullm.training.reward import Reward
from tpullm.training.state import TrainState
from tpullm.training.step import make_train_step

# ---------------------------------------------------------------------------------------------- trl
VOCAB = 128
# Token pairs (prompt, chosen, rejected) of different lengths; 1 is eos, as trl appends it.
TOKEN_PAIRS = [
    ([5, 6, 7], [8, 9, 1], [10, 1]),
    ([11, 12], [13, 1], [14, 15, 16, 1]),
    ([17, 18, 19, 20, 21], [22, 23, 24, 25, 1], [26, 27, 1]),
    ([30], [31, 32, 33, 1], [34, 35, 36, 37, 38, 1]),
]


def hf_llama(seed):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llamas():
    """(policy, reference): two tiny random-weight HF Llamas with different weights."""
    return hf_llama(0), hf_llama(1)


def trl_metrics(policy, reference, token_pairs, beta, label_smoothing=0.0, loss_type="sigmoid"):
    """trl's DPO loss and metrics on `token_pairs`: DPOTrainer._compute_loss on its own collated batch."""
    import datasets
    import tokenizers
    import transformers
    import trl

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="t0", eos_token="t1", pad_token="t2", unk_token="t3"
    )
    args = trl.DPOConfig(
        output_dir="/tmp/unused_trl_output",
        report_to="none",
        use_cpu=True,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=[loss_type],
        disable_tqdm=True,
        bf16=False,  # trl defaults to bfloat16 autocast; the comparison is in float32
    )
    # The trainer needs a dataset to build; the batch below is the one it scores.
    dummy = datasets.Dataset.from_list([{"prompt": "t5", "chosen": "t6", "rejected": "t7"}])
    trainer = trl.DPOTrainer(policy, reference, args=args, train_dataset=dummy, processing_class=tokenizer)
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in token_pairs]
    loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train" if trainer.model.training else "eval"].items()}
    return {"loss": float(loss), **metrics}


def token_pair_rows(token_pairs, seq_len=64):
    """The pairs as tpullm packs them: each an example of chosen then rejected, all in one row."""
    examples = []
    for prompt, chosen, rejected in token_pairs:
        for answer in (chosen, rejected):
            ids = np.array(prompt + answer, np.int32)
            trained = np.array([0] * len(prompt) + [1] * len(answer), bool)
            examples.append(example_array(ids, trained))
    pair_examples = [np.concatenate(examples[i : i + 2]) for i in range(0, len(examples), 2)]
    return pack_examples(pair_examples, seq_len, split=False).take(slice(None))


@pytest.fixture(scope="module")
def ours(llamas):
    """(policy Decoder, its params, reference params) imported from the HF Llamas with from_hf."""
    from tpullm.interop import from_hf

    (config, policy), (_, reference) = from_hf(llamas[0]), from_hf(llamas[1])
    return models.Decoder(config), policy, reference


def our_metrics(ours, token_pairs, beta, label_smoothing=0.0):
    model, policy, reference = ours
    batch = token_pair_rows(token_pairs)
    objective = DPO(model, beta, label_smoothing)
    sums = objective.sums(model, policy, {"reference": reference}, batch, None)
    counts = objective.counts(model, batch)
    metrics = {k: float(v) for k, v in objective.metrics(model, sums, counts).items()}
    return {"loss": float(objective.loss(model, sums, counts)), **metrics}


DPO_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def assert_metrics_close(got, want, keys=DPO_KEYS):
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_dpo_loss_logps_and_rewards_equal_trl(llamas, ours):
    assert token_pair_rows(TOKEN_PAIRS)["segment_ids"].max() == 2 * len(TOKEN_PAIRS)  # all pairs in one row
    assert_metrics_close(our_metrics(ours, TOKEN_PAIRS, 0.1), trl_metrics(*llamas, TOKEN_PAIRS, 0.1))


def test_each_pairs_logps_equal_trl(llamas, ours):
    """Per pair (the means above could hide two errors cancelling): one pair at a time, a larger beta."""
    for pair in TOKEN_PAIRS:
        assert_metrics_close(our_metrics(ours, [pair], 0.5), trl_metrics(*llamas, [pair], 0.5))


@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.2), (1.0, 0.1), (3.0, 0.0)])
def test_beta_and_label_smoothing_change_the_loss_as_trls(llamas, ours, beta, label_smoothing):
    """trl 1.16's sigmoid loss has no label smoothing; its "aot" loss is conservative DPO's
    -(1-ls) log sigmoid(beta h) - ls log sigmoid(-beta h) on the batch's sorted log-ratios, which
    for one pair is h itself: so each pair's loss is trl's aot loss of that pair alone."""
    per_pair = [trl_metrics(*llamas, [pair], beta, label_smoothing, loss_type="aot")["loss"] for pair in TOKEN_PAIRS]
    np.testing.assert_allclose(our_metrics(ours, TOKEN_PAIRS, beta, label_smoothing)["loss"], np.mean(per_pair), 1e-4)


def test_policy_equal_to_reference_gives_log_2_and_no_preference(ours):
    model, policy, _ = ours
    m = our_metrics((model, policy, policy), TOKEN_PAIRS, 0.1, 0.0)
    np.testing.assert_allclose(m["loss"], np.log(2), rtol=1e-6)
    assert m["rewards/margins"] == 0 and m["rewards/accuracies"] == 0


def test_a_lora_runs_own_base_is_the_reference_it_would_load(ours):
    """With LoRA and no finetune.reference, DPO's reference is the policy's params without the adapters
    (finetune.lora_base_reference): the same loss and adapter gradients as the base loaded as a frozen model."""
    from tpullm.models import lora

    model, base, _ = ours
    lora_model = models.Decoder(dataclasses.replace(model.config, lora_rank=4, lora_targets="attention/"))
    batch = token_pair_rows(TOKEN_PAIRS)
    fresh = lora_model.init(jax.random.key(0), batch["tokens"][:, :8])["params"]
    params = init_from.overlay(nn.unbox(fresh), base)
    params["layers"]["attention"]["query"]["lora_b"] += 0.05  # a policy that moved away from its base
    shared = DPO(models.Decoder(lora.merged_config(lora_model.config)), 0.1, lora_base=True)
    loaded = DPO(model, 0.1)
    assert shared.frozen_models == {} and set(loaded.frozen_models) == {"reference"}

    def loss_and_grads(objective, frozen):
        def loss(p):
            return objective.loss(lora_model, objective.sums(lora_model, p, frozen, batch, None), 1.0)  # summed

        return jax.value_and_grad(loss)(params)

    (l1, g1), (l2, g2) = loss_and_grads(shared, {}), loss_and_grads(loaded, {"reference": base})
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    assert l1 != pytest.approx(np.log(2) * len(TOKEN_PAIRS))  # the policy differs from the reference
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- preference data
def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def preference_records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps"]

    def text(k):
        return " ".join(rng.choice(words, rng.integers(1, k)))

    return [{"prompt": text(4), "chosen": text(6), "rejected": text(6)} for _ in range(n)]


def data_config(path, seq_len=256, **overrides):
    c = default_config().data
    c.update(corpus=str(path), format="preference", seq_len=seq_len, val_fraction=0.0, num_workers=0, **overrides)
    return c


def test_pair_masks_cover_exactly_the_responses():
    record = {"prompt": "Add two numbers.", "chosen": "def add(a, b):\n    return a + b", "rejected": "pass"}
    example = pair_example(record, "chatml", ByteTokenizer(), add_bos=False)
    starts = np.flatnonzero(example[:, 2] == 0)
    assert starts.tolist() == [0, starts[1]]  # chosen, then rejected from offset 0
    prompt = "<|im_start|>user\nAdd two numbers.<|im_end|>\n<|im_start|>assistant\n"
    for part, answer in zip(np.split(example, starts[1:]), (record["chosen"], record["rejected"])):
        # By hand, in bytes: the targets trained are the answer's bytes, its end of turn and eos (2).
        ids = np.array(list((prompt + answer + "<|im_end|>\n").encode()) + [-1]) + 3
        np.testing.assert_array_equal(part[:, 0], ids[:-1])
        np.testing.assert_array_equal(part[:, 1], ids[1:])
        np.testing.assert_array_equal(part[:, 3] > 0, np.arange(ids.size - 1) >= len(prompt) - 1)


def test_chat_prompts_and_bad_records(tmp_path):
    chat = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    good = [
        {**chat, "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "No."},
    ]
    bad = [
        {"prompt": "Hi", "chosen": "Hello."},
        {"prompt": [{"role": "assistant", "content": "Hi"}], "chosen": "a", "rejected": "b"},
        {"prompt": "Hi", "chosen": "x" * 200, "rejected": "y" * 200},
    ]
    sources = DataSources(data_config(write_jsonl(tmp_path / "p.jsonl", good + bad)), ByteTokenizer())
    assert len(sources.sources[0]) == 2
    assert sources.sources[0].counts.bad == {
        "'rejected' missing or not text": 1,
        "'prompt' is neither text nor a list of messages ending with a user turn": 1,
        "longer than data.seq_len=256 (dropped)": 1,
    }
    first = sources.sources[0].example(0)
    chosen = first[: np.flatnonzero(first[:, 2] == 0)[1]]
    assert (
        ByteTokenizer()
        .decode(chosen[:, 0])
        .startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    )


def test_pipeline_never_splits_pairs_and_chosen_precedes_rejected(tmp_path):
    records = preference_records(40)
    config = data_config(write_jsonl(tmp_path / "p.jsonl", records), seq_len=640)
    sources = DataSources(config, ByteTokenizer())
    expected = {tuple(sources.sources[0].example(i)[:, 0]) for i in range(len(records))}
    batches = make_pipeline(config, ByteTokenizer(), 4, 0, 0, 1, sources=sources)
    most = 0
    for _ in range(5):
        batch = next(batches)
        for row in range(4):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            n = seg.max()
            assert n % 2 == 0 and n >= 2  # whole pairs
            most = max(most, n // 2)
            for k in range(1, n // 2 + 1):
                chosen, rejected = seg == 2 * k - 1, seg == 2 * k
                np.testing.assert_array_equal(pos[chosen], np.arange(chosen.sum()))
                np.testing.assert_array_equal(pos[rejected], np.arange(rejected.sum()))
                pair_tokens = np.concatenate([batch["tokens"][row][chosen], batch["tokens"][row][rejected]])
                assert tuple(pair_tokens) in expected  # this very pair, in order
    assert most >= 3  # several pairs to a row
    # Validation rows too.
    rows = sources.validation_rows(640)
    assert all(m % 2 == 0 for m in rows.segment_ids.max(axis=1))


def test_chosen_and_rejected_never_see_each_other_packed_equals_unpacked(ours):
    """Every pair in one row gives each pair's log-probs alone in a row (and with the sequences swapped)."""
    model, policy, _ = ours
    packed = np.stack(sequence_log_probs(model, policy, token_pair_rows(TOKEN_PAIRS)))[:, 0, : len(TOKEN_PAIRS)]
    for i, (prompt, chosen, rejected) in enumerate(TOKEN_PAIRS):
        alone = np.stack(sequence_log_probs(model, policy, token_pair_rows([(prompt, chosen, rejected)])))[:, 0, 0]
        swapped = np.stack(sequence_log_probs(model, policy, token_pair_rows([(prompt, rejected, chosen)])))[:, 0, 0]
        np.testing.assert_allclose(packed[:, i], alone, rtol=1e-5)
        np.testing.assert_allclose(packed[:, i], swapped[::-1], rtol=1e-5)


def test_pair_helpers_by_hand():
    seg = jnp.array([[1, 1, 2, 2, 2, 3, 4, 0], [1, 2, 2, 0, 0, 0, 0, 0]])
    chosen, rejected = pairs.sequence_sums(jnp.ones_like(seg, jnp.float32), seg)
    np.testing.assert_array_equal(chosen, [[2, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(rejected, [[3, 1, 0, 0], [2, 0, 0, 0]])
    np.testing.assert_array_equal(pairs.real(seg), [[1, 1, 0, 0], [1, 0, 0, 0]])
    assert pairs.count(seg) == 3
    np.testing.assert_array_equal(pairs.last_tokens(seg), [[0, 1, 0, 0, 1, 1, 1, 0], [1, 0, 1, 0, 0, 0, 0, 0]])


def test_config_pairs_objectives_with_preference_data():
    def config(objective, fmt, head="lm"):
        c = default_config()
        c.finetune.objective, c.data.format, c.model.head = objective, fmt, head
        return c

    for objective, fmt, head in (("lm", "text", "lm"), ("dpo", "preference", "lm"), ("reward", "preference", "reward")):
        validate(config(objective, fmt, head))
    for objective, fmt, head, error in (
        ("dpo", "text", "lm", "data.format='preference'"),
        ("lm", "preference", "lm", "data.format='preference'"),
        ("reward", "preference", "lm", "model.head='reward'"),
        ("lm", "text", "reward", "model.head='reward'"),
    ):
        with pytest.raises(ConfigError, match=error):
            validate(config(objective, fmt, head))


# ---------------------------------------------------------------------------------------------- reward
REWARD_MODEL = ModelConfig(
    vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_length=256, head="reward",
    compute_dtype="float32", param_dtype="float32",
)  # fmt: skip


def reward_batch(tmp_path, records, seq_len=256):
    path = write_jsonl(tmp_path / f"p{len(records)}.jsonl", records)
    sources = DataSources(data_config(path, seq_len), ByteTokenizer())
    examples = [sources.sources[0].example(i) for i in range(len(records))]
    return pack_examples(examples, seq_len, split=False).take(slice(None))


def test_bradley_terry_loss_equals_hand_computation_at_each_sequences_last_token(tmp_path):
    model = models.build(REWARD_MODEL)
    params = models.init_params(model, jax.random.key(0))
    assert params["reward_head"]["kernel"].shape == (32, 1) and "lm_head" not in params
    batch = reward_batch(tmp_path, preference_records(12, seed=1))
    objective = Reward()
    sums = objective.sums(model, params, {}, batch, None)
    loss = float(objective.loss(model, sums, objective.counts(model, batch)))

    # By hand: each row's segments in numpy, the reward at each segment's last position.
    rewards = np.asarray(model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"]))
    assert rewards.shape == batch["tokens"].shape
    losses, correct = [], []
    for row, seg in enumerate(batch["segment_ids"]):
        for k in range(1, seg.max() // 2 + 1):
            r_chosen = rewards[row, np.flatnonzero(seg == 2 * k - 1)[-1]]
            r_rejected = rewards[row, np.flatnonzero(seg == 2 * k)[-1]]
            losses.append(np.log1p(np.exp(-(r_chosen - r_rejected))))
            correct.append(r_chosen > r_rejected)
    assert len(losses) == 12
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
    metrics = objective.metrics(model, sums, objective.counts(model, batch))
    np.testing.assert_allclose(metrics["rewards/accuracies"], np.mean(correct), rtol=1e-6)


def test_reward_head_starts_fresh_from_a_language_model():
    """`train.init_from` keeps the params both models have (training/init_from.common, overlay):
    the language model's head is dropped, the reward head keeps its fresh initialization."""
    lm = models.init_params(models.build(dataclasses.replace(REWARD_MODEL, head="lm")), jax.random.key(1))
    fresh = models.init_params(models.build(REWARD_MODEL), jax.random.key(2))
    assert "lm_head" in lm
    started = init_from.overlay(fresh, init_from.common(lm, fresh))
    assert "lm_head" not in started
    np.testing.assert_array_equal(started["reward_head"]["kernel"], fresh["reward_head"]["kernel"])
    for a, b in zip(jax.tree.leaves(started["layers"]), jax.tree.leaves(lm["layers"])):
        np.testing.assert_array_equal(a, b)


def test_a_few_steps_raise_the_held_out_pair_accuracy(tmp_path):
    """Pairs whose chosen answer ends in a smile, the rejected one in a frown: a rule a reward model
    learns in a few steps, so pairs it never trained on are ranked right too."""

    def smiles(n, seed):
        return [
            {**r, "chosen": r["chosen"] + " :)", "rejected": r["rejected"] + " :("} for r in preference_records(n, seed)
        ]

    model = models.build(REWARD_MODEL)
    params = models.init_params(model, jax.random.key(0))
    train, held_out = reward_batch(tmp_path, smiles(12, 2)), reward_batch(tmp_path, smiles(8, 3))
    optimizer = optax.adam(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
    step = jax.jit(make_train_step(model, optimizer, lambda s: 1e-2, Reward()))
    sums = jax.jit(lambda p: Reward().validation_sums(model, p, {}, held_out))
    before = Reward().validation_metrics(sums(state.params))["val_pair_accuracy"]
    for _ in range(25):
        state, _ = step(state, train)
    after = Reward().validation_metrics(sums(state.params))["val_pair_accuracy"]
    assert before <= 0.75 and after >= 0.9, (before, after)


@pytest.mark.parametrize("name", ["dpo_demo", "reward_demo"])
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_demo_configs_validate(name, variant, tmp_path):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config(variant)
    assert c.data.format == "preference" and c.finetune.objective == name.split("_")[0]
    c.train.init_from = str(tmp_path)
    validate(c)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo_demo", "reward_demo"])
def test_demo_configs_train_from_a_checkpoint(name, tmp_path):
    """The whole loop: a smoke base trained 2 steps, then 3 steps of the demo config on preference
    pairs from it (the DPO reference loaded frozen from the base, the reward head fresh)."""
    import importlib

    from configs import demo
    from tpullm.interop import init_from as interop_init_from
    from tpullm.training import loop

    base = demo.get_config("smoke")
    base.train.update(steps=2, checkpoint_every=2, eval_every=2, log_every=1, sample_tokens=0)
    base.optimizer.warmup_steps = 1
    loop.train(base, str(tmp_path / "base"))

    c = importlib.import_module(f"configs.{name}").get_config("smoke")
    c.train.update(init_from=str(tmp_path / "base"), steps=3, eval_every=3, log_every=1, batch_size=4, eval_batches=1)
    c.optimizer.warmup_steps = 1
    c.data.update(corpus=write_jsonl(tmp_path / "p.jsonl", preference_records(60)), val_fraction=0.2)
    source = interop_init_from.resolve(c.train.init_from)
    metrics = loop.train(c, str(tmp_path / name), None, source, interop_init_from.frozen_sources(c, source))
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["val_pair_accuracy"] <= 1
    assert "rewards/margins" in metrics
