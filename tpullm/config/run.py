"""A run config: the defaults of every section (data, optimizer, train, mesh), the ranges of their
numbers, and `validate`, which checks a whole run before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import os

import ml_collections

from tpullm.config.bounds import (
    AT_LEAST_ONE,
    BELOW_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Bound,
    ConfigError,
    check_bound,
)
from tpullm.config.model import ModelConfig, check_sequence_split, moe_group_error

MESH_AXES = ("data", "stage", "fsdp", "sequence", "tensor", "expert")


def default_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with defaults for a small model on CPU."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))

    c.data = ml_collections.ConfigDict()
    # One source: python_stdlib | a glob of text files | *.jsonl | *.parquet | a folder written by
    # tpullm.data.prepare (ArrayRecord token shards) | hf:NAME (Hugging Face datasets).
    c.data.corpus = "python_stdlib"
    # A mixture instead of corpus: name -> {path, weight (share of tokens), and optionally field,
    # kind, hf_config, hf_split, hf_data_files, max_bytes}, e.g. in a config file
    # c.data.sources = {"web": dict(path="/data/prepared/web", weight=0.8), "code": dict(path=..., weight=0.2)}
    c.data.sources = ml_collections.ConfigDict()
    c.data.text_field = "text"  # the JSONL / Parquet / Hugging Face field holding a document's text
    c.data.tokenizer = "bytes"  # bytes (UTF-8) | the path of a sentencepiece .model
    c.data.add_bos = False  # start every document with bos (LLaMA); eos always ends one
    c.data.seq_len = 256
    c.data.val_fraction = 0.02  # share of documents held out, chosen by a hash of their name
    c.data.max_bytes = 0  # text sources: 0 reads all; else stop reading after this many bytes
    c.data.shuffle_window_tokens = 1 << 20  # packed rows are shuffled within windows of this many tokens (0: off)
    c.data.num_workers = -1  # prefetch processes per host; -1 sizes them for the machine, 0 none
    c.data.read_threads = 2  # threads reading and tokenizing documents in each pipeline process
    # Supervised fine-tuning (tpullm/data/chat.py): "text" (pre-training documents) | "chat" (JSONL
    # {"messages": [{"role", "content"}]}) | "prompt_completion" (JSONL {"prompt", "completion"}); the
    # SFT formats train only on the answers, rendered with chat_template: "chatml" | "llama2";
    # "preference" (JSONL {"prompt", "chosen", "rejected"}, tpullm/data/preference.py) for dpo and reward.
    c.data.format = "text"
    c.data.chat_template = "chatml"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 3e-4  # peak
    c.optimizer.warmup_steps = 100
    c.optimizer.min_lr_ratio = 0.1  # cosine decays to this share of the peak
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1  # never on norms and biases
    c.optimizer.grad_clip = 1.0  # global norm
    c.optimizer.z_loss = 0.0  # weight of log(Z)^2, as in PaLM (1e-4)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 16  # global, in sequences, per optimizer step
    c.train.grad_accum_steps = 1  # the batch is split into this many microbatches
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 8
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3  # the newest K checkpoints are kept...
    c.train.keep_period = 0  # ...plus every one whose step is a multiple of this (0: none)
    c.train.checkpoint_minutes = 0.0  # also save when this many minutes passed since the last save (0: off)
    # Keys whose change a resumed run accepts although it alters the model or the data stream,
    # comma-separated (e.g. "train.batch_size,model.rope_theta"); checkpoint/config_change.py.
    c.train.allow_changes = ""
    c.train.profile_steps = 0  # trace this many steps after the first (compiled) one to <workdir>/profile
    # Weights a fresh run starts from (a resumed run ignores it): "hf:/path" (a Hugging Face model
    # directory; its tokenizer.model becomes data.tokenizer) or "/path" (a tpullm workdir or export).
    # The model section must describe the same architecture (tpullm/training/init_from.py).
    c.train.init_from = ""
    # Downstream evaluation during training (tpullm/evaluation): LM Evaluation Harness tasks, comma-separated
    # (e.g. "hellaswag,arc_easy", or task YAMLs under eval_tasks_include_path), every eval_tasks_every steps
    # and at the end, into metrics.jsonl and TensorBoard as eval/<task>/<metric>. Needs lm-eval (.[eval]).
    c.train.eval_tasks = ""
    c.train.eval_tasks_every = 1000
    c.train.eval_tasks_include_path = ""
    c.train.eval_tasks_num_fewshot = -1  # -1: each task's own default
    c.train.eval_tasks_limit = 0  # documents per task (0: all)
    # The sample `python -m tpullm.train` prints at the end of a run (sample_tokens=0: none).
    c.train.sample_prompt = "def "
    c.train.sample_tokens = 200
    c.train.sample_temperature = 0.8
    c.train.sample_top_k = 40
    c.train.sample_top_p = 1.0

    # Degrees of each mesh axis inside a slice (ici) and across slices (dcn); -1 fills the rest,
    # so by default every device does data parallelism and extra slices add data replicas
    # (the slow DCN links then carry only the once-per-step gradient all-reduce).
    # Examples: FSDP on 8 chips: ici.data=1, ici.fsdp=-1. Megatron tensor parallel inside a
    # host plus data parallel: ici.tensor=4 (heads, kv_heads and mlp must divide by 4).
    # Fine-tuning on the same loop (tpullm/training/objective.py and the objectives beside it).
    c.finetune = ml_collections.ConfigDict()
    # lm (next-token cross-entropy: pre-training, SFT) | dpo (data.format=preference) | reward
    # (Bradley-Terry on preference pairs; model.head=reward) | distill (a teacher's logits)
    c.finetune.objective = "lm"
    # The regex of the parameter paths that train (tpullm/training/trainable.py); "": the adapters
    # (model.lora_rank, model.soft_prompt_length) when the model has any, else everything.
    c.finetune.trainable = ""
    # dpo: the frozen reference model, "" for the run's starting weights (train.init_from; a LoRA run that trains
    # only its adapters uses its own base weights: no second copy).
    c.finetune.reference = ""
    c.finetune.dpo_beta = 0.1
    c.finetune.dpo_label_smoothing = 0.0  # cDPO: the assumed share of flipped preference labels
    # distill: the teacher ("hf:/path" or a tpullm workdir or export, same vocabulary), the softmax
    # temperature, and the weight of the KL term: loss = w T^2 KL(teacher_T || student_T) + (1 - w) CE.
    c.finetune.teacher = ""
    c.finetune.temperature = 2.0
    c.finetune.kl_weight = 0.5

    c.mesh = ml_collections.ConfigDict()
    c.mesh.ici = ml_collections.ConfigDict({a: (-1 if a == "data" else 1) for a in MESH_AXES})
    c.mesh.dcn = ml_collections.ConfigDict({a: (-1 if a == "data" else 1) for a in MESH_AXES})
    # Start-up guard: the largest share of parameter bytes that may stay replicated on a mesh
    # axis the rules meant to split them over (a dimension the axis degree does not divide).
    c.mesh.max_replicated_share = 0.1
    return c


# data.format and data.chat_template (tpullm/data/chat.py renders them; the data layer sits above config).
DATA_FORMATS = ("text", "chat", "prompt_completion", "preference")
CHAT_TEMPLATES = ("chatml", "llama2")
# The objectives that read data.format="preference" pairs (tpullm/training/dpo.py, reward.py).
PAIR_OBJECTIVES = ("dpo", "reward")

# Every number of a run config outside `model` (validate_model checks those), with its range.
RUN_BOUNDS = {
    "data.seq_len": AT_LEAST_ONE,
    "data.val_fraction": BELOW_ONE,
    "data.max_bytes": NON_NEGATIVE,
    "data.shuffle_window_tokens": NON_NEGATIVE,
    "data.num_workers": Bound(-1),
    "data.read_threads": AT_LEAST_ONE,
    "optimizer.learning_rate": POSITIVE,
    "optimizer.warmup_steps": NON_NEGATIVE,
    "optimizer.min_lr_ratio": FRACTION,
    "optimizer.b1": BELOW_ONE,
    "optimizer.b2": BELOW_ONE,
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.grad_clip": NON_NEGATIVE,
    "optimizer.z_loss": NON_NEGATIVE,
    "train.steps": AT_LEAST_ONE,
    "train.batch_size": AT_LEAST_ONE,
    "train.grad_accum_steps": AT_LEAST_ONE,
    "train.seed": NON_NEGATIVE,
    "train.log_every": AT_LEAST_ONE,
    "train.eval_every": AT_LEAST_ONE,
    "train.eval_batches": AT_LEAST_ONE,
    "train.checkpoint_every": AT_LEAST_ONE,
    # At least two: a newest step damaged on disk after its save always leaves one to resume from.
    "train.keep_checkpoints": Bound(2),
    "train.keep_period": NON_NEGATIVE,
    "train.checkpoint_minutes": NON_NEGATIVE,
    "train.sample_tokens": NON_NEGATIVE,
    "train.sample_temperature": NON_NEGATIVE,
    "train.sample_top_k": NON_NEGATIVE,
    "train.sample_top_p": Bound(0, 1, low_open=True),
    "train.profile_steps": NON_NEGATIVE,
    "train.eval_tasks_every": AT_LEAST_ONE,
    "train.eval_tasks_limit": NON_NEGATIVE,
    "train.eval_tasks_num_fewshot": Bound(-1),  # -1: each task's own default
    "mesh.max_replicated_share": FRACTION,
    "finetune.dpo_beta": POSITIVE,
    "finetune.dpo_label_smoothing": Bound(0, 0.5, high_open=True),
    "finetune.temperature": POSITIVE,
    "finetune.kl_weight": FRACTION,
}


def _lookup(c: ml_collections.ConfigDict, key: str):
    for part in key.split("."):
        c = c[part]
    return c


def _validate_ranges(c: ml_collections.ConfigDict) -> None:
    defaults = default_config()
    for key, bound in RUN_BOUNDS.items():
        check_bound(key, _lookup(c, key), bound, _lookup(defaults, key))
    for kind in ("ici", "dcn"):
        degrees = c.mesh[kind]
        for axis, degree in degrees.items():
            if isinstance(degree, bool) or not isinstance(degree, int) or (degree < 1 and degree != -1):
                raise ConfigError(
                    f"mesh.{kind}.{axis}={degree!r} must be a positive integer or -1 (the devices left over)"
                )
        if list(degrees.values()).count(-1) > 1:
            raise ConfigError(f"mesh.{kind}: at most one axis may be -1 (the devices left over); got {dict(degrees)}")
    for name, source in (c.data.get("sources") or {}).items():
        weight = source.get("weight", 1.0)
        if not source.get("path"):
            raise ConfigError(f"data.sources.{name} has no path: give path=<a source data.corpus accepts>")
        if not POSITIVE.holds(weight):
            raise ConfigError(
                f"data.sources.{name}.weight={weight!r} must be {POSITIVE} and finite (its share of "
                f"tokens; drop the source instead of weighting it 0)"
            )
    for key, choices in (("format", DATA_FORMATS), ("chat_template", CHAT_TEMPLATES)):
        value = c.data.get(key, choices[0])
        if value not in choices:
            raise ConfigError(f"data.{key}={value!r} is not one of {choices}")
    if not c.data.get("sources") and not c.data.corpus:
        raise ConfigError(
            "data.corpus is empty: give python_stdlib, a glob, a prepared folder or hf:NAME, or set data.sources"
        )


def _is_section(node) -> bool:
    return isinstance(node, (ml_collections.ConfigDict, dict))


def _paths(node, base=""):
    """Every dotted key of a config: sections and leaves."""
    for k, v in node.items():
        yield base + k
        if _is_section(v):
            yield from _paths(v, f"{base}{k}.")


def unknown_key(config: ml_collections.ConfigDict, key: str, prefix: str = "config") -> str | None:
    """None if the dotted `key` exists in `config`; else one line naming it and the nearest valid keys."""
    parts = key.split(".")
    node, depth = config, 0
    while depth < len(parts) and _is_section(node) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    if depth == len(parts):
        return None
    found = ".".join([prefix] + parts[:depth])
    # The nearest keys inside the deepest section that exists: a misspelt leaf or subsection.
    base = "".join(p + "." for p in parts[:depth])
    nearest = (
        [base + k for k in difflib.get_close_matches(".".join(parts[depth:]), list(_paths(node)), n=3, cutoff=0.6)]
        if _is_section(node)
        else []
    )
    if nearest:
        hint = "did you mean " + " or ".join(f"{prefix}.{k}" for k in nearest) + "?"
    elif _is_section(node) and node:
        hint = f"the keys of {found} are {', '.join(sorted(node.keys()))}"
    elif _is_section(node):
        hint = f"{found} is empty here; a config file can fill it"
    else:
        hint = f"{found} is a value, not a section"
    return f"{prefix}.{key} is not a config key: {found} has no {parts[depth]!r}; {hint}"


def _validate_init_from(init_from: str) -> None:
    path = init_from[len("hf:") :] if init_from.startswith("hf:") else init_from
    if init_from and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(
            f"train.init_from={init_from!r}: {path} is not a directory; give hf:/path/to/hf_model_dir or the "
            f"path of a tpullm workdir or export"
        )


def _validate_finetune(c: ml_collections.ConfigDict, model: ModelConfig) -> None:
    objective, fmt = c.finetune.objective, c.data.get("format", "text")
    if (objective in PAIR_OBJECTIVES) != (fmt == "preference"):
        raise ConfigError(
            f"finetune.objective={objective!r} with data.format={fmt!r}: the {' and '.join(PAIR_OBJECTIVES)} "
            f"objectives train on preference pairs, and only they read them; set data.format='preference' with "
            f"finetune.objective in {PAIR_OBJECTIVES}, or neither"
        )
    if (objective == "reward") != (model.head == "reward"):
        raise ConfigError(
            f"finetune.objective={objective!r} with model.head={model.head!r}: a reward model (model.head='reward') "
            f"trains with finetune.objective='reward' and only with it; set both or neither"
        )


def validate(c: ml_collections.ConfigDict) -> ModelConfig:
    """Checks a whole run config; returns its resolved ModelConfig."""
    model = ModelConfig.from_any(c.model).resolve()
    _validate_ranges(c)
    t, d, o = c.train, c.data, c.optimizer
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}: "
            f"each microbatch must hold batch_size/grad_accum_steps whole sequences"
        )
    if (
        model.num_experts
        and model.moe_dispatch == "capacity"
        and model.moe_group_size
        and d.seq_len % model.moe_group_size
    ):
        raise ConfigError(moe_group_error(model.moe_group_size, d.seq_len, "data.seq_len ="))
    micro = t.batch_size // t.grad_accum_steps
    if model.pipeline_microbatches and micro % model.pipeline_microbatches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} / train.grad_accum_steps={t.grad_accum_steps} = {micro} sequences "
            f"per step is not divisible by model.pipeline_microbatches={model.pipeline_microbatches}; make "
            f"batch_size a multiple of grad_accum_steps x pipeline_microbatches = "
            f"{t.grad_accum_steps * model.pipeline_microbatches}"
        )
    if model.positions == "learned" and d.seq_len + model.soft_prompt_length > model.max_length:
        raise ConfigError(
            f"data.seq_len={d.seq_len} + model.soft_prompt_length={model.soft_prompt_length} exceeds "
            f"model.max_length={model.max_length}, the size of the learned position table; raise "
            f"model.max_length or shorten data.seq_len"
        )
    _validate_init_from(t.init_from)
    _validate_finetune(c, model)
    if o.warmup_steps >= t.steps:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} must be smaller than train.steps={t.steps}")
    sequence = c.mesh.ici.get("sequence", 1) * c.mesh.dcn.get("sequence", 1)
    if model.sequence_attention == "ring" and sequence > 1:  # (-1 degrees are checked when traced)
        check_sequence_split(d.seq_len, sequence, model.sequence_load_balance)
    return model
