"""Knowledge distillation (Hinton et al. 2015): a student trained on a frozen teacher's logits.

    loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kl_weight) * CE

both means over the loss-masked tokens, plus the student's z-loss and (mixture of experts) router
losses in full, as `LanguageModeling` has them. T^2 keeps the soft targets' gradient on the scale of
the cross-entropy's as T grows. The teacher is any tpullm model with the student's vocabulary; it
runs forward only, as `frozen["teacher"]` (training/finetune.py builds it and checks the vocabulary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tpullm.training.loss import cross_entropy_sums
from tpullm.training.objective import LanguageModeling, Objective, apply


def kl_sum(teacher_logits, student_logits, mask, vocab_size: int, temperature: float):
    """sum over masked tokens of KL(softmax(teacher / T) || softmax(student / T)), in float32.

    teacher_logits, student_logits: [batch, length, padded vocab]; mask: [batch, length]. Only the
    first `vocab_size` ids count: the padding ids (whose logits are the dtype's lowest value, -inf
    once divided by a T < 1) are replaced by 0 before any arithmetic and left out of every sum, so
    neither the loss nor its gradient meets inf - inf or 0 * log 0.
    """
    real = jnp.arange(student_logits.shape[-1]) < vocab_size  # [padded vocab]

    def log_softmax(logits):
        z = jnp.where(real, jnp.asarray(logits, jnp.float32), 0.0) / temperature  # [b, l, padded vocab]
        return z - jax.nn.logsumexp(z, axis=-1, where=real, keepdims=True)

    log_p, log_q = log_softmax(teacher_logits), log_softmax(student_logits)
    # A teacher probability that underflows to 0 gives 0 * (finite log-ratio) = 0.
    kl = jnp.sum(jnp.where(real, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=-1)  # [b, l]
    return jnp.sum(jnp.asarray(mask, jnp.float32) * kl)


class Distillation(Objective):
    """`finetune.objective = "distill"`: sums are (LanguageModeling's sums, KL sum); the teacher's
    params arrive as frozen["teacher"]."""

    def __init__(self, teacher, temperature: float, kl_weight: float, z_loss: float = 0.0):
        self.frozen_models = {"teacher": teacher}
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.lm = LanguageModeling(z_loss)

    def counts(self, model, batch):
        return self.lm.counts(model, batch)

    def _kl(self, model, frozen, batch, student_logits):
        teacher_logits, _ = apply(self.frozen_models["teacher"], frozen["teacher"], batch)  # no jitter: rng None
        return kl_sum(teacher_logits, student_logits, batch["loss_mask"], model.config.vocab_size, self.temperature)

    def sums(self, model, params, frozen, batch, rng):
        logits, state = apply(model, params, batch, rng)  # [b, l, padded vocab]
        return self.lm.output_sums(model, logits, state, batch), self._kl(model, frozen, batch, logits)

    def loss(self, model, sums, counts):
        # LanguageModeling's loss (CE + z-loss + router losses) with w * CE traded for w * T^2 * KL:
        # kl_weight = 0 leaves exactly LanguageModeling's loss.
        (lm_sums, kl), (n_tokens, _) = sums, counts
        soft = self.temperature**2 * kl - lm_sums[0][1]
        return self.lm.loss(model, lm_sums, counts) + self.kl_weight * soft / n_tokens

    def metrics(self, model, sums, counts) -> dict:
        return {**self.lm.metrics(model, sums[0], counts), "kl": sums[1] / counts[0]}

    def validation_sums(self, model, params, frozen, batch):
        logits, _ = apply(model, params, batch)
        ce = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])
        return ce, self._kl(model, frozen, batch, logits)

    def validation_metrics(self, totals) -> dict:
        """val_loss: the student's cross-entropy (comparable to pre-training's); val_kl at T."""
        ce_sums, kl = totals
        n_tokens = max(float(np.asarray(ce_sums)[3]), 1.0)
        return {**self.lm.validation_metrics(ce_sums), "val_kl": kl / n_tokens}
