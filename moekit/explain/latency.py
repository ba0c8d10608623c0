"""Latency breakdown of a forward pass, per block: attention and feed-forward (forward hooks,
wall-clock), and for MoE layers the stages router -> dispatch (plan + permute) -> experts ->
combine, read from the ``torch.profiler.record_function`` ranges that the layer's own forward
opens while a profiler runs (``moekit.dispatch.run.stage``): one forward path, timed, not a copy
of it. A fused experts path runs permute, products and combine as one op, all of it under
experts (its combine column stays empty).

Attention, ffn and total: perf_counter with a device synchronise on CUDA. Stages: the ranges'
CPU time, on CUDA the device time of the kernels they launch. The median over repeats.

Shape legend: B batch, S positions.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ..layer import MoE

STAGES = ("router", "dispatch", "experts", "combine")
_BLOCK_RANGE = "latency.block."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stage_times(model: nn.Module, ids_BS: torch.Tensor, blocks: list[nn.Module]) -> dict[tuple[int, str], float]:
    """Milliseconds per (block, stage) of one profiled forward: each MoE block's forward runs in
    a range ``latency.block.<i>``, and each ``moe.<stage>`` range is charged to the block range
    above it (a stage that runs twice in a block, as dispatch does, is summed)."""
    cuda = ids_BS.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    handles, open_ranges = [], {}

    def enter(i: int):
        def hook(module, args):
            open_ranges[i] = record_function(f"{_BLOCK_RANGE}{i}").__enter__()
        return hook

    def leave(i: int):
        def hook(module, args, output):
            open_ranges.pop(i).__exit__(None, None, None)
        return hook

    for i, block in enumerate(blocks):
        if isinstance(block.mlp, MoE):
            handles.append(block.mlp.register_forward_pre_hook(enter(i)))
            handles.append(block.mlp.register_forward_hook(leave(i)))
    try:
        with profile(activities=activities) as prof:
            model(ids_BS)
            _sync(ids_BS.device)
    finally:
        for h in handles:
            h.remove()
    times: dict[tuple[int, str], float] = {}
    for event in prof.events():
        if not event.name.startswith("moe.") or event.name[4:] not in STAGES:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(_BLOCK_RANGE):
            parent = parent.cpu_parent
        if parent is None:
            continue
        us = event.device_time_total if cuda else event.cpu_time_total
        key = (int(parent.name[len(_BLOCK_RANGE):]), event.name[4:])
        times[key] = times.get(key, 0.0) + us / 1e3
    return times


@torch.no_grad()
def latency_breakdown(model: nn.Module, ids_BS: torch.Tensor, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Median milliseconds per block of an ``LM`` forward on ``ids_BS``:
    {"total_ms", "blocks": [{block, kind, attention_ms, ffn_ms, router_ms, ... (MoE)}],
     "stage_totals_ms": {attention, ffn, router, dispatch, experts, combine}}."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    device = ids_BS.device
    blocks = list(model.layers)
    times: dict[tuple[int, str], list[float]] = {}
    starts: dict[tuple[int, str], float] = {}
    handles = []

    def pre(i: int, part: str):
        def hook(module, args):
            _sync(device)
            starts[(i, part)] = time.perf_counter()
        return hook

    def post(i: int, part: str):
        def hook(module, args, output):
            _sync(device)
            times.setdefault((i, part), []).append(1e3 * (time.perf_counter() - starts[(i, part)]))
        return hook

    for i, block in enumerate(blocks):
        for part, module in (("attention", block.self_attn), ("ffn", block.mlp)):
            handles.append(module.register_forward_pre_hook(pre(i, part)))
            handles.append(module.register_forward_hook(post(i, part)))
    was_training = model.training
    model.eval()
    totals = []
    try:
        for r in range(warmup + repeats):
            if r == warmup:
                times.clear()
            _sync(device)
            t0 = time.perf_counter()
            model(ids_BS)
            _sync(device)
            totals.append(1e3 * (time.perf_counter() - t0))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    if any(isinstance(block.mlp, MoE) for block in blocks):
        model.eval()
        try:
            for r in range(warmup + repeats):
                stage_ms = _stage_times(model, ids_BS, blocks)
                if r >= warmup:
                    for key, ms in stage_ms.items():
                        times.setdefault(key, []).append(ms)
        finally:
            model.train(was_training)

    rows = []
    stage_totals = {k: 0.0 for k in ("attention", "ffn", *STAGES)}
    for i, block in enumerate(blocks):
        row: dict[str, Any] = {"block": i, "kind": "moe" if isinstance(block.mlp, MoE) else "dense"}
        for part in ("attention", "ffn", *STAGES):
            if (i, part) in times:
                row[f"{part}_ms"] = statistics.median(times[(i, part)])
                stage_totals[part] += row[f"{part}_ms"]
        rows.append(row)
    return {"total_ms": statistics.median(totals[warmup:]), "blocks": rows, "stage_totals_ms": stage_totals,
            "repeats": repeats, "tokens": ids_BS.numel()}


def format_latency(result: dict[str, Any]) -> str:
    """A text table of ``latency_breakdown``'s result."""
    cols = ["attention", "ffn", *STAGES]
    lines = [f"forward {result['total_ms']:.2f} ms for {result['tokens']} tokens (median of {result['repeats']});"
             " ffn = the layer's forward, router..combine = its profiler ranges (fused: combine inside experts)",
             f"{'block':<7}{'kind':<7}" + "".join(f"{c + ' ms':>14}" for c in cols)]
    for row in result["blocks"]:
        lines.append(f"{row['block']:<7}{row['kind']:<7}" + "".join(
            f"{row[c + '_ms']:>14.3f}" if c + "_ms" in row else f"{'-':>14}" for c in cols))
    lines.append(f"{'all':<14}" + "".join(f"{result['stage_totals_ms'][c]:>14.3f}" for c in cols))
    return "\n".join(lines)
