"""CUDA kernel choices and host syncs of the MoE layer, checked on the device (about 30 s).

Prints and writes (JSON) what ``moekit.ops.cuda_kernels`` found on this device (grouped_mm per dtype:
``native`` one kernel, ``host_sync`` fallback, ``unsupported``; the gather decode path's byte limit),
and for a few shapes the host syncs one call makes (``torch.cuda.set_sync_debug_mode``) and its
median time, against the alternative the choice replaced, timed in the same process, interleaved:
  train_fp32   the demo LM's MoE layer (D 128, E 16, K 4, F 128, 2048 tokens, float32), forward +
               backward: schedule ``auto`` (grouped_mm where it runs) against ``loop`` (one Python op
               sequence per expert, the previous CUDA float32 choice).
  train_bf16   a fine-grained layer (D 1024, E 64, K 8, F 512, 4096 tokens, bfloat16), forward +
               backward: ``auto`` (syncs expected: 0 where grouped_mm is ``native``).
  decode_T1/8  E 128, K 8, D 2048, F 768, bfloat16, eval without finite checks: the gather path
               (now taken up to the device-memory limit) against the sorted grouped path (the path
               taken before, with the 16 MiB limit).

    python benchmarks/gpu_probe.py --out benchmarks/results/gpu/gpu_probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import moekit.dispatch.run as run
from moekit import MoE, moe_config
from moekit.ops.cuda_kernels import cuda_grouped_mm, gather_max_bytes, sync_warnings


def count_syncs(fn: Callable[[], object]) -> int:
    return len(sync_warnings(fn))


def median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each fn, the fns interleaved call by call (after two warm-up calls each)."""
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def train_case(dim: int, experts: int, top_k: int, hidden: int, tokens: int, dtype: torch.dtype,
               backends: tuple[str, ...], repeats: int) -> dict:
    torch.manual_seed(0)
    layers = {}
    for backend in backends:
        layer = MoE(moe_config(dim=dim, num_experts=experts, expert_hidden=hidden, top_k=top_k, backend=backend,
                               z_loss_coef=1e-3)).to("cuda", dtype).train()
        layers[backend] = layer
    x = torch.randn(tokens, dim, device="cuda", dtype=dtype, requires_grad=True)

    def step(layer: MoE) -> Callable[[], object]:
        def fn() -> None:
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            (layer(x).float().square().mean() + layer.aux_loss).backward()
        return fn

    fns = {b: step(layer) for b, layer in layers.items()}
    ms = median_ms(fns, repeats)
    return {"ms": ms, "syncs": {b: count_syncs(fn) for b, fn in fns.items()}}


def decode_layer() -> MoE:
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=2048, num_experts=128, expert_hidden=768, top_k=8, check_finite=False))
    return layer.to("cuda", torch.bfloat16).eval()


def decode_case(layer: MoE, tokens: int, repeats: int) -> dict:
    x = torch.randn(1, tokens, 2048, device="cuda", dtype=torch.bfloat16)
    limit = run.gather_limit_bytes

    def forward(gather: bool) -> Callable[[], object]:
        def fn() -> object:
            run.gather_limit_bytes = limit if gather else (lambda x_TD: -1)
            try:
                with torch.no_grad():
                    return layer(x)
            finally:
                run.gather_limit_bytes = limit
        return fn

    fns = {"gather": forward(True), "sorted_grouped": forward(False)}
    ms = median_ms(fns, repeats)
    with torch.no_grad():
        diff = float((fns["gather"]().float() - fns["sorted_grouped"]().float()).norm()
                     / fns["sorted_grouped"]().float().norm())
    return {"ms": ms, "syncs": {n: count_syncs(fn) for n, fn in fns.items()}, "rel_diff": round(diff, 5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe.py needs a CUDA device")
    dev = torch.device("cuda", torch.cuda.current_device())
    result: dict = {
        "device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "grouped_mm": {str(dt).replace("torch.", ""): cuda_grouped_mm(dev, dt)
                       for dt in (torch.bfloat16, torch.float16, torch.float32)},
        "gather_max_mb": round(gather_max_bytes(dev) / 2**20, 1),
    }
    print(json.dumps(result), flush=True)
    decode: dict[str, MoE] = {}

    def shared_decode_layer() -> MoE:  # built once (600M parameters), used by both decode cases
        if "layer" not in decode:
            decode["layer"] = decode_layer()
        return decode["layer"]

    cases = {
        "train_fp32": lambda: train_case(128, 16, 4, 128, 2048, torch.float32, ("auto", "loop"), args.repeats),
        "train_bf16": lambda: train_case(1024, 64, 8, 512, 4096, torch.bfloat16, ("auto",), args.repeats),
        "decode_T1": lambda: decode_case(shared_decode_layer(), 1, args.repeats),
        "decode_T8": lambda: decode_case(shared_decode_layer(), 8, args.repeats),
    }
    for name, case in cases.items():
        try:
            result[name] = case()
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            result[name] = {"failed": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        print(name, json.dumps(result[name]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
