"""IsoFLOP sweep on this repository's CPU: the demo's byte-level LLaMA-style model on the Python
standard library's source, 3 compute budgets spanning 10x (1e12, 3.16e12, 1e13 FLOPs), 7 model
sizes each (20K to 1.2M parameters), every run's cosine schedule exactly as long as the run.

    python -m tpullm.sweep --experiment=experiments/chinchilla/isoflop_cpu.py --workdir=runs/chinchilla
    python -m tpullm.sweep --experiment=experiments/chinchilla/isoflop_cpu.py --workdir=runs/chinchilla --analyze

Variants (":arg"):
    (none)     the sweep above: 21 runs, 9.9e13 FLOPs
    extended   adds a 3.16e13 budget (4 budgets spanning 31.6x; ~3x the compute)
    smoke      2 tiny runs (~20 s each, mostly start-up) on 1 MB of the corpus, for tests

Choices, and why:
  - Model: configs/demo.py (RMSNorm, SwiGLU, RoPE, untied embeddings, 264-byte vocabulary) with
    plain multi-head attention, heads of 32, and the shape rule of `tpullm.scaling.shapes` with
    width ~ 32 x depth (inside Kaplan et al.'s flat range of 20-200) in steps of 8, so that the
    sizes here are 1-5 layers deep rather than mostly single-layer models.
  - Sizes: 7 targets log-spaced over a factor 16 around N_opt = sqrt(C / 120) (20 tokens per
    parameter, C = 6ND), the Chinchilla optimum; if the valley turns out to sit at an edge,
    re-centre with `tokens_per_param` rather than widening the span.
  - Tokens: 16 sequences of 128 bytes per step (2,048 tokens); each run gets C / (exact FLOPs per
    token) tokens, rounded to whole steps. The smallest model of the largest budget reads the
    ~11.5M training bytes 1.2 times; every other run stays within one epoch.
  - Optimizer: the demo's AdamW (peak LR 2e-3, cosine to 10%, weight decay 0.1), one learning
    rate for all sizes (the paper's Approach 1 runs only went from 2e-4 for the smallest models to
    1.25e-4 for the largest), warmup 5% of each run.
  - Loss: the final validation loss over 32 batches (65K bytes of held-out files), the same
    batches for every run.
"""

from tpullm.scaling.experiment import Experiment, load_config
from tpullm.scaling.plan import isoflop_runs

BASE = "configs/demo.py"
BUDGETS = (1e12, 10**12.5, 1e13)
SHAPES = dict(aspect_ratio=32.0, head_dim=32, width_multiple=8)
TRAIN_BYTES = 11.5e6  # python_stdlib: 12.1 MB, 95% of the documents for training (demo's val_fraction)


def get_experiment(arg=None):
    base = load_config(BASE)
    if arg is None or arg == "extended":
        budgets = BUDGETS + ((10**13.5,) if arg == "extended" else ())
        common = {"data.seq_len": 128, "model.max_length": 128, "train.batch_size": 16, "train.eval_batches": 32}
        runs = isoflop_runs(
            base,
            budgets,
            sizes_per_budget=7,
            span=4.0,
            shape_kwargs=SHAPES,
            corpus_tokens=TRAIN_BYTES,
            extra_overrides=common,
        )
        return Experiment(
            name=f"chinchilla_isoflop_cpu{'_' + arg if arg else ''}",
            base_config=BASE,
            runs=tuple(runs),
            description="IsoFLOP profiles of byte-level models on the Python standard library",
        )
    if arg == "smoke":
        common = {
            "data.seq_len": 64,
            "model.max_length": 64,
            "train.batch_size": 8,
            "train.eval_batches": 2,
            "data.max_bytes": 1_000_000,
        }
        runs = isoflop_runs(
            base,
            (5e9,),
            sizes_per_budget=2,
            span=2.0,
            tokens_per_param=2.0,
            min_steps=10,
            log_points=8,
            shape_kwargs=dict(SHAPES, head_dim=16),
            extra_overrides=common,
        )
        return Experiment(
            name="chinchilla_isoflop_smoke", base_config=BASE, runs=tuple(runs), description="two tiny runs, for tests"
        )
    raise ValueError(f"experiments/chinchilla/isoflop_cpu.py: unknown variant {arg!r}; use none, extended or smoke")
