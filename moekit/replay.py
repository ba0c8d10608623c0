"""Router replay: record which experts each token used, and force the same experts in a later forward.

RL fine-tuning samples rollouts with one forward (the server, ``moekit generate``) and trains on
them with another (a full-sequence training forward). Float differences between the two (KV-cache
decode vs full attention, batch composition, bf16 vs fp32) flip near-tied top-k choices, so the
trained policy is not the one that sampled; replaying the rollout's expert choices removes that
mismatch (the "routing replay" of Megatron-LM, vLLM and transformers). Only the choice is replayed:
the weights of the chosen experts are recomputed from the current router's scores at those
indices (normalised and scaled as the router does), so the router still gets gradients.

    with record_routing(model) as rec:               # every MoE forward inside is recorded
        out_BS = generate(model, prompt_BS, 64)
    record = rec.record(tokens=out_BS[:, :-1])        # the training input: all but the last token
    record.save("rollout.routing.safetensors")

    with replay_routing(model, RoutingRecord.load("rollout.routing.safetensors")):
        logits = model(record.tokens)                 # uses the recorded experts in every MoE layer

Calls inside ``record_routing`` are concatenated along the sequence, in order, so record a
cached generation (prefill, then one token per step) or single full forwards; a generation
without a KV cache re-runs the whole sequence each step and records it again.

File format (safetensors): one tensor ``topk_idx/<layer name>`` (B, S, K) per MoE layer in model
order, uint8 when E <= 256 (int16 up to 32768, else int32); optional ``tokens`` (B, S) int32;
metadata ``format`` = moekit.routing_record, ``version``, and JSON lists ``layers``,
``num_experts``, ``top_k``. A 1000-token rollout of a 32-layer, top-8-of-128 model takes 256 kB.

Shape legend: B sequences, S positions, K top-k, T = B * S tokens, E experts, L MoE layers.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .layer import MoE, RoutingEvent
from .model_ops import moe_layers

FORMAT = "moekit.routing_record"
VERSION = "1"


class RoutingRecordError(ValueError):
    """A routing record is malformed or does not fit the model it is replayed on."""


def index_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype that holds expert ids 0..E-1."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= 32768 else torch.int32


@dataclass
class RoutingRecord:
    """Expert ids per MoE layer: ``topk_idx[l]`` (B, S, K), in the order the router ranked them.

    ``tokens`` (B, S) long, when known, is the input those positions saw (for a generation: the
    prompt and every generated token but the last, i.e. a training forward's input).
    """

    layers: list[str]
    num_experts: list[int]
    topk_idx: list[torch.Tensor]
    tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ shape and checks
    @property
    def top_k(self) -> list[int]:
        return [int(t.shape[-1]) for t in self.topk_idx]

    @property
    def shape(self) -> tuple[int, int]:
        """(B, S) of the recorded positions."""
        return (int(self.topk_idx[0].shape[0]), int(self.topk_idx[0].shape[1]))

    def validate(self, source: str = "routing record") -> None:
        """Raise RoutingRecordError naming the layer unless every tensor is well formed."""
        L = len(self.layers)
        if L == 0:
            raise RoutingRecordError(f"{source}: holds no MoE layer")
        if len(self.num_experts) != L or len(self.topk_idx) != L:
            raise RoutingRecordError(f"{source}: {L} layer names but {len(self.num_experts)} num_experts "
                                     f"and {len(self.topk_idx)} index tensors")
        shape = None
        for name, E, idx in zip(self.layers, self.num_experts, self.topk_idx):
            if idx.dim() != 3 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
                raise RoutingRecordError(f"{source}: {name} indices must be an integer (B, S, K) tensor, "
                                         f"got {tuple(idx.shape)} {idx.dtype}")
            if shape is None:
                shape = tuple(idx.shape[:2])
            elif tuple(idx.shape[:2]) != shape:
                raise RoutingRecordError(f"{source}: {name} covers positions {tuple(idx.shape[:2])}, "
                                         f"the first layer {shape}")
            K = idx.shape[2]
            if not 1 <= K <= E:
                raise RoutingRecordError(f"{source}: {name} has top_k={K} for num_experts={E}")
            if idx.numel() == 0:
                continue
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= E:
                raise RoutingRecordError(f"{source}: {name} holds expert id {hi if hi >= E else lo}, "
                                         f"out of range [0, {E})")
            if K > 1:
                sorted_TK = idx.reshape(-1, K).long().sort(dim=-1).values
                if bool((sorted_TK[:, 1:] == sorted_TK[:, :-1]).any()):
                    raise RoutingRecordError(f"{source}: {name} picks the same expert twice for one token")
        if self.tokens is not None and tuple(self.tokens.shape) != shape:
            raise RoutingRecordError(f"{source}: tokens of shape {tuple(self.tokens.shape)} do not match the "
                                     f"recorded positions {shape}")

    # ------------------------------------------------------------------ files
    def to_bytes(self) -> bytes:
        """The record as a safetensors file's bytes (see the module docstring)."""
        from safetensors.torch import save

        tensors = {f"topk_idx/{name}": idx.to(index_dtype(E)).contiguous()
                   for name, E, idx in zip(self.layers, self.num_experts, self.topk_idx)}
        if self.tokens is not None:
            tensors["tokens"] = self.tokens.to(torch.int32).contiguous()
        metadata = {"format": FORMAT, "version": VERSION, "layers": json.dumps(self.layers),
                    "num_experts": json.dumps(self.num_experts), "top_k": json.dumps(self.top_k)}
        return save({k: v.cpu() for k, v in tensors.items()}, metadata=metadata)

    def save(self, path: str | Path) -> Path:
        """Write the record to ``path`` (written to a temporary name, then renamed)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "routing record") -> RoutingRecord:
        """Parse bytes written by ``to_bytes``; errors name ``source``."""
        from safetensors.torch import load

        metadata = _safetensors_metadata(data, source)
        if metadata.get("format") != FORMAT:
            raise RoutingRecordError(f"{source}: not a moekit routing record (metadata format="
                                     f"{metadata.get('format')!r}, expected {FORMAT!r})")
        if metadata.get("version") != VERSION:
            raise RoutingRecordError(f"{source}: routing record version {metadata.get('version')!r} is not "
                                     f"supported (this moekit reads version {VERSION})")
        try:
            layers = json.loads(metadata["layers"])
            num_experts = [int(e) for e in json.loads(metadata["num_experts"])]
            top_k = [int(k) for k in json.loads(metadata["top_k"])]
        except (KeyError, ValueError, TypeError) as err:
            raise RoutingRecordError(f"{source}: metadata layers/num_experts/top_k unreadable ({err})") from None
        tensors = load(data)
        missing = [n for n in layers if f"topk_idx/{n}" not in tensors]
        if missing:
            raise RoutingRecordError(f"{source}: no index tensor for layer(s) {missing}")
        topk_idx = [tensors[f"topk_idx/{n}"].long() for n in layers]
        for name, K, idx in zip(layers, top_k, topk_idx):
            if idx.dim() == 3 and idx.shape[-1] != K:
                raise RoutingRecordError(f"{source}: {name} holds {idx.shape[-1]} experts per token, "
                                         f"metadata top_k={K}")
        tokens = tensors["tokens"].long() if "tokens" in tensors else None
        record = cls.__new__(cls)
        record.layers, record.num_experts, record.topk_idx, record.tokens = layers, num_experts, topk_idx, tokens
        record.validate(source)
        return record

    @classmethod
    def load(cls, path: str | Path) -> RoutingRecord:
        path = Path(path)
        return cls.from_bytes(path.read_bytes(), str(path))

    # ------------------------------------------------------------------ batching
    @classmethod
    def stack(cls, records: Sequence[RoutingRecord], pad_token: int = 0) -> tuple[RoutingRecord, torch.Tensor]:
        """Right-pad records of one sequence each (B = 1, e.g. one per served request) into one batch.

        Returns the batched record and a token mask (B, S_max) bool, True at recorded positions,
        for ``LM.forward(token_mask=...)``. Padding positions replay experts 0..K-1 (their outputs are
        meaningless, as padding's are, and the token mask keeps them out of losses and statistics).
        """
        if not records:
            raise RoutingRecordError("stack needs at least one record")
        first = records[0]
        for i, r in enumerate(records):
            if r.shape[0] != 1:
                raise RoutingRecordError(f"stack: record {i} holds {r.shape[0]} sequences; stack takes one each")
            if r.layers != first.layers or r.num_experts != first.num_experts or r.top_k != first.top_k:
                raise RoutingRecordError(f"stack: record {i} comes from a different model (layers, num_experts "
                                         f"or top_k differ from record 0)")
            if (r.tokens is None) != (first.tokens is None):
                raise RoutingRecordError(f"stack: record {i} {'lacks' if r.tokens is None else 'has'} tokens, "
                                         f"record 0 does not")
        S = max(r.shape[1] for r in records)
        mask_BS = torch.zeros(len(records), S, dtype=torch.bool)
        for b, r in enumerate(records):
            mask_BS[b, :r.shape[1]] = True
        topk_idx = []
        for layer, K in enumerate(first.top_k):
            out = torch.arange(K).expand(len(records), S, K).clone()
            for b, r in enumerate(records):
                out[b, :r.shape[1]] = r.topk_idx[layer][0]
            topk_idx.append(out)
        tokens = None
        if first.tokens is not None:
            tokens = torch.full((len(records), S), pad_token, dtype=torch.long)
            for b, r in enumerate(records):
                tokens[b, :r.shape[1]] = r.tokens[0]
        return cls(list(first.layers), list(first.num_experts), topk_idx, tokens), mask_BS


def _safetensors_metadata(data: bytes, source: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (its header: 8-byte length, then JSON)."""
    if len(data) < 8:
        raise RoutingRecordError(f"{source}: {len(data)} bytes is too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise RoutingRecordError(f"{source}: safetensors header of {n} bytes runs past the end ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise RoutingRecordError(f"{source}: safetensors header is not valid JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _replayable_layers(model: nn.Module, what: str) -> list[tuple[str, MoE]]:
    """The model's MoE layers, checked to be token-choice layers whose forward takes the replay hook."""
    layers = moe_layers(model)
    if not layers:
        raise RoutingRecordError(f"{what}: the model has no moekit MoE layer")
    for name, layer in layers:
        if layer.config.router.kind == "expert_choice":
            raise RoutingRecordError(f"{what}: {name} uses expert-choice routing, which has no per-token top-k "
                                     f"to record or replay")
        if layer.sharded:
            raise RoutingRecordError(f"{what}: {name} is expert-parallel; router replay supports "
                                     f"single-device layers only")
    return layers


# ---------------------------------------------------------------------- recording
class RoutingRecorder:
    """Collects each MoE layer's top-k ids over the forwards run inside ``record_routing``."""

    def __init__(self, layers: list[tuple[str, MoE]]) -> None:
        self.layers = layers
        self.chunks: list[list[torch.Tensor]] = [[] for _ in layers]

    def _hook(self, i: int) -> Any:
        name, layer = self.layers[i]
        dtype = index_dtype(layer.num_experts)

        def hook(module: MoE, event: RoutingEvent) -> None:
            idx_TK = event.routing.topk_idx_TK
            assert idx_TK is not None
            lead = event.shape
            S = lead[-1] if lead else 1
            B = math.prod(lead[:-1]) if len(lead) > 1 else 1
            valid_T = event.valid_T
            if valid_T is not None and layer.config.router.capacity_factor is not None:
                # Padding was not routed (its row says expert 0 k times): store distinct ids 0..K-1.
                fill_TK = torch.arange(idx_TK.shape[1], device=idx_TK.device).expand_as(idx_TK)
                idx_TK = torch.where(valid_T[:, None], idx_TK, fill_TK)
            self.chunks[i].append(idx_TK.to(dtype).reshape(B, S, -1))
        return hook

    def record(self, tokens: torch.Tensor | None = None) -> RoutingRecord:
        """The calls so far, concatenated along the sequence per layer; ``tokens`` (B, S) is stored with them."""
        topk_idx = []
        for (name, layer), chunks in zip(self.layers, self.chunks):
            if not chunks:
                raise RoutingRecordError(f"record_routing: {name} ran no forward while recording")
            batches = sorted({c.shape[0] for c in chunks})
            if len(batches) > 1:
                raise RoutingRecordError(f"record_routing: {name} saw forwards of batch sizes {batches}; a record "
                                         f"joins calls along the sequence and needs one batch size")
            topk_idx.append(torch.cat(chunks, dim=1).cpu().long())
        if tokens is not None:
            tokens = tokens.detach().cpu().long()
        return RoutingRecord([n for n, _ in self.layers], [m.num_experts for _, m in self.layers], topk_idx, tokens)


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecorder]:
    """Record every MoE layer's chosen experts for the forwards run inside the block."""
    layers = _replayable_layers(model, "record_routing")
    recorder = RoutingRecorder(layers)
    handles = [layer.register_routing_hook(recorder._hook(i)) for i, (_, layer) in enumerate(layers)]
    try:
        yield recorder
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------- replay
def check_record(model: nn.Module, record: RoutingRecord, match_names: bool = True) -> list[tuple[str, MoE]]:
    """The model's MoE layers, after checking that ``record`` fits them one for one (layer count,
    names unless ``match_names`` is off, num_experts, top_k, no replayed expert masked)."""
    layers = _replayable_layers(model, "replay_routing")
    if len(layers) != len(record.layers):
        raise RoutingRecordError(f"replay_routing: the record has {len(record.layers)} MoE layers, the model "
                                 f"{len(layers)} ({[n for n, _ in layers]})")
    for (name, layer), rec_name, E, idx in zip(layers, record.layers, record.num_experts, record.topk_idx):
        if match_names and name != rec_name:
            raise RoutingRecordError(f"replay_routing: record layer {rec_name!r} meets model layer {name!r} "
                                     f"(pass match_names=False to pair layers by order)")
        if E != layer.num_experts or idx.shape[-1] != layer.top_k:
            raise RoutingRecordError(f"replay_routing: {name} has num_experts={layer.num_experts}, "
                                     f"top_k={layer.top_k}; the record has num_experts={E}, top_k={idx.shape[-1]}")
        masked_ids = layer.masked_experts
        if masked_ids:
            masked = (~layer.available_E.cpu())[idx.long()].any(dim=-1)
            if bool(masked.any()):
                hit = sorted(set(idx.long()[masked].flatten().tolist()) & set(masked_ids))
                raise RoutingRecordError(f"replay_routing: {name} replays masked expert(s) {hit}")
    return layers


@contextlib.contextmanager
def replay_routing(model: nn.Module, record: RoutingRecord, match_names: bool = True) -> Iterator[RoutingRecord]:
    """Inside the block, every MoE layer uses the record's experts instead of its router's top-k.

    Each forward must cover the recorded positions: input (B, S) as recorded (or the same T tokens
    flattened), else the layer raises a ValueError naming itself. Weights come from the current
    router scores at the replayed ids, so outputs and gradients follow the current parameters.
    """
    layers = check_record(model, record, match_names)
    busy = [name for name, layer in layers if layer.replay_topk_idx is not None]
    if busy:
        raise RoutingRecordError(f"replay_routing: {busy[0]} is already replaying a record (nested replay_routing)")
    try:
        for (_, layer), idx in zip(layers, record.topk_idx):
            layer.replay_topk_idx = idx.to(device=layer.available_E.device, dtype=torch.long)
        yield record
    finally:
        for _, layer in layers:
            layer.replay_topk_idx = None
