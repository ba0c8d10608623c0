"""The grouped matrix product: rows grouped by expert times each expert's weight.

grouped_matmul(x_RI, w_EIO, counts_E) -> y_RO where rows counts_E[0] of x use w[0], the next
counts_E[1] rows use w[1], and so on. Backends:
  ``grouped_mm``  torch.nn.functional.grouped_mm (one kernel; fast on CPU in float32 and on CUDA).
  ``loop``        one torch.mm per expert over its contiguous block (no masks; reads counts on
                  the host). Used where grouped_mm is slow or missing (CPU bfloat16).
  ``reference``   the same as loop, kept as the name tests force to compare against; it also
                  turns off the fused experts path (moekit.ops.fused), so the layer runs
                  the plain permute -> experts.forward -> combine composition.
``auto`` picks the fastest correct backend for the device and dtype (on CUDA: grouped_mm wherever a
probe finds it runs on this device and dtype, ``moekit.ops.cuda_kernels``). With ``grouped_mm`` or
``loop``, stacked SwiGLU/MLP experts run through the fused path with the same schedule; with
``auto`` on CPU in float32 the fused path picks loop or grouped at run time from the block sizes
and the measured CPU (``resolve_schedule``, ``moekit.ops.kernels``).
grouped_mm needs every row stride to be a multiple of 16 bytes; ``auto`` falls back to ``loop``
for widths that are not (e.g. float32 widths not divisible by 4), an explicit ``grouped_mm``
raises naming the width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cuda_kernels import cuda_grouped_mm
from .kernels import cpu_kernels

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(backend: str, x: torch.Tensor, widths: tuple[int, ...] = ()) -> str:
    """The backend that runs: ``backend``, or for ``auto`` the best for x's device and dtype.
    widths are the product widths involved (checked against grouped_mm's 16-byte stride rule)."""
    misaligned = [w for w in widths if (w * x.element_size()) % 16 != 0]
    if backend != "auto":
        if backend == "grouped_mm" and not _HAS_GROUPED_MM:
            raise RuntimeError("backend='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.8)")
        if backend == "grouped_mm" and x.dtype not in _GROUPED_MM_DTYPES:
            raise ValueError(f"backend='grouped_mm' has no {x.dtype} kernel (float32, bfloat16 and float16 "
                             f"only); use backend='auto' or 'loop'")
        if backend == "grouped_mm" and misaligned:
            raise ValueError(f"backend='grouped_mm' needs widths whose rows are multiples of 16 bytes; "
                             f"width(s) {misaligned} in {x.dtype} are not (use backend='auto' or 'loop')")
        return backend
    if not _HAS_GROUPED_MM or misaligned or x.dtype not in _GROUPED_MM_DTYPES:
        return "loop"
    if x.device.type == "cuda":
        # Wherever grouped_mm runs on this device and dtype (probed once, ``cuda_kernels``). Even its
        # host-sync fallback (one mm per group, launched from C++) launches fewer ops than the loop
        # schedule, which runs the gather, activation and products from Python once per expert.
        return "grouped_mm" if cuda_grouped_mm(x.device, x.dtype) != "unsupported" else "loop"
    # On CPU grouped_mm is a good float32 kernel but orders of magnitude slower in bfloat16.
    return "grouped_mm" if x.dtype == torch.float32 else "loop"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a block product runs in: on CPU, half-precision inputs run natively where the CPU
    has bf16 dot products (float16 never does here) and in float32 otherwise (several times
    faster there); elsewhere the input's own dtype. See ``moekit.ops.kernels``."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        if x.dtype == torch.bfloat16 and cpu_kernels().native_bf16:
            return torch.bfloat16
        return torch.float32
    return x.dtype


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """y_RO[rows of expert e] = x_RI[rows of expert e] @ w_EIO[e]."""
    backend = resolve_backend(backend, x_RI, (x_RI.shape[-1], w_EIO.shape[-1]))
    if backend == "grouped_mm":
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return F.grouped_mm(x_RI, w_EIO, offs=offs_E)
    return _loop_matmul(x_RI, w_EIO, counts_E)


def _loop_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    blocks = torch.split(x_RI, counts_E.tolist(), dim=0)
    outs = [block @ w_EIO[e] for e, block in enumerate(blocks) if block.shape[0] > 0]
    if not outs:
        return x_RI.new_zeros(x_RI.shape[0], w_EIO.shape[-1])
    return torch.cat(outs, dim=0)


def resolve_schedule(x: torch.Tensor, dim: int, first_width: int, hidden: int, rows_per_expert: float) -> str:
    """The fused schedule ``auto`` runs: the loop on CPU where its per-block op overhead is small
    against a block's products (``CPUKernels.loop_min_rows``, measured at run time) or where
    grouped_mm cannot run (dtype, alignment), else grouped."""
    if resolve_backend("auto", x, (dim, first_width, hidden)) != "grouped_mm":
        return "loop"
    if x.device.type == "cpu" and rows_per_expert >= cpu_kernels().loop_min_rows(dim, first_width, hidden):
        return "loop"
    return "grouped"


def fused_schedule(backend: str, x: torch.Tensor, widths: tuple[int, ...] = ()) -> str | None:
    """The fused experts schedule a backend maps to (None: use the plain composition). ``auto``
    stays ``auto`` where grouped_mm can run: the op resolves it at run time from the block sizes
    (``resolve_schedule``), so nothing host-side is traced under torch.compile."""
    if backend == "auto" and x.device.type == "cuda":
        # Resolved inside the op: the device probe (``cuda_kernels``) never runs under tracing.
        static_ok = _HAS_GROUPED_MM and x.dtype in _GROUPED_MM_DTYPES and not any(
            (w * x.element_size()) % 16 for w in widths)
        return "auto" if static_ok else "loop"
    resolved = resolve_backend(backend, x, widths)
    if backend == "reference" or resolved == "reference":
        return None
    if backend == "auto" and resolved == "grouped_mm" and x.device.type == "cpu":
        return "auto"
    return "grouped" if resolved == "grouped_mm" else "loop"
