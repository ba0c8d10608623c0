"""What this CPU can do, measured once per thread count, and the kernel choices that follow.

Nothing here is a constant tuned on one machine. ``cpu_kernels()`` reads the instruction-set
flags (/proc/cpuinfo: ``avx512_bf16``, ``amx_bf16``) and torch's CPU capability, and runs a short
probe (a few milliseconds, cached per ``torch.get_num_threads()``):
  * a 256^3 float32 product, and the same in bfloat16 where the flags say the CPU has bf16 dot
    products (or where no flags can be read), both on one thread (a busy machine stalls
    multi-thread products far more than it slows one core; the rate is scaled by the thread count). bfloat16 products run natively (oneDNN, float32
    accumulation inside the kernel) when they are at least as fast as float32; otherwise
    half-precision blocks are computed in float32 (``compute_dtype``).
  * the latency of one small parallel op (an ``index_select`` of 1024 x 64 float32 rows) at the
    current thread count: the price the per-expert loop pays for every op of every block.
Each timing is the minimum of several calls, which a loaded machine inflates least.

One-row half-precision products (decode blocks: a token times one expert's weights) are bound by
reading the weights. ``row_product_kernel(dtype)`` measures, once per thread count and dtype and
only when first asked, which kernel reads them faster: oneDNN (ATen's default for CPU bf16
products) or ATen's own one-row kernel (oneDNN switched off around the call, ``onednn_off``).
The weights are 2x the last-level cache (read from sysfs; 32 MiB if unreadable), cycled, as a
model's experts are: on one AMD EPYC (AVX-512 BF16) the two read cached weights alike but ATen's
read uncached ones 1.5-4x faster.

Loop vs grouped schedule (``loop_min_rows``): the loop schedule runs about LOOP_OPS_PER_BLOCK small
ops per expert block in forward+backward that the grouped schedule runs once; what it buys is
cache locality (its per-block temporaries stay in cache), worth at most ~15% of the block's
product time (measured 0.86x at 512 rows of D 1024, F 512). So the loop is chosen when its extra
op overhead is below LOOP_OVERHEAD_SHARE (5%) of a block's product time, both measured here:
    rows >= LOOP_OPS_PER_BLOCK * op_latency / LOOP_OVERHEAD_SHARE / (6 * (D*H + F*D) / matmul_rate)
(6 = 2 FLOPs per multiply-add x 3 products per weight in forward+backward). More threads raise
the op latency (the team's wake-up) more than the product rate, so the threshold rises with them.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

LOOP_OPS_PER_BLOCK = 16
LOOP_OVERHEAD_SHARE = 0.05
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CPUKernels:
    """The probe's findings for one thread count."""

    capability: str          # torch.backends.cpu.get_cpu_capability()
    bf16_flags: bool | None  # avx512_bf16 or amx_bf16 in /proc/cpuinfo (None: unreadable)
    native_bf16: bool        # bfloat16 products at least as fast as float32 ones
    threads: int
    matmul_gflops: float     # float32, 256^3, one thread's rate x threads
    bf16_matmul_gflops: float | None
    op_latency_us: float     # one small parallel op

    def loop_min_rows(self, dim: int, first_width: int, hidden: int) -> float:
        """Rows per expert from which the loop schedule beats the grouped one (see module doc)."""
        block_s_per_row = 6 * (dim * first_width + hidden * dim) / (self.matmul_gflops * 1e9)
        return LOOP_OPS_PER_BLOCK * self.op_latency_us * 1e-6 / LOOP_OVERHEAD_SHARE / block_s_per_row


_CACHE: dict[int, CPUKernels] = {}


def cpu_kernels() -> CPUKernels:
    """The (cached) probe for the current ``torch.get_num_threads()``."""
    threads = torch.get_num_threads()
    found = _CACHE.get(threads)
    if found is None:
        found = _CACHE[threads] = _probe(threads)
    return found


def _cpu_flags() -> set[str] | None:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _min_seconds(fn, calls: int) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def _probe(threads: int) -> CPUKernels:
    flags = _cpu_flags()
    bf16_flags = None if flags is None else any(f in flags for f in _BF16_FLAGS)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=gen), torch.randn(256, 256, generator=gen)
    flops = 2 * 256**3
    bf16_s = None
    torch.set_num_threads(1)
    try:
        fp32_s = _min_seconds(lambda: a @ b, 5)
        if bf16_flags is not False:
            ah, bh = a.bfloat16(), b.bfloat16()
            bf16_s = _min_seconds(lambda: ah @ bh, 5)
            fp32_s = min(fp32_s, _min_seconds(lambda: a @ b, 3))  # like with like on a busy machine
    finally:
        torch.set_num_threads(threads)
    src = torch.randn(2048, 64, generator=gen)
    idx = torch.randint(0, 2048, (1024,), generator=gen)
    op_s = _min_seconds(lambda: src.index_select(0, idx), 10)
    return CPUKernels(capability=torch.backends.cpu.get_cpu_capability(), bf16_flags=bf16_flags,
                      native_bf16=bf16_s is not None and bf16_s <= fp32_s, threads=threads,
                      matmul_gflops=threads * flops / fp32_s / 1e9,
                      bf16_matmul_gflops=None if bf16_s is None else threads * flops / bf16_s / 1e9,
                      op_latency_us=op_s * 1e6)


_ROW_CACHE: dict[tuple[int, torch.dtype], str] = {}
_ROW_PROBE_SIDE = 1024  # probe matrices are (1024, 1024)


@contextlib.contextmanager
def onednn_off() -> Iterator[None]:
    """ATen's own CPU kernels instead of oneDNN for the products inside (a process-wide flag, set
    and restored on this thread's call; both kernels accumulate half precision in float32)."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


def row_product_kernel(dtype: torch.dtype) -> str:
    """``"aten"`` or ``"onednn"``: the faster kernel for a one-row product ``x_1D @ w_UD.t()`` in
    ``dtype`` on uncached weights, measured once per thread count (see the module doc)."""
    if dtype not in (torch.bfloat16, torch.float16) or not torch.backends.mkldnn.is_available():
        return "aten"  # not probed: only half-precision blocks are switched
    key = (torch.get_num_threads(), dtype)
    found = _ROW_CACHE.get(key)
    if found is None:
        found = _ROW_CACHE[key] = _probe_row_product(dtype)
    return found


def _cache_sizes() -> dict[int, int]:
    """Bytes per cache level of cpu0 (data or unified caches) from sysfs; {} where unreadable."""
    sizes: dict[int, int] = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            level = int((index / "level").read_text())
            if (index / "type").read_text().strip() == "Instruction":
                continue
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes[level] = max(sizes.get(level, 0), int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return sizes


def _last_level_cache_bytes() -> int:
    sizes = _cache_sizes()
    return max(sizes.values(), default=32 * 2**20)


@functools.cache
def l2_cache_bytes() -> int:
    """One core's level-2 cache in bytes (sysfs; 1 MiB where unreadable): the working set that
    blocked passes over large tensors (``moekit.ops.permute.token_sum``) keep in cache."""
    return _cache_sizes().get(2, 2**20)


@torch.no_grad()
def _probe_row_product(dtype: torch.dtype) -> str:
    side = _ROW_PROBE_SIDE
    matrix_bytes = side * side * torch.finfo(dtype).bits // 8
    count = max(4, min(64, 2 * _last_level_cache_bytes() // matrix_bytes))
    w_MUD = torch.full((count, side, side), 0.01, dtype=dtype)
    x_1D = torch.randn(1, side, generator=torch.Generator().manual_seed(0)).to(dtype)

    def onednn() -> None:
        for m in range(count):
            torch.mm(x_1D, w_MUD[m].t())

    def aten() -> None:
        with onednn_off():
            onednn()

    best = {"onednn": float("inf"), "aten": float("inf")}
    for _ in range(3):
        for name, fn in (("onednn", onednn), ("aten", aten)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.__getitem__)
