"""Chinchilla's Approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to every run's final loss.

As in Hoffmann et al. 2022 (section 3.3, appendix D.2) and its replication by Besiroglu et al.
2024: with A = exp(a), B = exp(b), E = exp(e), minimise

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3,

by L-BFGS started from points of the grid alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
a, b in {0, 5, ..., 25}, keeping the best optimum (`fit_parametric`'s n_starts says which points).
Besiroglu et al. could not reproduce the paper's estimates and suspect an optimiser that stopped
before converging, so this runs in float64 with tight tolerances (optax's L-BFGS with a zoom line
search, one jit for all starts). The Huber loss on log-loss makes the fit robust to a few bad runs.

The compute-optimal frontier under C = 6 N D follows in closed form (paper, eq. 4):
N_opt = G (C/6)^a_exp, D_opt = G^-1 (C/6)^b_exp, G = (alpha A / (beta B))^(1/(alpha+beta)),
a_exp = beta / (alpha + beta), b_exp = alpha / (alpha + beta).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from tpullm.scaling.fits import percentile_intervals, resample

HUBER_DELTA = 1e-3
# The paper's initialisation grid: 5 * 5 * 5 * 6 * 6 = 4500 starts.
INIT_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
_ORDER = ("a", "b", "e", "alpha", "beta")  # the layout of theta
MAX_ITER = 2000
# The objective is ~1e-4: stop when the gradient vanishes or a step changes it by < 1e-15,
# i.e. once theta stops moving in about its 7th digit.
GRAD_TOL, VALUE_TOL = 1e-12, 1e-15


def objective(theta, log_n, log_d, log_loss, delta=HUBER_DELTA, weights=1.0):
    """The Huber objective at theta = (a, b, e, alpha, beta), each run's term times its weight
    (a bootstrap replicate is a 0/1 weighting, so it keeps the data's shape); traceable by JAX."""
    import jax
    import jax.numpy as jnp

    a, b, e, alpha, beta = theta
    terms = jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.full_like(log_n, e)])
    r = jax.nn.logsumexp(terms, axis=0) - log_loss
    return jnp.sum(weights * jnp.where(jnp.abs(r) <= delta, 0.5 * r**2, delta * (jnp.abs(r) - 0.5 * delta)))


@functools.cache
def _lbfgs_fn(delta: float):
    """One jitted L-BFGS run (optax, zoom line search) from theta0 on data passed as arguments,
    so every start and every bootstrap replicate reuses one compilation (seconds), after which a run
    takes milliseconds. Call it under `jax.enable_x64(True)`."""
    import jax
    import jax.numpy as jnp
    import optax

    def run(theta0, log_n, log_d, log_loss, weights):
        def f(theta):
            return objective(theta, log_n, log_d, log_loss, delta, weights)

        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(f)

        def body(carry):
            theta, state, _ = carry
            value, grad = value_and_grad(theta, state=state)
            updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=f)
            return optax.apply_updates(theta, updates), state, value

        def cond(carry):
            _, state, previous = carry
            count = optax.tree_utils.tree_get(state, "count")
            grad = optax.tree_utils.tree_get(state, "grad")
            value = optax.tree_utils.tree_get(state, "value")
            moving = (jnp.linalg.norm(grad) > GRAD_TOL) & (jnp.abs(previous - value) > VALUE_TOL)
            return (count == 0) | ((count < MAX_ITER) & moving)

        theta, _, _ = jax.lax.while_loop(cond, body, (theta0, opt.init(theta0), jnp.inf))
        return theta, f(theta)

    return jax.jit(run)


def _lbfgs(starts, log_n, log_d, log_loss, weights, delta):
    """The best optimum of L-BFGS runs from each row of `starts`, and each run's final value.
    Float64, scoped to this call (the process keeps its float32 default): the residuals are
    ~1e-3, and imprecise optimisation is the suspected cause of the paper's unreproducible fit."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        run = _lbfgs_fn(float(delta))
        data = [jnp.asarray(x, jnp.float64) for x in (log_n, log_d, log_loss, weights)]
        thetas, values = [], []
        for theta0 in starts:
            theta, value = run(jnp.asarray(theta0, jnp.float64), *data)
            thetas.append(np.asarray(theta))
            values.append(float(value))
    values = np.where(np.isfinite(values), values, np.inf)
    return thetas[int(np.argmin(values))], values


def _objective_at(starts, log_n, log_d, log_loss, delta):
    """The objective at many thetas [S, 5] at once, in numpy: ranks the grid's starts."""
    a, b, e, alpha, beta = (starts[:, i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0 * log_n))
    top = terms.max(axis=0)
    r = top + np.log(np.exp(terms - top).sum(axis=0)) - log_loss
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(axis=-1)


def _grid(init_grid) -> np.ndarray:
    grid = init_grid or INIT_GRID
    return np.array(list(itertools.product(*(grid[k] for k in _ORDER))), dtype=np.float64)


def _as_params(theta) -> dict:
    a, b, e, alpha, beta = (float(x) for x in theta)
    out = {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}
    total = alpha + beta
    if alpha > 0 and beta > 0:
        out["a"] = beta / total  # N_opt ~ C^a
        out["b"] = alpha / total  # D_opt ~ C^b
        out["G"] = float((alpha * out["A"] / (beta * out["B"])) ** (1.0 / total))
    return out


def fit_parametric(
    n_params,
    n_tokens,
    losses,
    *,
    delta: float = HUBER_DELTA,
    init_grid: dict | None = None,
    n_starts: int | None = 256,
    n_boot: int = 0,
    ci: float = 0.8,
    boot_fraction: float | None = 0.8,
    boot_starts: int = 10,
    seed: int = 0,
) -> dict:
    """Fits L(N, D) = E + A/N^alpha + B/D^beta; arrays in, floats out.

    L-BFGS runs from the `n_starts` points of the paper's initialisation grid with the lowest
    objective (ranking all 4500 takes milliseconds; the best-ranked ones converge in ~100
    iterations, the worst wander for thousands), ~1 s; n_starts=None runs from every grid point,
    exactly as the paper does (~1 minute). On synthetic data about half of the 64 best-ranked
    starts already reach the full grid's optimum.

    Returns E, A, B, alpha, beta, the frontier exponents a (N_opt ~ C^a) and b (D_opt ~ C^b), G,
    and `objective`. With `n_boot` > 0, also `ci`: {name: (low, high)}, the central `ci` interval
    over refits on `n_boot` resamples (`fits.resample`: by default 80% of the runs, as in the
    paper's Table 2), each refitted from the full fit's optimum and the `boot_starts` grid starts
    that ended best on the full data.
    """
    log_n, log_d = np.log(np.asarray(n_params, np.float64)), np.log(np.asarray(n_tokens, np.float64))
    log_loss = np.log(np.asarray(losses, np.float64))
    if not (log_n.shape == log_d.shape == log_loss.shape) or log_n.size < 5:
        raise ValueError("fit_parametric needs equal-length arrays of at least 5 runs")
    starts = _grid(init_grid)
    if n_starts is not None:
        starts = starts[np.argsort(_objective_at(starts, log_n, log_d, log_loss, delta))[:n_starts]]
    theta, values = _lbfgs(starts, log_n, log_d, log_loss, np.ones_like(log_n), delta)
    out = _as_params(theta)
    out["objective"] = float(values.min())
    if n_boot > 0:
        boot_init = np.vstack([theta, starts[np.argsort(values)[:boot_starts]]])
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(n_boot):
            weights = np.bincount(resample(rng, np.arange(log_n.size), boot_fraction), minlength=log_n.size)
            samples.append(_as_params(_lbfgs(boot_init, log_n, log_d, log_loss, weights, delta)[0]))
        out["ci"] = percentile_intervals(samples, ci)
        out["n_boot"] = n_boot
    return out


def predict(params: dict, n_params, n_tokens):
    """L(N, D) of a fit."""
    n, d = np.asarray(n_params, np.float64), np.asarray(n_tokens, np.float64)
    return params["E"] + params["A"] / n ** params["alpha"] + params["B"] / d ** params["beta"]


def optimal_allocation(params: dict, flops):
    """(N_opt, D_opt) minimising the fitted loss under C = 6 N D (paper, eq. 4)."""
    c = np.asarray(flops, np.float64) / 6.0
    return params["G"] * c ** params["a"], c ** params["b"] / params["G"]
