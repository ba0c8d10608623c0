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

import time
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
