"""Multi-head latent attention (MLA) of DeepSeek-V2 (arXiv 2405.04434), also used by DeepSeek-V3.

Keys and values are rebuilt per head from a small shared latent c = RMSNorm(x W_dkv) (rank C),
and one extra rotary key k_r = RoPE(x W_kr) is shared by every head:
    q = [q_nope, RoPE(q_rope)] per head, from x (or from RMSNorm(x W_dq) with a query rank);
    [k_nope, v] = c W_ukv per head;  k = [k_nope, k_r];  y = softmax(q k^T * s) v.
The cache stores the latent c and k_r only (C + R numbers per position instead of 2 H Hd).
Submodules carry the names of transformers' DeepseekV2/V3Attention (q_proj or q_a_proj /
q_a_layernorm / q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj).

Rotary layout: DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...
(``rope_interleave=True``); ``False`` rotates halves as Llama does. The interleaved result is
written de-interleaved; q and k are permuted alike, so their dot products are unchanged.

Options (``LMConfig.attention_options``): kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
v_head_dim (required); q_lora_rank (None: a full q_proj), rope_interleave (True),
attention_bias (False), rope (None: plain rotary with ``rope_theta``; else a Hugging Face
``rope_parameters`` dict, e.g. DeepSeek's YaRN scaling (arXiv 2309.00071): YaRN frequencies,
cos/sin times its attention factor, and the softmax scale times mscale(factor, mscale_all_dim)^2
as DeepSeek does).

Shape legend: B batch, S new positions, P cached positions, L = P + S key positions, D model dim,
H heads, N no-position head dim, R rotary head dim, V value head dim, C kv latent rank, Q q rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .config import LMConfig
from .model import Cache, NoCache, RMSNorm, attend_visible
from .rope import rotary_inv_freq, yarn_mscale

_REQUIRED = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_OPTIONAL: dict[str, Any] = {"q_lora_rank": None, "rope_interleave": True, "attention_bias": False, "rope": None}
# transformers builds the latent norms with RMSNorm's default eps, not the config's.
_LATENT_NORM_EPS = 1e-6


def mla_options(cfg: LMConfig) -> dict[str, Any]:
    """Validated MLA options with defaults filled in; errors name the option."""
    opts = dict(cfg.attention_options)
    unknown = sorted(set(opts) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"unknown attention_options {unknown} for attention='mla'; "
                          f"known: {sorted(_REQUIRED + tuple(_OPTIONAL))}")
    for name in _REQUIRED:
        value = opts.get(name)
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"attention_options.{name}={value!r} must be an int >= 1 for attention='mla'")
    if opts["qk_rope_head_dim"] % 2:
        raise ConfigError(f"attention_options.qk_rope_head_dim={opts['qk_rope_head_dim']} must be even")
    q_rank = opts.get("q_lora_rank")
    if q_rank is not None and not (isinstance(q_rank, int) and q_rank >= 1):
        raise ConfigError(f"attention_options.q_lora_rank={q_rank!r} must be None or an int >= 1")
    rope = opts.get("rope")
    if rope is not None and not isinstance(rope, dict):
        raise ConfigError(f"attention_options.rope={rope!r} must be None or an HF rope_parameters dict")
    return {**_OPTIONAL, **opts}


class MLAttention(nn.Module):
    """forward(x_BSD, positions_BS, cache) -> y_BSD, caching (latent, rotary key) per layer."""

    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        o = mla_options(cfg)
        self.layer_idx = layer_idx
        self.n_heads = H = cfg.n_heads
        self.nope, self.rope, self.v_dim = o["qk_nope_head_dim"], o["qk_rope_head_dim"], o["v_head_dim"]
        self.rank, self.interleave = o["kv_lora_rank"], bool(o["rope_interleave"])
        qk_dim = self.nope + self.rope
        bias = bool(o["attention_bias"])
        if o["q_lora_rank"] is None:
            self.q_proj = nn.Linear(cfg.dim, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, o["q_lora_rank"], bias=bias)
            self.q_a_layernorm = RMSNorm(o["q_lora_rank"], _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(o["q_lora_rank"], H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, cfg.dim, bias=bias)
        self.scale = qk_dim ** -0.5
        rope = o["rope"] or {"rope_type": "default", "rope_theta": cfg.rope_theta}
        inv_freq, self.rope_scale = rotary_inv_freq(self.rope, rope, cfg.max_seq_len)
        if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
            self.scale *= yarn_mscale(float(rope["factor"]), rope["mscale_all_dim"]) ** 2
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _cos_sin(self, positions_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) -> cos, sin (B, S, R/2), times the rope scale."""
        angle_BSR2 = positions_BS.float()[..., None] * self.inv_freq
        return angle_BSR2.cos() * self.rope_scale, angle_BSR2.sin() * self.rope_scale

    def _rotate(self, x_XSR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x32 = x_XSR.float()
        if self.interleave:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
        else:
            x1, x2 = x32.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_XSR.dtype)

    def forward(self, x_BSD: torch.Tensor, positions_BS: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H = self.n_heads
        cache = NoCache(positions_BS) if cache is None else cache
        if hasattr(self, "q_proj"):
            q_BSX = self.q_proj(x_BSD)
        else:
            q_BSX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_BHSX = q_BSX.view(B, S, H, self.nope + self.rope).transpose(1, 2)
        q_nope_BHSN, q_rope_BHSR = q_BHSX.split([self.nope, self.rope], dim=-1)
        c_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.rank, self.rope], dim=-1)
        c_BSC = self.kv_a_layernorm(c_BSC)
        cos_BSR2, sin_BSR2 = self._cos_sin(positions_BS)
        q_rope_BHSR = self._rotate(q_rope_BHSR, cos_BSR2[:, None], sin_BSR2[:, None])
        k_rope_BSR = self._rotate(k_rope_BSR, cos_BSR2, sin_BSR2)
        c_BLC, k_rope_BLR = cache.update(self.layer_idx, c_BSC, k_rope_BSR)
        L = c_BLC.shape[1]
        kv_BHLX = self.kv_b_proj(c_BLC).view(B, L, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope_BHLN, v_BHLV = kv_BHLX.split([self.nope, self.v_dim], dim=-1)
        k_BHLX = torch.cat([k_nope_BHLN, k_rope_BLR[:, None].expand(B, H, L, self.rope)], dim=-1)
        q_BHSX = torch.cat([q_nope_BHSN, q_rope_BHSR], dim=-1)
        y_BHSV = attend_visible(self._attend, q_BHSX, k_BHLX, v_BHLV, cache.visible(positions_BS, None))
        return self.o_proj(y_BHSV.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def _attend(self, q_BHSX: torch.Tensor, k_BHLX: torch.Tensor, v_BHLV: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_BHSX, k_BHLX, v_BHLV, attn_mask=mask, is_causal=mask is None,
                                              scale=self.scale)
