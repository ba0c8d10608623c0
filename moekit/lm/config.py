"""Configuration of the decoder-only language model in ``moekit.lm.model``.

One flat dataclass (nanoGPT style) with the MoE layer's own ``moekit.MoEConfig`` nested in it.
The fields cover the Hugging Face families the interop code converts (Llama-style attention with
GQA, Qwen2 q/k/v bias, Qwen3 per-head q/k RMSNorm, OLMoE whole-projection q/k RMSNorm, tied
embeddings, dense layers before the first MoE layer as in DeepSeek). A ``moekit.config_base.Config``:
fields checked from their annotations and ranges, cross-field checks in ``validate``; round-trips
through ``to_dict``/``from_dict`` and ``save``/``load`` (JSON); unknown keys are an error that names
the key, the closest known one and the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import MoEConfig
from ..config_base import Config, ConfigError, check, read_json, spec

# Attention kinds -> "module:class" built lazily by moekit.lm.model.build_attention.
# Adding a kind is one line here plus its module.
ATTENTION_REGISTRY: dict[str, str] = {
    "mha": "moekit.lm.model:Attention",
    "mla": "moekit.lm.mla:MLAttention",
    "gpt_oss": "moekit.lm.gpt_oss:GptOssAttention",
}
QK_NORMS = ("none", "head", "full")


@dataclass
class LMConfig(Config):
    """Decoder-only transformer: RMSNorm, rotary attention, SwiGLU dense or MoE feed-forward."""

    vocab_size: int = spec(257, ge=1)
    dim: int = spec(256, ge=1)
    n_layers: int = spec(4, ge=1)
    n_heads: int = spec(4, ge=1)
    # Grouped-query attention: key/value heads (None = n_heads). n_heads % n_kv_heads == 0.
    n_kv_heads: int | None = spec(None, ge=1)
    # Per-head size (None = dim // n_heads); may differ from dim / n_heads (Qwen3).
    head_dim: int | None = spec(None, ge=1)
    attention: str = "mha"
    # Kind-specific options (e.g. MLA ranks), read by that attention module only.
    attention_options: dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    qk_norm: str = spec("none", choices=QK_NORMS)
    rope_theta: float = spec(10000.0, gt=0)
    norm_eps: float = spec(1e-5, gt=0)
    max_seq_len: int = spec(256, ge=1)
    tie_embeddings: bool = False
    # Hidden size of the dense SwiGLU feed-forward (expert hidden lives in moe.expert_hidden).
    ffn_hidden: int = spec(1024, ge=1)
    # The MoE feed-forward; None makes every layer dense.
    moe: MoEConfig | None = None
    # MoE placement: layer i is MoE if i >= first_dense_layers and
    # (i - first_dense_layers) % moe_every == 0; an explicit list ``moe_layers`` overrides both.
    moe_every: int = spec(1, ge=1)
    first_dense_layers: int = spec(0, ge=0)
    moe_layers: list[int] | None = None
    init_std: float = spec(0.02, gt=0)

    def validate(self) -> None:
        check(self.attention in ATTENTION_REGISTRY,
              f"attention={self.attention!r} is not one of {sorted(ATTENTION_REGISTRY)}")
        if self.head_dim is None:
            check(self.dim % self.n_heads == 0,
                  f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
        check(self.attention != "mha" or self.n_heads % self.kv_heads == 0,
              f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        check(self.attention != "mha" or self.head_size % 2 == 0,
              f"head_dim={self.head_size} must be even for rotary embeddings")
        if self.moe is not None:
            check(self.moe.dim == self.dim, f"moe.dim={self.moe.dim} differs from dim={self.dim}")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not 0 <= i < self.n_layers]
            check(not bad, f"moe_layers has {bad} outside [0, n_layers={self.n_layers})")
            check(self.moe is None or len(set(self.moe_layers)) == len(self.moe_layers),
                  f"moe_layers={self.moe_layers} has repeats")
            check(self.moe is not None or not self.moe_layers, "moe_layers is set but moe is None")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i >= self.first_dense_layers and (i - self.first_dense_layers) % self.moe_every == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


__all__ = ["ATTENTION_REGISTRY", "ConfigError", "LMConfig", "QK_NORMS", "read_json"]
