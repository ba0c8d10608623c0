"""Shared harness of the ``benchmarks/ops_*.py`` scripts: each times one ``moekit.ops`` op against its
plain-PyTorch reference (``moekit.ops.reference``) in the same process, interleaved (op, reference,
op, ...), and keeps the minimum of each (a loaded machine inflates the minimum least). A few
seconds per script: every case stops after ``budget_s``. The table goes to stdout, the JSON (cases,
times, ratio reference/op, CPU model, flags, threads, moekit's CPU probe) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_step import cpu_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def time_pair(op: Callable[[], object], reference: Callable[[], object], budget_s: float) -> tuple[float, float, int]:
    """(min op seconds, min reference seconds, calls of each), alternating until budget_s passes."""
    op(), reference()  # warm-up: first-call costs (allocations, the CPU probe) are not timed
    best_op = best_ref = float("inf")
    calls, start = 0, time.perf_counter()
    while calls < 3 or (time.perf_counter() - start < budget_s and calls < 200):
        t0 = time.perf_counter()
        op()
        t1 = time.perf_counter()
        reference()
        t2 = time.perf_counter()
        best_op, best_ref = min(best_op, t1 - t0), min(best_ref, t2 - t1)
        calls += 1
    return best_op, best_ref, calls


def run(name: str, cases: list[tuple[str, Callable[[], object], Callable[[], object]]], argv: list[str] | None = None,
        doc: str = "") -> list[dict]:
    """Time every (label, op, reference) case, print the table, write benchmarks/results/ops_<name>.json."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--budget", type=float, default=0.5, help="seconds per case (default 0.5)")
    p.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/ops_{name}.json)")
    args = p.parse_args(argv)
    rows = []
    print(f"{'case':44s} {'op ms':>9s} {'ref ms':>9s} {'ref/op':>7s} {'calls':>6s}")
    with torch.no_grad():
        for label, op, reference in cases:
            op_s, ref_s, calls = time_pair(op, reference, args.budget)
            rows.append({"case": label, "op_ms": op_s * 1e3, "reference_ms": ref_s * 1e3,
                         "reference_over_op": ref_s / op_s, "calls": calls})
            print(f"{label:44s} {op_s * 1e3:9.3f} {ref_s * 1e3:9.3f} {ref_s / op_s:7.2f} {calls:6d}")
    out = Path(args.out) if args.out else RESULTS / f"ops_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"op": f"moekit.ops.{name}", "reference": "moekit.ops.reference", "timing": "min over interleaved calls",
               "load_avg": os.getloadavg(), "cpu": cpu_info(), "results": rows}
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return rows
