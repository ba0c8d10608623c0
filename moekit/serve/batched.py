"""Forward steps over many sequences at once, each with its own KV cache and positions.

Continuous batching (Yu et al. 2022, "Orca") needs a forward pass over rows that sit at
different positions: each row's new token gets its own rotary angle and attends only to its own
cached keys. ``moekit.lm.LM.forward`` takes one position range for the whole batch, so this
module runs the same submodules (embedding, norms, q/k/v/o projections, rotary, dense or MoE
feed-forward, head) with per-row positions and a key padding mask. The MoE layers see all rows
as one token batch, which is where batching pays: one routed grouped product per expert per step
instead of one per sequence.

``prefill_step`` packs several prompts into one token sequence (as in packed training batches):
projections and MoE layers run once over all prompts' tokens, attention runs per prompt with its
own causal mask and positions, and no padding tokens reach the experts (so routing statistics
count real tokens only). Both are checked against ``LM.forward`` with one cache per row
(tests/test_serve_batched.py). Only the ``mha`` attention kind is batched here; ``can_batch``
tells the engine, which otherwise decodes rows one at a time through ``LM.forward``.

Shape legend: B rows (sequences), T packed tokens of all rows, D model dim, H query heads,
G key/value heads, Hd head dim, L longest cached length + 1, S one row's new tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lm.model import LM, Attention, KVCache


def can_batch(model: LM) -> bool:
    """True when every attention module is the plain multi-head / grouped-query kind."""
    return all(type(layer.self_attn) is Attention for layer in model.layers)


def truncate_cache(cache: KVCache) -> None:
    """Drop entries past ``cache.length`` (left by a step that raised before finishing). A
    ``SlotCache`` needs nothing: positions past its length are overwritten by the next step."""
    if isinstance(cache, SlotCache):
        return
    for i, entry in enumerate(cache.layers):
        if entry is not None and entry[0].shape[-2] != cache.length:
            cache.layers[i] = tuple(t[..., :cache.length, :] for t in entry) if cache.length else None


class KVPool:
    """Preallocated keys and values for ``slots`` sequences of up to ``capacity`` positions, per layer:
    k and v (slots, G, capacity, Hd). Static caches as in gpt-fast: appending writes in place, and a
    batched decode step reads all rows' keys with one gather instead of one copy per row."""

    def __init__(self, n_layers: int, slots: int, capacity: int) -> None:
        self.n_layers, self.slots, self.capacity = n_layers, slots, capacity
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.free = list(range(slots))[::-1]

    def ensure(self, layer: int, like_1GSHd: torch.Tensor) -> None:
        if self.k[layer] is None:
            _, G, _, Hd = like_1GSHd.shape
            shape = (self.slots, G, self.capacity, Hd)
            self.k[layer] = like_1GSHd.new_zeros(shape)
            self.v[layer] = like_1GSHd.new_zeros(shape)

    def acquire(self) -> SlotCache:
        if not self.free:
            raise RuntimeError(f"all {self.slots} KV cache slots are in use")
        return SlotCache(self, self.free.pop())

    def release(self, cache: SlotCache) -> None:
        if cache.slot not in self.free:
            self.free.append(cache.slot)


class SlotCache(KVCache):
    """One sequence's cache: slot ``slot`` of a ``KVPool``. Works wherever ``KVCache`` does
    (``LM.forward``, ``prefill_step``); ``decode_step`` batches SlotCaches of one pool without copies
    per row."""

    def __init__(self, pool: KVPool, slot: int) -> None:
        super().__init__(pool.n_layers)
        self.pool, self.slot = pool, slot

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k_1GSHd, v_1GSHd = new
        P, S = self.length, k_1GSHd.shape[-2]
        if P + S > self.pool.capacity:
            raise ValueError(f"{P + S} positions exceed the KV pool's capacity of {self.pool.capacity}")
        self.pool.ensure(layer, k_1GSHd)
        k_pool, v_pool = self.pool.k[layer], self.pool.v[layer]
        k_pool[self.slot, :, P:P + S] = k_1GSHd[0]
        v_pool[self.slot, :, P:P + S] = v_1GSHd[0]
        full = (k_pool[self.slot:self.slot + 1, :, :P + S], v_pool[self.slot:self.slot + 1, :, :P + S])
        self.layers[layer] = full
        return full


def _attention(attn: Attention, x_B1D: torch.Tensor, positions_B: torch.Tensor,
               caches: list[KVCache]) -> torch.Tensor:
    B = x_B1D.shape[0]
    H, G, Hd = attn.n_heads, attn.n_kv, attn.head_dim
    cos_BHd, sin_BHd = attn.rotary(positions_B)
    q_BH1Hd, k_BG1Hd, v_BG1Hd = attn.rotated_heads(x_B1D, cos_BHd[:, None, None, :], sin_BHd[:, None, None, :])
    lengths_B = positions_B + 1
    L = int(lengths_B.max())
    pool = caches[0].pool if isinstance(caches[0], SlotCache) else None
    if pool is not None and all(isinstance(c, SlotCache) and c.pool is pool for c in caches):
        if L > pool.capacity:
            raise ValueError(f"{L} positions exceed the KV pool's capacity of {pool.capacity}")
        pool.ensure(attn.layer_idx, k_BG1Hd)
        k_pool, v_pool = pool.k[attn.layer_idx], pool.v[attn.layer_idx]
        slots_B = torch.tensor([c.slot for c in caches], device=x_B1D.device)
        k_pool[slots_B, :, positions_B] = k_BG1Hd[:, :, 0]
        v_pool[slots_B, :, positions_B] = v_BG1Hd[:, :, 0]
        k_BGLHd = k_pool[:, :, :L].index_select(0, slots_B)
        v_BGLHd = v_pool[:, :, :L].index_select(0, slots_B)
    else:
        k_BGLHd, v_BGLHd = _gather_rows(attn.layer_idx, k_BG1Hd, v_BG1Hd, caches, L)
    keys_1L = torch.arange(L, device=x_B1D.device)[None, :]
    visible_BL = keys_1L < lengths_B[:, None]
    if attn.window is not None:  # sliding window: the query at lengths - 1 sees keys >= lengths - window
        visible_BL &= keys_1L >= (lengths_B - attn.window)[:, None]
    visible_B11L = visible_BL[:, None, None, :]
    y_BH1Hd = F.scaled_dot_product_attention(q_BH1Hd, k_BGLHd, v_BGLHd, attn_mask=visible_B11L,
                                             enable_gqa=G != H)
    return attn.o_proj(y_BH1Hd.transpose(1, 2).reshape(B, 1, H * Hd))


def _gather_rows(layer_idx: int, k_BG1Hd: torch.Tensor, v_BG1Hd: torch.Tensor, caches: list[KVCache],
                 L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each row's new key/value to its own cache; return all rows' keys/values padded to L."""
    keys, values = [], []
    for b, cache in enumerate(caches):
        k_1GLHd, v_1GLHd = cache.update(layer_idx, k_BG1Hd[b:b + 1], v_BG1Hd[b:b + 1])
        keys.append(k_1GLHd)
        values.append(v_1GLHd)
    k_BGLHd = torch.cat([F.pad(k, (0, 0, 0, L - k.shape[-2])) for k in keys])
    v_BGLHd = torch.cat([F.pad(v, (0, 0, 0, L - v.shape[-2])) for v in values])
    return k_BGLHd, v_BGLHd


@torch.no_grad()
def decode_step(model: LM, tokens_B: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Feed one token per row; row b continues ``caches[b]``. Returns next-token logits (B, V) float32.

    Cache lengths advance only when the whole step succeeds; after an exception call
    ``truncate_cache`` on each cache to undo the partial appends.
    """
    if tokens_B.dim() != 1 or tokens_B.shape[0] != len(caches):
        raise ValueError(f"tokens must be (B,) with B = {len(caches)} caches, got shape {tuple(tokens_B.shape)}")
    positions_B = torch.tensor([c.length for c in caches], dtype=torch.long, device=tokens_B.device)
    if int(positions_B.max()) + 1 > model.config.max_seq_len:
        raise ValueError(f"{int(positions_B.max()) + 1} positions exceed max_seq_len={model.config.max_seq_len}")
    x_B1D = model.embed_tokens(tokens_B[:, None])
    for layer in model.layers:
        x_B1D = x_B1D + _attention(layer.self_attn, layer.input_layernorm(x_B1D), positions_B, caches)
        x_B1D = x_B1D + layer.mlp(layer.post_attention_layernorm(x_B1D))
    logits_BV = model.lm_head(model.norm(x_B1D)).float()[:, 0]
    for cache in caches:
        cache.length += 1
    return logits_BV


def _packed_attention(attn: Attention, x_1TD: torch.Tensor, positions_T: torch.Tensor, lengths: list[int],
                      caches: list[KVCache]) -> torch.Tensor:
    T = x_1TD.shape[1]
    q_1HTHd, k_1GTHd, v_1GTHd = attn.rotated_heads(x_1TD, *attn.rotary(positions_T))
    outputs, start = [], 0
    for S, cache in zip(lengths, caches):
        P = cache.length
        k_1GLHd, v_1GLHd = cache.update(attn.layer_idx, k_1GTHd[:, :, start:start + S], v_1GTHd[:, :, start:start + S])
        outputs.append(attn.attend(q_1HTHd[:, :, start:start + S], k_1GLHd, v_1GLHd, P))
        start += S
    y_1HTHd = torch.cat(outputs, dim=2)
    return attn.o_proj(y_1HTHd.transpose(1, 2).reshape(1, T, attn.n_heads * attn.head_dim))


@torch.no_grad()
def prefill_step(model: LM, prompts: list[torch.Tensor], caches: list[KVCache]) -> tuple[torch.Tensor, list[int]]:
    """Feed each row's new tokens (``prompts[b]``, shape (S_b,) long) after its cache, all rows packed
    into one sequence. Returns (logits of each row's last new token (B, V) float32, the packed index
    of each row's last token, i.e. its row in the MoE layers' ``last_routing``).

    As with ``decode_step``, cache lengths advance only when the whole step succeeds.
    """
    if len(prompts) != len(caches) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts for {len(caches)} caches; need one per cache, at least one")
    lengths = [int(p.shape[0]) for p in prompts]
    if min(lengths) < 1:
        raise ValueError(f"every row needs at least one new token, got lengths {lengths}")
    for S, cache in zip(lengths, caches):
        if cache.length + S > model.config.max_seq_len:
            raise ValueError(f"{cache.length + S} positions exceed max_seq_len={model.config.max_seq_len}")
    device = prompts[0].device
    positions_T = torch.cat([torch.arange(c.length, c.length + S, device=device) for S, c in zip(lengths, caches)])
    x_1TD = model.embed_tokens(torch.cat(prompts)[None, :])
    for layer in model.layers:
        x_1TD = x_1TD + _packed_attention(layer.self_attn, layer.input_layernorm(x_1TD), positions_T, lengths, caches)
        x_1TD = x_1TD + layer.mlp(layer.post_attention_layernorm(x_1TD))
    last = torch.tensor(lengths, device=device).cumsum(0) - 1
    logits_BV = model.lm_head(model.norm(x_1TD[0, last])).float()
    for S, cache in zip(lengths, caches):
        cache.length += S
    return logits_BV, last.tolist()
