"""The training loop: set up mesh, model, data and state, then step, log, evaluate, checkpoint.

`train(config, workdir)` is what `python -m tpullm.train` runs; a notebook can call it too.
Running it again on the same workdir resumes from the newest checkpoint.
"""

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tpullm import config as config_lib, data
from tpullm.checkpoint import manager as ckpt, policy as ckpt_policy, resume as ckpt_resume
from tpullm.inference.sampling import generate
from tpullm.models import Decoder
from tpullm.parallel import distributed, guard, mesh as mesh_lib, rules
from tpullm.training import flops, metrics as metrics_lib
from tpullm.training.optimizer import learning_rate_schedule, make_optimizer
from tpullm.training.state import TrainState
from tpullm.training.step import make_eval_step, make_train_step


def log(message: str) -> None:
    """Progress for people: process 0 prints, the others stay quiet."""
    if jax.process_index() == 0:
        print(message, flush=True)


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first step."""

    model: Decoder
    mesh: jax.sharding.Mesh
    state_shardings: object
    abstract_state: object
    init_state: object  # jitted rng -> TrainState, laid out on the mesh
    optimizer: object
    schedule: object
    layout: guard.Report  # bytes per device of every parameter, from the rules


def build(config, model_cfg, devices=None) -> Setup:
    """Model, optimizer and the train state's layout on the mesh, from the rules table.

    `devices`: all devices of all processes by default; AOT compilation passes a TPU topology's.
    Fails (ConfigError) when the rules leave too many parameter bytes replicated (parallel/guard.py).
    """
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    model = Decoder(model_cfg)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    schedule = learning_rate_schedule(config.optimizer, config.train.steps)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)

    def boxed_state(rng):
        # Optax maps over the logical-axis boxes, so the moments inherit the params' names.
        params = model.init(rng, tokens)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))

    key = jax.random.key(0)  # made outside the mesh: an AOT mesh has compile-only devices
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        abstract_boxed = jax.eval_shape(boxed_state, key)
        rules.check_batch(config.train.batch_size, mesh.shape)
        rules.check_pipeline(model_cfg, config.train.batch_size, config.train.grad_accum_steps, mesh.shape)
        layout = guard.check(abstract_boxed.params, mesh.shape, config.mesh.max_replicated_share)
        state_shardings = rules.state_shardings(abstract_boxed, mesh)
        init_state = jax.jit(lambda rng: nn.unbox(boxed_state(rng)), out_shardings=state_shardings)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  nn.unbox(abstract_boxed), state_shardings)
    return Setup(model, mesh, state_shardings, abstract_state, init_state, optimizer, schedule, layout)


def jit_train_step(setup: Setup, config):
    """The train step as the loop runs it: jitted with the state's and the batch's shardings and
    the state donated. Trace it (call, or `.lower`) under `jax.set_mesh(setup.mesh)` and the rules."""
    return jax.jit(
        make_train_step(setup.model, setup.optimizer, setup.schedule, config.optimizer.z_loss,
                        config.train.grad_accum_steps, config.train.seed),
        in_shardings=(setup.state_shardings, rules.batch_sharding(setup.mesh)),
        out_shardings=(setup.state_shardings, None), donate_argnums=0)


def put_batch(batch: dict, sharding, global_batch_size: int | None = None) -> dict:
    """Host numpy arrays -> global arrays laid out like the mesh's batch axes.

    With several processes each one feeds only the rows its own devices hold. By default every
    process passes the whole global batch and JAX takes its rows from it; a pipeline that reads
    only this process's rows (`parallel.distributed.process_rows`) passes `global_batch_size`.
    """
    def put(v):
        rows = v.shape[0] if global_batch_size is None else global_batch_size
        return jax.make_array_from_process_local_data(sharding, v, (rows, *v.shape[1:]))

    return {k: put(v) for k, v in batch.items()}


def evaluate(eval_step, params, val_rows: data.PackedRows, batch_size: int, max_batches: int, sharding) -> dict:
    """Mean loss over the first batches of the validation rows, in order (the same every time)."""
    n_batches = min(max_batches, val_rows.n_rows // batch_size)
    totals = np.zeros(5)
    for i in range(n_batches):
        batch = put_batch(val_rows.take(slice(i * batch_size, (i + 1) * batch_size)), sharding)
        totals += np.asarray(jax.device_get(eval_step(params, batch)))
    _, ce, _, n_tokens, n_correct = totals
    return {"val_loss": ce / max(n_tokens, 1), "val_accuracy": n_correct / max(n_tokens, 1)}


def train(config, workdir: str) -> dict:
    """Trains `config` in `workdir`; returns the final metrics (including val_loss)."""
    model_cfg = config_lib.validate(config)
    tokenizer = data.load_tokenizer(config.data.tokenizer)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
            f"set model.vocab_size >= {tokenizer.vocab_size}")
    t = config.train
    sources = data.DataSources(config.data, tokenizer)
    for line in sources.describe():
        log(f"data: {line}")
    val_rows = sources.validation_rows(config.data.seq_len, max_rows=t.eval_batches * t.batch_size)
    unigram = sources.unigram_entropy()
    log(f"data: {val_rows.n_rows} validation rows of {config.data.seq_len} tokens; unigram entropy "
        f"{unigram:.3f} nats/token")

    setup = build(config, model_cfg)
    counts = flops.param_counts(model_cfg)
    fpt = flops.flops_per_token(model_cfg, config.data.seq_len)
    log(f"model: {counts['total']:,} params ({counts['non_embedding']:,} without embeddings); "
        f"{fpt['total'] / 1e6:.1f} MFLOPs/token ({fpt['convention']})")
    log(f"mesh: {mesh_lib.describe(setup.mesh)} in {jax.process_count()} process(es)")
    log(setup.layout.text(config.mesh.max_replicated_share))

    batch_sharding = rules.batch_sharding(setup.mesh)
    # This process feeds the rows of the global batch its devices hold; processes holding the
    # same rows (model parallelism across hosts) read the same data shard.
    rows = distributed.process_rows(batch_sharding, t.batch_size)
    local_batch = rows.stop - rows.start
    batches = data.make_pipeline(config.data, tokenizer, local_batch, t.seed,
                                 process_index=rows.start // local_batch,
                                 process_count=t.batch_size // local_batch, sources=sources)
    log(f"data: {local_batch} of {t.batch_size} rows per process, {batches.num_workers} prefetch workers")

    ckpt.write_config(workdir, config)
    manager = ckpt.make_manager(workdir, t.keep_checkpoints, t.keep_period)
    save_policy = ckpt_policy.SavePolicy(t.checkpoint_every, t.checkpoint_minutes, t.steps)
    # The newest checkpoint that restores; damaged ones are reported and moved aside.
    start, state = ckpt_resume.restore_newest(manager, setup.abstract_state, batches, log)
    if start is None:
        state = setup.init_state(jax.random.key(t.seed))
        start = 0
    else:
        log(f"resuming from step {start} in {workdir}")
    writer = metrics_lib.MetricWriter(workdir)
    device = jax.devices()[0]
    peak = flops.peak_flops_per_device(device)
    # On CPU the figure is the whole process's; simulated devices share the same cores.
    peak_total = peak if device.platform == "cpu" else (peak or 0) * jax.device_count()
    throughput = metrics_lib.Throughput(t.batch_size * config.data.seq_len, fpt["total"], peak_total,
                                        t.steps, start)

    preempted = False
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES), save_policy.catch_sigterm():
        train_step = jit_train_step(setup, config)
        eval_step = jax.jit(make_eval_step(setup.model), in_shardings=(setup.state_shardings.params, batch_sharding))
        compile_start = time.perf_counter()
        last = {}
        for step in range(start, t.steps):
            state, step_metrics = train_step(state, put_batch(next(batches), batch_sharding, t.batch_size))
            done = step + 1
            if step == start:
                jax.block_until_ready(step_metrics)
                log(f"first step (compilation included) took {time.perf_counter() - compile_start:.1f}s")
                throughput.report(done)
            if done % t.log_every == 0 or done == t.steps:
                last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                last.update(throughput.report(done))
                last.update({f"epochs/{name}": e for name, e in batches.epochs().items()})
                if done % t.eval_every == 0 or done == t.steps:
                    last.update(evaluate(eval_step, state.params, val_rows, t.batch_size, t.eval_batches,
                                         batch_sharding))
                writer.write(done, last)
                log(format_step(done, t.steps, last))
            save, preempted = save_policy.decide(done)
            if save:
                ckpt.save(manager, done, state, batches)
            if preempted:
                log(f"SIGTERM: saved step {done} and stopping; run the same command to resume")
                break
        manager.wait_until_finished()
        log(f"data: {batches.accounting.summary()}")
        batches.close()
        writer.close()

        if t.sample_tokens > 0 and not preempted:
            prompt = tokenizer.encode(t.sample_prompt)
            new = generate(setup.model, state.params, prompt, t.sample_tokens, jax.random.key(t.seed),
                           context=config.data.seq_len, temperature=0.8, top_k=40, eos_id=tokenizer.eos_id)
            log("sample:\n" + t.sample_prompt + tokenizer.decode(new))
    if "val_loss" in last:
        log(f"validation loss {last['val_loss']:.3f} nats/token against the corpus' unigram entropy "
            f"{unigram:.3f} nats/token ({last['val_loss'] / unigram:.0%} of it)")
    return {**last, "unigram_entropy": unigram}


def format_step(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.2f}",
             f"{m['tokens_per_sec']:,.0f} tok/s"]
    if "mfu" in m:
        parts.append(f"MFU {m['mfu']:.1%}")
    if "moe_aux_loss" in m:  # mixture of experts: load balance (1.0 = balanced) and dropped assignments
        parts.append(f"moe_aux {m['moe_aux_loss']:.3f} dropped {m['moe_dropped']:.1%}")
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    parts.append(f"ETA {metrics_lib.format_eta(m['eta_sec'])}")
    return " | ".join(parts)
