"""CUDA-only checks of the fused experts path (skipped by conftest, with the reason, on machines
without a GPU): the grouped schedule in bfloat16 and the loop schedule in float32 against a
float64 CPU recomputation, outputs and all gradients; and the benchmark's CUDA mode on a tiny
shape.

Shape legend: T tokens, D model dim, E experts, K top-k, F expert hidden.
"""

from __future__ import annotations

import copy
import math
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import MoE, moe_config
from moekit.ops.cuda_kernels import sync_warnings

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


# ---------------------------------------------------------------------- the trainer on a GPU
def _token_data():
    """Two 'languages' with different byte statistics, a label per token (as tests/test_train.py)."""
    import numpy as np

    from moekit.data.corpus import TokenData, TokenSplit

    rng = np.random.default_rng(0)
    toks = np.concatenate([rng.integers(0, 8, 2000), rng.integers(100, 140, 2000)]).astype(np.uint16)
    labs = np.concatenate([np.zeros(2000), np.ones(2000)]).astype(np.int16)
    return TokenData(TokenSplit(toks, labs), TokenSplit(toks[::-1].copy(), labs[::-1].copy()), ["a", "b"], "byte",
                     None)


def _train_cfg(tmp_path: Path, moe: bool = True, router: str = "softmax_topk", **kw):
    from moekit.lm import LMConfig
    from moekit.train import TrainConfig

    model = LMConfig(vocab_size=257, dim=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=32,
                     moe=moe_config(dim=32, num_experts=4, expert_hidden=32, top_k=2, z_loss_coef=1e-3,
                                    router=router) if moe else None)
    base = dict(model=model, seq_len=32, batch_size=8, steps=6, warmup_steps=2, eval_every=3, ckpt_every=3,
                eval_tokens=256, out_dir=str(tmp_path / "run"), progress=False, tensorboard=False, device="cuda")
    return TrainConfig(**{**base, **kw})


def test_trainer_trains_on_cuda_with_fused_adamw_and_loads_on_cpu(tmp_path: Path):
    from moekit.train import Trainer
    from moekit.train.trainer import load_trained

    t = Trainer(_train_cfg(tmp_path, steps=20, lr=1e-2, eval_every=20, ckpt_every=20), _token_data())
    assert t.device.type == "cuda" and all(p.is_cuda for p in t.model.parameters())
    assert t.optimizer.defaults["fused"] is True and t.batch(0, 0).input_ids.is_cuda
    t.fit()
    assert t.evals[-1]["loss"] < t.evals[0]["loss"] - 1.0
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in t.history)
    model, cfg, _ = load_trained(tmp_path / "run")  # a checkpoint written on the GPU loads on the CPU
    assert cfg.device == "cuda" and next(model.parameters()).device.type == "cpu"
    ids = torch.randint(0, 140, (2, 16))
    t.model.eval()
    torch.testing.assert_close(model(ids), t.model(ids.cuda()).cpu(), rtol=1e-4, atol=1e-4)


def test_cuda_run_matches_the_cpu_run(tmp_path: Path):
    """Same seed, same initial weights (built on the CPU, then moved), same batches: losses agree to
    float32 rounding (softmax_topk router: no noise, whose generator differs between devices)."""
    from moekit.train import Trainer

    runs = {}
    for device in ("cpu", "cuda"):
        t = Trainer(_train_cfg(tmp_path / device, device=device, steps=3, eval_every=100), _token_data())
        t.fit()
        runs[device] = t
    assert runs["cuda"].evals[0]["loss"] == pytest.approx(runs["cpu"].evals[0]["loss"], rel=1e-5)
    for cpu, cuda in zip(runs["cpu"].history, runs["cuda"].history):
        assert cuda["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
        assert cuda["aux"] == pytest.approx(cpu["aux"], rel=1e-3)


def test_bf16_autocast_follows_the_training_device(tmp_path: Path):
    from moekit.train import Trainer

    t = Trainer(_train_cfg(tmp_path, autocast="bf16", steps=4), _token_data())
    seen = []
    hook = t.model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with t.autocast():
        assert torch.is_autocast_enabled("cuda")
        t.model(t.batch(0, 0).input_ids)
    hook.remove()
    assert seen == [torch.bfloat16]  # LM.forward returns float32 logits; its matmuls ran in bf16
    t.fit()
    assert all(math.isfinite(h["loss"]) for h in t.history)


def test_resume_on_cuda_restores_the_cuda_generator(tmp_path: Path):
    """noisy_topk draws its noise from the GPU's generator: a resumed run draws the same noise and
    continues the uninterrupted run's losses (to atomics' rounding, not bit for bit)."""
    from moekit.train import Trainer

    straight = Trainer(_train_cfg(tmp_path / "a", router="noisy_topk"), _token_data())
    straight.fit()
    first = Trainer(_train_cfg(tmp_path / "b", router="noisy_topk"), _token_data())
    first.fit(steps=3)
    saved = torch.cuda.get_rng_state(first.device)
    torch.cuda.manual_seed(1234)  # disturb the generator: resume must restore it
    second = Trainer(_train_cfg(tmp_path / "b", router="noisy_topk"), _token_data())
    second.resume(tmp_path / "b" / "run")
    assert torch.equal(torch.cuda.get_rng_state(second.device), saved)
    second.fit()
    for got, want in zip(first.history + second.history, straight.history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_dense_train_step_syncs_the_host_once(tmp_path: Path):
    """The trainer's hot path: batches go up through pinned memory, loss terms stay on the GPU, and the
    terms and the gradient norm come down in one read. Syncs inside torch's own forward and backward
    kernels are counted apart (a bare forward + backward) and allowed once per micro-batch. (MoE
    dispatch may sync on its own; a dense model isolates the trainer.)"""
    import torch.nn.functional as F

    from moekit.train import Trainer

    t = Trainer(_train_cfg(tmp_path, moe=False, grad_accum=3), _token_data())
    t.train_step()  # first step: allocations, optimizer state
    b = t.batch(5, 0)

    def forward_backward() -> None:
        logits_BSV = t.model(b.input_ids)
        F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), b.targets.reshape(-1)).backward()

    in_kernels = sync_warnings(forward_backward)
    t.optimizer.zero_grad(set_to_none=True)
    in_step = sync_warnings(t.train_step)
    assert len(in_step) == 3 * len(in_kernels) + 1, (in_step, in_kernels)


# ---------------------------------------------------------------------- host syncs and kernel choices
def _first_sync_traceback(fn) -> str:
    """Where the first synchronizing call happens (run again with the debug mode raising)."""
    import traceback

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return traceback.format_exc(limit=-8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "(no sync on the second run)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_grouped_mm_probe_says_what_the_kernel_does(dtype):
    """cuda_grouped_mm's answer holds on a larger call than the probe's: ``native`` runs under
    set_sync_debug_mode("error") and matches per-group float64 products (an empty group included);
    ``host_sync`` runs and matches. bfloat16 on sm90/sm100 has had the one-kernel path since torch 2.8."""
    import torch.nn.functional as F

    from moekit.ops.cuda_kernels import GROUPED_MM_SUPPORT, cuda_grouped_mm

    support = cuda_grouped_mm("cuda", dtype)
    assert support in GROUPED_MM_SUPPORT
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10):
        assert support == "native"
    if support == "unsupported":
        pytest.skip(f"grouped_mm does not run in {dtype} on {torch.cuda.get_device_name()}")
    counts = [50, 0, 7, 143]
    x = torch.randn(sum(counts), 64)
    w = torch.randn(len(counts), 64, 96) / 8
    offs = torch.tensor(counts).cumsum(0).to(device="cuda", dtype=torch.int32)
    xc, wc = x.to("cuda", dtype), w.to("cuda", dtype)
    torch.cuda.synchronize()
    if support == "native":
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = F.grouped_mm(xc, wc, offs=offs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = torch.cat([blk @ w[e].double() for e, blk in enumerate(torch.split(xc.double().cpu(), counts))])
    assert _rel(out, ref) < (2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dropless_layer_train_forward_backward_does_not_sync(dtype):
    """Router, plan, the fused grouped experts op, combine, balancing losses and statistics of a
    training forward + backward run without one host sync wherever grouped_mm is one kernel (the
    probe says ``native``); with the host-sync fallback, no more than its grouped products make
    (2 in forward, 4 in backward, each counted alone here)."""
    import torch.nn.functional as F

    from moekit.ops.cuda_kernels import cuda_grouped_mm

    layer = MoE(moe_config(dim=D, num_experts=8, expert_hidden=F, top_k=2, z_loss_coef=1e-3)).to("cuda", dtype)
    layer.train()
    x = torch.randn(600, D, device="cuda", dtype=dtype, requires_grad=True)

    def step() -> None:
        y = layer(x)
        (y.float().square().mean() + layer.aux_loss).backward()

    step()  # the probe runs here (it syncs), and the allocator settles
    found = sync_warnings(step)
    if cuda_grouped_mm("cuda", dtype) == "native":
        assert not found, (found, _first_sync_traceback(step))
    else:
        a, w = torch.randn(8, D, device="cuda", dtype=dtype), torch.randn(2, D, D, device="cuda", dtype=dtype)
        offs = torch.tensor([3, 8], device="cuda", dtype=torch.int32)
        per_product = len(sync_warnings(lambda: F.grouped_mm(a, w, offs=offs)))
        assert len(found) <= 6 * per_product, (found, per_product, _first_sync_traceback(step))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
def test_cuda_decode_takes_the_gather_path_past_the_cpu_limit(dtype, tol):
    """Decode (T*K <= E/2) with 24 MiB of gathered weights, over the CPU's 16 MiB limit: on CUDA the
    limit comes from the device's memory, so the sort-free gather path runs, without a host sync
    (finite checks off), and matches a float64 CPU recomputation."""
    from moekit.dispatch import plan_token_choice
    from moekit.dispatch.run import GATHER_MAX_BYTES, use_gather_path

    torch.manual_seed(0)
    Ee, Kd, Dd, Fd, T = 16, 2, 1024, 1024, 2
    layer = MoE(moe_config(dim=Dd, num_experts=Ee, expert_hidden=Fd, top_k=Kd, check_finite=False)).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.05)  # well-separated top-k: no near tie that rounding flips
    cuda = layer.to("cuda", dtype)
    ref = copy.deepcopy(cuda).cpu().double()  # the same (rounded) weights and input, in float64
    ref.experts.backend = "reference"
    xc = torch.randn(T, Dd).to("cuda", dtype)
    x = xc.cpu().double()
    with torch.no_grad():
        plan = plan_token_choice(cuda.router(xc), Ee, None)
        w1, w2 = cuda.experts.gate_up_proj, cuda.experts.down_proj
        nbytes = T * Kd * (w1[0].numel() + w2[0].numel()) * xc.element_size()
        assert nbytes > GATHER_MAX_BYTES and use_gather_path(plan, w1, w2, xc)
        cuda(xc)
        out = []
        assert not sync_warnings(lambda: out.append(cuda(xc)))
        want = ref(x)
    assert _rel(out[0], want) < tol
