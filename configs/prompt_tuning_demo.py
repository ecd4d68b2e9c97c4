"""Prompt tuning (Lester et al. 2021) of the demo model (configs/demo.py) on the standard library's
instruction pairs (configs/sft_demo.py's data): 16 trained virtual-token embeddings before every
example, every other weight frozen (finetune.trainable="" trains only model.soft_prompt). The prompt
starts as 16 rows of the loaded token table (tpullm/models/soft_prompt.py). A few minutes on a 2-core CPU.

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo       # the base model
    python experiments/sft/stdlib_pairs.py --out=/tmp/tpullm_sft_pairs.jsonl         # ~2500 pairs
    python experiments/sft/val_loss.py --config=configs/prompt_tuning_demo.py --params=/tmp/tpullm_demo  # before
    python -m tpullm.train --config=configs/prompt_tuning_demo.py --workdir=/tmp/tpullm_prompt
    python experiments/sft/val_loss.py --config=configs/prompt_tuning_demo.py --params=/tmp/tpullm_prompt  # after

"Before" is the base model with the initial prompt (the one the run starts from). Another prompt
length: --config.model.soft_prompt_length=N.
"""

from configs import sft_demo


def get_config(arg=None):
    if arg is not None:
        raise sft_demo.demo.common.unknown_variant(__file__, arg, (None,))
    c = sft_demo.get_config()
    c.model.soft_prompt_length = 16
    c.finetune.trainable = ""  # the adapters: here the soft prompt alone
    # One [16, 256] matrix trains: a high rate, as Lester et al. use (0.3 with Adafactor), for few steps.
    c.optimizer.update(learning_rate=3e-2, warmup_steps=10, weight_decay=0.0)
    return c
