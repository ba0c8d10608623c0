"""Benchmark of the MoE layer against Hugging Face transformers' MoE block and the dense limit.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden, R = T*K routed rows.

For each shape x dtype x mode it times, in one process and on the same weights:
  moekit            moekit's MoE layer (backend "auto": the fused experts path).
  moekit_unfused    the same layer with backend "reference" (permute -> experts -> combine).
  hf_<impl>         transformers' Qwen3MoeSparseMoeBlock with experts implementation <impl>
                    (eager, grouped_mm, batched_mm); a failure (an error, or batched_mm's per-row
                    weight gathers exceeding --max-gather-gb) is recorded as failed, a call
                    estimated (from calls at 16/32 tokens) to exceed --max-call-s as skipped.
  dense             the dense limit: the same active FLOPs as plain dense products, R rows
                    through one expert's weights (gate_up, activation, down), in the dtype.
  dense_fp32        (half precision on CPU only) the same dense products computed in float32
                    from half-precision tensors; the dense limit used for ratios is the faster
                    of ``dense`` and ``dense_fp32``.
Modes: ``forward`` (inference, no grad) and ``forward_backward`` (training step, input and all
weight gradients). Each time is the median of repeated calls after one warm-up call.

Peak memory of forward+backward (CPU): for the warm-up call only, glibc is made to return every
block over 64 KiB to the kernel (``mallopt`` M_MMAP_THRESHOLD, after ``malloc_trim``), the
kernel's resident-set high-water mark is reset (/proc/self/clear_refs) before that call and read
after it; the peak is that mark minus the resident set before the call. Timed calls run with
glibc's own steady state (blocks under 32 MiB reused from the heap), so page faults on fresh
small blocks do not penalise implementations with many temporaries. On CUDA: torch.cuda.max_memory_allocated.
``act_peak_mb`` subtracts the parameter gradients the step creates (E times one expert's for
MoE, one expert's for the dense limit), which every MoE training step needs whatever its kernels.

Decode shapes (1 and 8 tokens) also report the bytes of the distinct experts' weights the step
must read, their effective GB/s, and the floor bytes / measured read bandwidth.

Run ``python benchmarks/moe_layer.py`` (full) or ``--quick`` (256 tokens, short budgets, without
moekit_unfused, hf_batched_mm, and hf_eager in forward+backward; every shape x dtype x mode stays);
``--device cuda`` runs bf16 at GPU sizes. ``--threads 1`` is the fair setting on a loaded machine
(2-thread OpenMP regions stall on descheduled threads, which hurts many small products most).
The JSON records the CPU flags, torch's CPU capability, threads, the OpenMP environment and
moekit's run-time kernel probe (``moekit.ops.kernels``).
Prints a table, writes JSON (rewritten after every shape, ``complete`` false until the end).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit import MoE

HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
# glibc mallopt parameters (malloc.h) and the values its dynamic threshold settles at on 64-bit.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20


@dataclass
class Shape:
    name: str
    num_experts: int
    top_k: int
    dim: int
    hidden: int
    tokens: int
    decode: bool = False

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    def flops(self, mode: str) -> float:
        fwd = 2.0 * self.rows * self.dim * 3 * self.hidden
        return fwd * (3 if mode == "forward_backward" else 1)

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return 3 * self.dim * self.hidden * torch.tensor([], dtype=dtype).element_size()


def shapes_for(device: str, quick: bool) -> list[Shape]:
    if device == "cuda":
        big = 16384
    else:
        big = 256 if quick else 4096
    return [
        Shape("fine_E64_k8", 64, 8, 1024, 512, big),
        Shape("coarse_E8_k2", 8, 2, 1024, 2048, big),
        Shape("decode_E128_k8_T1", 128, 8, 2048, 768, 1, decode=True),
        Shape("decode_E128_k8_T8", 128, 8, 2048, 768, 8, decode=True),
    ]


# ---------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    info: dict = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "openmp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "GOMP_", "MKL_"))},
        "torch_config": [line.strip(" -") for line in torch.__config__.show().splitlines()
                         if re.search(r"Math Kernel|MKL-DNN|OpenMP|CPU capability", line)],
    }
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu)
        flags = re.search(r"Flags:\s*(.+)", lscpu)
        info["cpu_model"] = model.group(1).strip() if model else None
        have = set(flags.group(1).split()) if flags else set()
        info["cpu_flags_of_interest"] = {f: f in have for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")}
    except (OSError, subprocess.CalledProcessError) as err:
        info["cpu_model"] = f"lscpu failed: {err}"
    mem = Path("/proc/meminfo")
    if mem.exists():
        total = re.search(r"MemTotal:\s+(\d+)", mem.read_text())
        info["mem_total_gb"] = round(int(total.group(1)) / 2**20, 1) if total else None
    if device == "cpu":
        from moekit.ops.kernels import cpu_kernels
        info["moekit_cpu_kernels"] = vars(cpu_kernels())  # native bf16, op latency, matmul rate
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def measure_read_bandwidth(device: str) -> float:
    """GB/s of a reduction over a buffer far larger than the last-level cache (bytes read once)."""
    n = (1 << 28) if device == "cuda" else (1 << 27)
    buf = torch.rand(n, device=device)
    ms = time_calls(lambda: buf.sum(), device, repeats=7)
    del buf
    return n * 4 / (ms * 1e-3) / 1e9


def measure_dense_peak(device: str, dtype: torch.dtype) -> float:
    """TFLOP/s of one large square dense product (the machine's practical matmul peak). The size
    doubles from 256 while one product takes under a quarter second, up to 8192 (CUDA) or 2048
    (CPU), so a slow dtype (bf16 on a CPU without bf16 units) does not stall the run."""
    n, top = 256, (8192 if device == "cuda" else 2048)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_calls(lambda: a @ b, device, repeats=10 if device == "cuda" else 3)
        if n >= top or ms > 250:
            return 2 * n**3 / (ms * 1e-3) / 1e12
        n *= 2


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory above the level before one call of fn (see the module docstring)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    clear = Path("/proc/self/clear_refs")
    libc = _glibc()
    if not clear.exists() or libc is None:
        fn()
        return None
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)
    try:
        before = _status_kb("VmRSS")
        clear.write_text("5")
        fn()
        return (_status_kb("VmHWM") - before) / 1024
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (attribute lookups raise if absent)
    except (OSError, AttributeError):
        return None
    return libc


# ---------------------------------------------------------------------------------------------- models
def build_pair(shape: Shape, dtype: torch.dtype, device: str):
    """A moekit MoE and a transformers Qwen3MoeSparseMoeBlock holding the same weights."""
    layer = MoE(dim=shape.dim, num_experts=shape.num_experts, expert_hidden=shape.hidden, top_k=shape.top_k,
                norm_topk_prob=True)
    hf = None
    try:
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        Qwen3MoeSparseMoeBlock = None
    if Qwen3MoeSparseMoeBlock is not None:
        cfg = Qwen3MoeConfig(hidden_size=shape.dim, moe_intermediate_size=shape.hidden,
                             num_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                             norm_topk_prob=True, hidden_act="silu", experts_implementation="eager")
        hf = Qwen3MoeSparseMoeBlock(cfg)
        with torch.no_grad():
            hf.gate.weight.copy_(layer.router.weight)
            hf.experts.gate_up_proj.copy_(layer.experts.gate_up_proj)
            hf.experts.down_proj.copy_(layer.experts.down_proj)
        hf = hf.to(device=device, dtype=dtype)
    layer = layer.to(device=device, dtype=dtype)
    return layer, hf


def set_hf_impl(hf, impl: str) -> None:
    hf.experts.config._experts_implementation = impl


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def step_fn(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> Callable[[], object]:
    params = [p for p in module.parameters() if p.requires_grad]
    if mode == "forward":
        def fwd() -> object:
            with torch.no_grad():
                return module(x)
        return fwd

    def fwd_bwd() -> object:
        for p in params:
            p.grad = None
        xg = x.detach().requires_grad_(True)
        module(xg).backward(dy)
        return xg.grad
    return fwd_bwd


def dense_fn(shape: Shape, dtype: torch.dtype, device: str, mode: str, fp32_compute: bool):
    """R rows through one expert's SwiGLU weights, as plain dense products."""
    D, Fh, R = shape.dim, shape.hidden, shape.rows
    x_RD = torch.randn(R, D, device=device, dtype=dtype)
    w1 = (torch.randn(2 * Fh, D, device=device) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(D, Fh, device=device) / math.sqrt(Fh)).to(dtype)
    dy = torch.randn(R, D, device=device, dtype=dtype)

    def block(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if fp32_compute:
            x, a, b = x.float(), a.float(), b.float()
        gate, up = F.linear(x, a).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, b).to(dtype)

    if mode == "forward":
        def fwd() -> object:
            with torch.no_grad():
                return block(x_RD, w1, w2)
        return fwd, 0

    w1.requires_grad_(True)
    w2.requires_grad_(True)

    def fwd_bwd() -> object:
        w1.grad = w2.grad = None
        xg = x_RD.detach().requires_grad_(True)
        block(xg, w1, w2).backward(dy)
        return xg.grad
    return fwd_bwd, (w1.numel() + w2.numel()) * w1.element_size()


# ---------------------------------------------------------------------------------------------- one case
def _estimate_call_s(make: Callable[[int], tuple[Callable[[], object], int]], tokens: int, device: str,
                    budget_s: float) -> tuple[float, str]:
    """Seconds one call at ``tokens`` would take: from one call at 16 tokens scaled linearly, or,
    when that exceeds the budget, from calls at 16 and 32 tokens (fixed cost + per-token slope),
    but never below a quarter of the 32-token call scaled linearly."""
    def once(n: int) -> float:
        fn, _ = make(n)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    t16 = once(16)
    if t16 * tokens / 16 <= budget_s or t16 > budget_s:
        return t16 * tokens / 16, "one call at 16 tokens, scaled linearly"
    t32 = once(32)
    est = max(t32 + (tokens - 32) * max(t32 - t16, 0.0) / 16, 0.25 * t32 * tokens / 32)
    return est, f"calls at 16 and 32 tokens took {t16:.2f} s and {t32:.2f} s"


def run_case(name: str, make: Callable[[int], tuple[Callable[[], object], int]], shape: Shape, dtype: torch.dtype,
             mode: str, device: str, args, probe: bool) -> dict:
    """Time one implementation. make(tokens) returns (step, parameter-gradient bytes)."""
    row = {"shape": shape.name, "dtype": str(dtype).replace("torch.", ""), "mode": mode, "impl": name,
           "tokens": shape.tokens}
    try:
        if probe and shape.tokens >= 64:
            est, how = _estimate_call_s(make, shape.tokens, device, args.max_call_s)
            if est > args.max_call_s:
                row.update(status="skipped", reason=f"estimated {est:.0f} s per call at {shape.tokens} tokens "
                           f"({how}), over the {args.max_call_s:.0f} s budget")
                return row
        fn, grad_bytes = make(shape.tokens)
        if mode == "forward_backward":
            peak = peak_mb(fn, device)
            row["peak_mb"] = None if peak is None else round(peak, 1)
            row["param_grad_mb"] = round(grad_bytes / 2**20, 1)
            if peak is not None:
                row["act_peak_mb"] = round(peak - grad_bytes / 2**20, 1)
        else:
            fn()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        first_ms = (time.perf_counter() - start) * 1e3
        more = max(0, min(args.repeats, int(args.case_budget_s * 1e3 / max(first_ms, 1e-3))) - 1)
        times = [first_ms] + ([time_calls(fn, device, repeats=1, warmup=0) for _ in range(more)])
        ms = statistics.median(times)
        row.update(status="ok", ms=round(ms, 3), repeats=len(times),
                   gflops=round(shape.flops(mode) / (ms * 1e-3) / 1e9, 2))
    except (RuntimeError, MemoryError, NotImplementedError, ValueError, TypeError) as err:
        row.update(status="failed", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def bench_shape(shape: Shape, dtype: torch.dtype, device: str, args) -> list[dict]:
    rows: list[dict] = []
    layer, hf = build_pair(shape, dtype, device)
    bf_cpu = device == "cpu" and dtype != torch.float32
    modes = ("forward",) if shape.decode else ("forward", "forward_backward")

    x_check = torch.randn(1, min(shape.tokens, 64), shape.dim, device=device, dtype=dtype)
    with torch.no_grad():
        layer.eval()
        ref_out = layer(x_check)
    check: dict = {}
    if hf is not None:
        for impl in HF_IMPLS:
            set_hf_impl(hf, impl)
            try:
                with torch.no_grad():
                    check[impl] = round(rel_err(hf(x_check), ref_out), 6)
            except RuntimeError as err:
                check[impl] = f"failed: {str(err).splitlines()[0][:200]}"

    def inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(tokens)
        x = torch.randn(1, tokens, shape.dim, device=device, generator=gen).to(dtype)
        return x, torch.randn(1, tokens, shape.dim, device=device, generator=gen).to(dtype)

    if shape.decode:
        with torch.no_grad():
            idx = layer.router(inputs(shape.tokens)[0].view(-1, shape.dim)).topk_idx_TK
        args.decode_bytes[(shape.name, str(dtype))] = int(idx.unique().numel()) * shape.expert_bytes(dtype)

    for mode in modes:
        train = mode == "forward_backward"
        layer.train(train)
        if hf is not None:
            hf.train(train)

        def moe_maker(module, impl=None, backend="auto"):
            def make(tokens: int):
                x, dy = inputs(tokens)
                if impl is not None:
                    set_hf_impl(module, impl)
                if backend != "auto":
                    module.experts.backend = backend
                grad_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
                return step_fn(module, x, dy, mode), grad_bytes
            return make

        cases: list[tuple[str, Callable, bool]] = [("moekit", moe_maker(layer), False)]
        if not args.quick and not shape.decode:
            unfused = copy.deepcopy(layer)
            cases.append(("moekit_unfused", moe_maker(unfused, backend="reference"), bf_cpu))
        if hf is not None:
            for impl in HF_IMPLS:
                if args.quick and (impl == "batched_mm" or (impl == "eager" and train)):
                    continue  # quick: the slowest transformers cases (seconds per call, or skipped after a probe)
                if impl == "batched_mm":
                    need = shape.rows * shape.expert_bytes(dtype) * (3 if train else 1)
                    if need > args.max_gather_gb * 1e9:
                        rows.append({"shape": shape.name, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                                     "impl": "hf_batched_mm", "tokens": shape.tokens, "status": "failed",
                                     "reason": f"out of memory: gathers one weight copy per routed row, "
                                               f"{need / 1e9:.0f} GB > {args.max_gather_gb} GB allowed"})
                        continue
                cases.append((f"hf_{impl}", moe_maker(hf, impl=impl), device == "cpu"))
        for dense_name, fp32c in (("dense", False), ("dense_fp32", True)):
            if fp32c and not bf_cpu:
                continue
            cases.append((dense_name, lambda t, fp32c=fp32c: dense_fn(
                Shape(shape.name, shape.num_experts, shape.top_k, shape.dim, shape.hidden, t), dtype, device, mode,
                fp32c), bf_cpu and not fp32c))
        mode_rows = []
        cases = [c for c in cases if c[0] not in args.skip.split(",")]
        for name, make, probe in cases:
            row = run_case(name, make, shape, dtype, mode, device, args, probe)
            mode_rows.append(row)
            _progress(row)
        if not args.quick and not shape.decode:
            del unfused
        _add_ratios(mode_rows, shape, dtype, args)
        for row in mode_rows:
            if row["impl"].startswith("hf_"):
                row["rel_err_vs_moekit_forward"] = check.get(row["impl"][3:])
        rows.extend(mode_rows)
    del layer, hf
    gc.collect()
    return rows


def _add_ratios(rows: list[dict], shape: Shape, dtype: torch.dtype, args) -> None:
    ok = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    dense = [ok[n]["ms"] for n in ("dense", "dense_fp32") if n in ok]
    hf = [ok[n]["ms"] for n in ok if n.startswith("hf_")]
    best_hf = min(hf) if hf else None
    dense_native = ok.get("dense")
    for r in rows:
        if r.get("status") != "ok":
            continue
        if dense:
            r["ratio_to_dense_limit"] = round(min(dense) / r["ms"], 3)
        if best_hf:
            r["speedup_vs_best_hf"] = round(best_hf / r["ms"], 3)
        if dense_native and r.get("act_peak_mb") is not None and dense_native.get("act_peak_mb"):
            r["act_peak_vs_dense"] = round(r["act_peak_mb"] / dense_native["act_peak_mb"], 3)
        if shape.decode:
            r["expert_bytes_read"] = args.decode_bytes[(shape.name, str(dtype))]
            r["effective_gbps"] = round(r["expert_bytes_read"] / (r["ms"] * 1e-3) / 1e9, 2)
            r["floor_ms"] = round(r["expert_bytes_read"] / (args.read_gbps * 1e9) * 1e3, 3)
            r["ms_over_floor"] = round(r["ms"] / r["floor_ms"], 3)


def _progress(row: dict) -> None:
    if row.get("status") == "ok":
        line = f"{row['ms']:10.2f} ms {row['gflops']:9.1f} GFLOP/s"
    else:
        line = f"{row['status']}: {row.get('reason', '')[:100]}"
    print(f"  {row['shape']:20s} {row['dtype']:8s} {row['mode']:16s} {row['impl']:16s} {line}", flush=True)


def print_table(rows: list[dict]) -> None:
    head = f"{'shape':20s} {'dtype':8s} {'mode':16s} {'impl':15s} {'ms':>10s} {'GFLOP/s':>9s} {'xDense':>7s} " \
           f"{'xBestHF':>8s} {'actMB':>8s} {'xDenseMem':>9s} {'GB/s':>7s} {'xFloor':>7s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['shape']:20s} {r['dtype']:8s} {r['mode']:16s} {r['impl']:15s} {r['status']}: "
                  f"{r.get('reason', '')[:70]}")
            continue

        def f(key: str, fmt: str) -> str:
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['shape']:20s} {r['dtype']:8s} {r['mode']:16s} {r['impl']:15s} {r['ms']:10.2f} "
              f"{r['gflops']:9.1f} {f('ratio_to_dense_limit', '7.2f')} {f('speedup_vs_best_hf', '8.2f')} "
              f"{f('act_peak_mb', '8.0f')} {f('act_peak_vs_dense', '9.2f')} {f('effective_gbps', '7.2f')} "
              f"{f('ms_over_floor', '7.2f')}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small token counts and few repeats (< 3 min on 2 cores)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtypes", default=None, help="comma list (default: float32,bfloat16 on CPU, bfloat16 on CUDA)")
    p.add_argument("--shapes", default=None, help="comma list of shape names to run (default: all)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (median reported)")
    p.add_argument("--case-budget-s", type=float, default=None, help="seconds of timed calls per case at most")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="skip a case whose single call is estimated to take longer (probed at T/16)")
    p.add_argument("--max-gather-gb", type=float, default=8.0, help="memory allowed for batched_mm's weight gathers")
    p.add_argument("--skip", default="", help="comma list of implementations not to run (e.g. moekit_unfused)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice; 1 is fairer on a loaded machine)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>[_quick].json)")
    args = p.parse_args(argv)
    if args.device == "cpu" and (libc := _glibc()) is not None:  # timed calls in glibc's steady state
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.case_budget_s = args.case_budget_s or (3.0 if args.quick else 20.0)
    args.max_call_s = args.max_call_s or (3.0 if args.quick else 30.0)
    dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16"] if args.device == "cuda" else
                                                         ["float32", "bfloat16"])
    shapes = shapes_for(args.device, args.quick)
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {s.name for s in shapes})
        if unknown:
            p.error(f"unknown shape(s) {unknown}; known: {[s.name for s in shapes]}")
        shapes = [s for s in shapes if s.name in wanted]

    torch.manual_seed(0)
    started = time.time()
    machine = machine_info(args.device)
    args.read_gbps = measure_read_bandwidth(args.device)
    machine["read_bandwidth_gbps"] = round(args.read_gbps, 2)
    machine["dense_matmul_tflops"] = {dt: round(measure_dense_peak(args.device, getattr(torch, dt)), 4)
                                      for dt in dtypes}
    print(f"machine: {machine.get('cpu_model')} {machine.get('gpu', '')}  threads={machine['torch_threads']}  "
          f"read {args.read_gbps:.1f} GB/s  dense matmul TFLOP/s {machine['dense_matmul_tflops']}", flush=True)
    args.decode_bytes = {}
    rows: list[dict] = []
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"{args.device}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(complete: bool) -> None:
        machine["loadavg_end"] = os.getloadavg()
        payload = {"benchmark": "moe_layer", "command": " ".join(["python", *sys.argv]), "quick": args.quick,
                   "complete": complete, "device": args.device, "wall_s": round(time.time() - started, 1),
                   "machine": machine, "shapes": [vars(s) for s in shapes], "rows": rows}
        out.write_text(json.dumps(payload, indent=1))

    for dt_name in dtypes:
        dtype = getattr(torch, dt_name)
        for shape in shapes:
            torch.manual_seed(1234)
            rows.extend(bench_shape(shape, dtype, args.device, args))
            write(complete=False)
    write(complete=True)
    print()
    print_table(rows)
    print(f"\nwrote {out} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
