"""gpt-oss model parts for ``moekit.lm``: its attention (attention kind ``"gpt_oss"``) and its
clamped SwiGLU experts, following OpenAI's gpt-oss model card (arXiv 2508.10925) as implemented
by transformers' GptOssAttention and GptOssExperts.

Grouped-query attention with q/k/v/o biases and rotary positions (rotate-half layout; default
or YaRN frequencies, see ``rope.py``), plus two differences from Llama:
  attention sinks  one learned logit per head joins each query's softmax and is then dropped:
                   p_j = exp(s_j) / (exp(sink_h) + sum_j' exp(s_j')), so rows may sum to < 1.
  sliding window   layers whose ``layer_types`` entry is "sliding_attention" let query i see
                   keys j with i - window < j <= i; "full_attention" layers see every j <= i.
The MoE feed-forward is moekit's MoE with ``ClampedSwiGLUExperts`` (below) and a router bias.

Options (``LMConfig.attention_options``): layer_types (list, one entry per layer),
sliding_window (int), rope (an HF ``rope_parameters`` dict), attention_bias (True).

Shape letters (docs/architecture.md): B batch, S new positions, P cached positions, L = P + S key
positions, D model dim, H query heads, G key/value heads, Hd head dim; experts: R rows grouped by
expert, E experts, F expert hidden, U = 2F gate/up width, N one expert's rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..ops.grouped import grouped_matmul
from .config import LMConfig
from .model import Cache, NoCache, apply_rotary, attend_visible, causal_mask
from .rope import rotary_inv_freq

LAYER_TYPES = ("sliding_attention", "full_attention")


def gpt_oss_options(cfg: LMConfig) -> dict[str, Any]:
    """Validated gpt-oss attention options; errors name the option."""
    opts = {"attention_bias": True, **cfg.attention_options}
    known = {"layer_types", "sliding_window", "rope", "attention_bias"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ConfigError(f"unknown attention_options {unknown} for attention='gpt_oss'; known: {sorted(known)}")
    types = opts.get("layer_types")
    if not (isinstance(types, list) and len(types) == cfg.n_layers and all(t in LAYER_TYPES for t in types)):
        raise ConfigError(f"attention_options.layer_types={types!r} must list one of {list(LAYER_TYPES)} for each "
                          f"of the n_layers={cfg.n_layers} layers")
    window = opts.get("sliding_window")
    if "sliding_attention" in types and not (isinstance(window, int) and window >= 1):
        raise ConfigError(f"attention_options.sliding_window={window!r} must be an int >= 1 with sliding layers")
    if not isinstance(opts.get("rope"), dict):
        raise ConfigError(f"attention_options.rope={opts.get('rope')!r} must be an HF rope_parameters dict")
    return opts


class GptOssAttention(nn.Module):
    """forward(x_BSD, positions_BS, cache) -> y_BSD; caches keys and values (all positions)."""

    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        o = gpt_oss_options(cfg)
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        if self.n_heads % self.n_kv:
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv}")
        H, G, Hd = self.n_heads, self.n_kv, self.head_dim
        bias = bool(o["attention_bias"])
        self.q_proj = nn.Linear(cfg.dim, H * Hd, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, G * Hd, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, G * Hd, bias=bias)
        self.o_proj = nn.Linear(H * Hd, cfg.dim, bias=bias)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.window = o["sliding_window"] if o["layer_types"][layer_idx] == "sliding_attention" else None
        inv_freq, self.rope_scale = rotary_inv_freq(Hd, o["rope"], cfg.max_seq_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = Hd ** -0.5

    def _cos_sin(self, positions_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) -> cos, sin (B, 1, S, Hd), times the rope scale."""
        freqs_BSHd2 = positions_BS.float()[..., None] * self.inv_freq
        emb_B1SHd = torch.cat([freqs_BSHd2, freqs_BSHd2], dim=-1)[:, None]
        return emb_B1SHd.cos() * self.rope_scale, emb_B1SHd.sin() * self.rope_scale

    def forward(self, x_BSD: torch.Tensor, positions_BS: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, G, Hd = self.n_heads, self.n_kv, self.head_dim
        cache = NoCache(positions_BS) if cache is None else cache
        q_BHSHd = self.q_proj(x_BSD).view(B, S, H, Hd).transpose(1, 2)
        k_BGSHd = self.k_proj(x_BSD).view(B, S, G, Hd).transpose(1, 2)
        v_BGSHd = self.v_proj(x_BSD).view(B, S, G, Hd).transpose(1, 2)
        cos_B1SHd, sin_B1SHd = self._cos_sin(positions_BS)
        q_BHSHd = apply_rotary(q_BHSHd, cos_B1SHd, sin_B1SHd)
        k_BGSHd = apply_rotary(k_BGSHd, cos_B1SHd, sin_B1SHd)
        k_BGLHd, v_BGLHd = cache.update(self.layer_idx, k_BGSHd, v_BGSHd)
        k_BHLHd = k_BGLHd.repeat_interleave(H // G, dim=1)
        v_BHLHd = v_BGLHd.repeat_interleave(H // G, dim=1)
        y_BHSHd = attend_visible(self._attend, q_BHSHd, k_BHLHd, v_BHLHd, cache.visible(positions_BS, self.window))
        return self.o_proj(y_BHSHd.transpose(1, 2).reshape(B, S, H * Hd))

    def _attend(self, q_BHSHd: torch.Tensor, k_BHLHd: torch.Tensor, v_BHLHd: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Attention where ``mask`` is True (None: causal, L = S), softmax in float32 over the keys
        and the head's sink logit, which is then dropped."""
        B, H, S, _ = q_BHSHd.shape
        if mask is None:
            mask = causal_mask(S, 0, q_BHSHd.device)
        scores_BHSL = (q_BHSHd.float() @ k_BHLHd.float().transpose(-1, -2)) * self.scale
        scores_BHSL = scores_BHSL.masked_fill(~mask, float("-inf"))
        sinks_BHS1 = self.sinks.float().view(1, H, 1, 1).expand(B, H, S, 1)
        probs_BHSL = torch.softmax(torch.cat([scores_BHSL, sinks_BHS1], dim=-1), dim=-1)[..., :-1]
        return probs_BHSL.to(v_BHLHd.dtype) @ v_BHLHd


class ClampedSwiGLUExperts(nn.Module):
    """gpt-oss experts, computed as transformers stores them.

    gate_up = x @ gate_up_proj[e] + gate_up_proj_bias[e], with gate = gate_up[..., 0::2] and
    up = gate_up[..., 1::2] (interleaved); gate clamped above at ``limit``, up to [-limit, limit];
    h = (up + 1) * gate * sigmoid(alpha * gate); y = h @ down_proj[e] + down_proj_bias[e].
    gate_up_proj (E, D, U), gate_up_proj_bias (E, U), down_proj (E, F, D), down_proj_bias (E, D).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, alpha: float = 1.702, limit: float = 7.0,
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.alpha, self.limit, self.backend = alpha, limit, backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(hidden))

    def _glu(self, gate_up_RU: torch.Tensor) -> torch.Tensor:
        gate_RF = gate_up_RU[..., 0::2].clamp(max=self.limit)
        up_RF = gate_up_RU[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up_RF + 1) * gate_RF * torch.sigmoid(gate_RF * self.alpha)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dt = x_RD.dtype
        h_RU = grouped_matmul(x_RD, self.gate_up_proj.to(dt), counts_E, self.backend)
        h_RU = h_RU + torch.repeat_interleave(self.gate_up_proj_bias.to(dt), counts_E, dim=0,
                                              output_size=x_RD.shape[0])
        y_RD = grouped_matmul(self._glu(h_RU), self.down_proj.to(dt), counts_E, self.backend)
        return y_RD + torch.repeat_interleave(self.down_proj_bias.to(dt), counts_E, dim=0, output_size=x_RD.shape[0])

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        dt = x_ND.dtype
        h_NU = x_ND @ self.gate_up_proj[e].to(dt) + self.gate_up_proj_bias[e].to(dt)
        return self._glu(h_NU) @ self.down_proj[e].to(dt) + self.down_proj_bias[e].to(dt)
