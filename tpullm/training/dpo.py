"""Direct preference optimization (Rafailov et al. 2023), with conservative DPO's label smoothing.

Per pair, with log-probs summed over the response tokens only (the loss mask) of the chosen (c) and
rejected (r) sequences under the policy (pi) and the frozen reference model (ref):

    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))
    loss = -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)

averaged over the batch's pairs (ls = finetune.dpo_label_smoothing: the assumed share of flipped
labels; beta = finetune.dpo_beta). The metrics are trl's: rewards/chosen = beta (log pi(c) - log ref(c)),
rewards/rejected, rewards/accuracies (chosen reward > rejected), rewards/margins, logps/chosen,
logps/rejected, each a mean over pairs. Validation: val_loss and val_pair_accuracy over held-out pairs.

The reference is `frozen_models["reference"]` (finetune.reference, or the run's starting weights);
its params arrive in the step as frozen["reference"]. A LoRA run that trains only its adapters and
names no reference uses its own base weights (the adapters left out), as trl does with peft: the
starting policy, without a second copy of the model (`training/finetune.lora_base_reference`).
Mixture-of-experts router losses are not added.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tpullm.models import lora
from tpullm.training import pairs
from tpullm.training.loss import target_log_probs
from tpullm.training.objective import apply


def sequence_log_probs(model, params, batch, rng=None):
    """(chosen, rejected) float32 [batch, max_pairs]: log-probs summed over each sequence's response tokens."""
    logits, _ = apply(model, params, batch, rng)  # [b, l, vocab]
    token_logps = target_log_probs(logits, batch["targets"]) * batch["loss_mask"]  # [b, l]
    return pairs.sequence_sums(token_logps, batch["segment_ids"])


def dpo_losses(h, beta: float, label_smoothing: float):
    """The per-pair (c)DPO loss of the log-ratio differences h."""
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)


class DPO(pairs.PairObjective):
    """reference: the reference Decoder. With `lora_base`, it runs the policy's own params without the
    LoRA adapters (the frozen base, which is the starting policy): no second copy of the weights is
    loaded; otherwise it is a frozen model whose params arrive as frozen["reference"]."""

    def __init__(self, reference, beta: float, label_smoothing: float = 0.0, lora_base: bool = False):
        self.reference, self.lora_base = reference, lora_base
        self.frozen_models = {} if lora_base else {"reference": reference}
        self.beta, self.label_smoothing = beta, label_smoothing

    def pair_terms(self, model, params, frozen, batch, rng=None):
        """(losses, chosen rewards, rejected rewards, chosen logps, rejected logps, real), [batch, max_pairs]."""
        chosen, rejected = sequence_log_probs(model, params, batch, rng)
        reference = jax.lax.stop_gradient(lora.base(params)) if self.lora_base else frozen["reference"]
        ref_chosen, ref_rejected = sequence_log_probs(self.reference, reference, batch)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        losses = dpo_losses(chosen_ratio - rejected_ratio, self.beta, self.label_smoothing)
        real = pairs.real(batch["segment_ids"])
        return losses, self.beta * chosen_ratio, self.beta * rejected_ratio, chosen, rejected, real

    def sums(self, model, params, frozen, batch, rng):
        """Sums over real pairs of: loss, chosen reward, rejected reward, correct, chosen logps, rejected logps."""
        losses, chosen_r, rejected_r, chosen, rejected, real = self.pair_terms(model, params, frozen, batch, rng)
        correct = (chosen_r > rejected_r).astype(jnp.float32)
        return tuple(jnp.sum(real * x) for x in (losses, chosen_r, rejected_r, correct, chosen, rejected))

    def metrics(self, model, sums, counts) -> dict:
        _, chosen_r, rejected_r, correct, chosen, rejected = (s / counts for s in sums)
        return {
            **pairs.reward_metrics(chosen_r, rejected_r, correct),
            "logps/chosen": chosen,
            "logps/rejected": rejected,
        }

    def validation_sums(self, model, params, frozen, batch):
        losses, chosen_r, rejected_r, _, _, real = self.pair_terms(model, params, frozen, batch)
        return pairs.validation_sums(losses, chosen_r, rejected_r, real)
