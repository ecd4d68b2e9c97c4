"""Pieces shared by the configs: the pretraining recipe of the LLaMA papers, the CPU-sized variants
(`:tiny`, `:smoke`) that keep a config's architecture switches at a size a laptop trains, and the
error for a variant a config does not have."""


def llama_recipe(c, seq_len: int = 4096, tokens_per_batch: int = 4 * 1024 * 1024, total_tokens: float = 2e12):
    """AdamW (0.9, 0.95), peak LR 3e-4, 2000 warmup steps, cosine to 10%, weight decay 0.1,
    clipping at 1.0, 4M-token batches (LLaMA-2 paper, section 2.2); bf16 compute with full remat."""
    c.data.seq_len = seq_len
    c.train.batch_size = tokens_per_batch // seq_len
    c.train.steps = int(total_tokens // tokens_per_batch)
    c.train.update(log_every=100, eval_every=1000, checkpoint_every=2000)
    c.optimizer.update(
        learning_rate=3e-4,
        warmup_steps=2000,
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-5,
        weight_decay=0.1,
        grad_clip=1.0,
    )
    c.model.update(compute_dtype="bfloat16", param_dtype="float32", remat_policy="full")
    return c


def tiny(c, **shape):
    """The CPU size of `c` (a run of minutes on a 2-core CPU, like `make demo`): bytes vocabulary,
    256-token sequences, float32 without remat, 300 steps of 16 rows at learning rate 2e-3. `shape`
    sets the model's size (embed_dim, num_layers, num_heads, mlp_dim, ...); every other model
    switch (norm, MLP, positions, experts, ...) stays as `c` has it."""
    c.model.update(vocab_size=264, max_length=256, compute_dtype="float32", remat_policy="none", **shape)
    c.data.seq_len = 256
    c.train.update(steps=300, batch_size=16, log_every=25, eval_every=100, eval_batches=8, checkpoint_every=150)
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50)
    return c


def smoke(c, **shape):
    """A run of seconds for tests: `tiny` with 64-token sequences, the first 1 MB of the corpus, 30 steps
    of 8 rows (logged every 10, evaluated at the end, saved at 15 and 30) and a 20-token sample."""
    c = tiny(c, **shape)
    c.data.update(seq_len=64, max_bytes=1_000_000)
    c.train.update(
        steps=30, batch_size=8, log_every=10, eval_every=30, eval_batches=2, checkpoint_every=15, sample_tokens=20
    )
    c.optimizer.warmup_steps = 5
    return c


def unknown_variant(config_file: str, arg, variants) -> ValueError:
    """The error for `--config=config_file:arg` when the config knows only `variants` (None: no variant)."""
    names = ", ".join("no variant" if v is None else f":{v}" for v in variants)
    return ValueError(f"configs/{config_file.rsplit('/', 1)[-1]}: unknown variant {arg!r}; use {names}")
