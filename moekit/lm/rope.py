"""Rotary-embedding frequency tables of Hugging Face checkpoints: the default table of RoFormer
(Su et al. 2021) and YaRN (Peng et al. 2023, arXiv 2309.00071), with the parameter names and
defaults of transformers' ``rope_parameters``.

YaRN with scale s over a pre-training context L0 and rotary dim d: dimension pair i has
frequency theta_i = base^(-2i/d). Pairs that turn fewer than beta_slow times over L0 are
interpolated (theta_i / s), pairs that turn more than beta_fast times are kept, and a linear
ramp blends the two between; the boundary for r turns is d * ln(L0 / (2 pi r)) / (2 ln base)
(floored / ceiled when ``truncate``). cos and sin are scaled by the attention factor
0.1 ln(s) + 1 (or the ratio of DeepSeek's mscale / mscale_all_dim forms, or as given).

Shape legend: Hd2 = rotary dim / 2 frequencies.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import ConfigError

ROPE_TYPES = ("default", "yarn")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotary_inv_freq(rotary_dim: int, rope: dict[str, Any], max_position_embeddings: int | None = None
                    ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (Hd2,) float32, cos/sin scale) of an HF ``rope_parameters`` dict.

    ``rope`` holds rope_type ("default" or "yarn"), rope_theta and, for yarn, factor,
    original_max_position_embeddings and optionally beta_fast (32), beta_slow (1), truncate
    (True), attention_factor, mscale, mscale_all_dim. Errors name the missing or bad field.
    """
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_type={rope_type!r} is not one of {list(ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (needs 1.0)")
    base = rope.get("rope_theta")
    if not isinstance(base, (int, float)) or base <= 0:
        raise ConfigError(f"rope_theta={base!r} must be a number > 0")
    if rotary_dim % 2:
        raise ConfigError(f"rotary dim {rotary_dim} must be even")
    wavelength_Hd2 = float(base) ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    keep_Hd2 = 1.0 / wavelength_Hd2
    if rope_type == "default":
        return keep_Hd2, 1.0
    original = rope.get("original_max_position_embeddings")
    if not isinstance(original, int) or original < 1:
        raise ConfigError(f"yarn original_max_position_embeddings={original!r} must be an int >= 1")
    factor = rope.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise ConfigError("yarn factor is None and no max_position_embeddings to derive it from")
        factor = max_position_embeddings / original
    factor = float(factor)
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def boundary(turns: float) -> float:
        return rotary_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = boundary(beta_fast), boundary(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp_Hd2 = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq_Hd2 = 1.0 / (factor * wavelength_Hd2) * ramp_Hd2 + keep_Hd2 * (1 - ramp_Hd2)
    return inv_freq_Hd2, float(attention_factor)
