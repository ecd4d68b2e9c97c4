"""Which parameters train (tpullm/training/trainable.py) and how the step honours it."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import demo
from tpullm import config as config_lib
from tpullm.data.synthetic import random_packed_batch
from tpullm.parallel import rules
from tpullm.training import loop
from tpullm.training import trainable as trainable_lib

PARAMS = {
    "token_embed": {"embedding": np.ones((4, 2))},
    "layers": {
        "attention": {"query": {"kernel": np.ones((3, 2)), "lora_a": np.ones((2, 1))}},
        "mlp_norm": {"scale": np.ones(2)},
    },
}


def test_split_and_merge_are_inverses_and_follow_the_regex():
    trainable, frozen = trainable_lib.split(PARAMS, r"attention/query")
    assert trainable_lib.names(PARAMS, r"attention/query") == [
        "layers/attention/query/kernel",
        "layers/attention/query/lora_a",
    ]
    assert frozen["layers"]["attention"]["query"]["kernel"] is None
    assert trainable["token_embed"]["embedding"] is None
    assert len(jax.tree.leaves(trainable)) == 2 and len(jax.tree.leaves(frozen)) == 2
    merged = trainable_lib.merge(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)
    assert trainable_lib.count(PARAMS, r"attention/query") == (6 + 2, 8 + 6 + 2 + 2)


def test_the_adapters_train_when_present_else_everything():
    assert trainable_lib.pattern("", PARAMS) == trainable_lib.ADAPTER_PATTERN
    assert trainable_lib.names(PARAMS, trainable_lib.ADAPTER_PATTERN) == ["layers/attention/query/lora_a"]
    plain = {"layers": {"attention": {"query": {"kernel": np.ones(2)}}}}
    assert trainable_lib.pattern("", plain) is None
    assert trainable_lib.pattern("norm", plain) == "norm"


@pytest.mark.parametrize("accum", [1, 2])
def test_a_step_changes_only_the_trainable_params_and_holds_state_only_for_them(accum):
    c = demo.get_config("smoke")
    c.finetune.trainable = r"(attention/query|final_norm)/"
    c.train.grad_accum_steps = accum
    c.optimizer.warmup_steps = 0  # the first step moves the params
    model_cfg = config_lib.validate(c)
    setup = loop.build(c, model_cfg)
    batch = random_packed_batch(c.train.batch_size, c.data.seq_len, model_cfg.vocab_size)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        state = setup.init_state(jax.random.key(0))
        before = jax.device_get(state.params)
        after, metrics = loop.jit_train_step(setup, c)(state, loop.put_batch(batch, rules.batch_sharding(setup.mesh)))
    after = jax.device_get(after)
    changed = {
        trainable_lib.path_name(path)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(after.params)[0], jax.tree.leaves(before))
        if not np.array_equal(a, b)
    }
    assert changed == {"layers/attention/query/kernel", "final_norm/scale"}
    # Adam's two moments for exactly those two leaves (plus scalar counts), nothing for the frozen ones.
    moment_sizes = sorted(x.size for x in jax.tree.leaves(after.opt_state) if x.ndim)
    query, norm = before["layers"]["attention"]["query"]["kernel"], before["final_norm"]["scale"]
    assert moment_sizes == sorted([query.size, query.size, norm.size, norm.size])
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0


def test_a_regex_that_is_not_one_is_refused_with_the_key():
    c = demo.get_config("smoke")
    c.model.lora_rank = 4
    c.model.lora_targets = "attention/(query"
    with pytest.raises(config_lib.ConfigError, match="model.lora_targets"):
        config_lib.validate(c)
