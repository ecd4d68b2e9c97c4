"""A reward model (model.head="reward"): the Bradley-Terry loss on preference pairs.

The model's output is a scalar per position (tpullm/models/transformer.py's reward head); a
sequence's reward r is its value at the sequence's last input token (the last position of its
segment, which has read the whole response). Per pair, loss = -log sigmoid(r(chosen) - r(rejected)),
averaged over the batch's pairs. Metrics, named as DPO's: rewards/chosen, rewards/rejected (mean
rewards), rewards/accuracies (share of pairs with r(chosen) > r(rejected)), rewards/margins;
validation: val_loss and val_pair_accuracy on held-out pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tpullm.training import pairs
from tpullm.training.objective import apply


def sequence_rewards(model, params, batch, rng=None):
    """(chosen, rejected) float32 [batch, max_pairs]: each sequence's reward at its last token."""
    rewards, _ = apply(model, params, batch, rng)  # [b, l]
    segment_ids = batch["segment_ids"]
    return pairs.sequence_sums(rewards.astype(jnp.float32) * pairs.last_tokens(segment_ids), segment_ids)


class Reward(pairs.PairObjective):
    def pair_terms(self, model, params, batch, rng=None):
        """(losses, chosen rewards, rejected rewards, real), each [batch, max_pairs]."""
        chosen, rejected = sequence_rewards(model, params, batch, rng)
        return -jax.nn.log_sigmoid(chosen - rejected), chosen, rejected, pairs.real(batch["segment_ids"])

    def sums(self, model, params, frozen, batch, rng):
        """Sums over real pairs of: loss, correct, chosen reward, rejected reward."""
        losses, chosen, rejected, real = self.pair_terms(model, params, batch, rng)
        correct = (chosen > rejected).astype(jnp.float32)
        return tuple(jnp.sum(real * x) for x in (losses, correct, chosen, rejected))

    def metrics(self, model, sums, counts) -> dict:
        _, correct, chosen, rejected = (s / counts for s in sums)
        return pairs.reward_metrics(chosen, rejected, correct)

    def validation_sums(self, model, params, frozen, batch):
        return pairs.validation_sums(*self.pair_terms(model, params, batch))
