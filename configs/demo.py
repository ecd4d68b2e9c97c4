"""A small LLaMA-style model (RoPE, SwiGLU, RMSNorm) on the Python standard library's source,
as UTF-8 bytes. Trains on a 2-core CPU in a few minutes.

    python -m tpullm.train --config=configs/demo.py --workdir=/tmp/tpullm_demo
    python -m tpullm.train --config=configs/demo.py:smoke --workdir=/tmp/tpullm_smoke   # seconds, for tests
"""

from configs import common
from tpullm.config import default_config


def get_config(arg=None):
    c = default_config()
    c.data.val_fraction = 0.05
    if arg is None:
        return common.tiny(c, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=768)
    if arg == "smoke":
        return common.smoke(c, embed_dim=64, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=128)
    raise common.unknown_variant(__file__, arg, (None, "smoke"))
