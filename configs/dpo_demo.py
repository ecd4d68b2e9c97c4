"""DPO of the SFT'd demo model (configs/sft_demo.py) on preference pairs from the Python standard
library: a docstring as the prompt, its function chosen over a function of about the same length
(experiments/dpo/stdlib_preferences.py). The reference model is the starting checkpoint
(finetune.reference empty: train.init_from's weights, frozen). The log shows the training pair
accuracy (pair_acc: chosen reward above rejected) and, at each evaluation, the held-out pairs'
val_loss and val_pair_acc; before training the policy is the reference, so every reward is 0
(val_loss log 2 = 0.693, no pair ranked right).

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo       # the base model
    python experiments/sft/stdlib_pairs.py --out=/tmp/tpullm_sft_pairs.jsonl
    python -m tpullm.train --config=configs/sft_demo.py --workdir=/tmp/tpullm_sft      # SFT
    python -m experiments.dpo.stdlib_preferences --out=/tmp/tpullm_preferences.jsonl   # ~2500 pairs
    python -m tpullm.train --config=configs/dpo_demo.py --workdir=/tmp/tpullm_dpo      # DPO

`:smoke` starts from the smoke model instead (no SFT), a run of a few minutes:

    python -m tpullm.train --config=configs/demo.py:smoke --workdir=/tmp/tpullm_smoke
    python -m tpullm.train --config=configs/dpo_demo.py:smoke --workdir=/tmp/tpullm_dpo_smoke

Another start or data: --config.train.init_from=/path/to/workdir (or hf:/dir),
--config.finetune.reference=... for another reference, --config.data.corpus=/path/to/pairs.jsonl
(e.g. pairs whose rejected answer is the chosen function with its lines reversed:
python -m experiments.dpo.stdlib_preferences --rejected=reversed --out=...).
"""

from configs import demo


def preference_run(c, init_from: str):
    """`c` (the starting model's config: init_from checks its architecture) on the stdlib preference
    pairs, a pair of two sequences packed whole in 512 positions."""
    c.train.init_from = init_from
    c.data.update(corpus="/tmp/tpullm_preferences.jsonl", format="preference", chat_template="chatml", seq_len=512)
    c.data.val_fraction = 0.05
    c.data.shuffle_window_tokens = 0  # pairs already come in a new order every epoch
    c.data.max_bytes = 0
    c.train.update(
        steps=100, batch_size=8, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=100, sample_tokens=0
    )
    c.optimizer.update(learning_rate=2e-4, warmup_steps=10)
    return c


def get_config(arg=None):
    if arg not in (None, "smoke"):
        raise demo.common.unknown_variant(__file__, arg, (None, "smoke"))
    c = preference_run(demo.get_config(arg), "/tmp/tpullm_smoke" if arg else "/tmp/tpullm_sft")
    c.finetune.update(objective="dpo", dpo_beta=0.1, dpo_label_smoothing=0.0)
    return c
