"""The training loop: set up mesh, model, data and state, then step, log, evaluate, checkpoint.

`train(config, workdir)` is what `python -m tpullm.train` runs; a notebook can call it too.
Running it again on the same workdir resumes from the newest intact checkpoint, after checking
that the config still describes it (checkpoint/config_change.py); one run at a time holds a
workdir (checkpoint/lock.py), and a loss or gradient norm that stops being finite stops the run
before anything non-finite is saved.
"""

import dataclasses
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tpullm import config as config_lib
from tpullm import data, errors
from tpullm.checkpoint import (
    config_change as ckpt_config,
)
from tpullm.checkpoint import (
    lock as ckpt_lock,
)
from tpullm.checkpoint import (
    manager as ckpt,
)
from tpullm.checkpoint import (
    policy as ckpt_policy,
)
from tpullm.checkpoint import (
    resume as ckpt_resume,
)
from tpullm.errors import UserError
from tpullm.evaluation import run as eval_run
from tpullm.models import Decoder, lora, soft_prompt
from tpullm.parallel import distributed, guard, rules
from tpullm.parallel import mesh as mesh_lib
from tpullm.training import finetune, flops, init_from, validation
from tpullm.training import metrics as metrics_lib
from tpullm.training import trainable as trainable_lib
from tpullm.training.objective import LanguageModeling, Objective
from tpullm.training.optimizer import learning_rate_schedule, make_optimizer
from tpullm.training.state import TrainState
from tpullm.training.step import make_eval_step, make_train_step


def log(message: str) -> None:
    """Progress for people: process 0 prints, the others stay quiet."""
    if jax.process_index() == 0:
        print(message, flush=True)


def warn(message: str) -> None:
    """A warning, from process 0 only, that stands out from the progress lines."""
    if jax.process_index() == 0:
        errors.warn(message)


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
    objective: Objective
    trainable: str | None  # the regex of the parameters that train (None: all; training/trainable.py)
    frozen_shardings: dict  # {name: params' NamedShardings} of the objective's frozen models


def build(config, model_cfg, devices=None, objective: Objective | None = None) -> Setup:
    """Model, optimizer and the train state's layout on the mesh, from the rules table.

    `devices`: all devices of all processes by default; AOT compilation passes a TPU topology's.
    `objective`: what the run minimises (training/finetune.py), next-token cross-entropy by default.
    Fails (ConfigError) when the rules leave too many parameter bytes replicated (parallel/guard.py).
    """
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    model = Decoder(model_cfg)
    objective = objective or LanguageModeling(config.optimizer.z_loss)
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    schedule = learning_rate_schedule(config.optimizer, config.train.steps)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    key = jax.random.key(0)  # made outside the mesh: an AOT mesh has compile-only devices
    abstract_params = jax.eval_shape(model.init, key, tokens)["params"]
    lora.check_targets(model_cfg, abstract_params)
    trains = trainable_lib.pattern(config.finetune.trainable, abstract_params)

    def boxed_state(rng):
        # Optax maps over the logical-axis boxes, so the moments inherit the params' names; it holds
        # state for the trainable params only.
        params = model.init(rng, tokens)["params"]
        opt_state = optimizer.init(trainable_lib.split(params, trains)[0])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
        abstract_boxed = jax.eval_shape(boxed_state, key)
        frozen_shardings = {
            name: rules.state_shardings(jax.eval_shape(m.init, key, tokens)["params"], mesh)
            for name, m in objective.frozen_models.items()
        }
        rules.check_batch(config.train.batch_size, mesh.shape)
        rules.check_pipeline(model_cfg, config.train.batch_size, config.train.grad_accum_steps, mesh.shape)
        layout = guard.check(abstract_boxed.params, mesh.shape, config.mesh.max_replicated_share)
        state_shardings = rules.state_shardings(abstract_boxed, mesh)
        init_state = jax.jit(lambda rng: nn.unbox(boxed_state(rng)), out_shardings=state_shardings)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract_boxed), state_shardings
    )
    return Setup(
        model,
        mesh,
        state_shardings,
        abstract_state,
        init_state,
        optimizer,
        schedule,
        layout,
        objective,
        trains,
        frozen_shardings,
    )


def jit_train_step(setup: Setup, config):
    """The train step as the loop runs it: jitted with the state's and the batch's shardings and
    the state donated; called as (state, batch), plus the frozen models' {name: params} when the
    objective has any. Trace it (call, or `.lower`) under `jax.set_mesh(setup.mesh)` and the rules."""
    frozen = (setup.frozen_shardings,) if setup.frozen_shardings else ()
    return jax.jit(
        make_train_step(
            setup.model,
            setup.optimizer,
            setup.schedule,
            setup.objective,
            config.train.grad_accum_steps,
            config.train.seed,
            setup.trainable,
        ),
        in_shardings=(setup.state_shardings, rules.batch_sharding(setup.mesh), *frozen),
        out_shardings=(setup.state_shardings, None),
        donate_argnums=0,
    )


def jit_eval_step(setup: Setup):
    """The objective's validation sums of one batch, (params, batch[, frozen]) -> sums."""
    frozen = (setup.frozen_shardings,) if setup.frozen_shardings else ()
    return jax.jit(
        make_eval_step(setup.model, setup.objective),
        in_shardings=(setup.state_shardings.params, rules.batch_sharding(setup.mesh), *frozen),
    )


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


def _check_finite(step: int, metrics: dict, newest_saved: int | None) -> None:
    """Stops the run at the first step whose loss or gradient norm is NaN or infinite."""
    values = {k: float(v) for k, v in jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")}).items()}
    if all(np.isfinite(v) for v in values.values()):
        return
    kept = f"the newest checkpoint, step {newest_saved}, is kept" if newest_saved else "no checkpoint was saved"
    raise TrainingDiverged(
        f"step {step}: loss {values['loss']}, gradient norm {values['grad_norm']}: training diverged; stopped before "
        f"saving anything non-finite ({kept}). Lower optimizer.learning_rate, raise optimizer.warmup_steps or "
        f"set optimizer.grad_clip, then run the same command to resume"
    )


class TrainingDiverged(UserError):
    """The loss or gradient norm became NaN or infinite: the message says which settings to change."""


def _resume_data(manager, step: int, batches, changes: dict, config) -> None:
    """Puts the data iterator where the checkpoint at `step` left it, or, when an accepted config
    change altered the data stream, restarts it as the log line says."""
    if not ckpt_config.data_stream_changed(changes):
        try:
            ckpt.restore_data(manager, step, batches)
        except ValueError as e:
            raise config_lib.ConfigError(f"the data iterator saved at step {step} does not fit this run: {e}") from e
        return
    old_batch = changes.get("train.batch_size", (config.train.batch_size,))[0]
    if any(k.startswith("data.") or k == "train.seed" for k in changes):
        log("data: the data stream changed (allowed by train.allow_changes); it starts from its beginning")
        return
    skip = step * old_batch // config.train.batch_size
    log(
        f"data: train.batch_size changed from {old_batch} to {config.train.batch_size} (allowed by "
        f"train.allow_changes); the data stream restarts and skips the {step * old_batch} rows the run consumed "
        f"({skip} batches of the new size)"
    )
    batches.skip(skip)


def train(
    config,
    workdir: str,
    on_finish=None,
    init_source: init_from.InitSource | None = None,
    frozen_sources: dict | None = None,
) -> dict:
    """Trains `config` in `workdir`; returns the final metrics (including val_loss).

    `on_finish(model, params)`, if given, runs at the end of a run that was not preempted, on the
    mesh (the train command prints a sample with it). `init_source` holds the weights a fresh run
    starts from when `train.init_from` is set (tpullm.interop.init_from.resolve makes it); the run
    then uses its tokenizer (`config.data.tokenizer` is set in place). `frozen_sources`: {name:
    InitSource} of the objective's frozen models (DPO's "reference", distillation's "teacher"), loaded
    onto the mesh at every start, fresh or resumed."""
    model_cfg = config_lib.validate(config)
    init_from.check_source_given(config, init_source)
    if init_source is not None:
        init_from.check_model(model_cfg, init_source)
        init_from.with_tokenizer(config, init_source, log)
    errors.check_writable(workdir, "--workdir")
    t = config.train
    with ckpt_lock.hold(workdir, warn):
        manager = ckpt.make_manager(workdir, t.keep_checkpoints, t.keep_period)
        changes = ckpt_config.check_resume(workdir, config, max(manager.all_steps(), default=None), log)
        return _train(config, model_cfg, workdir, manager, changes, on_finish, init_source, frozen_sources or {})


def _train(config, model_cfg, workdir, manager, changes, on_finish, init_source, frozen_sources) -> dict:
    t = config.train
    objective = finetune.make_objective(config, model_cfg, frozen_sources)  # checks its frozen models first
    tokenizer = data.load_tokenizer(config.data.tokenizer)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids; "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    sources = data.DataSources(config.data, tokenizer)
    for line in sources.describe():
        log(f"data: {line}")
    val_rows = sources.validation_rows(config.data.seq_len, max_rows=t.eval_batches * t.batch_size)
    validation.check_rows(val_rows.n_rows, t.batch_size, config.data.val_fraction, warn)
    val_rows = val_rows.take(slice(None))
    unigram = sources.unigram_entropy()
    log(
        f"data: {len(val_rows['tokens'])} validation rows of {config.data.seq_len} tokens; unigram entropy "
        f"{unigram:.3f} nats/token"
    )

    evaluate_tasks = eval_run.during_training(t, tokenizer, config.data.seq_len)
    setup = build(config, model_cfg, objective=objective)
    counts = flops.param_counts(model_cfg)
    fpt = flops.flops_per_token(model_cfg, config.data.seq_len)
    log(
        f"model: {counts['total']:,} params ({counts['non_embedding']:,} without embeddings); "
        f"{fpt['total'] / 1e6:.1f} MFLOPs/token (6 x matmul params + attention, as PaLM's MFU counts)"
    )
    n_trained, n_params = trainable_lib.count(setup.abstract_state.params, setup.trainable)
    which = "all" if setup.trainable is None else f"the params matching {setup.trainable!r}"
    log(f"trainable: {n_trained:,} of {n_params:,} params ({n_trained / n_params:.2%}): {which}")
    log(f"mesh: {mesh_lib.describe(setup.mesh)} in {jax.process_count()} process(es)")
    log(setup.layout.text(config.mesh.max_replicated_share))

    batch_sharding = rules.batch_sharding(setup.mesh)
    # This process feeds the rows of the global batch its devices hold; processes holding the
    # same rows (model parallelism across hosts) read the same data shard.
    rows = distributed.process_rows(batch_sharding, t.batch_size)
    local_batch = rows.stop - rows.start
    batches = data.make_pipeline(
        config.data,
        tokenizer,
        local_batch,
        t.seed,
        process_index=rows.start // local_batch,
        process_count=t.batch_size // local_batch,
        sources=sources,
    )
    log(f"data: {local_batch} of {t.batch_size} rows per process, {batches.num_workers} prefetch workers")

    save_policy = ckpt_policy.SavePolicy(t.checkpoint_every, t.checkpoint_minutes, t.steps, agree_every=t.log_every)
    # The newest checkpoint that restores intact; damaged ones are reported and moved aside.
    start, state = ckpt_resume.restore_newest(manager, setup.abstract_state, warn=warn)
    if start is None:
        state = setup.init_state(jax.random.key(t.seed))
        if init_source is not None:  # its params, a fresh optimizer state
            # Params the source lacks (adapters, a new head) keep their fresh initialization.
            params = init_source.load(model_cfg, setup.mesh, setup.state_shardings.params)
            fresh_prompt = "soft_prompt" not in params  # then drawn from the loaded token table, not the fresh one
            params = init_from.overlay(state.params, params)
            if fresh_prompt:
                params = soft_prompt.init_from_table(params, model_cfg)
            state = state.replace(params=params)
            log(f"initialized the params from {init_source.description}")
        start = 0
    else:
        _resume_data(manager, start, batches, changes, config)
        log(f"resuming from step {start} in {workdir}")
    frozen = {
        name: frozen_sources[name].load(m.config, setup.mesh, setup.frozen_shardings[name])
        for name, m in setup.objective.frozen_models.items()
    }
    for name in frozen:
        log(f"{name} model (frozen): {frozen_sources[name].description}")
    frozen_args = (frozen,) if frozen else ()
    writer = metrics_lib.MetricWriter(workdir)
    device = jax.devices()[0]
    peak = flops.peak_flops_per_device(device)
    # On CPU the figure is the whole process's; simulated devices share the same cores.
    peak_total = peak if device.platform == "cpu" else (peak or 0) * jax.device_count()
    throughput = metrics_lib.Throughput(t.batch_size * config.data.seq_len, fpt["total"], peak_total, t.steps, start)

    preempted = False
    newest_saved = start or None
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES), save_policy.catch_sigterm():
        train_step = jit_train_step(setup, config)
        eval_step = jit_eval_step(setup)
        compile_start = time.perf_counter()
        last, previous, tracing = {}, None, False
        try:
            for step in range(start, t.steps):
                batch = put_batch(next(batches), batch_sharding, t.batch_size)
                state, step_metrics = train_step(state, batch, *frozen_args)
                done = step + 1
                # The previous step's loss is checked once this one is queued, so the host never
                # waits for the device just to check.
                if previous is not None:
                    _check_finite(done - 1, previous, newest_saved)
                previous = step_metrics
                if step == start:
                    jax.block_until_ready(step_metrics)
                    log(f"first step (compilation included) took {time.perf_counter() - compile_start:.1f}s")
                    throughput.report(done)
                    if t.profile_steps and jax.process_index() == 0:
                        jax.profiler.start_trace(os.path.join(workdir, "profile"), create_perfetto_trace=True)
                        tracing = True
                if tracing and done == start + 1 + t.profile_steps:
                    jax.block_until_ready(step_metrics)
                    jax.profiler.stop_trace()
                    tracing = False
                    log(
                        f"profile: steps {start + 2}-{done} traced to {os.path.join(workdir, 'profile')} "
                        f"(open with TensorBoard's profile plugin or ui.perfetto.dev)"
                    )
                if done % t.log_every == 0 or done == t.steps:
                    _check_finite(done, step_metrics, newest_saved)
                    last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    last.update(throughput.report(done))
                    last.update({f"epochs/{name}": e for name, e in batches.epochs().items()})
                    if done % t.eval_every == 0 or done == t.steps:
                        last.update(
                            validation.evaluate(
                                lambda p, b: eval_step(p, b, *frozen_args),
                                state.params,
                                val_rows,
                                t.batch_size,
                                lambda b: put_batch(b, batch_sharding),
                                setup.objective.validation_metrics,
                            )
                        )
                    if evaluate_tasks and (done % t.eval_tasks_every == 0 or done == t.steps):
                        last.update(evaluate_tasks(setup.model, state.params))
                    writer.write(done, last)
                    log(format_step(done, t.steps, last))
                save, preempted = save_policy.decide(done)
                if save:
                    _check_finite(done, step_metrics, newest_saved)
                    ckpt.save(manager, done, state, batches)
                    newest_saved = done
                if preempted:
                    log(f"SIGTERM: saved step {done} and stopping; run the same command to resume")
                    break
        finally:
            if tracing:
                jax.profiler.stop_trace()
            manager.wait_until_finished()
            batches.close()
            writer.close()
        log(f"data: {batches.accounting.summary()}")
        if on_finish is not None and not preempted:
            on_finish(setup.model, state.params)
    if "val_loss" in last and config.finetune.objective in ("lm", "distill"):  # val_loss: the cross-entropy
        log(
            f"validation loss {last['val_loss']:.3f} nats/token against the corpus' unigram entropy "
            f"{unigram:.3f} nats/token ({last['val_loss'] / unigram:.0%} of it)"
        )
    return {**last, "unigram_entropy": unigram}


def format_step(step: int, total: int, m: dict) -> str:
    parts = [
        f"step {step}/{total}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"gnorm {m['grad_norm']:.2f}",
        f"{m['tokens_per_sec']:,.0f} tok/s",
    ]
    if "mfu" in m:
        parts.append(f"MFU {m['mfu']:.1%}")
    if "moe_aux_loss" in m:  # mixture of experts: load balance (1.0 = balanced) and dropped assignments
        parts.append(f"moe_aux {m['moe_aux_loss']:.3f} dropped {m['moe_dropped']:.1%}")
    if "kl" in m:  # distillation: KL to the teacher at finetune.temperature
        parts.append(f"kl {m['kl']:.4f}")
    if "rewards/accuracies" in m:  # preference pairs (dpo, reward): the share ranked right
        parts.append(f"pair_acc {m['rewards/accuracies']:.1%}")
    if "val_loss" in m:
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if "val_kl" in m:
        parts.append(f"val_kl {m['val_kl']:.4f}")
    if "val_pair_accuracy" in m:
        parts.append(f"val_pair_acc {m['val_pair_accuracy']:.1%}")
    parts.append(f"ETA {metrics_lib.format_eta(m['eta_sec'])}")
    return " | ".join(parts)
