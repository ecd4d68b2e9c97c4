"""Masked next-token cross-entropy with an optional z-loss (PaLM's log(Z)^2 penalty).

`cross_entropy_sums` returns token *sums*, not means, so gradient accumulation can add
the sums of all microbatches and divide once by the total token count: averaging
per-microbatch means would over-weight microbatches with few real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _log_z_and_target_logit(logits, targets):
    """(log Z, logit of the target), float32 [batch, length] each, of float32 logits [batch, length, vocab]."""
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
    # Pick logit[target] with a compare-and-sum rather than a gather: it fuses, and stays
    # a local reduce + all-reduce when the vocab axis is sharded across devices.
    vocab_ids = jnp.arange(logits.shape[-1])  # [vocab]
    target_logit = jnp.sum(jnp.where(vocab_ids == jnp.asarray(targets)[..., None], logits, 0.0), axis=-1)
    return log_z, target_logit


def target_log_probs(logits, targets):
    """log p(target) per position, float32 [batch, length], of logits [batch, length, vocab] (any float
    dtype) and int targets [batch, length]: what DPO sums over a sequence's response tokens."""
    log_z, target_logit = _log_z_and_target_logit(jnp.asarray(logits).astype(jnp.float32), targets)
    return target_logit - log_z


def cross_entropy_sums(logits, targets, mask, z_loss: float = 0.0):
    """Masked sums over all tokens.

    logits: [batch, length, vocab], any float dtype (upcast to float32 here).
    targets: int [batch, length]. mask: [batch, length], 1.0 for tokens that count.
    Returns float32 scalars (sum_loss, sum_ce, sum_z, n_tokens, n_correct), where
    sum_loss = sum_ce + z_loss * sum_z and sum_z is the masked sum of log(Z)^2.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    mask = jnp.asarray(mask).astype(jnp.float32)
    log_z, target_logit = _log_z_and_target_logit(logits, targets)

    sum_ce = jnp.sum(mask * (log_z - target_logit))
    sum_z = jnp.sum(mask * jnp.square(log_z))
    sum_loss = sum_ce + z_loss * sum_z
    n_tokens = jnp.sum(mask)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [batch, length]
    n_correct = jnp.sum(mask * correct)
    return sum_loss, sum_ce, sum_z, n_tokens, n_correct


def finalize(sum_loss, sum_ce, sum_z, n_tokens, n_correct):
    """Means from (possibly accumulated) sums: (loss, aux); zero tokens give zeros, not NaN."""
    denom = jnp.maximum(n_tokens, 1.0)
    aux = {
        "ce": sum_ce / denom,
        "z_loss": sum_z / denom,  # unweighted mean of log(Z)^2
        "tokens": n_tokens,
        "accuracy": n_correct / denom,
    }
    return sum_loss / denom, aux


def cross_entropy(logits, targets, mask, z_loss: float = 0.0):
    """Mean masked cross-entropy (+ z_loss * mean log(Z)^2) over the tokens of one batch.

    Shapes as in `cross_entropy_sums`. Returns (loss, aux) with aux keys
    `ce`, `z_loss` (unweighted), `tokens`, `accuracy`.
    """
    return finalize(*cross_entropy_sums(logits, targets, mask, z_loss))


# ---------------------------------------------------------------------------------------------
# Mixture of experts: the router losses and loads each MoE layer sows into `intermediates`
# (tpullm/models/moe.py) are per-call means over that layer's real tokens. Weighting them by the
# microbatch's real tokens (tpullm/parallel/microbatches.py) turns them into sums that accumulate
# like the cross-entropy, so with gradient accumulation the step sees the mean over real tokens.

MOE_KEYS = ("aux_loss", "z_loss", "dropped", "load")


def _sown(intermediates, name: str):
    """Every value sown under `name`, each [moe layers of that scan, ...], concatenated on axis 0."""
    found = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]
        if any(getattr(p, "key", None) == name for p in path)
    ]
    return jnp.concatenate([jnp.asarray(x, jnp.float32).reshape(-1, *jnp.shape(x)[1:]) for x in found], axis=0)


def moe_sums(intermediates, n_tokens):
    """(aux_loss, z_loss, dropped, load [E]): means over MoE layers, times n_tokens (see above)."""
    return tuple(n_tokens * jnp.mean(_sown(intermediates, name), axis=0) for name in MOE_KEYS)


def moe_metrics(sums, n_tokens) -> dict:
    """Scalar metrics from (accumulated) `moe_sums`: the unweighted router losses, the dropped share
    of assignments, and each expert's share of assignments relative to uniform (1.0 = balanced)."""
    if not sums:
        return {}
    denom = jnp.maximum(n_tokens, 1.0)
    aux, z, dropped, load = (s / denom for s in sums)
    relative = load * load.shape[-1]
    out = {
        "moe_aux_loss": aux,
        "moe_z_loss": z,
        "moe_dropped": dropped,
        "moe_load_max": jnp.max(relative),
        "moe_load_min": jnp.min(relative),
    }
    out.update({f"moe_load/{i}": relative[i] for i in range(load.shape[-1])})
    return out
