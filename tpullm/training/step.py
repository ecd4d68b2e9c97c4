"""The train and eval steps: pure functions of (state, batch), compiled once by the loop.

A batch is a dict of [batch, length] arrays: tokens, targets, segment_ids, positions, loss_mask.
"""

import jax
import jax.numpy as jnp
import optax

from tpullm.parallel.microbatches import real_tokens, split_microbatches
from tpullm.training.loss import cross_entropy_sums, finalize, moe_metrics, moe_sums
from tpullm.training.state import TrainState


def _num_experts(model) -> int:
    return getattr(getattr(model, "config", None), "num_experts", 0) or 0


def _loss_sums(model, params, batch, z_loss):
    logits = model.apply(
        {"params": params}, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )  # [b, l, vocab]
    return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], z_loss)


def _train_sums(model, params, batch, z_loss, rng):
    """(the 5 cross-entropy sums, the MoE sums weighted by the batch's real tokens or ())."""
    if not _num_experts(model):
        return _loss_sums(model, params, batch, z_loss), ()
    rngs = {"router": rng} if model.config.router_jitter else {}
    logits, state = model.apply(
        {"params": params},
        batch["tokens"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        rngs=rngs,
        mutable=["intermediates"],
    )
    sums = cross_entropy_sums(logits, batch["targets"], batch["loss_mask"], z_loss)
    return sums, moe_sums(state["intermediates"], real_tokens(batch["segment_ids"]))


def objective(model, sums, moe, n_tokens, n_real):
    """The train loss from (some microbatches' share of) the sums: the cross-entropy (+ z-loss) sum
    over the batch's n_tokens loss tokens, plus the weighted router losses, whose MoE sums are
    weighted by real tokens (`real_tokens`), over the batch's n_real real tokens."""
    if not moe:
        return sums[0] / n_tokens
    cfg = model.config
    return sums[0] / n_tokens + (cfg.router_aux_loss * moe[0] + cfg.router_z_loss * moe[1]) / n_real


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    schedule,
    z_loss: float = 0.0,
    grad_accum_steps: int = 1,
    seed: int = 0,
):
    """Returns train_step(state, batch) -> (state, metrics).

    seed (train.seed) keys the router jitter of MoE models: step s, microbatch i draws from
    fold_in(fold_in(key(seed), s), i), so a resumed run draws the same noise.

    Each microbatch contributes the gradient of its summed token loss divided by the token count
    of the *whole* batch (known before the first microbatch runs; its router-loss sums likewise by
    the whole batch's real tokens, see `objective`), so accumulating k microbatches gives exactly
    the gradient of the whole batch, and no extra pass over the gradients is needed.
    """

    def grad_of_sums(params, batch, n_tokens, n_real, rng):
        def loss_share(p):
            sums, moe = _train_sums(model, p, batch, z_loss, rng)
            return objective(model, sums, moe, n_tokens, n_real), (sums, moe)

        return jax.grad(loss_share, has_aux=True)(params)

    def train_step(state: TrainState, batch):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        n_real = jnp.maximum(real_tokens(batch["segment_ids"]), 1.0)
        rng = jax.random.fold_in(jax.random.key(seed), state.step)  # router jitter (MoE only)
        if grad_accum_steps == 1:
            grads, (sums, moe) = grad_of_sums(state.params, batch, n_tokens, n_real, rng)
        else:
            micro = jax.tree.map(lambda x: split_microbatches(x, grad_accum_steps), batch)

            def accumulate(carry, xs):
                microbatch, i = xs
                grads, sums = grad_of_sums(state.params, microbatch, n_tokens, n_real, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (grads, sums)), None

            first = jax.tree.map(lambda x: x[0], micro)
            sums_shape = jax.eval_shape(lambda: grad_of_sums(state.params, first, n_tokens, n_real, rng)[1])
            zeros = (
                jax.tree.map(jnp.zeros_like, state.params),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
            )
            (grads, (sums, moe)), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))
        _, aux = finalize(*sums)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": objective(model, sums, moe, n_tokens, n_real),
            **aux,
            **moe_metrics(moe, n_real),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model):
    """Returns eval_step(params, batch) -> (sum_loss, sum_ce, sum_z, n_tokens, n_correct)."""

    def eval_step(params, batch):
        return _loss_sums(model, params, batch, 0.0)

    return eval_step
