"""Latency breakdown of a forward pass, per block: attention, feed-forward (the layer's real
path, fused or not), and for MoE layers the stages router -> dispatch (plan + permute) ->
experts -> combine, timed by rerunning the layer's own input through the plain composition
(``staged_moe_forward``, which tests check against the layer). Stages are also labelled with
``torch.profiler.record_function`` so a profiler trace shows them.

Wall-clock timers (perf_counter, with a device synchronise on CUDA); the median over repeats.

Shape legend: T tokens, D model dim, R routed rows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from ..dispatch import plan_expert_choice, plan_token_choice
from ..dispatch.combine import combine, permute
from ..layer import MoE

STAGES = ("router", "dispatch", "experts", "combine")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def staged_moe_forward(layer: MoE, x: torch.Tensor, clock: Callable[[str], None] | None = None) -> torch.Tensor:
    """The layer's forward as separate stages (no statistics, no losses); ``clock(stage)`` is
    called after each stage finishes."""
    tick = clock or (lambda stage: None)
    x_TD = x.reshape(-1, layer.dim)
    available_E = layer.available_E if layer._any_masked else None
    with record_function("moe.router"):
        routing = layer.router(x_TD, available_E)
    tick("router")
    with record_function("moe.dispatch"):
        if routing.is_token_choice:
            plan = plan_token_choice(routing, layer.num_experts, layer.config.router.capacity_factor,
                                     layer.config.router.drop_policy)
        else:
            plan = plan_expert_choice(routing, available_E)
        x_RD = permute(x_TD, plan)
    tick("dispatch")
    with record_function("moe.experts"):
        y_RD = layer.experts(x_RD, plan.counts_E)
    tick("experts")
    with record_function("moe.combine"):
        out_TD = combine(y_RD, plan, x_TD.dtype)
        if layer.shared_experts is not None:
            out_TD = out_TD + layer.shared_experts(x_TD)
    tick("combine")
    return out_TD.view(x.shape)


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
    inputs: dict[int, torch.Tensor] = {}
    starts: dict[tuple[int, str], float] = {}
    handles = []

    def pre(i: int, part: str):
        def hook(module, args):
            _sync(device)
            starts[(i, part)] = time.perf_counter()
            if part == "ffn":
                inputs[i] = args[0]
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

    for i, block in enumerate(blocks):
        if not isinstance(block.mlp, MoE):
            continue
        for r in range(warmup + repeats):
            last = [time.perf_counter()]

            def clock(stage: str, i: int = i, keep: bool = r >= warmup) -> None:
                _sync(device)
                now = time.perf_counter()
                if keep:
                    times.setdefault((i, stage), []).append(1e3 * (now - last[0]))
                last[0] = now

            _sync(device)
            last[0] = time.perf_counter()
            staged_moe_forward(block.mlp, inputs[i], clock)

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
             " ffn = the layer's real path, router..combine = the staged rerun",
             f"{'block':<7}{'kind':<7}" + "".join(f"{c + ' ms':>14}" for c in cols)]
    for row in result["blocks"]:
        lines.append(f"{row['block']:<7}{row['kind']:<7}" + "".join(
            f"{row[c + '_ms']:>14.3f}" if c + "_ms" in row else f"{'-':>14}" for c in cols))
    lines.append(f"{'all':<14}" + "".join(f"{result['stage_totals_ms'][c]:>14.3f}" for c in cols))
    return "\n".join(lines)
