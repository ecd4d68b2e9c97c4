"""The validation loss of a workdir's (or an export's) params on a config's held-out rows, the
rows `python -m tpullm.train` evaluates (data.val_fraction, at most train.eval_batches batches):
for an SFT config, the mean cross-entropy of the answer tokens only. Measures a base model
before fine-tuning, and its fine-tuned workdir after. A base model measured with a soft-prompt config
gets the prompt that run starts from (vocabulary rows of its token table).

    python experiments/sft/val_loss.py --config=configs/sft_demo.py --params=/tmp/tpullm_demo
"""

from __future__ import annotations

import argparse
import importlib.util

import jax
import numpy as np

from tpullm import models
from tpullm.checkpoint import load as ckpt_load
from tpullm.config import ModelConfig
from tpullm.data import DataSources, load_tokenizer
from tpullm.models import soft_prompt
from tpullm.training.loss import cross_entropy_sums
from tpullm.training.validation import padded_batches


def load_config(path: str):
    name, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("config_module", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a config file (optionally file.py:variant)")
    parser.add_argument("--params", required=True, help="a tpullm workdir or export")
    args = parser.parse_args()
    config = load_config(args.config)
    t, d = config.train, config.data
    tokenizer = load_tokenizer(d.tokenizer)
    rows = DataSources(d, tokenizer).validation_rows(d.seq_len, max_rows=t.eval_batches * t.batch_size)
    model_cfg = ModelConfig.from_any(config.model).resolve()
    model = models.build(model_cfg)
    params = ckpt_load.load_params(args.params)
    if model_cfg.soft_prompt_length and "soft_prompt" not in params:  # a base model: the run's initial prompt
        params = soft_prompt.init_from_table(params, model_cfg)

    @jax.jit
    def sums(params, batch):
        logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"])
        return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])[1::2]  # sum_ce, n_tokens

    total = np.zeros(2)
    for batch in padded_batches(rows.take(slice(None)), t.batch_size):
        total += np.asarray(jax.device_get(sums(params, batch)))
    print(
        f"{args.params}: validation loss {total[0] / total[1]:.4f} nats/token over {int(total[1]):,} "
        f"loss tokens in {rows.n_rows} rows ({d.format} data, {d.corpus})"
    )


if __name__ == "__main__":
    main()
