"""The grouped matrix product: rows grouped by expert times each expert's weight.

grouped_matmul(x_RI, w_EIO, counts_E) -> y_RO where rows counts_E[0] of x use w[0], the next
counts_E[1] rows use w[1], and so on. Backends:
  ``grouped_mm``  torch.nn.functional.grouped_mm (one kernel; fast on CPU in float32 and on CUDA).
  ``loop``        one torch.mm per expert over its contiguous block (no masks; reads counts on
                  the host). Used where grouped_mm is slow or missing (CPU bfloat16).
  ``reference``   the same as loop, kept as the name tests force to compare against; it also
                  turns off the fused experts path (moekit.dispatch.fused), so the layer runs
                  the plain permute -> experts.forward -> combine composition.
``auto`` picks the fastest correct backend for the device and dtype. With ``grouped_mm`` or
``loop``, stacked SwiGLU/MLP experts run through the fused path with the same schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend != "auto":
        if backend == "grouped_mm" and not _HAS_GROUPED_MM:
            raise RuntimeError("backend='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.8)")
        return backend
    if not _HAS_GROUPED_MM:
        return "loop"
    if x.device.type == "cuda":
        return "grouped_mm" if x.dtype == torch.bfloat16 else "loop"
    # On CPU grouped_mm is a good float32 kernel but orders of magnitude slower in bfloat16.
    return "grouped_mm" if x.dtype == torch.float32 else "loop"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a block product runs in: float32 for half-precision inputs on CPU (where this
    machine class has no fast bf16 matrix unit and float32 products are several times faster),
    else the input's own dtype."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return x.dtype


def grouped_matmul(x_RI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """y_RO[rows of expert e] = x_RI[rows of expert e] @ w_EIO[e]."""
    backend = resolve_backend(backend, x_RI)
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


def fused_schedule(backend: str, x: torch.Tensor) -> str | None:
    """The fused experts schedule a backend maps to (None: use the plain composition)."""
    resolved = resolve_backend(backend, x)
    if backend == "reference" or resolved == "reference":
        return None
    return "grouped" if resolved == "grouped_mm" else "loop"
