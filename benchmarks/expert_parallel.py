"""Benchmark of the expert-parallel MoE layer at EP = 1, 2, 4 processes on this machine (gloo on
loopback, one thread per process): time per layer forward split into routing, the dispatch
all-to-all (count exchange + tokens), expert compute, the combine all-to-all and the combine,
plus bytes each rank sends per forward; and a forward+backward step.

Shape legend: T tokens per rank, D model dim, E experts, K top-k, F expert hidden.

Weak scaling: every rank brings T tokens (the global batch grows with EP), so expert compute per
rank stays about T*K rows. Baseline, in the EP=1 process: the plain single-process ``MoE`` layer
on the same T tokens; ratios are against it. Loopback gloo on a shared 2-core CPU is a stand-in
for a real interconnect: it shows the code path's overheads and the bytes, not GPU timings (see
docs/scaling.md for the model of a real cluster).

Run ``python benchmarks/expert_parallel.py`` (about a minute); prints a table, writes
benchmarks/results/expert_parallel.json. ``--device cuda --ep 1`` runs the layer's EP path
under NCCL on one GPU (world size 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import MoE
from moekit.parallel import shard_moe
from moekit.parallel.groups import build_groups
from moekit.parallel.testing import free_port

PHASES = ["routing", "permute", "all_to_all_dispatch", "experts", "all_to_all_combine", "combine", "losses_stats"]


def _time(fn, iters: int, sync) -> list[float]:
    out = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups = build_groups(world, timeout_s=120.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    kw = dict(dim=args.dim, num_experts=args.experts, expert_hidden=args.hidden, top_k=args.top_k,
              aux_loss_coef=0.01, check_finite=False)
    plain = MoE(**kw).to(device)
    layer = shard_moe(MoE(**kw).to(device), groups)
    torch.manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.dim, device=device)
    result: dict = {"rank": rank}

    def fwd(module):
        return lambda: module(x)

    def step(module):
        def run():
            xg = x.detach().requires_grad_(True)
            (module(xg).square().mean() + module.aux_loss).backward()
        return run

    for _ in range(args.warmup):
        fwd(layer)()
        step(layer)()
    layer.profile = {}
    fwd_times = _time(fwd(layer), args.iters, sync)
    profile, layer.profile = layer.profile, None
    result["forward_s"] = statistics.median(fwd_times)
    result["phases_s"] = {k: profile.get(k, 0.0) / args.iters for k in PHASES}
    result["bytes_sent"] = profile.get("bytes_sent", 0.0) / args.iters
    result["step_s"] = statistics.median(_time(step(layer), args.iters, sync))
    if world == 1:
        for _ in range(args.warmup):
            fwd(plain)()
        result["plain_forward_s"] = statistics.median(_time(fwd(plain), args.iters, sync))
        result["plain_step_s"] = statistics.median(_time(step(plain), args.iters, sync))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out_dir, f"ep{world}.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def summarize(per_rank: list[dict]) -> dict:
    """Mean over ranks of each phase; the forward time is the slowest rank's (the layer waits for it)."""
    phases = {k: statistics.mean(r["phases_s"][k] for r in per_rank) for k in PHASES}
    comm = phases["all_to_all_dispatch"] + phases["all_to_all_combine"]
    total = sum(phases.values())
    return {"forward_s": max(r["forward_s"] for r in per_rank), "step_s": max(r["step_s"] for r in per_rank),
            "phases_s": phases, "comm_share": comm / total if total else 0.0,
            "bytes_sent_per_rank": statistics.mean(r["bytes_sent"] for r in per_rank),
            "per_rank": per_rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", dest="top_k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "expert_parallel.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and max(args.ep) > torch.cuda.device_count():
        parser.error(f"--ep {max(args.ep)} needs that many GPUs; this machine has {torch.cuda.device_count()}")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.ep:
            mp.spawn(worker, args=(ep, free_port(), args, tmp), nprocs=ep, join=True)
            rows[ep] = summarize(json.loads(Path(tmp, f"ep{ep}.json").read_text()))
    base = rows[min(rows)]["per_rank"][0]
    baseline = base.get("plain_forward_s")

    head = ["EP", "fwd ms", "vs plain", "routing", "a2a disp.", "experts", "a2a comb.", "combine", "loss+stats",
            "comm %", "MB sent/rank", "fwd+bwd ms"]
    print(f"T={args.tokens}/rank D={args.dim} F={args.hidden} E={args.experts} K={args.top_k}, device {args.device}, "
          f"{os.cpu_count()} CPUs; per-phase ms are means over ranks")
    if baseline:
        print(f"plain single-process MoE layer: forward {baseline * 1e3:.1f} ms, fwd+bwd {base['plain_step_s'] * 1e3:.1f} ms")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for ep, r in rows.items():
        p = r["phases_s"]
        ratio = f"{r['forward_s'] / baseline:.2f}x" if baseline else "-"
        cells = [str(ep), f"{r['forward_s'] * 1e3:.1f}", ratio, f"{p['routing'] * 1e3:.1f}",
                 f"{p['all_to_all_dispatch'] * 1e3:.1f}", f"{p['experts'] * 1e3:.1f}",
                 f"{p['all_to_all_combine'] * 1e3:.1f}", f"{(p['combine'] + p['permute']) * 1e3:.1f}",
                 f"{p['losses_stats'] * 1e3:.1f}", f"{r['comm_share']:.0%}", f"{r['bytes_sent_per_rank'] / 1e6:.2f}",
                 f"{r['step_s'] * 1e3:.1f}"]
        print("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "machine": {"platform": platform.platform(),
                                                                 "cpus": os.cpu_count(), "torch": torch.__version__},
                               "plain_forward_s": baseline, "plain_step_s": base.get("plain_step_s"),
                               "ep": {str(k): v for k, v in rows.items()}}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
