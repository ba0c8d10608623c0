"""Benchmark: one training step of the demo's MoE language model against its dense twin.

The demo's shapes (``moekit demo``, size small): dim 128, 4 layers, 4 heads, sequence 128, batch
16; dense SwiGLU feed-forward of hidden 512 against 16 experts of hidden 128 with top-4 (equal
active FLOPs), aux loss 0.01 and z-loss 1e-3 as in the demo. A step is forward, cross-entropy +
balancing losses, backward, gradient clipping, AdamW (the trainer's kernel, ``adamw_options``) and
the router-bias update, as the trainer does it (loss terms are not read on the host inside the step).

Eager and ``torch.compile`` (fullgraph where the model allows it) are timed in one process with
torch's default thread count and the user's OpenMP environment (nothing is set here). On a loaded
machine absolute times are noisy, so dense and MoE steps are interleaved: each repeat times a few
dense steps then a few MoE steps, and the ratio is the median over repeats of the per-repeat
ratio. The load average before and after is recorded.

    python benchmarks/lm_step.py            # eager and compiled, prints a table, writes JSON
    python benchmarks/lm_step.py --quick    # fewer repeats, eager only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit import aux_loss, moe_config, update_router_biases
from moekit.lm.config import LMConfig
from moekit.lm.model import LM
from moekit.train.loop import adamw_options

DEMO = {"dim": 128, "n_layers": 4, "n_heads": 4, "ffn_hidden": 512, "seq_len": 128, "batch_size": 16,
        "num_experts": 16, "top_k": 4, "lr": 3e-3}
ENV_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_")


def cpu_info() -> dict:
    """CPU model, the instruction-set flags that decide kernels, torch's capability and threads."""
    flags: set[str] = set()
    model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
    from moekit.ops.kernels import cpu_kernels

    return {
        "cpu_model": model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_flags_of_interest": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "openmp_env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
        "moekit_cpu_kernels": vars(cpu_kernels()),
    }


def build(kind: str, seed: int = 0) -> LM:
    torch.manual_seed(seed)
    moe = None
    if kind == "moe":
        moe = moe_config(dim=DEMO["dim"], num_experts=DEMO["num_experts"], top_k=DEMO["top_k"],
                         expert_hidden=DEMO["ffn_hidden"] // DEMO["top_k"], aux_loss_coef=0.01, z_loss_coef=1e-3)
    cfg = LMConfig(dim=DEMO["dim"], n_layers=DEMO["n_layers"], n_heads=DEMO["n_heads"],
                   ffn_hidden=DEMO["ffn_hidden"], max_seq_len=DEMO["seq_len"], moe=moe)
    return LM(cfg).train()


def make_step(model: LM, compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=DEMO["lr"], weight_decay=0.1, **adamw_options(device))
    params = list(model.parameters())

    def loss_of(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux_loss(model)

    fn = torch.compile(loss_of, fullgraph=True) if compiled else loss_of

    def step(ids: torch.Tensor, targets: torch.Tensor) -> None:
        fn(ids, targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_router_biases(model)

    return step


def measure(compiled: bool, repeats: int, steps: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    B, S, V = DEMO["batch_size"], DEMO["seq_len"], 257
    batches = [torch.randint(0, V, (B, S + 1), generator=gen).to(device) for _ in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {}
    for kind in ("dense", "moe"):
        model = build(kind).to(device)
        runs[kind] = (model, make_step(model, compiled))
    warm_start = time.perf_counter()
    for kind, (_, step) in runs.items():
        for i in range(3):  # compile, then settle the allocator
            b = batches[i % len(batches)]
            step(b[:, :-1], b[:, 1:])
    sync()
    warm_s = time.perf_counter() - warm_start
    times: dict[str, list[float]] = {"dense": [], "moe": []}
    ratios = []
    for r in range(repeats):
        per = {}
        for kind, (_, step) in runs.items():
            sync()
            start = time.perf_counter()
            for i in range(steps):
                b = batches[(r * steps + i) % len(batches)]
                step(b[:, :-1], b[:, 1:])
            sync()
            per[kind] = (time.perf_counter() - start) / steps * 1e3
            times[kind].append(per[kind])
        ratios.append(per["moe"] / per["dense"])
    tokens = B * S
    dense_ms, moe_ms = statistics.median(times["dense"]), statistics.median(times["moe"])
    calls = {kind: aten_calls(step, batches[0]) for kind, (_, step) in runs.items()}
    return {"mode": "compiled" if compiled else "eager", "dense_ms": round(dense_ms, 2), "moe_ms": round(moe_ms, 2),
            "dense_tok_s": round(tokens / dense_ms * 1e3), "moe_tok_s": round(tokens / moe_ms * 1e3),
            "moe_over_dense": round(statistics.median(ratios), 3),
            "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "dense_aten_calls": calls["dense"], "moe_aten_calls": calls["moe"],
            "warmup_s": round(warm_s, 1), "dense_ms_all": [round(t, 2) for t in times["dense"]],
            "moe_ms_all": [round(t, 2) for t in times["moe"]]}


def aten_calls(step: Callable[[torch.Tensor, torch.Tensor], None], batch: torch.Tensor) -> int:
    """aten operator calls (nested ones included) of one step, counted by torch.profiler: a measure of
    per-op overhead that a loaded machine does not blur."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(batch[:, :-1], batch[:, 1:])
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, eager only")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (median ratio reported)")
    p.add_argument("--steps", type=int, default=3, help="steps per model per repeat")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice, as a user gets it)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda (fused AdamW there)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lm_step.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    repeats = args.repeats or (5 if args.quick else 9)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = cpu_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info["device"] = str(device)
    info["loadavg_start"] = os.getloadavg()
    started = time.time()
    rows = []
    for compiled in (False, True) if not (args.quick or args.no_compile) else (False,):
        rows.append(measure(compiled, repeats, args.steps, device))
        print(f"{rows[-1]['mode']}: moe/dense {rows[-1]['moe_over_dense']}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    if len(rows) == 2:
        for kind in ("dense", "moe"):
            rows[1][f"{kind}_compiled_over_eager"] = round(rows[1][f"{kind}_ms"] / rows[0][f"{kind}_ms"], 3)
    print(f"{info['cpu_model']}  capability {info['torch_cpu_capability']}  threads {info['torch_threads']}  "
          f"OpenMP env {info['openmp_env'] or 'default'}  load {info['loadavg_start'][0]:.2f} -> "
          f"{info['loadavg_end'][0]:.2f}")
    print(f"{'mode':9} {'dense ms':>9} {'moe ms':>9} {'dense tok/s':>12} {'moe tok/s':>10} {'moe/dense':>10} {'range':>14} "
          f"{'aten calls dense/moe':>21}")
    for r in rows:
        print(f"{r['mode']:9} {r['dense_ms']:9.1f} {r['moe_ms']:9.1f} {r['dense_tok_s']:12d} {r['moe_tok_s']:10d} "
              f"{r['moe_over_dense']:10.3f} {str(r['ratio_min_max']):>14} "
              f"{r['dense_aten_calls']:>10d}/{r['moe_aten_calls']:<10d}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "lm_step", "command": " ".join(["python", *sys.argv]), "shapes": DEMO,
                               "repeats": repeats, "steps_per_repeat": args.steps, "machine": info, "rows": rows,
                               "wall_s": round(time.time() - started, 1)}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
