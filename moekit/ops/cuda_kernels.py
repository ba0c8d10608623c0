"""What this CUDA device's grouped product can do, probed once per (device, dtype) at run time.

``torch.nn.functional.grouped_mm`` on CUDA has a one-kernel path (CUTLASS, for some dtypes and
architectures: bfloat16 on sm90/sm100 in torch 2.8-2.10) and a fallback that copies the offsets to
the host (a sync) and runs one ``mm`` per group. Which one a (device, dtype) gets changes between torch
releases, so nothing here is a table: ``cuda_grouped_mm`` runs a tiny call of each form the fused
experts op uses (x @ w per group, x @ w^T per group, and the weight-gradient form x^T @ y with one
empty group) under ``torch.cuda.set_sync_debug_mode("error")``, and checks the results against
per-group ``mm``:
  ``native``       one kernel, no host sync (the whole dropless layer can run without syncing).
  ``host_sync``    runs and is right, but reads the offsets on the host (the fallback).
  ``unsupported``  raises or is wrong: the grouped schedule is not used.
The gather decode path's size limit (``gather_max_bytes``) comes from the device's memory.

Shape letters: R rows grouped by expert, E experts (groups), I/O a product's input/output widths.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .finite import all_finite

GROUPED_MM_SUPPORT = ("native", "host_sync", "unsupported")
# Gathered decode weights may take this share of the device's memory (a transient copy).
GATHER_MEMORY_SHARE = 1 / 64

_CACHE: dict[tuple[int, torch.dtype], str] = {}


def cuda_grouped_mm(device: torch.device | str | int, dtype: torch.dtype) -> str:
    """One of GROUPED_MM_SUPPORT for grouped_mm on this CUDA device in ``dtype`` (probed once, cached).
    While a CUDA graph is being captured or torch.compile traces, nothing is probed: the cached
    answer, else ``host_sync`` (assume it runs, do not promise sync-freedom)."""
    index = torch.device(device).index
    key = (torch.cuda.current_device() if index is None else index, dtype)
    found = _CACHE.get(key)
    if found is not None:
        return found
    if not hasattr(F, "grouped_mm"):
        _CACHE[key] = "unsupported"
        return "unsupported"
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "host_sync"
    found = _CACHE[key] = _probe(torch.device("cuda", key[0]), dtype)
    return found


def _probe(device: torch.device, dtype: torch.dtype) -> str:
    gen = torch.Generator().manual_seed(0)
    R, E, I, O = 24, 3, 16, 32  # widths of 16 elements: 16-byte aligned rows in every dtype
    counts = [10, 0, 14]        # one empty group, as experts without rows
    x_RI = torch.randn(R, I, generator=gen).to(device, dtype)
    w_EIO = torch.randn(E, I, O, generator=gen).to(device, dtype)
    w_EOI = torch.randn(E, O, I, generator=gen).to(device, dtype)
    y_RO = torch.randn(R, O, generator=gen).to(device, dtype)
    offs_E = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    calls = (lambda: F.grouped_mm(x_RI, w_EIO, offs=offs_E),
             lambda: F.grouped_mm(x_RI, w_EOI.transpose(1, 2), offs=offs_E),
             lambda: F.grouped_mm(x_RI.t(), y_RO, offs=offs_E))
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    synced = False
    outs = []
    try:
        torch.cuda.set_sync_debug_mode("error")
        for call in calls:
            try:
                outs.append(call())
            except RuntimeError as err:
                if "synchroniz" not in str(err):
                    raise
                synced = True
                break
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return "unsupported"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    if synced:
        try:
            outs = [call() for call in calls]
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            return "unsupported"
    if not _matches(outs, x_RI, w_EIO, w_EOI, y_RO, counts):
        return "unsupported"
    return "host_sync" if synced else "native"


def _matches(outs, x_RI, w_EIO, w_EOI, y_RO, counts) -> bool:
    """The three probe products against per-group float64 products on the CPU."""
    x, w, wt, y = (t.double().cpu() for t in (x_RI, w_EIO, w_EOI, y_RO))
    ref_fwd, ref_t, ref_w = [], [], []
    start = 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        ref_fwd.append(x[rows] @ w[e])
        ref_t.append(x[rows] @ wt[e].t())
        ref_w.append(x[rows].t() @ y[rows])
        start += n
    refs = (torch.cat(ref_fwd), torch.cat(ref_t), torch.stack(ref_w))
    tol = 1e-2  # a wrong kernel is off by O(1); bfloat16 rounding and TF32 (where allowed) are not
    for out, ref in zip(outs, refs):
        if out.shape != ref.shape or not all_finite(out):
            return False
        if float((out.double().cpu() - ref).norm()) > tol * max(float(ref.norm()), 1e-12):
            return False
    return True


def sync_warnings(fn: Callable[[], object]) -> list[str]:
    """The messages of the synchronizing CUDA calls ``fn()`` makes (``torch.cuda.set_sync_debug_mode``
    in "warn" mode reports each one; the previous mode is restored). For tests and benchmarks."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def gather_max_bytes(device: torch.device) -> int:
    """The most bytes of gathered expert weights the sort-free decode path may copy on a CUDA device:
    GATHER_MEMORY_SHARE of its memory. On an accelerator the copy streams at memory bandwidth (1 GiB
    on a few-TB/s device is well under a millisecond), while the sorted path pays a launch per op, so
    the limit guards memory, not time."""
    return int(torch.cuda.get_device_properties(device).total_memory * GATHER_MEMORY_SHARE)


def reset_cache() -> None:
    """Forget the probes (tests)."""
    _CACHE.clear()
