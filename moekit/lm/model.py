"""A decoder-only transformer language model whose feed-forward blocks are dense or MoE.

Reads top to bottom: RMSNorm -> rotary embedding -> attention -> dense SwiGLU MLP -> block -> model.
The architecture is Llama's (Touvron et al. 2023: pre-norm RMSNorm, rotary position embedding
of Su et al. 2021 in the rotate-half layout, SwiGLU of Shazeer 2020); MoE blocks are
``moekit.MoE`` layers as in Mixtral (Jiang et al. 2024). Submodules carry Hugging Face names
(embed_tokens, layers.N.self_attn.q_proj, input_layernorm, mlp, norm, lm_head) so checkpoint
conversion is a rename.

Caches: ``LM.forward`` and every attention kind talk to a cache through one protocol (``Cache``):
the cache gives each row's positions, stores the new keys/values (or whatever the attention kind
caches), and says which keys each new query sees. ``KVCache`` is the growing cache of
``generate``; ``NoCache`` is the protocol with nothing kept (plain forward); the serving engine's
row batches and packed prompts (``moekit.serve.batched``) implement it too, so one forward serves
all. As gpt-fast's ``input_pos``, positions are per token: (B, S), or (1, S) when rows share them.

Shape legend: B batch, S new positions, P cached positions, L = P + S key positions,
D model dim, H query heads, G key/value heads, Hd head dim, V vocabulary, F hidden, X any width.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoE
from ..config import ConfigError
from .config import ATTENTION_REGISTRY, LMConfig


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019; computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for given positions; rotate-half layout (as Llama in transformers)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) -> cos, sin (B, 1, S, Hd), broadcasting over heads."""
        freqs_BSHd2 = positions_BS.float()[..., None] * self.inv_freq
        emb_B1SHd = torch.cat([freqs_BSHd2, freqs_BSHd2], dim=-1)[:, None]
        return emb_B1SHd.cos(), emb_B1SHd.sin()


def apply_rotary(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSHd.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_BHSHd.float() * cos_SHd + rotated.float() * sin_SHd).to(x_BHSHd.dtype)


ALL = slice(None)


class Visible(NamedTuple):
    """Queries ``queries`` (a slice of S) attend to keys ``keys`` (a slice of L) where ``mask``
    (bool, broadcastable to (B, 1, S', L')) is True; mask None: causal with no cached key (SDPA's
    ``is_causal``). A packed batch of sequences gives one Visible per sequence."""
    queries: slice
    keys: slice
    mask: torch.Tensor | None


class Cache(Protocol):
    """What ``LM.forward`` and the attention layers ask of a cache (``KVCache``, ``NoCache``, and
    the serving caches of ``moekit.serve.batched``). Lengths grow only in ``advance``, called once
    the whole forward succeeded."""

    def end(self, S: int) -> int:
        """Positions in use after S new tokens (the longest row); checked against max_seq_len."""
        ...

    def positions(self, S: int, device: torch.device) -> torch.Tensor:
        """Positions of the next S tokens, (B, S) long, or (1, S) when every row shares them."""
        ...

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store layer ``layer``'s new entries (B, ..., S, X) (each attention kind picks what it
        stores) and return every row's entries (B, ..., L, X), the new ones included."""
        ...

    def visible(self, positions_BS: torch.Tensor, window: int | None) -> list[Visible]:
        """Which of ``update``'s L keys each new query sees (causal, within ``window``)."""
        ...

    def advance(self, S: int) -> None:
        """The forward finished: every row holds S more positions."""
        ...


class KVCache:
    """The ``Cache`` of one batch whose rows share their length: per-layer tensors appended along
    the position axis (dim -2). ``update`` returns the full cached tensors, new positions included."""

    def __init__(self, n_layers: int) -> None:
        self.layers: list[tuple[torch.Tensor, ...] | None] = [None] * n_layers
        self.length = 0

    def end(self, S: int) -> int:
        return self.length + S

    def positions(self, S: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + S, device=device)[None]

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        old = self.layers[layer]
        full = new if old is None else tuple(torch.cat([o, n], dim=-2) for o, n in zip(old, new))
        self.layers[layer] = full
        return full

    def visible(self, positions_BS: torch.Tensor, window: int | None) -> list[Visible]:
        if self.length == 0 and window is None:
            return [Visible(ALL, ALL, None)]
        return [Visible(ALL, ALL, causal_mask(positions_BS.shape[-1], self.length, positions_BS.device, window))]

    def advance(self, S: int) -> None:
        self.length += S


class NoCache:
    """The ``Cache`` with nothing kept: a forward attends over its own tokens. With ``positions_BS``
    (explicit per-row positions) query s sees key j when pos_j <= pos_s (and pos_s - pos_j <
    window); without, positions are 0..S-1."""

    def __init__(self, positions_BS: torch.Tensor | None = None) -> None:
        self.given = positions_BS

    def end(self, S: int) -> int:
        return S if self.given is None else int(self.given.max()) + 1

    def positions(self, S: int, device: torch.device) -> torch.Tensor:
        return torch.arange(S, device=device)[None] if self.given is None else self.given

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return new

    def visible(self, positions_BS: torch.Tensor, window: int | None) -> list[Visible]:
        if self.given is None:
            return KVCache(0).visible(positions_BS, window)
        return [Visible(ALL, ALL, position_mask(positions_BS, positions_BS, window))]

    def advance(self, S: int) -> None:
        pass


def position_mask(query_pos_BS: torch.Tensor, key_pos_BL: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool (B, 1, S, L): query s sees key j when pos_j <= pos_s, and with a sliding ``window``
    when pos_s - window < pos_j as well."""
    query_BS1, key_B1L = query_pos_BS[:, :, None], key_pos_BL[:, None, :]
    seen_BSL = key_B1L <= query_BS1
    if window is not None:
        seen_BSL &= key_B1L > query_BS1 - window
    return seen_BSL[:, None]


def attend_visible(attend: Any, q_BHSX: torch.Tensor, k_BHLX: torch.Tensor, v_BHLX: torch.Tensor,
                   spans: list[Visible]) -> torch.Tensor:
    """``attend(q, k, v, mask)`` over each ``Visible`` span (the position axis is -2), outputs
    concatenated along S."""
    if len(spans) == 1 and spans[0].queries == ALL and spans[0].keys == ALL:
        return attend(q_BHSX, k_BHLX, v_BHLX, spans[0].mask)
    return torch.cat([attend(q_BHSX[..., sp.queries, :], k_BHLX[..., sp.keys, :], v_BHLX[..., sp.keys, :], sp.mask)
                      for sp in spans], dim=-2)


def causal_mask(S: int, P: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Bool (S, P+S): query s sees keys 0..P+s; with a sliding ``window``, only keys j with
    P+s - window < j (Mistral's window: the query and the window - 1 keys before it)."""
    seen_SL = torch.ones(S, P + S, dtype=torch.bool, device=device).tril(diagonal=P)
    if window is not None:
        seen_SL &= torch.ones_like(seen_SL).triu(diagonal=P - window + 1)
    return seen_SL


def mha_window(cfg: LMConfig) -> int | None:
    """The sliding window of ``attention="mha"`` (``attention_options.sliding_window``, None =
    full causal attention); errors name the option."""
    opts = cfg.attention_options
    unknown = sorted(set(opts) - {"sliding_window"})
    if unknown:
        raise ConfigError(f"unknown attention_options {unknown} for attention='mha'; known: ['sliding_window']")
    window = opts.get("sliding_window")
    if window is not None and not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
        raise ConfigError(f"attention_options.sliding_window={window!r} must be None or an int >= 1")
    return window


class Attention(nn.Module):
    """Multi-head / grouped-query attention with rotary positions, optional q/k/v bias, q/k norm
    and sliding window (Mistral / Mixtral: every layer sees the last ``window`` positions)."""

    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.window = mha_window(cfg)
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        H, G, Hd = self.n_heads, self.n_kv, self.head_dim
        self.q_proj = nn.Linear(cfg.dim, H * Hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, G * Hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, G * Hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * Hd, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Hd, cfg.norm_eps), RMSNorm(Hd, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Hd, cfg.norm_eps), RMSNorm(G * Hd, cfg.norm_eps)
        self.rotary = Rotary(Hd, cfg.rope_theta)

    def forward(self, x_BSD: torch.Tensor, positions_BS: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        cache = NoCache(positions_BS) if cache is None else cache
        q_BHSHd, k_BGSHd, v_BGSHd = self.rotated_heads(x_BSD, *self.rotary(positions_BS))
        k_BGLHd, v_BGLHd = cache.update(self.layer_idx, k_BGSHd, v_BGSHd)
        y_BHSHd = attend_visible(self.attend, q_BHSHd, k_BGLHd, v_BGLHd, cache.visible(positions_BS, self.window))
        return self.o_proj(y_BHSHd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def rotated_heads(self, x_BSD: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> q (B, H, S, Hd), k and v (B, G, S, Hd): projections, q/k norms, and rotary
        positions on q and k. cos/sin broadcast against (B, heads, S, Hd), as ``Rotary`` gives them."""
        B, S, _ = x_BSD.shape
        H, G, Hd = self.n_heads, self.n_kv, self.head_dim
        q_BSX, k_BSX, v_BSX = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":
            q_BSX, k_BSX = self.q_norm(q_BSX), self.k_norm(k_BSX)
        q_BHSHd = q_BSX.view(B, S, H, Hd).transpose(1, 2)
        k_BGSHd = k_BSX.view(B, S, G, Hd).transpose(1, 2)
        v_BGSHd = v_BSX.view(B, S, G, Hd).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHSHd, k_BGSHd = self.q_norm(q_BHSHd), self.k_norm(k_BGSHd)
        return apply_rotary(q_BHSHd, cos, sin), apply_rotary(k_BGSHd, cos, sin), v_BGSHd

    def attend(self, q_BHSHd: torch.Tensor, k_BGLHd: torch.Tensor, v_BGLHd: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of S queries over L keys where ``mask`` is True (None: causal, L = S) -> (B, H, S, Hd)."""
        return F.scaled_dot_product_attention(q_BHSHd, k_BGLHd, v_BGLHd, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=self.n_kv != self.n_heads)


def build_attention(cfg: LMConfig, layer_idx: int) -> nn.Module:
    """Attention module of kind ``cfg.attention``: forward(x_BSD, positions_BS, cache) -> y_BSD."""
    module_name, _, class_name = ATTENTION_REGISTRY[cfg.attention].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"attention={cfg.attention!r} needs {module_name}.{class_name}, which cannot be "
                          f"loaded: {err}") from err
    return cls(cfg, layer_idx)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BSD)) * self.up_proj(x_BSD))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); mlp is dense or MoE."""

    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = build_attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp: nn.Module = MoE(cfg.moe) if self.is_moe else MLP(cfg.dim, cfg.ffn_hidden)
        if self.is_moe:
            self.mlp.layer_name = f"layers.{layer_idx}.mlp"  # its path in LM, so errors name the layer

    def forward(self, x_BSD: torch.Tensor, positions_BS: torch.Tensor, cache: Cache | None = None,
                token_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), positions_BS, cache)
        h_BSD = self.post_attention_layernorm(x_BSD)
        if token_mask_BS is None or not self.is_moe:
            return x_BSD + self.mlp(h_BSD)
        return x_BSD + self.mlp(h_BSD, token_mask=token_mask_BS)

    def forward_groups(self, x_1TD: torch.Tensor, groups: list[tuple[int, int, torch.Tensor, Cache]]) -> torch.Tensor:
        """``forward`` over several groups of tokens packed along T, each with its own cache layout:
        group (B_g, S_g, positions (B_g, S_g) or (1, S_g), cache) holds the next B_g * S_g tokens.
        Attention runs once per group (each over its own cache); the norms and the MLP / MoE run
        once over all T tokens, which is where mixing groups pays. x (1, T, D) -> (1, T, D)."""
        h_1TD = self.input_layernorm(x_1TD)
        parts, start = [], 0
        for B, S, positions_BS, cache in groups:
            h_BSD = h_1TD[0, start:start + B * S].view(B, S, -1)
            parts.append(self.self_attn(h_BSD, positions_BS, cache).reshape(1, B * S, -1))
            start += B * S
        x_1TD = x_1TD + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return x_1TD + self.mlp(self.post_attention_layernorm(x_1TD))


class LM(nn.Module):
    """input_ids (B, S) long -> logits (B, S, V) float32."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation for every model (dense and MoE alike, so comparisons are fair):
        N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers), norms 1,
        biases and the noisy router's noise weights 0 (as Shazeer et al.)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif (name.endswith(".bias") and p.dim() == 1) or name.endswith("noise_weight"):
                p.zero_()
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight") or name.endswith("down_proj"):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, token_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, V), or (B, N, V) at the N positions ``logits_at``.

        ``cache``: continue it (any ``Cache``: a row at its own length continues there). Its
        lengths grow only when the whole forward succeeds.

        ``positions`` (B, S) or (S,) long, without a cache: each token's position (its rotary
        angle; query s sees key j when positions[j] <= positions[s]); default 0..S-1. A cache
        supplies its rows' positions itself (the serving engine's give each row its own).

        ``logits_at`` (N,) long: compute logits only at these positions of S (as transformers'
        ``logits_to_keep``; a packed prefill needs each prompt's last).

        ``token_mask`` (B, S), bool or 0/1 (an HF-style attention_mask of the new positions): 0
        marks padding, which the MoE layers leave out of their balancing losses, routing
        statistics, bias-update counts and capacity. Attention stays causal and does not read the
        mask: pad on the right, so real tokens never attend to padding.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a (B, S) long tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
        if token_mask is not None and tuple(token_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"token_mask of shape {tuple(token_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if positions is not None:
            if cache is not None:
                raise ValueError("pass positions or a cache, not both: a cache supplies its rows' positions")
            positions = positions[None] if positions.dim() == 1 else positions
            if (positions.dim() != 2 or positions.dtype != torch.long or positions.shape[1] != S
                    or positions.shape[0] not in (1, B) or int(positions.min()) < 0):
                raise ValueError(f"positions must be (B, S) or (S,) long >= 0 for input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(positions.shape)} {positions.dtype}")
        step: Cache = NoCache(positions) if cache is None else cache
        self._check_end(step.end(S))
        positions_BS = step.positions(S, input_ids.device)
        x_BSD = self.embed_tokens(input_ids)
        for layer in self.layers:
            x_BSD = layer(x_BSD, positions_BS, step, token_mask)
        step.advance(S)
        if logits_at is not None:
            x_BSD = x_BSD[:, logits_at]
        return self.lm_head(self.norm(x_BSD)).float()

    def forward_groups(self, groups: list[tuple[torch.Tensor, Cache]], logits_at: torch.Tensor) -> torch.Tensor:
        """One forward over several groups of sequences, each continuing its own cache of its own
        layout: ``groups`` [(input_ids (B_g, S_g) long, cache)] (a serving step: decoding rows one
        token each, and newly admitted prompts packed into one row). The groups' tokens are packed
        along one axis T in order (group by group, row-major); attention runs per group over its
        cache, every token-wise layer (embedding, norms, MLP / MoE, head) once over all T.
        Returns float32 logits (N, V) at the N packed positions ``logits_at`` (N,) long. Caches
        advance only when the whole forward succeeded."""
        if not groups:
            raise ValueError("forward_groups needs at least one (input_ids, cache) group")
        layout, ids = [], []
        for input_ids, cache in groups:
            if input_ids.dim() != 2 or input_ids.dtype != torch.long or input_ids.numel() == 0:
                raise ValueError(f"each group's input_ids must be a non-empty (B, S) long tensor, got "
                                 f"{tuple(input_ids.shape)} {input_ids.dtype}")
            B, S = input_ids.shape
            self._check_end(cache.end(S))
            layout.append((B, S, cache.positions(S, input_ids.device), cache))
            ids.append(input_ids.reshape(-1))
        x_1TD = self.embed_tokens(torch.cat(ids)[None])
        for layer in self.layers:
            x_1TD = layer.forward_groups(x_1TD, layout)
        for B, S, _, cache in layout:
            cache.advance(S)
        return self.lm_head(self.norm(x_1TD[0, logits_at])).float()

    def _check_end(self, end: int) -> None:
        """A forward's positions in use after it (a cache's ``end``) must fit the model's context."""
        if end > self.config.max_seq_len:
            raise ValueError(f"{end} positions exceed max_seq_len={self.config.max_seq_len}")

    # ------------------------------------------------------------------ sizes and cost
    def num_params(self) -> int:
        """Total parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token uses: all but the unchosen routed experts (top_k of E per MoE layer)."""
        inactive = 0
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                routed = sum(p.numel() for p in layer.mlp.experts.parameters())
                inactive += routed - routed * layer.mlp.top_k // layer.mlp.num_experts
        return self.num_params() - inactive

    def flops_per_token(self, seq_len: int | None = None) -> dict[str, float]:
        """Forward and training (3x forward) FLOPs per token at context ``seq_len``.

        2 FLOPs per multiply-add of every active weight matrix (the embedding lookup is free)
        plus attention scores and weighted sum, 2 * 2 * H * Hd per key, averaged over a causal
        context of seq_len (seq_len / 2 keys on average). Router and norms are ignored.
        """
        cfg = self.config
        S = cfg.max_seq_len if seq_len is None else seq_len
        matmul_params = self.num_active_params() - self.embed_tokens.weight.numel() - sum(
            p.numel() for n, p in self.named_parameters() if n.endswith("norm.weight"))
        if cfg.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        attention = cfg.n_layers * 4 * cfg.n_heads * cfg.head_size * (S + 1) / 2
        forward = 2 * matmul_params + attention
        return {"forward": float(forward), "train": float(3 * forward)}

    def param_summary(self) -> dict[str, Any]:
        return {"total_params": self.num_params(), "active_params": self.num_active_params(),
                "flops_per_token": self.flops_per_token(), "moe_layers": self.config.moe_layer_ids}
