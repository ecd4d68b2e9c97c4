"""The LM Evaluation Harness' own command line, with tpullm's model registered:

    python -m tpullm.evaluation.lm_eval_cli run --model tpullm --model_args workdir=/tmp/run --tasks hellaswag

takes every flag `lm_eval` takes. lm-eval 0.4 finds models only through the modules it imports itself
(no plugin entry points), so a plain `lm_eval --model tpullm` cannot see this package's model.
"""

from lm_eval.__main__ import cli_evaluate

import tpullm.evaluation.harness  # noqa: F401  (registers "tpullm")

if __name__ == "__main__":
    cli_evaluate()
