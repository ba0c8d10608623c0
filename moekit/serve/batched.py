"""Forward steps over many sequences at once, each with its own KV cache and positions, through
``LM.forward`` itself: what they need is in two implementations of the cache protocol
(``moekit.lm.model.Cache``), not in a copy of the model.

Continuous batching (Yu et al. 2022, "Orca") needs a forward pass over rows that sit at
different positions: each row's new token gets its own rotary angle and attends only to its own
cached keys. ``RowCaches`` gives ``LM.forward`` exactly that (row b continues ``caches[b]`` at its
own length, keys past a row's length are masked), and ``decode_step`` feeds one token per row
through it. The MoE layers see all rows as one token batch, which is where batching pays: one
routed grouped product per expert per step instead of one per sequence.

``PackedCaches`` packs several prompts into one token sequence (as in packed training batches):
projections and MoE layers run once over all prompts' tokens, attention runs per prompt with its
own causal mask and positions (one ``Visible`` span per prompt), and no padding tokens reach the
experts (so routing statistics count real tokens only). ``prefill_step`` runs it. Both are
checked against ``LM.forward`` with one cache per row (tests/test_serve_batched.py), for every
attention kind (standard with sliding window, MLA, gpt-oss); ``can_batch`` says which kinds the
engine batches, and it decodes the others one row at a time.

``mixed_step`` runs both in one forward (``LM.forward_groups``): the running rows' next tokens
through ``RowCaches`` and newly admitted prompts through ``PackedCaches``, attention per group and
every token-wise layer (the MoE layers included) once over all of them, so a prompt that arrives
while others decode costs no forward of its own.

``KVPool`` holds static per-slot caches (as gpt-fast's): a ``RowCaches`` over slots of one pool
writes every row's new entries with one indexed store and reads them with one gather per tensor.

Shape legend: B rows (sequences), T packed tokens of all rows, L longest cached length + new
positions, S one row's new tokens, V vocabulary; cached entries are (B, ..., L, X) with any
middle dims (keys and values (B, G, L, Hd); MLA's latent (B, L, C)).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..lm.gpt_oss import GptOssAttention
from ..lm.mla import MLAttention
from ..lm.model import ALL, LM, Attention, KVCache, Visible, causal_mask, position_mask


def can_batch(model: LM) -> bool:
    """True when every attention module is of a kind the engine batches: plain multi-head /
    grouped-query, MLA (its latent cache goes through the same protocol) and gpt-oss (sinks and a
    per-layer window, through ``Cache.visible``). Another module, whose cache use is unknown, is
    served row by row."""
    return all(type(layer.self_attn) in (Attention, MLAttention, GptOssAttention) for layer in model.layers)


def truncate_cache(cache: KVCache) -> None:
    """Drop entries past ``cache.length`` (left by a step that raised before finishing). A
    ``SlotCache`` needs nothing: positions past its length are overwritten by the next step."""
    if isinstance(cache, SlotCache):
        return
    for i, entry in enumerate(cache.layers):
        if entry is not None and entry[0].shape[-2] != cache.length:
            cache.layers[i] = tuple(t[..., :cache.length, :] for t in entry) if cache.length else None


class KVPool:
    """Preallocated cache entries for ``slots`` sequences of up to ``capacity`` positions, per
    layer: one (slots, ..., capacity, X) tensor per entry the attention kind stores (keys and
    values for ``mha``). Static caches as in gpt-fast: appending writes in place."""

    def __init__(self, n_layers: int, slots: int, capacity: int) -> None:
        self.n_layers, self.slots, self.capacity = n_layers, slots, capacity
        self.entries: list[tuple[torch.Tensor, ...] | None] = [None] * n_layers
        self.free = list(range(slots))[::-1]

    def ensure(self, layer: int, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Layer ``layer``'s buffers, allocated on first use like the new entries ``like`` (1 or B, ..., S, X)."""
        if self.entries[layer] is None:
            self.entries[layer] = tuple(t.new_zeros((self.slots, *t.shape[1:-2], self.capacity, t.shape[-1]))
                                        for t in like)
        return self.entries[layer]

    def check(self, end: int) -> None:
        if end > self.capacity:
            raise ValueError(f"{end} positions exceed the KV pool's capacity of {self.capacity}")

    def acquire(self) -> SlotCache:
        """A cache in the lowest free slot (running sequences stay packed at the start of the pool)."""
        if not self.free:
            raise RuntimeError(f"all {self.slots} KV cache slots are in use")
        slot = min(self.free)
        self.free.remove(slot)
        return SlotCache(self, slot)

    def compact(self, caches: list[SlotCache]) -> None:
        """Put ``caches`` (of this pool) in slots 0..n-1: each one past them moves into a free slot
        below n (a copy of its cached positions), so a step over them reads one view of the pool
        (``RowCaches``) instead of gathering every row, step after step, once a sequence in a low
        slot has finished."""
        n = len(caches)
        holes = sorted(slot for slot in self.free if slot < n)
        movers = sorted((c for c in caches if c.slot >= n), key=lambda c: c.slot)
        for slot, cache in zip(holes, movers):
            self.move(cache, slot)

    def move(self, cache: SlotCache, slot: int) -> None:
        """Copy ``cache``'s cached positions to free slot ``slot``, which it takes; its old slot is freed."""
        if cache.pool is not self or slot not in self.free:
            raise ValueError(f"slot {slot} is not a free slot of this pool (free: {sorted(self.free)})")
        n = cache.length
        for entries in self.entries:
            for buf in entries or ():
                buf[slot, ..., :n, :] = buf[cache.slot, ..., :n, :]
        self.free.remove(slot)
        self.free.append(cache.slot)
        cache.slot = slot
        cache.layers = [None] * self.n_layers  # views of the old slot

    def release(self, cache: SlotCache) -> None:
        if cache.slot not in self.free:
            self.free.append(cache.slot)


class SlotCache(KVCache):
    """One sequence's cache: slot ``slot`` of a ``KVPool``. Works wherever ``KVCache`` does
    (``LM.forward``, ``prefill_step``); ``RowCaches`` batches SlotCaches of one pool without copies
    per row."""

    def __init__(self, pool: KVPool, slot: int) -> None:
        super().__init__(pool.n_layers)
        self.pool, self.slot = pool, slot

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        P, S = self.length, new[0].shape[-2]
        self.pool.check(P + S)
        full = []
        for buf, t in zip(self.pool.ensure(layer, new), new):
            buf[self.slot, ..., P:P + S, :] = t[0]
            full.append(buf[self.slot:self.slot + 1, ..., :P + S, :])
        self.layers[layer] = tuple(full)
        return self.layers[layer]


class RowCaches:
    """The cache protocol for B rows of S new tokens each, row b continuing ``caches[b]`` at its
    own length: positions (B, S) = length_b + 0..S-1, and row b's query at position p sees its
    keys 0..p (within a sliding window). Entries come back padded to the longest row, L =
    max length + S; padding and stale pool positions are masked."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self.lengths = [c.length for c in caches]
        pool = getattr(caches[0], "pool", None)
        one_pool = pool is not None and all(isinstance(c, SlotCache) and c.pool is pool for c in caches)
        self.pool: KVPool | None = pool if one_pool else None
        self._positions_BS: torch.Tensor | None = None
        self._slots_B: torch.Tensor | None = None
        # First slot when the rows hold consecutive slots in order (read as one view of the pool).
        slots = [c.slot for c in caches] if self.pool is not None else []
        self._first_slot = slots[0] if slots and slots == list(range(slots[0], slots[0] + len(slots))) else None
        self._visible: dict[int | None, list[Visible]] = {}

    def end(self, S: int) -> int:
        return max(self.lengths) + S

    def positions(self, S: int, device: torch.device) -> torch.Tensor:
        self._positions_BS = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(S, device=device)
        if self.pool is not None:
            self._slots_B = torch.tensor([c.slot for c in self.caches], device=device)
        return self._positions_BS

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        L = self.end(new[0].shape[-2])
        if self.pool is None:
            per_row = [c.update(layer, *(t[b:b + 1] for t in new)) for b, c in enumerate(self.caches)]
            return tuple(torch.cat([F.pad(row[i], (0, 0, 0, L - row[i].shape[-2])) for row in per_row])
                         for i in range(len(new)))
        self.pool.check(L)
        if self._positions_BS is None or self._slots_B is None:
            raise RuntimeError("RowCaches.positions must be called before update")
        full = []
        for buf, t in zip(self.pool.ensure(layer, new), new):
            middle = (slice(None),) * (t.dim() - 3)
            # Row b's entries go to slot b at positions (B, S): the indexed view is (B, S, ..., X).
            buf[(self._slots_B[:, None], *middle, self._positions_BS)] = t.movedim(-2, 1)
            upto = buf.narrow(-2, 0, L)
            full.append(upto.narrow(0, self._first_slot, len(self.caches)) if self._first_slot is not None
                        else upto.index_select(0, self._slots_B))
        return tuple(full)

    def visible(self, positions_BS: torch.Tensor, window: int | None) -> list[Visible]:
        if window not in self._visible:
            keys_1L = torch.arange(self.end(positions_BS.shape[-1]), device=positions_BS.device)[None]
            self._visible[window] = [Visible(ALL, ALL, position_mask(positions_BS, keys_1L, window))]
        return self._visible[window]

    def advance(self, S: int) -> None:
        for cache in self.caches:
            cache.advance(S)


class PackedCaches:
    """The cache protocol for several sequences packed into one row: tokens
    ``starts[b]:starts[b] + lengths[b]`` continue ``caches[b]``. Each sequence gets its own
    positions and a ``Visible`` span of its own keys, so attention never crosses sequences."""

    def __init__(self, caches: list[KVCache], lengths: list[int]) -> None:
        self.caches, self.lengths = caches, lengths
        self.cached = [c.length for c in caches]
        self._visible: dict[int | None, list[Visible]] = {}

    def end(self, T: int) -> int:
        if T != sum(self.lengths):
            raise ValueError(f"{T} packed tokens, but the sequences' lengths {self.lengths} sum to {sum(self.lengths)}")
        return max(P + S for P, S in zip(self.cached, self.lengths))

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        return torch.cat([torch.arange(P, P + S, device=device) for P, S in zip(self.cached, self.lengths)])[None]

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        per_seq, start = [], 0
        for S, cache in zip(self.lengths, self.caches):
            per_seq.append(cache.update(layer, *(t.narrow(-2, start, S) for t in new)))
            start += S
        return tuple(torch.cat([seq[i] for seq in per_seq], dim=-2) for i in range(len(new)))

    def visible(self, positions_BS: torch.Tensor, window: int | None) -> list[Visible]:
        if window not in self._visible:
            spans, q, k = [], 0, 0
            for P, S in zip(self.cached, self.lengths):
                mask = None if P == 0 and window is None else causal_mask(S, P, positions_BS.device, window)
                spans.append(Visible(slice(q, q + S), slice(k, k + P + S), mask))
                q, k = q + S, k + P + S
            self._visible[window] = spans
        return self._visible[window]

    def advance(self, T: int) -> None:
        for S, cache in zip(self.lengths, self.caches):
            cache.advance(S)


@torch.no_grad()
def decode_step(model: LM, tokens_B: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """Feed one token per row; row b continues ``caches[b]``. Returns next-token logits (B, V) float32.

    Cache lengths advance only when the whole step succeeds; after an exception call
    ``truncate_cache`` on each cache to undo the partial appends.
    """
    if tokens_B.dim() != 1 or tokens_B.shape[0] != len(caches):
        raise ValueError(f"tokens must be (B,) with B = {len(caches)} caches, got shape {tuple(tokens_B.shape)}")
    return model(tokens_B[:, None], cache=RowCaches(caches))[:, 0]


@torch.no_grad()
def prefill_step(model: LM, prompts: list[torch.Tensor], caches: list[KVCache]) -> tuple[torch.Tensor, list[int]]:
    """Feed each row's new tokens (``prompts[b]``, shape (S_b,) long) after its cache, all rows packed
    into one sequence. Returns (logits of each row's last new token (B, V) float32, the packed index
    of each row's last token, i.e. its row in the routing ``moekit.capture_routing`` records).

    As with ``decode_step``, cache lengths advance only when the whole step succeeds.
    """
    if len(prompts) != len(caches) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts for {len(caches)} caches; need one per cache, at least one")
    lengths = [int(p.shape[0]) for p in prompts]
    if min(lengths) < 1:
        raise ValueError(f"every row needs at least one new token, got lengths {lengths}")
    last_B = torch.tensor(lengths, device=prompts[0].device).cumsum(0) - 1
    logits_1BV = model(torch.cat(prompts)[None], cache=PackedCaches(caches, lengths), logits_at=last_B)
    return logits_1BV[0], last_B.tolist()


@torch.no_grad()
def mixed_step(model: LM, tokens_B: torch.Tensor, row_caches: list[KVCache], prompts: list[torch.Tensor],
               prompt_caches: list[KVCache]) -> tuple[torch.Tensor, list[int]]:
    """A decode step and a prefill in one forward (a mixed batch, as Sarathi-Serve's and vLLM's
    chunked prefill form them, with whole prompts): row b feeds ``tokens_B[b]`` after ``row_caches[b]`` (attention as in
    ``decode_step``), prompt p feeds ``prompts[p]`` after ``prompt_caches[p]`` (packed, as in
    ``prefill_step``), and the MoE layers route all of their tokens as one batch
    (``LM.forward_groups``), so admitting a prompt costs no forward of its own.

    Returns (logits (B + P, V) float32: each row's next token, then each prompt's, and the packed
    index of each of those tokens, i.e. its row in the routing ``moekit.capture_routing`` records:
    0..B-1 for the rows, then each prompt's last token). Cache lengths advance only when the whole
    step succeeds.
    """
    if tokens_B.dim() != 1 or tokens_B.shape[0] != len(row_caches) or not row_caches:
        raise ValueError(f"tokens must be (B,) with B = {len(row_caches)} >= 1 row caches, "
                         f"got shape {tuple(tokens_B.shape)}")
    if len(prompts) != len(prompt_caches) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts for {len(prompt_caches)} caches; need one per cache, "
                         f"at least one")
    lengths = [int(p.shape[0]) for p in prompts]
    if min(lengths) < 1:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
    B = len(row_caches)
    last = [B - 1 + end for end in itertools.accumulate(lengths)]
    rows = list(range(B)) + last
    logits_NV = model.forward_groups([(tokens_B[:, None], RowCaches(row_caches)),
                                      (torch.cat(prompts)[None], PackedCaches(prompt_caches, lengths))],
                                     torch.tensor(rows, device=tokens_B.device))
    return logits_NV, rows

