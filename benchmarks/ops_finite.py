"""Benchmark: ``moekit.ops.all_finite`` (one ``aminmax`` read) against the reference's
``torch.isfinite(x).all()``, on a layer output of the full benchmark shapes (4096 tokens x 1024) in
float32 and bfloat16, and on a decode step's (16 x 128).

    python benchmarks/ops_finite.py    # a few seconds; prints a table, writes results/ops_finite.json
"""

from __future__ import annotations

import torch
from opsbench import run

from moekit.ops import all_finite
from moekit.ops import reference as ref


def cases() -> list:
    gen = torch.Generator().manual_seed(0)
    out = []
    for T, D in ((4096, 1024), (16, 128)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(T, D, generator=gen).to(dtype)
            out.append((f"all_finite ({T}, {D}) {str(dtype).removeprefix('torch.')}",
                        lambda x=x: all_finite(x), lambda x=x: ref.all_finite(x)))
    return out


if __name__ == "__main__":
    run("finite", cases(), doc=__doc__)
