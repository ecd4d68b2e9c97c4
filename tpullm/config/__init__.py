"""The config schema: model shape, data, optimizer, training loop and mesh.

Experiment files in `configs/` start from `default_config()` and change what they need.
`ModelConfig` (model.py) is the single source of truth for model fields: the ConfigDict's `model`
section is generated from it, so a command-line override of a key that does not exist fails in
`ml_collections` with the key's name, and a bad value fails in `validate` (run.py) with the
field's name and the fix. bounds.py holds the ranges numbers must keep.
"""

from tpullm.config.bounds import Bound, ConfigError, check_bound
from tpullm.config.model import (
    DTYPES,
    MLPS,
    MOE_DISPATCH,
    NORMS,
    POSITIONS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
    SEQUENCE_ATTENTION,
    ModelConfig,
    check_sequence_split,
    moe_group_error,
    validate_model,
)
from tpullm.config.run import (
    CHAT_TEMPLATES,
    DATA_FORMATS,
    MESH_AXES,
    RUN_BOUNDS,
    default_config,
    unknown_key,
    validate,
)

__all__ = [
    "CHAT_TEMPLATES",
    "DATA_FORMATS",
    "DTYPES",
    "MESH_AXES",
    "MLPS",
    "MOE_DISPATCH",
    "NORMS",
    "POSITIONS",
    "REMAT_POLICIES",
    "ROPE_SCALINGS",
    "RUN_BOUNDS",
    "SEQUENCE_ATTENTION",
    "Bound",
    "ConfigError",
    "ModelConfig",
    "check_bound",
    "check_sequence_split",
    "default_config",
    "moe_group_error",
    "unknown_key",
    "validate",
    "validate_model",
]
