"""Preference pairs inside packed rows: per-sequence sums, the pairs' count, and what the pair objectives
(DPO, reward models) share.

A row holds whole pairs (tpullm/data/preference.py): segments 1, 2 are the first pair's chosen and
rejected sequences, 3, 4 the second's, and so on; segment 0 is padding. A row of `length`
positions holds at most length // 2 pairs (every sequence has at least one position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tpullm.training.objective import Objective


def max_pairs(segment_ids) -> int:
    """The pairs a row can hold: the pair axis of `sequence_sums`."""
    return segment_ids.shape[-1] // 2


def sequence_sums(values, segment_ids):
    """(chosen, rejected), float32 [batch, max_pairs] each: `values` [batch, length] summed over each
    pair's chosen and rejected sequence (0 for pairs the row does not hold)."""
    pairs = max_pairs(segment_ids)
    # Slot 2 * pair + (0 chosen | 1 rejected) of each position, pairs from 1, is segment + 1 (segments 1, 2 ->
    # slots 2, 3; 3, 4 -> 4, 5); padding's slot 1 belongs to pair 0, dropped.
    slots = segment_ids + 1
    per_row = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=2 * (pairs + 1)))
    sums = per_row(jnp.asarray(values, jnp.float32), slots).reshape(-1, pairs + 1, 2)[:, 1:]  # [b, pairs, 2]
    return sums[..., 0], sums[..., 1]


def real(segment_ids):
    """float32 [batch, max_pairs]: 1 for each pair the row holds (both its sequences present)."""
    _, rejected_length = sequence_sums(segment_ids > 0, segment_ids)
    return (rejected_length > 0).astype(jnp.float32)


def count(segment_ids):
    """The number of pairs in a batch, float32: half the segments of every row."""
    return jnp.sum(jnp.max(segment_ids, axis=-1) // 2).astype(jnp.float32)


def last_tokens(segment_ids):
    """float32 [batch, length]: 1 at the last position of every sequence (a reward model's readout)."""
    following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))  # the next position's segment, 0 past the row
    return ((segment_ids > 0) & (following != segment_ids)).astype(jnp.float32)


class PairObjective(Objective):
    """An objective that is a mean over the batch's preference pairs of a per-pair loss (DPO, reward
    models): `sums` starts with the loss sum; validation reports val_loss and val_pair_accuracy."""

    def counts(self, model, batch):
        return jnp.maximum(count(batch["segment_ids"]), 1.0)

    def loss(self, model, sums, counts):
        return sums[0] / counts

    def validation_metrics(self, totals) -> dict:
        loss, correct, n = (float(x) for x in np.asarray(totals))
        n = max(n, 1.0)
        return {"val_loss": loss / n, "val_pair_accuracy": correct / n}


def validation_sums(losses, chosen_rewards, rejected_rewards, real):
    """(loss sum, pairs ranked right, pairs) over the real pairs, each input [batch, max_pairs]."""
    return jnp.sum(real * losses), jnp.sum(real * (chosen_rewards > rejected_rewards)), jnp.sum(real)


def reward_metrics(chosen, rejected, correct) -> dict:
    """trl's names for the mean rewards of the chosen and rejected sequences and the share ranked right."""
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": correct,
        "rewards/margins": chosen - rejected,
    }
