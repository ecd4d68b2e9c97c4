"""Supervised fine-tuning of the demo model (configs/demo.py) on instruction pairs from the Python
standard library: a function's docstring as the instruction, its source as the answer, rendered in
ChatML; only the answers count in the loss (tpullm/data/chat.py). A few minutes on a 2-core CPU.

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo       # the base model
    python experiments/sft/stdlib_pairs.py --out=/tmp/tpullm_sft_pairs.jsonl         # ~2500 pairs
    python experiments/sft/val_loss.py --config=configs/sft_demo.py --params=/tmp/tpullm_demo   # before
    python -m tpullm.train --config=configs/sft_demo.py --workdir=/tmp/tpullm_sft
    python experiments/sft/val_loss.py --config=configs/sft_demo.py --params=/tmp/tpullm_sft    # after

Another base or data: --config.train.init_from=/path/to/workdir (or hf:/dir) and
--config.data.corpus=/path/to/pairs.jsonl.
"""

from configs import demo


def get_config(arg=None):
    if arg is not None:
        raise demo.common.unknown_variant(__file__, arg, (None,))
    c = demo.get_config()  # the base model's architecture: init_from checks it
    c.train.init_from = "/tmp/tpullm_demo"
    c.data.update(corpus="/tmp/tpullm_sft_pairs.jsonl", format="prompt_completion", chat_template="chatml")
    c.data.val_fraction = 0.05
    c.data.shuffle_window_tokens = 0  # examples already come in a new order every epoch
    c.train.update(steps=100, batch_size=16, log_every=10, eval_every=50, eval_batches=8, checkpoint_every=100)
    c.optimizer.update(learning_rate=5e-4, warmup_steps=10)
    c.train.sample_prompt = "<|im_start|>user\nReturn the absolute value of x.<|im_end|>\n<|im_start|>assistant\n"
    c.train.sample_temperature = 0.0
    return c
