"""Rotary position embeddings (Su et al. 2021), in the half-split layout of LLaMA/HF, with the
context-extension variants of released checkpoints.

Feature i of the first half and feature i of the second half form one rotating pair, with
frequency theta^(-2i/head_dim). The dot product of a rotated query at position m and a
rotated key at position n then depends on m - n only.

Scaling (`model.rope_scaling`) changes the frequencies so a model trained on `rope_original_length`
tokens reads longer sequences; each rule follows its paper and equals transformers' implementation:
  linear   Position interpolation (Chen et al. 2023): every frequency divided by `rope_factor`.
  dynamic  NTK-aware, dynamic (bloc97; Peng et al. 2023): once a call holds n > L tokens, theta
           becomes theta * (factor * n / L - (factor - 1)) ** (d / (d - 2)).
  yarn     YaRN (Peng et al. 2023): high frequencies kept, low ones divided by the factor, a linear
           ramp between (rotations per original context beta_fast .. beta_slow), and cos/sin scaled
           by the attention factor (0.1 ln(factor) + 1 unless given).
  llama3   Llama 3.1: wavelengths shorter than L / high_freq_factor kept, longer than
           L / low_freq_factor divided by the factor, smoothly interpolated between.
"""

import math

import jax.numpy as jnp

from tpullm.config import ModelConfig


def _base_inverse_frequencies(theta, half: int):
    """[half]: theta^(-2i/d), i < half = d/2."""
    return 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)


def _yarn(cfg: ModelConfig, half: int):
    """YaRN's blend of interpolated and original frequencies ([half])."""
    dim, base, length = 2 * half, cfg.rope_theta, cfg.rope_original_length

    def dimension_of(rotations):  # the feature whose wavelength fits `rotations` times into the context
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(cfg.rope_beta_fast), dimension_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / max(high - low, 1e-3), 0, 1)
    original = _base_inverse_frequencies(base, half)
    return original / cfg.rope_factor * ramp + original * (1 - ramp)


def _llama3(cfg: ModelConfig, half: int):
    """Llama 3.1's wavelength-dependent division by the factor ([half])."""
    original = _base_inverse_frequencies(cfg.rope_theta, half)
    length, factor = cfg.rope_original_length, cfg.rope_factor
    wavelength = 2 * math.pi / original
    scaled = jnp.where(wavelength > length / cfg.rope_low_freq_factor, original / factor, original)
    smooth = (length / wavelength - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= length / cfg.rope_high_freq_factor) & (wavelength <= length / cfg.rope_low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def attention_factor(cfg: ModelConfig) -> float:
    """The factor on cos and sin (YaRN's temperature; 1 for the other rules)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor:
        return cfg.rope_attention_factor
    return 0.1 * math.log(cfg.rope_factor) + 1.0 if cfg.rope_factor > 1 else 1.0


def inverse_frequencies(cfg: ModelConfig, head_dim: int, positions):
    """[half] the rotation frequencies for head_dim features; positions: [batch, length] (dynamic scaling
    depends on the longest sequence in the call)."""
    half = head_dim // 2
    if cfg.rope_scaling == "linear":
        return _base_inverse_frequencies(cfg.rope_theta, half) / cfg.rope_factor
    if cfg.rope_scaling == "dynamic":
        length, factor = cfg.rope_original_length, cfg.rope_factor
        tokens = jnp.maximum(jnp.max(positions) + 1, length).astype(jnp.float32)
        theta = cfg.rope_theta * (factor * tokens / length - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _base_inverse_frequencies(theta, half)
    if cfg.rope_scaling == "yarn":
        return _yarn(cfg, half)
    if cfg.rope_scaling == "llama3":
        return _llama3(cfg, half)
    return _base_inverse_frequencies(cfg.rope_theta, half)


def apply_rope(x, positions, cfg: ModelConfig):
    """x: [batch, length, heads, head_dim]; positions: [batch, length] int."""
    half = x.shape[-1] // 2
    inv_freq = inverse_frequencies(cfg, x.shape[-1], positions)  # [half]
    angle = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [batch, length, 1, half]
    scale = attention_factor(cfg)
    sin, cos = jnp.sin(angle) * scale, jnp.cos(angle) * scale
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
