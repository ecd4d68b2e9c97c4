from setuptools import find_packages, setup

setup(
    name="tpullm",
    version="0.1.0",
    description="Train large language models on TPU pods with JAX and Flax.",
    packages=find_packages(include=["tpullm", "tpullm.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "ml_collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "sentencepiece>=0.2,<0.3",
        "grain>=0.2.12,<0.3",
        "pyarrow>=15,<27",  # Parquet sources (tpullm.data.sources)
        "safetensors>=0.4.3,<0.9",  # Hugging Face model directories (tpullm.interop)
        "tensorboardX>=2.6,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
    ],
    extras_require={
        # Test-only: Hugging Face reference models built locally with random weights (and peft, trl as references).
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",  # make test: two workers, a test file per worker at a time
            "torch>=2.4,<2.15",
            "transformers>=4.50,<6",
            "ruff>=0.8,<1",
            "accelerate>=1.0,<2",
            "peft>=0.17,<0.22",
            "trl>=1.0,<2",
        ],
        # Downstream evaluation (python -m tpullm.eval, train.eval_tasks): EleutherAI's LM Evaluation Harness.
        "eval": ["lm-eval>=0.4.5,<0.5"],
        # Ahead-of-time compilation for TPU topologies on a machine without TPUs.
        "tpu": ["libtpu"],
    },
)
