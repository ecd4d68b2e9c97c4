"""Tests for tpullm.config: field-naming validation errors and command-line overrides."""

import ast
import dataclasses

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from tpullm.config import RUN_BOUNDS, ConfigError, ModelConfig, default_config, unknown_key, validate, validate_model


def model(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig(), **overrides)


# ----------------------------------------------------------------------------- ModelConfig


@pytest.mark.parametrize(
    "overrides, must_mention",
    [
        # grouped-query attention needs num_heads % num_kv_heads == 0: both fields are named
        (dict(num_heads=6, num_kv_heads=4), ["model.num_heads", "model.num_kv_heads", "6", "4"]),
        (dict(num_heads=4, num_kv_heads=8), ["model.num_heads", "model.num_kv_heads"]),
        (dict(norm="batchnorm"), ["model.norm", "batchnorm", "rmsnorm", "layernorm"]),
        (dict(mlp="relu"), ["model.mlp", "relu"]),
        (dict(positions="alibi"), ["model.positions", "alibi"]),
        (dict(remat_policy="some"), ["model.remat_policy", "some"]),
        (dict(compute_dtype="float64"), ["model.compute_dtype", "float64"]),
        (dict(embed_dim=30, num_heads=4), ["model.embed_dim", "model.num_heads", "30", "4"]),
        (dict(num_layers=0), ["model.num_layers"]),
        (dict(vocab_size=-1), ["model.vocab_size"]),
        (dict(rope_theta=0.0), ["model.rope_theta"]),
        (dict(num_kv_heads=-1), ["model.num_kv_heads"]),
    ],
)
def test_validate_model_errors_name_the_field(overrides, must_mention):
    cfg = model(**overrides)
    for check in (lambda: validate_model(cfg), cfg.resolve):
        with pytest.raises(ConfigError) as err:
            check()
        for word in must_mention:
            assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(embed_dim=12, num_heads=4),  # derived head_dim = 3
        dict(head_dim=5),  # explicit odd head_dim
    ],
)
def test_odd_head_dim_with_rope_names_head_dim(overrides):
    cfg = model(positions="rope", **overrides)
    with pytest.raises(ConfigError) as err:
        cfg.resolve()
    # The error must name the field the user can change, like every other validation error.
    assert "head_dim" in str(err.value), str(err.value)


def test_odd_head_dim_is_fine_with_learned_positions():
    resolved = model(positions="learned", embed_dim=12, num_heads=4).resolve()
    assert resolved.head_dim == 3


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_resolve_fills_derived_fields():
    resolved = model(embed_dim=256, num_heads=8).resolve()
    assert resolved.num_kv_heads == 8 and resolved.head_dim == 32
    # explicit values are kept
    resolved = model(embed_dim=256, num_heads=8, num_kv_heads=2, head_dim=64).resolve()
    assert resolved.num_kv_heads == 2 and resolved.head_dim == 64
    # explicit head_dim makes embed_dim % num_heads irrelevant
    assert model(embed_dim=30, num_heads=4, head_dim=8).resolve().head_dim == 8


def test_from_any_unknown_key_is_named():
    with pytest.raises(ConfigError, match="num_layerz"):
        ModelConfig.from_any({"num_layerz": 3})
    d = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
    d.unlock()
    d.hidden_size = 128
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_any(d)


def test_from_any_accepts_dicts_and_configdicts():
    m = model(num_layers=3, norm="layernorm")
    assert ModelConfig.from_any(m) is m
    assert ModelConfig.from_any(dataclasses.asdict(m)) == m
    assert ModelConfig.from_any({"num_layers": 3, "norm": "layernorm"}) == m
    assert ModelConfig.from_any(ml_collections.ConfigDict(dataclasses.asdict(m))) == m
    assert ModelConfig.from_any(ml_collections.FrozenConfigDict(dataclasses.asdict(m))) == m


def test_default_config_model_section_mirrors_model_config():
    c = default_config()
    assert set(c.model.keys()) == {f.name for f in dataclasses.fields(ModelConfig)}


# ----------------------------------------------------------------------------- whole run config


def test_default_config_validates():
    resolved = validate(default_config())
    assert isinstance(resolved, ModelConfig)
    assert resolved.num_kv_heads == resolved.num_heads
    assert resolved.head_dim == resolved.embed_dim // resolved.num_heads


def test_batch_size_not_divisible_by_grad_accum_names_both():
    c = default_config()
    c.train.batch_size, c.train.grad_accum_steps = 16, 3
    with pytest.raises(ConfigError) as err:
        validate(c)
    msg = str(err.value)
    assert "train.batch_size" in msg and "train.grad_accum_steps" in msg, msg
    c.train.grad_accum_steps = 4
    validate(c)


def test_seq_len_beyond_learned_position_table_fails():
    c = default_config()
    c.model.positions = "learned"
    c.model.max_length = 128
    c.data.seq_len = 256
    with pytest.raises(ConfigError) as err:
        validate(c)
    msg = str(err.value)
    assert "data.seq_len" in msg and "model.max_length" in msg, msg
    c.data.seq_len = 129  # one past the table
    with pytest.raises(ConfigError, match="data.seq_len"):
        validate(c)
    c.data.seq_len = 128  # exactly the table size is fine
    validate(c)
    c.data.seq_len = 256
    c.model.positions = "rope"  # RoPE has no table
    validate(c)


@pytest.mark.parametrize("warmup", [1000, 1001])
def test_warmup_not_smaller_than_steps_fails(warmup):
    c = default_config()
    c.train.steps, c.optimizer.warmup_steps = 1000, warmup
    with pytest.raises(ConfigError) as err:
        validate(c)
    msg = str(err.value)
    assert "optimizer.warmup_steps" in msg and "train.steps" in msg, msg
    c.optimizer.warmup_steps = 999
    validate(c)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "steps", 0),
        ("train", "batch_size", 0),
        ("train", "grad_accum_steps", 0),
        ("data", "seq_len", -1),
        ("optimizer", "min_lr_ratio", 1.5),
        ("data", "val_fraction", 1.0),
    ],
)
def test_validate_run_fields(section, key, value):
    c = default_config()
    c[section][key] = value
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        validate(c)


def set_key(c, key, value):
    *sections, leaf = key.split(".")
    for part in sections:
        c = c[part]
    c[leaf] = value


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimizer.learning_rate", -1.0),
        ("optimizer.learning_rate", 0.0),
        ("optimizer.learning_rate", float("nan")),
        ("optimizer.learning_rate", float("inf")),
        ("optimizer.b1", 1.0),
        ("optimizer.b2", -0.1),
        ("optimizer.eps", 0.0),
        ("optimizer.weight_decay", -0.1),
        ("optimizer.grad_clip", -1.0),
        ("optimizer.warmup_steps", -1),
        ("optimizer.min_lr_ratio", -0.1),
        ("optimizer.z_loss", -1e-4),
        ("train.eval_batches", 0),
        ("train.keep_checkpoints", 1),
        ("train.keep_period", -1),
        ("train.sample_tokens", -1),
        ("train.sample_top_p", 0.0),
        ("train.sample_temperature", -0.5),
        ("train.sample_top_k", -1),
        ("train.seed", -1),
        ("train.checkpoint_minutes", -1.0),
        ("data.seq_len", 0),
        ("data.max_bytes", -1),
        ("data.shuffle_window_tokens", -1),
        ("data.num_workers", -2),
        ("data.read_threads", 0),
        ("mesh.max_replicated_share", 1.5),
        ("mesh.ici.fsdp", 0),
        ("mesh.dcn.data", -2),
        ("model.norm_eps", 0.0),
        ("model.init_std", -0.02),
    ],
)
def test_out_of_range_value_names_the_key_and_a_value_that_works(key, value):
    c = default_config()
    set_key(c, key, value)
    with pytest.raises(ConfigError) as err:
        validate(c)
    msg = str(err.value)
    assert msg.startswith(f"{key}="), msg
    assert "\n" not in msg
    if key in RUN_BOUNDS:  # the fix: the flag that sets it, with the default
        assert f"--config.{key}=" in msg, msg
        fixed = default_config()
        set_key(fixed, key, ast.literal_eval(msg.split(f"--config.{key}=")[1].split()[0]))
        validate(fixed)


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimizer.b1", 0.0),
        ("optimizer.grad_clip", 0.0),
        ("optimizer.weight_decay", 0.0),
        ("optimizer.warmup_steps", 0),
        ("optimizer.min_lr_ratio", 1.0),
        ("optimizer.min_lr_ratio", 0.0),
        ("train.keep_period", 0),
        ("train.sample_tokens", 0),
        ("train.keep_checkpoints", 2),
        ("data.num_workers", -1),
        ("data.max_bytes", 0),
        ("mesh.max_replicated_share", 1.0),
        ("mesh.ici.fsdp", -1),
        ("mesh.ici.data", 2),
    ],
)
def test_values_on_the_edge_of_their_range_are_accepted(key, value):
    c = default_config()
    if key == "mesh.ici.fsdp":
        c.mesh.ici.data = 1  # one -1 per kind
    set_key(c, key, value)
    validate(c)


def test_two_leftover_mesh_degrees_fail():
    c = default_config()
    c.mesh.ici.fsdp = -1  # data is -1 already
    with pytest.raises(ConfigError, match="mesh.ici"):
        validate(c)


def test_every_number_of_a_run_config_has_a_range():
    """A key added to default_config() without a check would let a bad value reach data loading."""
    c = default_config()
    numbers = [
        key
        for key, value in leaves(c)
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not key.startswith(("model.", "mesh.ici.", "mesh.dcn."))
    ]
    assert numbers and sorted(numbers) == sorted(RUN_BOUNDS)


def leaves(node, base=""):
    for k, v in node.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from leaves(v, f"{base}{k}.")
        else:
            yield base + k, v


@pytest.mark.parametrize(
    "source, must_mention",
    [
        (dict(path="/data/web", weight=0.0), "data.sources.web.weight"),
        (dict(path="/data/web", weight=float("nan")), "data.sources.web.weight"),
        (dict(weight=1.0), "data.sources.web has no path"),
    ],
)
def test_mixture_sources_are_checked(source, must_mention):
    c = default_config()
    c.data.sources = {"web": source}
    with pytest.raises(ConfigError, match=must_mention):
        validate(c)


@pytest.mark.parametrize(
    "key, nearest",
    [
        ("train.batchsize", "config.train.batch_size"),
        ("model.num_layerz", "config.model.num_layers"),
        ("trian.steps", "config.train.steps"),
        ("mesh.ici.fdsp", "config.mesh.ici.fsdp"),
    ],
)
def test_unknown_key_names_it_and_the_nearest_valid_key(key, nearest):
    msg = unknown_key(default_config(), key)
    assert f"config.{key} is not a config key" in msg and f"did you mean {nearest}" in msg, msg


def test_unknown_key_without_a_near_one_lists_the_section():
    msg = unknown_key(default_config(), "optimizer.lr")
    assert "config.optimizer has no 'lr'" in msg and "learning_rate" in msg and "weight_decay" in msg, msg
    assert "is a value, not a section" in unknown_key(default_config(), "train.steps.x")
    assert "config.data.sources is empty" in unknown_key(default_config(), "data.sources.web.path")
    assert unknown_key(default_config(), "train.steps") is None
    assert unknown_key(default_config(), "mesh.ici") is None


def test_validate_reports_model_errors():
    c = default_config()
    c.model.num_heads, c.model.num_kv_heads = 4, 3
    with pytest.raises(ConfigError, match="num_kv_heads"):
        validate(c)


# ----------------------------------------------------------------------------- command line


def parse(argv):
    """Parses argv with a fresh FlagValues; the override flags are derived from `sys_argv`."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", default_config(), flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def test_command_line_override_sets_value():
    config = parse(
        ["prog", "--config.model.num_layers=4", "--config.model.norm=layernorm", "--config.train.batch_size=32"]
    )
    assert config.model.num_layers == 4 and isinstance(config.model.num_layers, int)
    assert config.model.norm == "layernorm"
    assert config.train.batch_size == 32
    assert validate(config).num_layers == 4


def test_command_line_override_of_unknown_key_names_it():
    with pytest.raises(Exception) as err:
        parse(["prog", "--config.model.num_layerz=4"])
    assert "num_layerz" in str(err.value)


@pytest.mark.parametrize(
    "arg", ["--config.model.num_layers=abc", "--config.model.num_layers=4.5", "--config.model.norm_eps=abc"]
)
def test_command_line_override_with_wrong_type_fails(arg):
    with pytest.raises(flags.Error) as err:
        parse(["prog", arg])
    assert arg.split("=")[0].lstrip("-") in str(err.value)
