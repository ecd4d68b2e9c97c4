"""A reward model from the demo model (configs/demo.py): its decoder with a scalar head (the language
model head dropped, a fresh reward head) trained with the Bradley-Terry loss on preference pairs
from the Python standard library (experiments/dpo/stdlib_preferences.py). The log shows the
training pair accuracy (pair_acc: chosen reward above rejected) and, at each evaluation, the
held-out pairs' val_loss and val_pair_acc.

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo       # the base model
    python -m experiments.dpo.stdlib_preferences --out=/tmp/tpullm_preferences.jsonl   # ~2500 pairs
    python -m tpullm.train --config=configs/reward_demo.py --workdir=/tmp/tpullm_reward

The held-out accuracy before training (the fresh head; a learning rate of ~0 for one step):

    python -m tpullm.train --config=configs/reward_demo.py --workdir=/tmp/tpullm_reward_before \\
        --config.train.steps=1 --config.optimizer.warmup_steps=0 --config.optimizer.learning_rate=1e-12

`:smoke` starts from the smoke model (python -m tpullm.train --config=configs/demo.py:smoke
--workdir=/tmp/tpullm_smoke), a run of a few minutes.
"""

from configs import demo, dpo_demo


def get_config(arg=None):
    if arg not in (None, "smoke"):
        raise demo.common.unknown_variant(__file__, arg, (None, "smoke"))
    c = dpo_demo.preference_run(demo.get_config(arg), "/tmp/tpullm_smoke" if arg else "/tmp/tpullm_demo")
    c.model.head = "reward"
    c.finetune.objective = "reward"
    c.optimizer.learning_rate = 1e-3  # the fresh head starts at rewards near 0, with small gradients
    return c
