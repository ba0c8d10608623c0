"""CUDA-only checks of the fused experts path (skipped by conftest, with the reason, on machines
without a GPU): the grouped schedule in bfloat16 and the loop schedule in float32 against a
float64 CPU recomputation, outputs and all gradients; and the benchmark's CUDA mode on a tiny
shape.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import MoE, moe_config

pytestmark = pytest.mark.gpu

E, K, D, F = 6, 3, 64, 96


def _layer() -> MoE:
    torch.manual_seed(0)
    layer = MoE(moe_config(dim=D, num_experts=E, expert_hidden=F, top_k=K))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.5)
    return layer.train()


def _run(layer: MoE, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y.double() * g.double()).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,backend,tol", [(torch.bfloat16, "auto", 2e-2), (torch.float32, "auto", 1e-4),
                                                (torch.bfloat16, "loop", 2e-2)])
def test_cuda_layer_matches_float64_cpu(dtype, backend, tol):
    layer = _layer()
    layer.experts.backend = backend
    ref = copy.deepcopy(layer).double()
    ref.experts.backend = "reference"
    cuda = layer.to("cuda", dtype)
    x = torch.randn(600, D)
    g = torch.randn(600, D)
    y, gx, gp = _run(cuda, x.to("cuda", dtype), g.to("cuda", dtype))
    y_ref, gx_ref, gp_ref = _run(ref, x.double(), g.double())
    assert y.dtype == dtype and y.is_cuda
    assert _rel(y, y_ref) < tol and _rel(gx, gx_ref) < tol
    for name, grad in gp_ref.items():
        assert _rel(gp[name], grad) < tol, name


def test_benchmark_cuda_mode_runs(tmp_path: Path):
    out = tmp_path / "gpu.json"
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_layer.py"
    subprocess.run([sys.executable, str(bench), "--device", "cuda", "--quick", "--shapes", "decode_E128_k8_T8",
                    "--out", str(out)], check=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows if r["status"] == "ok"} >= {"moekit", "dense"}
