"""Parameter count and FLOPs per token of a config, without allocating the parameters.

python -m tpullm.info --config=configs/llama2_7b.py
"""

import jax
from absl import flags
from ml_collections import config_flags

from tpullm import cli, models
from tpullm import config as config_lib
from tpullm.training import flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
flags.mark_flag_as_required("config")


def count_from_shapes(model_cfg) -> int:
    """Parameters of the built module, counted from `jax.eval_shape` (nothing is allocated)."""
    model = models.build(model_cfg)
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


def main(argv):
    del argv
    config = _CONFIG.value
    model_cfg = config_lib.validate(config)
    counts = flops.param_counts(model_cfg)
    built = count_from_shapes(model_cfg)
    fpt = flops.flops_per_token(model_cfg, config.data.seq_len)
    tokens = config.train.steps * config.train.batch_size * config.data.seq_len
    print(f"parameters:                {counts['total']:>18,}  ({counts['total'] / 1e9:.2f}B)")
    print(f"  without embeddings:      {counts['non_embedding']:>18,}")
    if model_cfg.num_experts:
        print(
            f"  active per token:        {counts['active']:>18,}  ({counts['active'] / 1e9:.2f}B; "
            f"{model_cfg.experts_per_token} of {model_cfg.num_experts} experts)"
        )
        print(f"  active without embeddings:{counts['active_non_embedding']:>17,}")
    if counts["vocab_padding"]:
        print(
            f"  vocab padding:           {counts['vocab_padding']:>18,}  (vocab {model_cfg.vocab_size:,} -> "
            f"{model_cfg.padded_vocab_size:,} rows)"
        )
    expected = counts["total"] + counts["vocab_padding"]
    print(f"  in the built module:     {built:>18,}  ({'matches' if built == expected else 'DIFFERS'})")
    print(
        f"FLOPs per token (train):   {fpt['total']:>18,.0f}  at seq_len {config.data.seq_len}"
        f"{' (active parameters)' if model_cfg.num_experts else ''}"
    )
    print(f"  of which attention:      {fpt['attention']:>18,.0f}")
    print(f"  convention: {fpt['convention']}")
    print(f"training tokens:           {tokens:>18,}  ->  {tokens * fpt['total']:.3e} FLOPs")


if __name__ == "__main__":
    cli.run(main)
