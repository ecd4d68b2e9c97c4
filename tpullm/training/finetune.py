"""The objective a run minimises, chosen by `finetune.objective`, with its frozen models.

The loop builds every run's objective here; objectives that need a frozen second model (DPO's
reference, distillation's teacher) get its `Decoder` here, and the loop loads its params from an
`InitSource` (tpullm/training/init_from.py) onto the run's mesh.
"""

from __future__ import annotations

import dataclasses

from tpullm.config import ConfigError, ModelConfig
from tpullm.models import Decoder, lora
from tpullm.training.distill import Distillation
from tpullm.training.dpo import DPO
from tpullm.training.objective import LanguageModeling, Objective
from tpullm.training.reward import Reward

OBJECTIVES = ("lm", "dpo", "reward", "distill")


def frozen_config(source: ModelConfig, run: ModelConfig) -> ModelConfig:
    """A frozen model's config: the source's weights (no adapters, the language-model head) computed
    the way the run computes (dtypes, remat, sequence attention, vocab padding: its logits line up
    with the run's) and unpipelined (it only runs forward)."""
    return dataclasses.replace(
        source,
        lora_rank=0,
        soft_prompt_length=0,
        head="lm",
        compute_dtype=run.compute_dtype,
        param_dtype=run.param_dtype,
        remat_policy=run.remat_policy,
        sequence_attention=run.sequence_attention,
        sequence_load_balance=run.sequence_load_balance,
        vocab_pad_multiple=run.vocab_pad_multiple,
        pipeline_stages=1,
        pipeline_microbatches=0,
        pipeline_repeats=1,
    )


def lora_base_reference(config) -> bool:
    """Whether a DPO run's reference is its own frozen base: a LoRA run (no soft prompt) that trains only
    its adapters and names no other reference. Its starting policy is then exactly the base (B = 0)."""
    f, m = config.finetune, config.model
    return f.objective == "dpo" and not f.reference and m.lora_rank > 0 and not m.soft_prompt_length and not f.trainable


def frozen_models(names: tuple[str, ...], model_cfg: ModelConfig, sources: dict) -> dict:
    """{name: Decoder} of each frozen model, from its source's config (`sources`: {name: InitSource})."""
    missing = [n for n in names if n not in sources]
    if missing:
        raise ConfigError(f"the objective needs the frozen model(s) {missing}; none was given to the loop")
    return {n: Decoder(frozen_config(sources[n].model, model_cfg)) for n in names}


def check_vocabulary(teacher: str, source: ModelConfig, run: ModelConfig) -> None:
    """Distillation compares logits id by id: the teacher must have the student's vocabulary."""
    if source.vocab_size != run.vocab_size:
        raise ConfigError(
            f"finetune.teacher={teacher} has vocab_size {source.vocab_size} but the student's model.vocab_size is "
            f"{run.vocab_size}; distillation needs the same vocabulary (use a teacher trained with the student's "
            f"tokenizer and vocab_size)"
        )


def make_objective(config, model_cfg: ModelConfig, sources: dict | None = None) -> Objective:
    """The objective of `finetune.objective`, its `frozen_models` built from `sources`
    ({name: InitSource}, e.g. "reference", "teacher"; the train CLI resolves them from the config)."""
    f = config.finetune
    if f.objective == "lm":
        return LanguageModeling(config.optimizer.z_loss)
    if f.objective == "dpo":
        if lora_base_reference(config):
            return DPO(Decoder(lora.merged_config(model_cfg)), f.dpo_beta, f.dpo_label_smoothing, lora_base=True)
        reference = frozen_models(("reference",), model_cfg, sources or {})["reference"]
        return DPO(reference, f.dpo_beta, f.dpo_label_smoothing)
    if f.objective == "reward":
        return Reward()
    if f.objective == "distill":
        [teacher] = frozen_models(("teacher",), model_cfg, sources or {}).values()
        check_vocabulary(f.teacher, teacher.config, model_cfg)
        return Distillation(teacher, f.temperature, f.kl_weight, config.optimizer.z_loss)
    raise ConfigError(f"finetune.objective={f.objective!r} is not one of {OBJECTIVES}")
