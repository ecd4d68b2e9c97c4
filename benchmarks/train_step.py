"""How close tpullm's train step is to a hand-written pure-JAX step of the same model and optimizer.

    JAX_PLATFORMS=cpu python benchmarks/train_step.py --config=configs/demo.py --repeats=15

(`--config.model.num_layers=8` and other overrides work as in `tpullm.train`.) Prints:
  1. tpullm's train step, built as the training loop builds it (`loop.build`, jit with shardings
     and donated state, traced under the mesh and the logical-axis rules): ms/step, tokens/s, MFU;
  2. "the floor": the same architecture, loss and clip + AdamW optimizer in plain jnp, after
     checking that its losses match tpullm's from the same params on the same batch;
  3. their step-time ratio (target: within 1.05x), from interleaved rounds (A B, B A, A B, ...;
     medians of wall-clock and of process CPU time, which busy shared cores disturb less), and
     XLA's static FLOP / byte estimates of both, which timing noise cannot disturb;
  4. compile time (lower + compile, fresh jits) of tpullm's step at two depths, and their ratio.
The batch is synthetic: random documents packed like real data (several segments per row, padding
in the last row), [train.batch_size, data.seq_len], reused every step (no host-to-device copy timed).
"""

import contextlib
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from tpullm import config as config_lib
from tpullm import data
from tpullm.data.synthetic import random_packed_batch
from tpullm.parallel import rules
from tpullm.training import flops, loop
from tpullm.training.step import make_train_step

_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file (configs/*.py[:arg]).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Interleaved timing rounds (A, B) per implementation.")
_STEPS = flags.DEFINE_integer("steps", 1, "Train steps per timing round.")
_COMPILE_LAYERS = flags.DEFINE_list("compile_layers", ["4", "48"], "Depths whose compile time is compared.")
_COMPILE_REPEATS = flags.DEFINE_integer("compile_repeats", 3, "Interleaved compilations per depth.")

F32 = jnp.float32
LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


# ---------------------------------------------------------------- tpullm, as loop.train builds it


@contextlib.contextmanager
def tpullm_context(mesh):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        yield


def build_tpullm(config, model_cfg):
    setup = loop.build(config, model_cfg)
    batch_sharding = rules.batch_sharding(setup.mesh)
    if hasattr(loop, "jit_train_step"):  # the loop's own helper, where the tree has it
        return setup, batch_sharding, loop.jit_train_step(setup, config)
    step = jax.jit(  # what loop.train does inline otherwise
        make_train_step(
            setup.model, setup.optimizer, setup.schedule, config.optimizer.z_loss, config.train.grad_accum_steps
        ),
        in_shardings=(setup.state_shardings, batch_sharding),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=0,
    )
    return setup, batch_sharding, step


# ---------------------------------------------------------------- the floor: plain jnp, no optax


def floor_params(params):
    """tpullm's param tree -> a flat dict of arrays (per-layer ones stacked [layers, ...]); copies."""
    lay, att, mlp = params["layers"], params["layers"]["attention"], params["layers"]["mlp"]
    flat = {
        "embed": params["token_embed"]["embedding"],
        "final_norm": params["final_norm"]["scale"],
        "lm_head": params["lm_head"]["kernel"],
        "attn_norm": lay["attn_norm"]["scale"],
        "wq": att["query"]["kernel"],
        "wk": att["key"]["kernel"],
        "wv": att["value"]["kernel"],
        "wo": att["out"]["kernel"],
        "mlp_norm": lay["mlp_norm"]["scale"],
        "w_gate": mlp["gate"]["kernel"],
        "w_up": mlp["up"]["kernel"],
        "w_down": mlp["down"]["kernel"],
    }
    return jax.tree.map(jnp.copy, flat)


def make_floor_step(m, o, total_steps, z_loss):
    """Returns step((params, mu, nu, count), batch) -> (state, {"loss", "grad_norm"})."""
    cdt, hd, half = jnp.dtype(m.compute_dtype), m.head_dim, m.head_dim // 2
    peak, warmup = o.learning_rate, o.warmup_steps
    end = o.min_lr_ratio * peak

    def norm(x, scale):
        x32 = x.astype(F32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + m.norm_eps)
        return (x32 * inv_rms).astype(cdt) * scale.astype(cdt)

    def loss_fn(p, batch):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        b, length = tokens.shape
        angle = batch["positions"].astype(F32)[:, :, None, None] * m.rope_theta ** (-jnp.arange(half, dtype=F32) / half)
        sin, cos = jnp.sin(angle), jnp.cos(angle)  # [b, l, 1, half], once for all layers

        def rope(x):
            x1, x2 = x[..., :half].astype(F32), x[..., half:].astype(F32)
            return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(cdt)

        i = jnp.arange(length)
        delta = i[:, None] - i[None, :]
        visible = (delta >= 0) & ((delta < m.sliding_window) if m.sliding_window else True)
        mask = (visible[None] & (seg[:, :, None] == seg[:, None, :]))[:, None, None]  # [b, 1, 1, q, k]

        def layer(x, w):
            h = norm(x, w["attn_norm"])
            q = rope(jnp.einsum("bld,dhk->blhk", h, w["wq"].astype(cdt)))
            k = rope(jnp.einsum("bld,dhk->blhk", h, w["wk"].astype(cdt)))
            v = jnp.einsum("bld,dhk->blhk", h, w["wv"].astype(cdt))
            q = q.reshape(b, length, m.num_kv_heads, m.num_heads // m.num_kv_heads, hd)
            s = jnp.einsum("bqngd,bknd->bngqk", q, k, preferred_element_type=F32) / jnp.sqrt(hd)
            probs = jax.nn.softmax(jnp.where(mask, s, -0.7 * jnp.finfo(F32).max), -1).astype(cdt)
            att = jnp.einsum("bngqk,bknd->bqngd", probs, v).reshape(b, length, m.num_heads, hd)
            x = x + jnp.einsum("blhk,hkd->bld", att, w["wo"].astype(cdt))
            h = norm(x, w["mlp_norm"])
            gated = jax.nn.silu(h @ w["w_gate"].astype(cdt)) * (h @ w["w_up"].astype(cdt))
            return x + gated @ w["w_down"].astype(cdt), None

        x = p["embed"].astype(cdt)[tokens]
        x, _ = jax.lax.scan(layer, x, {k: p[k] for k in LAYER_KEYS})
        logits = (norm(x, p["final_norm"]) @ p["lm_head"].astype(cdt)).astype(F32)
        log_z = jax.nn.logsumexp(logits, -1)
        # Compare-and-sum (fuses) rather than take_along_axis, whose backward is a scatter-add.
        target = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == batch["targets"][..., None], logits, 0.0), -1)
        w = batch["loss_mask"].astype(F32)
        return jnp.sum(w * (log_z - target + z_loss * log_z * log_z)) / jnp.maximum(jnp.sum(w), 1.0)

    def lr_at(step):  # linear warmup to peak, then cosine to end at total_steps
        s = step.astype(F32)
        frac = jnp.clip((s - warmup) / (total_steps - warmup), 0.0, 1.0)
        return jnp.where(s < warmup, peak * s / max(warmup, 1), end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))

    def step(state, batch):
        p, mu, nu, count = state
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        gnorm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
        if o.grad_clip > 0:
            g = jax.tree.map(lambda x: x * jnp.minimum(1.0, o.grad_clip / gnorm), g)
        t, lr = count + 1, lr_at(count)
        mu = jax.tree.map(lambda a, x: o.b1 * a + (1 - o.b1) * x, mu, g)
        nu = jax.tree.map(lambda a, x: o.b2 * a + (1 - o.b2) * x * x, nu, g)

        def update(name, w, a, n):
            u = (a / (1 - o.b1**t)) / (jnp.sqrt(n / (1 - o.b2**t)) + o.eps)
            decay = 0.0 if name.endswith("norm") else o.weight_decay  # norm scales: no decay
            return w - lr * (u + decay * w)

        p = {k: update(k, p[k], mu[k], nu[k]) for k in p}
        return (p, mu, nu, t), {"loss": loss, "grad_norm": gnorm}

    return step


# ---------------------------------------------------------------- helpers


def timed(fn, state, batch, steps):
    """Runs `steps` steps; returns the state and (wall, process CPU) seconds per step."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready((state, metrics))
    return state, ((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps)


def xla_cost(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)


def compile_seconds(config, num_layers):
    c = config.copy_and_resolve_references()
    c.model.num_layers = num_layers
    setup, batch_sharding, step = build_tpullm(c, config_lib.validate(c))
    shape = (c.train.batch_size, c.data.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sharding)
        for k in data.packing.FIELDS
    }
    with tpullm_context(setup.mesh):
        t0 = time.perf_counter()
        lowered = step.lower(setup.abstract_state, batch)
        t1 = time.perf_counter()
        lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    m = config_lib.validate(config)
    unsupported = {
        "norm": m.norm != "rmsnorm",
        "mlp": m.mlp != "swiglu",
        "positions": m.positions != "rope",
        "biases": m.qkv_bias or m.dense_bias,
        "tie_embeddings": m.tie_embeddings,
        "remat_policy": m.remat_policy != "none",
        "grad_accum_steps": config.train.grad_accum_steps != 1,
    }
    if any(unsupported.values()):
        raise app.UsageError(
            f"the floor implements RMSNorm/SwiGLU/RoPE, no biases, untied, no remat, no "
            f"accumulation; this config differs in {[k for k, v in unsupported.items() if v]}"
        )
    b, length = config.train.batch_size, config.data.seq_len
    device = jax.devices()[0]
    print(
        f"config: layers={m.num_layers} embed={m.embed_dim} heads={m.num_heads}/{m.num_kv_heads} "
        f"mlp={m.mlp_dim} vocab={m.vocab_size} batch={b}x{length} {m.compute_dtype}; "
        f"{jax.device_count()} {device.platform} device(s)"
    )

    setup, batch_sharding, tp_step = build_tpullm(config, m)
    batch = loop.put_batch(
        random_packed_batch(config.train.batch_size, config.data.seq_len, config.model.vocab_size), batch_sharding
    )
    tp_state = setup.init_state(jax.random.key(config.train.seed))
    fl_params = floor_params(tp_state.params)  # the same initial values, in the floor's layout
    fl_state = (
        fl_params,
        jax.tree.map(jnp.zeros_like, fl_params),
        jax.tree.map(jnp.zeros_like, fl_params),
        jnp.zeros((), jnp.int32),
    )
    fl_step = jax.jit(
        make_floor_step(m, config.optimizer, config.train.steps, config.optimizer.z_loss), donate_argnums=0
    )
    with tpullm_context(setup.mesh):  # XLA's static estimate of the work, immune to timing noise
        costs = {"tpullm": xla_cost(tp_step.lower(tp_state, batch).compile())}
    costs["floor"] = xla_cost(fl_step.lower(fl_state, batch).compile())

    def run_tpullm(state, batch):
        with tpullm_context(setup.mesh):
            return tp_step(state, batch)

    # Parity (also compiles both): same params, same batch, three steps (step 0 has lr 0 in warmup).
    print("\nparity check, same initial params and batch:")
    print(f"  {'step':>4}  {'tpullm loss':>12}  {'floor loss':>12}  {'rel diff':>9}  {'grad_norm rel diff':>18}")
    rel = []
    for i in range(3):
        tp_state, tm = run_tpullm(tp_state, batch)
        fl_state, fm = fl_step(fl_state, batch)
        lt, lf = float(tm["loss"]), float(fm["loss"])
        rel.append(abs(lt - lf) / abs(lt))
        g_rel = abs(float(tm["grad_norm"]) - float(fm["grad_norm"])) / float(tm["grad_norm"])
        print(f"  {i:>4}  {lt:>12.7f}  {lf:>12.7f}  {rel[-1]:>9.2e}  {g_rel:>18.2e}")
    ok = rel[0] <= 1e-5
    print(
        f"  step-0 loss {'MATCHES' if ok else 'DIFFERS'} within 1e-5 relative; "
        f"steps 1-2 (after optimizer updates) {'match' if max(rel[1:]) <= 1e-5 else 'differ'}"
    )
    if not ok:
        raise SystemExit("the floor does not compute the same loss as tpullm; timings would not be comparable")

    # Interleaved timing, A B, B A, A B, ... (the order alternates so neither always runs first).
    fns, states = {"tpullm": run_tpullm, "floor": fl_step}, {"tpullm": tp_state, "floor": fl_state}
    times = {"tpullm": [], "floor": []}  # (wall, cpu) seconds per step, one entry per round
    for r in range(_REPEATS.value):
        for name in ("tpullm", "floor") if r % 2 == 0 else ("floor", "tpullm"):
            states[name], t = timed(fns[name], states[name], batch, _STEPS.value)
            times[name].append(t)
    fpt = flops.flops_per_token(m, length)["total"]
    peak = flops.peak_flops_per_device(device)
    peak_total = peak if device.platform == "cpu" else (peak or 0) * jax.device_count()
    print(
        f"\ntrain step, median of {_REPEATS.value} interleaved rounds of {_STEPS.value} steps "
        f"({fpt / 1e6:.1f} MFLOPs/token; peak {peak_total / 1e9:,.0f} GFLOP/s):"
    )
    print(f"  {'':8}  {'ms/step':>9}  {'min':>8}  {'max':>8}  {'CPU ms/step':>11}  {'tokens/s':>9}  {'MFU':>6}")
    med, cpu = {}, {}
    for name, ts in times.items():
        wall = [t[0] for t in ts]
        med[name], cpu[name] = statistics.median(wall), statistics.median(t[1] for t in ts)
        tok_s = b * length / med[name]
        mfu = f"{tok_s * fpt / peak_total:.1%}" if peak_total else "n/a"
        print(
            f"  {name:8}  {med[name] * 1e3:>9.1f}  {min(wall) * 1e3:>8.1f}  {max(wall) * 1e3:>8.1f}  "
            f"{cpu[name] * 1e3:>11.1f}  {tok_s:>9,.0f}  {mfu:>6}"
        )
    ratio = med["tpullm"] / med["floor"]
    pairwise = statistics.median(a[0] / f[0] for a, f in zip(times["tpullm"], times["floor"]))
    print(
        f"  tpullm / floor = {ratio:.3f}x wall-clock: {'within' if ratio <= 1.05 else 'OUTSIDE'} the 1.05x "
        f"target (median per-round ratio {pairwise:.3f}x, CPU-time ratio {cpu['tpullm'] / cpu['floor']:.3f}x)"
    )
    print(
        f"  XLA cost analysis, tpullm / floor (scan bodies counted once): FLOPs "
        f"{costs['tpullm'][0] / costs['floor'][0]:.3f}x, bytes accessed {costs['tpullm'][1] / costs['floor'][1]:.3f}x"
    )

    # Compile time vs depth, fresh jits, interleaved.
    depths = [int(n) for n in _COMPILE_LAYERS.value]
    comp = {n: [] for n in depths}
    for _ in range(_COMPILE_REPEATS.value):
        for n in depths:
            comp[n].append(compile_seconds(config, n))
    print(f"\ncompile time of tpullm's train step (median of {_COMPILE_REPEATS.value}, fresh jits, same width):")
    print(f"  {'layers':>6}  {'lower s':>8}  {'compile s':>9}  {'total s':>8}")
    totals = {}
    for n in depths:
        lo, co = statistics.median(x[0] for x in comp[n]), statistics.median(x[1] for x in comp[n])
        totals[n] = statistics.median(x[0] + x[1] for x in comp[n])
        print(f"  {n:>6}  {lo:>8.2f}  {co:>9.2f}  {totals[n]:>8.2f}")
    print(f"  {depths[-1]} / {depths[0]} layers: {totals[depths[-1]] / totals[depths[0]]:.2f}x")


if __name__ == "__main__":
    app.run(main)
