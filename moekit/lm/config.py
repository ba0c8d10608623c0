"""Configuration of the decoder-only language model in ``moekit.lm.model``.

One flat dataclass (nanoGPT style) with the MoE layer's own ``moekit.MoEConfig`` nested in it.
The fields cover the Hugging Face families the interop code converts (Llama-style attention with
GQA, Qwen2 q/k/v bias, Qwen3 per-head q/k RMSNorm, OLMoE whole-projection q/k RMSNorm, tied
embeddings, dense layers before the first MoE layer as in DeepSeek). Validated in
``__post_init__``; round-trips through ``to_dict``/``from_dict`` and ``save``/``load`` (JSON);
unknown keys are an error that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ConfigError, MoEConfig

# Attention kinds -> "module:class" built lazily by moekit.lm.model.build_attention.
# Adding a kind is one line here plus its module.
ATTENTION_REGISTRY: dict[str, str] = {
    "mha": "moekit.lm.model:Attention",
    "mla": "moekit.lm.mla:MLAttention",
    "gpt_oss": "moekit.lm.gpt_oss:GptOssAttention",
}
QK_NORMS = ("none", "head", "full")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class LMConfig:
    """Decoder-only transformer: RMSNorm, rotary attention, SwiGLU dense or MoE feed-forward."""

    vocab_size: int = 257
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # Grouped-query attention: key/value heads (None = n_heads). n_heads % n_kv_heads == 0.
    n_kv_heads: int | None = None
    # Per-head size (None = dim // n_heads); may differ from dim / n_heads (Qwen3).
    head_dim: int | None = None
    attention: str = "mha"
    # Kind-specific options (e.g. MLA ranks), read by that attention module only.
    attention_options: dict[str, Any] = field(default_factory=dict)
    qkv_bias: bool = False
    qk_norm: str = "none"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    tie_embeddings: bool = False
    # Hidden size of the dense SwiGLU feed-forward (expert hidden lives in moe.expert_hidden).
    ffn_hidden: int = 1024
    # The MoE feed-forward; None makes every layer dense.
    moe: MoEConfig | None = None
    # MoE placement: layer i is MoE if i >= first_dense_layers and
    # (i - first_dense_layers) % moe_every == 0; an explicit list ``moe_layers`` overrides both.
    moe_every: int = 1
    first_dense_layers: int = 0
    moe_layers: list[int] | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_hidden", "moe_every"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f"{name}={value!r} must be an int >= 1")
        _check(isinstance(self.first_dense_layers, int) and self.first_dense_layers >= 0,
               f"first_dense_layers={self.first_dense_layers!r} must be an int >= 0")
        _check(self.attention in ATTENTION_REGISTRY,
               f"attention={self.attention!r} is not one of {sorted(ATTENTION_REGISTRY)}")
        _check(self.qk_norm in QK_NORMS, f"qk_norm={self.qk_norm!r} is not one of {list(QK_NORMS)}")
        if self.head_dim is None:
            _check(self.dim % self.n_heads == 0,
                   f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim explicitly")
        else:
            _check(isinstance(self.head_dim, int) and self.head_dim >= 1, f"head_dim={self.head_dim!r} must be >= 1")
        _check(self.attention != "mha" or self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0,
               f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        _check(self.attention != "mha" or self.head_size % 2 == 0,
               f"head_dim={self.head_size} must be even for rotary embeddings")
        _check(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        _check(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0")
        _check(self.init_std > 0, f"init_std={self.init_std} must be > 0")
        if self.moe is not None:
            _check(self.moe.dim == self.dim, f"moe.dim={self.moe.dim} differs from dim={self.dim}")
        if self.moe_layers is not None:
            bad = [i for i in self.moe_layers if not (isinstance(i, int) and 0 <= i < self.n_layers)]
            _check(not bad, f"moe_layers has {bad} outside [0, n_layers={self.n_layers})")
            _check(self.moe is None or len(set(self.moe_layers)) == len(self.moe_layers),
                   f"moe_layers={self.moe_layers} has repeats")
            _check(self.moe is not None or not self.moe_layers, "moe_layers is set but moe is None")

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

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "LMConfig") -> LMConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        _check(not unknown, f"unknown key(s) {unknown} in {where}; known: {sorted(names)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LMConfig:
        return cls.from_dict(read_json(path), where=str(path))


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; errors name the file (and line for syntax errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
