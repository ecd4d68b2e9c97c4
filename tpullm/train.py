"""Train a model from a config file.

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/demo [--config.model.num_layers=4 ...]

Running the same command again resumes from the newest checkpoint in the workdir.

Several processes (hosts) train one model when each runs this command with the same
coordinator: `--coordinator_address=host0:12355 --num_processes=N --process_id=i`, or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables (`launch/local.py` sets
them); on Cloud TPU VMs nothing is needed (`launch/tpu_pod.py`).
"""

from absl import app, flags
from ml_collections import config_flags

from tpullm import cli, data
from tpullm.inference.sampling import SamplingParams
from tpullm.inference.text import complete_texts
from tpullm.interop import init_from
from tpullm.parallel import distributed
from tpullm.training.loop import log, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard events go.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs (env JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (env JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (env JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize(distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))
    config = _CONFIG.value
    init_source = init_from.resolve(config.train.init_from) if config.train.init_from else None
    train(
        config,
        _WORKDIR.value,
        on_finish=lambda model, params: print_sample(config, model, params),
        init_source=init_source,
        frozen_sources=init_from.frozen_sources(config, init_source),
    )


def print_sample(config, model, params) -> None:
    """The end-of-run sample, with the config's `train.sample_*` settings."""
    t = config.train
    if t.sample_tokens <= 0 or model.config.head == "reward":  # a reward model scores text, it does not write it
        return
    sampling = SamplingParams(t.sample_temperature, t.sample_top_k, t.sample_top_p, seed=t.seed)
    [text] = complete_texts(
        model,
        params,
        data.load_tokenizer(config.data.tokenizer),
        [t.sample_prompt],
        t.sample_tokens,
        sampling,
        train_length=config.data.seq_len,
    )
    log("sample:\n" + t.sample_prompt + text)


if __name__ == "__main__":
    cli.run(main, compilation_cache=True)
