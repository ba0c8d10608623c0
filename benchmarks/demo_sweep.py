"""Sweep the demo's MoE design and training settings at equal tokens (issue 15).

Every job is one model of ``moekit demo``'s small size (``demo_configs``), with a ``DemoMoE`` and
any config fields overridden, trained for ``--steps`` steps by the same ``Trainer``; the job's row
is its final validation loss (the demo's 32,768 evaluation bytes) and its loss at the midpoint.
Workers run jobs from one queue, each with one CPU thread (``--cpu-workers``) or one CUDA device
(``--gpu-workers``, float32 like the demo); a job that fails on CUDA goes back to the CPU workers.

Stage 1 moves one lever at a time away from the base MoE; stage 2 combines the levers that
helped (greedy) and re-runs the best with more seeds and on the second corpus. Rows stream to
``--out`` (JSON lines) as they finish; ``--table`` prints a finished file as a table.

    python benchmarks/demo_sweep.py --out runs/sweep.jsonl --cpu-workers 15 --deadline 500
    python benchmarks/demo_sweep.py --table benchmarks/results/demo_sweep.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import time
import traceback
from pathlib import Path
from typing import Any

# The base MoE of stage 1: the demo's default before this sweep.
BASE_MOE = {"num_experts": 64, "top_k": 7, "shared_experts": 1, "balance": "aux", "aux_loss_coef": 0.01}
DENSE_LRS = (2e-3, 3e-3, 4.5e-3, 6e-3)
# The schedule every job starts from (the demo's before this sweep); a job's overrides replace it.
BASE_SCHEDULE = {"lr": 3e-3, "warmup_steps": 30}
# A lever joins stage 2's combinations when it beats the base by more than this (nats/byte, same seed).
MIN_GAIN = 0.003


def job(name: str, model: str, group: str, level: str, seed: int = 0, corpus: str = "polyglot",
        moe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run: ``moe`` = DemoMoE fields over BASE_MOE; ``overrides`` = dotted TrainConfig fields."""
    return {"name": name, "model": model, "group": group, "level": level, "seed": seed, "corpus": corpus,
            "moe": {**BASE_MOE, **(moe or {})} if model == "moe" else None,
            "overrides": {**BASE_SCHEDULE, **(overrides or {})}}


def stage1(second_corpus: str | None) -> list[dict[str, Any]]:
    """One lever at a time, seed 0 (the base and dense lr 3e-3 also seed 1)."""
    jobs = []
    for e, k, s in ((256, 7, 1), (128, 15, 1), (128, 14, 2), (128, 7, 1), (64, 8, 0), (64, 6, 2), (32, 3, 1)):
        jobs.append(job(f"{e} x {512 // (k + s)}, top-{k} + {s} shared", "moe", "shape", f"{e}/{k}/{s}",
                        moe={"num_experts": e, "top_k": k, "shared_experts": s}))
    jobs += [job("base", "moe", "base", "base"), job("base seed 1", "moe", "seed", "1", seed=1)]
    r = "model.moe.router."
    jobs += [job(f"lr {lr:g}", "moe", "lr", f"{lr:g}", overrides={"lr": lr}) for lr in (2e-3, 4.5e-3, 6e-3)]
    jobs += [job(f"routed scale {s:g}", "moe", "scale", f"{s:g}", overrides={r + "routed_scaling_factor": s})
             for s in (2.5, 4.0, 7.0)]
    jobs += [job("top-k weights not renormalised", "moe", "norm", "off", overrides={r + "norm_topk_prob": False}),
             job("aux 0.001", "moe", "aux", "0.001", moe={"aux_loss_coef": 1e-3}),
             job("aux 0.03", "moe", "aux", "0.03", moe={"aux_loss_coef": 3e-2}),
             job("bias balancing 1e-3", "moe", "aux", "bias", moe={"balance": "bias"}),
             job("no z-loss", "moe", "z", "0", overrides={"model.moe.balance.z_loss_coef": 0.0}),
             job("no weight decay", "moe", "wd", "0", overrides={"weight_decay": 0.0}),
             job("warm-up 100", "moe", "warmup", "100", overrides={"warmup_steps": 100}),
             job("layer 0 dense", "moe", "layers", "1-3", overrides={"model.moe_layers": [1, 2, 3]})]
    jobs += [job(f"dense lr {lr:g}", "dense", "lr", f"{lr:g}", overrides={"lr": lr}) for lr in DENSE_LRS]
    jobs.append(job("dense lr 0.003 seed 1", "dense", "seed", "1", seed=1, overrides={"lr": 3e-3}))
    if second_corpus:
        jobs += [job("dense lr 0.003", "dense", "corpus2", "dense", corpus=second_corpus, overrides={"lr": 3e-3}),
                 job("base", "moe", "corpus2", "base", corpus=second_corpus)]
    return jobs


def stage2(rows: list[dict[str, Any]], second_corpus: str | None) -> list[dict[str, Any]]:
    """Combine every stage-1 lever that beat the base (its best level), try the combination at
    three learning rates, and re-run the best pieces with seed 1 and on the second corpus."""
    by_name = {r["name"]: r for r in rows if r.get("loss") is not None and r["corpus"] == "polyglot"}
    base = by_name.get("base")
    jobs: list[dict[str, Any]] = []
    dense = [r for r in by_name.values() if r["model"] == "dense" and r["group"] == "lr"]
    best_dense_lr = min(dense, key=lambda r: r["loss"])["overrides"]["lr"] if dense else 3e-3
    if base is None:
        return jobs
    winners: dict[str, dict[str, Any]] = {}
    for r in by_name.values():
        if r["model"] != "moe" or r["group"] in ("base", "seed") or r["loss"] > base["loss"] - MIN_GAIN:
            continue
        if r["group"] not in winners or r["loss"] < winners[r["group"]]["loss"]:
            winners[r["group"]] = r
    ranked = sorted(winners.values(), key=lambda r: r["loss"])
    best_moe_lr = winners["lr"]["overrides"]["lr"] if "lr" in winners else 3e-3

    def merge(parts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        moe, over = dict(BASE_MOE), {}
        for p in parts:
            moe.update({k: v for k, v in p["moe"].items() if v != BASE_MOE.get(k)})
            over.update(p["overrides"])
        return moe, over

    levers = [p for p in ranked if p["group"] != "lr"]
    seen = {json.dumps([r["moe"], r["overrides"]], sort_keys=True) for r in rows}
    for n in range(1, min(3, len(levers)) + 1):
        moe, over = merge(levers[:n])
        label = " + ".join(p["name"] for p in levers[:n])
        for lr in sorted({3e-3, best_moe_lr, 6e-3}):
            key = json.dumps([moe, {**over, "lr": lr}], sort_keys=True)
            if key in seen or (n == 1 and lr == 3e-3):
                continue
            seen.add(key)
            jobs.append(job(f"{label}, lr {lr:g}", "moe", "combo", f"{n}", moe=moe, overrides={**over, "lr": lr}))
    best = ranked[:2]
    for p in best:
        jobs.append(job(p["name"] + " seed 1", "moe", "seed", "1", seed=1, moe=p["moe"], overrides=p["overrides"]))
    jobs.append(job(f"dense lr {best_dense_lr:g} seed 1", "dense", "seed", "1", seed=1,
                    overrides={"lr": best_dense_lr}))
    if second_corpus and best:
        p = best[0]
        jobs.append(job(p["name"], "moe", "corpus2", p["name"], corpus=second_corpus, moe=p["moe"],
                        overrides=p["overrides"]))
        if best_dense_lr != 3e-3:
            jobs.append(job(f"dense lr {best_dense_lr:g}", "dense", "corpus2", "dense", corpus=second_corpus,
                            overrides={"lr": best_dense_lr}))
    return [j for j in jobs if j["name"] not in by_name]


def confirm(rows: list[dict[str, Any]], second_corpus: str | None) -> list[dict[str, Any]]:
    """Stage 3: the best MoE and the best dense (polyglot, seed 0) with seeds 1 and 2 and on the
    second corpus, where not run yet."""
    done = {(r["name"], r["seed"], r["corpus"]) for r in rows}
    jobs = []
    for model in ("moe", "dense"):
        cands = [r for r in rows if r.get("loss") is not None and r["model"] == model and r["seed"] == 0
                 and r["corpus"] == "polyglot"]
        if not cands:
            continue
        best = min(cands, key=lambda r: r["loss"])
        for seed, corpus in ((1, "polyglot"), (2, "polyglot"), (0, second_corpus), (1, second_corpus)):
            if corpus and (best["name"], seed, corpus) not in done:
                jobs.append(job(best["name"], model, "confirm", model, seed=seed, corpus=corpus, moe=best["moe"],
                                overrides=best["overrides"]))
    return jobs


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    for p in path:
        d = d[p]
    d[last] = value


def build_config(spec: dict[str, Any], steps: int, data_dir: str, out_root: str, device: str) -> Any:
    """The TrainConfig of one job: the demo's small model with the job's MoE and overrides."""
    from moekit.cli.demo import DemoMoE, demo_configs
    from moekit.train import TrainConfig

    moe = DemoMoE(**spec["moe"]) if spec["moe"] else DemoMoE()
    cfg = demo_configs("small", Path(out_root), data_dir, moe, steps, spec["seed"], spec["corpus"])[spec["model"]]
    d = cfg.to_dict()
    d.update(eval_every=max(1, steps // 2), tensorboard=False, progress=False, device=device,
             out_dir=str(Path(out_root) / f"{os.getpid()}_{abs(hash(spec['name'])) % 10**8}"))
    for key, value in spec["overrides"].items():
        set_dotted(d, key, value)
    return TrainConfig.from_dict(d)


def run_job(spec: dict[str, Any], steps: int, data_dir: str, out_root: str, device: str,
            cache: dict[str, Any]) -> dict[str, Any]:
    import shutil

    import torch

    from moekit.data.prepare import prepare_corpus
    from moekit.train import Trainer

    cfg = build_config(spec, steps, data_dir, out_root, device)
    if spec["corpus"] not in cache:
        cache[spec["corpus"]] = prepare_corpus(spec["corpus"], data_dir, "byte", build=False)
    trainer = Trainer(cfg, cache[spec["corpus"]])
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    summary = trainer.model.param_summary()
    mid = [e["loss"] for e in trainer.evals if e["step"] == steps // 2]
    last = trainer.history[-10:]
    return {**spec, "steps": steps, "tokens": trainer.tokens_seen, "loss": trainer.evals[-1]["loss"],
            "loss_mid": mid[0] if mid else None, "per_label": trainer.evals[-1]["per_label"],
            "train_loss_last10": sum(h["loss"] for h in last) / len(last),
            "aux_last10": sum(h["aux"] for h in last) / len(last),
            "total_params": summary["total_params"], "active_params": summary["active_params"],
            "lr": cfg.lr, "train_s": trainer.train_time, "wall_s": wall, "device": device,
            "threads": torch.get_num_threads()}


def worker(device: str, jobs: Any, results: Any, steps: int, data_dir: str, out_root: str) -> None:
    import torch

    torch.set_num_threads(1)
    cache: dict[str, Any] = {}
    while True:
        spec = jobs.get()
        if spec is None:
            return
        try:
            results.put(run_job(spec, steps, data_dir, out_root, device, cache))
        except Exception:
            err = traceback.format_exc()
            if device != "cpu":
                jobs.put(spec)  # a CUDA failure: a CPU worker takes the job, this worker stops
                results.put({**spec, "loss": None, "error": err, "device": device, "requeued": True})
                return
            results.put({**spec, "loss": None, "error": err, "device": device})


def machine() -> dict[str, Any]:
    import torch

    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": flags.split(":")[-1].strip(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "threads_per_run": 1,
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_"))}}


def sweep(args: argparse.Namespace) -> None:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    jobs = manager.Queue()
    results = manager.Queue()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline
    procs = [ctx.Process(target=worker, args=(dev, jobs, results, args.steps, args.data_dir, args.work_dir))
             for dev, n in (("cuda", args.gpu_workers), ("cpu", args.cpu_workers)) for _ in range(n)]
    for p in procs:
        p.start()
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"machine": machine(), "steps": args.steps, "started": time.time()}) + "\n")
    rows: list[dict[str, Any]] = []
    plan = stage1(args.second_corpus) if args.stage1 else []
    if args.plan:
        plan = [job(**spec) for spec in json.loads(Path(args.plan).read_text(encoding="utf-8"))]
    pending = 0

    def submit(batch: list[dict[str, Any]]) -> int:
        for spec in batch:
            jobs.put(spec)
        return len(batch)

    pending += submit(plan)
    stage = 1
    while time.monotonic() < deadline:
        if pending == 0:
            if stage >= args.stages:
                break
            stage += 1
            more = stage2(rows, args.second_corpus) if stage == 2 else confirm(rows, args.second_corpus)
            print(f"stage {stage}: {len(more)} jobs", flush=True)
            pending += submit(more)
            continue
        try:
            row = results.get(timeout=2.0)
        except queue.Empty:
            continue
        if not row.get("requeued"):
            pending -= 1
        row["stage"] = stage
        rows.append(row)
        with out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        loss = "error" if row.get("loss") is None else f"{row['loss']:.4f}"
        print(f"[{time.monotonic() - deadline + args.deadline:6.0f}s] {row['corpus']:>8} {row['model']:5} "
              f"{row['name']:<55} {loss} ({row.get('train_s', 0):.0f}s {row['device']})", flush=True)
    for _ in procs:
        jobs.put(None)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()


def table(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "name" in r and r.get("loss") is not None]
    dense = {}
    for r in rows:
        if r["model"] == "dense":
            key = (r["corpus"], r["seed"])
            dense[key] = min(dense.get(key, math.inf), r["loss"])
    print("| stage | corpus | model | run | seed | device | active | total | loss | vs best dense (same seed) |")
    print("| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in sorted(rows, key=lambda r: (r["corpus"], r["model"] != "dense", r["loss"])):
        d = dense.get((r["corpus"], r["seed"]))
        gain = "" if d is None or r["model"] == "dense" else f"{100 * (r['loss'] / d - 1):+.2f}%"
        print(f"| {r.get('stage', '')} | {r['corpus']} | {r['model']} | {r['name']} | {r['seed']} | {r['device']} | "
              f"{r['active_params']:,} | {r['total_params']:,} | {r['loss']:.4f} | {gain} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo_sweep.jsonl")
    ap.add_argument("--table", help="print the rows of a finished sweep file as a table and exit")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--cpu-workers", type=int, default=1)
    ap.add_argument("--gpu-workers", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=3600, help="stop waiting after this many seconds")
    ap.add_argument("--data-dir", default="data_cache")
    ap.add_argument("--work-dir", default="runs/demo_sweep_work")
    ap.add_argument("--second-corpus", default="system")
    ap.add_argument("--no-stage1", dest="stage1", action="store_false")
    ap.add_argument("--plan", help="a JSON list of job() keyword sets to run instead of stage 1")
    ap.add_argument("--stages", type=int, default=3, help="stop after this stage (1: the plan alone)")
    args = ap.parse_args()
    if args.table:
        table(args.table)
        return
    sweep(args)


if __name__ == "__main__":
    main()
