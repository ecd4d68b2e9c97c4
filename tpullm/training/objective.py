"""What a run minimises: an objective turns a batch into sums, and sums into a loss and metrics.

Every objective is a ratio: sums over the batch's tokens or sequences (which add up over
microbatches) divided by whole-batch counts (known before the first microbatch runs). So
accumulating microbatch gradients gives exactly the whole batch's gradient, for any objective.

Objectives that compare against a frozen second model (DPO's reference, distillation's teacher) name
it in `frozen`: the loop loads its params onto the mesh and the step receives them as an argument
(never a closure constant), as {name: params}.

Pre-training and SFT: `LanguageModeling` (next-token cross-entropy on the loss mask, plus the router
losses of mixture-of-experts models). The fine-tuning objectives live beside it (dpo.py, reward.py,
distill.py) and are chosen by `finetune.objective` (`make`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tpullm.parallel.microbatches import real_tokens
from tpullm.training.loss import cross_entropy_sums, finalize, moe_metrics, moe_sums


def num_experts(model) -> int:
    return getattr(getattr(model, "config", None), "num_experts", 0) or 0


def apply(model, params, batch, rng=None, **kwargs):
    """The model on a batch's tokens: (output, sown intermediates or {}). A "router" rng (MoE jitter)
    and a "dropout" rng (LoRA dropout) are passed when given; rng=None is evaluation."""
    rngs = {}
    if rng is not None:
        cfg = model.config
        if num_experts(model) and cfg.router_jitter:
            rngs["router"] = rng
        if getattr(cfg, "lora_dropout", 0.0):
            rngs["dropout"] = rng
    mutable = ["intermediates"] if num_experts(model) else False
    out = model.apply(
        {"params": params},
        batch["tokens"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        rngs=rngs,
        mutable=mutable,
        **kwargs,
    )
    return out if mutable else (out, {})


class Objective:
    """The interface the step and the validation loop call. Sums and counts are pytrees of float32."""

    # {name: Decoder} of the frozen models the step needs; their params arrive as `frozen` {name: params}.
    frozen_models: dict = {}

    def counts(self, model, batch):
        """Whole-batch denominators, computed before the batch is split into microbatches."""
        raise NotImplementedError

    def sums(self, model, params, frozen: dict, batch, rng):
        """Sums over (a microbatch of) the batch; they add up over microbatches."""
        raise NotImplementedError

    def loss(self, model, sums, counts):
        """The scalar the step differentiates: linear in `sums`."""
        raise NotImplementedError

    def metrics(self, model, sums, counts) -> dict:
        """Scalars logged each step besides loss, grad_norm and lr."""
        return {}

    def validation_sums(self, model, params, frozen: dict, batch):
        """Sums over one held-out batch (padding rows add nothing)."""
        raise NotImplementedError

    def validation_metrics(self, totals) -> dict:
        """`val_*` metrics from the validation sums added over all held-out batches (numpy)."""
        raise NotImplementedError


class LanguageModeling(Objective):
    """Next-token cross-entropy (+ z_loss * log(Z)^2) over the loss-masked tokens, plus for MoE models
    the router losses, weighted by real tokens (`parallel.microbatches.real_tokens`) over the batch's
    real tokens."""

    def __init__(self, z_loss: float = 0.0):
        self.z_loss = z_loss

    def counts(self, model, batch):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        return n_tokens, jnp.maximum(real_tokens(batch["segment_ids"]), 1.0)

    def sums(self, model, params, frozen, batch, rng):
        """(the 5 cross-entropy sums, the MoE sums or ())."""
        return self.output_sums(model, *apply(model, params, batch, rng), batch)

    def output_sums(self, model, logits, state, batch):
        """`sums` of the model's output (logits [b, l, vocab], sown state): for objectives that also
        need the logits (distillation)."""
        sums = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], self.z_loss)
        if not num_experts(model):
            return sums, ()
        return sums, moe_sums(state["intermediates"], real_tokens(batch["segment_ids"]))

    def loss(self, model, sums, counts):
        (ce, moe), (n_tokens, n_real) = sums, counts
        if not moe:
            return ce[0] / n_tokens
        cfg = model.config
        return ce[0] / n_tokens + (cfg.router_aux_loss * moe[0] + cfg.router_z_loss * moe[1]) / n_real

    def metrics(self, model, sums, counts) -> dict:
        _, aux = finalize(*sums[0])
        return {**aux, **moe_metrics(sums[1], counts[1])}

    def validation_sums(self, model, params, frozen, batch):
        logits, _ = apply(model, params, batch)
        return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], 0.0)

    def validation_metrics(self, totals) -> dict:
        _, ce, _, n_tokens, n_correct = np.asarray(totals)
        return {"val_loss": ce / n_tokens, "val_accuracy": n_correct / n_tokens}
