"""LoRA (r=8) fine-tuning of the demo model (configs/demo.py) on the instruction pairs of
configs/sft_demo.py (a stdlib docstring as the instruction, its function as the answer, ChatML, loss
on the answers only): the base stays frozen and only the adapters on the attention projections train,
with Adam moments for them alone. A few minutes on a 2-core CPU.

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo       # the base model
    python experiments/sft/stdlib_pairs.py --out=/tmp/tpullm_sft_pairs.jsonl         # ~2500 pairs
    python experiments/sft/val_loss.py --config=configs/sft_demo.py --params=/tmp/tpullm_demo    # before
    python -m tpullm.train --config=configs/lora_demo.py --workdir=/tmp/tpullm_lora
    python experiments/sft/val_loss.py --config=configs/lora_demo.py --params=/tmp/tpullm_lora   # after
    python -m tpullm.export --workdir=/tmp/tpullm_lora --format=peft --out=/tmp/tpullm_lora_adapter
    python -m tpullm.export --workdir=/tmp/tpullm_lora --format=hf --out=/tmp/tpullm_lora_hf    # merged

The run logs "trainable: N of M params"; the adapter directory loads with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<the base's --format=hf export>), DIR)`.
Other targets: --config.model.lora_targets='(attention/(query|key|value|out)|mlp/(gate|up|down))/kernel$'.
"""

from configs import sft_demo


def get_config(arg=None):
    if arg is not None:
        raise sft_demo.demo.common.unknown_variant(__file__, arg, (None,))
    c = sft_demo.get_config()  # the base model, the pairs and the SFT schedule
    c.model.update(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05)
    c.finetune.trainable = ""  # the adapters alone
    c.optimizer.learning_rate = 2e-3  # adapters start at zero and take larger steps than full fine-tuning
    return c
