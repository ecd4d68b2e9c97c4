"""The train and validation steps: pure functions of (state, batch), compiled once by the loop.

A batch is a dict of [batch, length] arrays: tokens, targets, segment_ids, positions, loss_mask.
What the step minimises is an `Objective` (training/objective.py); which parameters it trains is a
regex over their paths (training/trainable.py), and only those get gradients and optimizer state.
"""

import jax
import jax.numpy as jnp
import optax

from tpullm.parallel.microbatches import split_microbatches
from tpullm.training import trainable as trainable_lib
from tpullm.training.objective import LanguageModeling, Objective
from tpullm.training.state import TrainState


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    schedule,
    objective: Objective | float = 0.0,
    grad_accum_steps: int = 1,
    seed: int = 0,
    trainable: str | None = None,
):
    """Returns train_step(state, batch, frozen=None) -> (state, metrics).

    objective: an Objective, or a z-loss weight for next-token cross-entropy. trainable: the regex of
    the parameters that train (None: all); `state.opt_state` must hold the optimizer state of exactly
    those (`optimizer.init(trainable_lib.split(params, trainable)[0])`). frozen: {name: params} of the
    objective's frozen models.

    seed (train.seed) keys the random draws of training (MoE router jitter, LoRA dropout): step s,
    microbatch i draws from fold_in(fold_in(key(seed), s), i), so a resumed run draws the same noise.

    Each microbatch contributes the gradient of its sums divided by the counts of the *whole* batch
    (`Objective.counts`), so accumulating k microbatches gives exactly the gradient of the whole
    batch, and no extra pass over the gradients is needed.
    """
    if not isinstance(objective, Objective):
        objective = LanguageModeling(objective)

    def train_step(state: TrainState, batch, frozen=None):
        frozen = frozen or {}
        counts = objective.counts(model, batch)
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        train_params, fixed = trainable_lib.split(state.params, trainable)

        def grad_of_sums(batch, rng):
            def loss_share(p):
                sums = objective.sums(model, trainable_lib.merge(p, fixed), frozen, batch, rng)
                return objective.loss(model, sums, counts), sums

            return jax.grad(loss_share, has_aux=True)(train_params)

        if grad_accum_steps == 1:
            grads, sums = grad_of_sums(batch, rng)
        else:
            micro = jax.tree.map(lambda x: split_microbatches(x, grad_accum_steps), batch)

            def accumulate(carry, xs):
                microbatch, i = xs
                return jax.tree.map(jnp.add, carry, grad_of_sums(microbatch, jax.random.fold_in(rng, i))), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(lambda: grad_of_sums(first, rng))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))
        updates, opt_state = optimizer.update(grads, state.opt_state, train_params)
        params = trainable_lib.merge(optax.apply_updates(train_params, updates), fixed)
        metrics = {
            "loss": objective.loss(model, sums, counts),
            **objective.metrics(model, sums, counts),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model, objective: Objective | None = None):
    """Returns eval_step(params, batch, frozen=None) -> the objective's validation sums (by default
    the five cross-entropy sums: sum_loss, sum_ce, sum_z, n_tokens, n_correct)."""
    objective = objective or LanguageModeling()

    def eval_step(params, batch, frozen=None):
        return objective.validation_sums(model, params, frozen or {}, batch)

    return eval_step
