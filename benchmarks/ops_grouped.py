"""Benchmark: ``moekit.ops.grouped_matmul`` (loop and grouped_mm backends) against the reference's
per-row batched product (``moekit.ops.reference.grouped_matmul``), float32 and bfloat16, at the
demo's expert shapes (16 experts, dim 128, hidden 128) for a training batch and a decode step.

    python benchmarks/ops_grouped.py    # a few seconds; prints a table, writes results/ops_grouped.json
"""

from __future__ import annotations

import torch
from opsbench import run

from moekit.ops import grouped_matmul, resolve_backend
from moekit.ops import reference as ref


def cases() -> list:
    out = []
    gen = torch.Generator().manual_seed(0)
    for rows in (4096, 16):
        for dtype in (torch.float32, torch.bfloat16):
            E, I, O = 16, 128, 256
            counts_E = torch.bincount(torch.randint(0, E, (rows,), generator=gen), minlength=E)
            x = torch.randn(rows, I, generator=gen).to(dtype)
            w = torch.randn(E, I, O, generator=gen).to(dtype)
            for backend in ("loop", "grouped_mm"):
                if backend == "grouped_mm" and resolve_backend("auto", x, (I, O)) != "grouped_mm":
                    continue  # no fast grouped_mm for this device and dtype (auto would not pick it)
                label = f"{backend} R={rows} E={E} {I}x{O} {str(dtype)[6:]}"
                out.append((label, lambda x=x, w=w, c=counts_E, b=backend: grouped_matmul(x, w, c, b),
                            lambda x=x, w=w, c=counts_E: ref.grouped_matmul(x, w, c)))
    return out


if __name__ == "__main__":
    run("grouped", cases(), doc=__doc__)
