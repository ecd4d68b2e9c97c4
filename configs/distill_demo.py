"""Distillation of the demo model (configs/demo.py, the teacher: 4 layers, width 256) into a student
of half its width and layers (2 layers, width 128, the same 64-wide heads and byte vocabulary) on the
same corpus: loss = 0.5 * T^2 * KL(teacher_T || student_T) + 0.5 * CE at T = 1 (training/distill.py;
T = 1 beat T = 2 here, experiments/distill/RESULTS.md). `:baseline` is the same student on the data
alone (finetune.objective=lm), for comparison.

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo                     # the teacher
    python -m tpullm.train --config=configs/distill_demo.py --workdir=/tmp/tpullm_distill
    python -m tpullm.train --config=configs/distill_demo.py:baseline --workdir=/tmp/tpullm_student
    python experiments/distill/compare.py --teacher=/tmp/tpullm_demo --workdir=/tmp/tpullm_distill_study

Another teacher: --config.finetune.teacher=/path/to/workdir (or hf:/dir), same vocabulary; the
student's model section sets its size, --config.finetune.{temperature,kl_weight} the mix.
"""

from configs import demo

STUDENT = dict(embed_dim=128, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=384)


def get_config(arg=None):
    if arg not in (None, "baseline"):
        raise demo.common.unknown_variant(__file__, arg, (None, "baseline"))
    c = demo.get_config()  # the teacher's recipe: data, steps, schedule
    c.model.update(**STUDENT)
    if arg is None:
        c.finetune.update(objective="distill", teacher="/tmp/tpullm_demo", temperature=1.0, kl_weight=0.5)
    return c
