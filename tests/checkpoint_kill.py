"""SIGKILL campaign for checkpoint resume: kill a tiny training run at random moments, resume it,
and compare the finished run with an uninterrupted one bit for bit.

Run as a script (``python tests/checkpoint_kill.py OUT --kills 30 --seed 0``); it prints one JSON
summary. ``tests/test_checkpoint_kill.py`` runs it in a fresh interpreter and asserts on it.

The process imports torch once, sets one intra-op thread before any tensor op, builds one Trainer
(its optimizer imports torch._dynamo) and then forks one child per attempt, so an attempt costs no
import time (with one intra-op thread there is no thread pool to break by forking). Each kill is
one of:

* ``timer``: the parent sends SIGKILL after a uniform random delay within a full run's duration
  (fork to exit);
* ``write`` / ``fsync`` / ``replace`` / ``replaced``: the child kills itself (SIGKILL) at the n-th
  ``os.write`` (after writing half of its buffer), before the n-th ``os.fsync``, before or after the
  n-th ``os.replace``, with n drawn from the counts of a full run. These are the moments inside a
  checkpoint write, its fsync and its rename (and the pointer's and metrics' writes) that timers
  rarely hit.

After every kill the next child resumes from the run folder (the newest checkpoint that verifies,
or step 0 when none exists). When a child finishes, the run's final checkpoint (model and optimizer
tensors, optimizer settings, RNG and MoE state) and metrics.jsonl (every row, minus wall time) must
equal the uninterrupted run's, no temporary file may remain, and a fresh episode starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from moekit import moe_config  # noqa: E402
from moekit.data.corpus import TokenData, TokenSplit  # noqa: E402
from moekit.lm import LMConfig  # noqa: E402
from moekit.train import TrainConfig, Trainer  # noqa: E402
from moekit.train.checkpoint import checkpoints, load_checkpoint  # noqa: E402

OPS = ("write", "fsync", "replace", "replaced")
KINDS = ("timer", "write", "fsync", "timer", "replace", "replaced")  # cycled: every kind in every 6 attempts
STEPS = 12


def fake_data(n: int = 4000) -> TokenData:
    rng = np.random.default_rng(0)
    half = n // 2
    toks = np.concatenate([rng.integers(0, 8, half), rng.integers(100, 140, n - half)]).astype(np.uint16)
    labs = np.concatenate([np.zeros(half), np.ones(n - half)]).astype(np.int16)
    return TokenData(TokenSplit(toks, labs), TokenSplit(toks[::-1].copy(), labs[::-1].copy()), ["a", "b"], "byte", None)


def config(out_dir: Path) -> TrainConfig:
    model = LMConfig(vocab_size=257, dim=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=16,
                     moe=moe_config(dim=16, num_experts=4, expert_hidden=16, top_k=2, z_loss_coef=1e-3,
                                    router="noisy_topk"))
    return TrainConfig(model=model, seq_len=16, batch_size=4, steps=STEPS, warmup_steps=2, eval_every=4, ckpt_every=2,
                       eval_tokens=128, log_every=1, keep_checkpoints=2, out_dir=str(out_dir), progress=False,
                       tensorboard=False)


def _install_kill(op: str, n: int) -> None:
    """SIGKILL this process at the n-th call of ``op`` (see the module docstring)."""
    real = {"write": os.write, "fsync": os.fsync, "replace": os.replace}
    seen = {"k": 0}

    def hit() -> bool:
        seen["k"] += 1
        return seen["k"] == n

    if op == "write":
        def write(fd, data):  # type: ignore[no-untyped-def]
            if hit():
                real["write"](fd, bytes(data)[:max(1, len(data) // 2)])
                os.kill(os.getpid(), signal.SIGKILL)
            return real["write"](fd, data)
        os.write = write
    elif op == "fsync":
        def fsync(fd):  # type: ignore[no-untyped-def]
            if hit():
                os.kill(os.getpid(), signal.SIGKILL)
            return real["fsync"](fd)
        os.fsync = fsync
    else:
        def replace(src, dst):  # type: ignore[no-untyped-def]
            if op == "replace" and hit():
                os.kill(os.getpid(), signal.SIGKILL)
            real["replace"](src, dst)
            if op == "replaced" and hit():
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace


def _count_calls() -> dict[str, int]:
    counts = {"write": 0, "fsync": 0, "replace": 0}
    for name in counts:
        real = getattr(os, name)

        def counted(*a, _real=real, _name=name):  # type: ignore[no-untyped-def]
            counts[_name] += 1
            return _real(*a)
        setattr(os, name, counted)
    return counts


def _child(run: Path, data: TokenData, kill: tuple[str, int] | None, counts_file: Path | None) -> None:
    """Body of a forked attempt: resume if there is a checkpoint, train to the end, exit."""
    code = 0
    try:
        trainer = Trainer(config(run), data)
        if checkpoints(run / "checkpoints"):
            trainer.resume(run)
        counts = _count_calls() if counts_file is not None else None
        if kill is not None:
            _install_kill(*kill)
        trainer.fit()
        if counts is not None:
            counts_file.write_text(json.dumps(counts))
    except BaseException as err:  # report, then leave without running the parent's cleanup
        sys.stderr.write(f"attempt failed: {type(err).__name__}: {err}\n")
        code = 1
    finally:
        os._exit(code)


def _attempt(run: Path, data: TokenData, kill: tuple[str, int] | None = None, delay: float | None = None,
             counts_file: Path | None = None) -> str:
    """Fork one attempt; returns "done", "killed" or "failed"."""
    pid = os.fork()
    if pid == 0:
        _child(run, data, kill, counts_file)
    if delay is not None:
        end = time.perf_counter() + delay
        while time.perf_counter() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:  # finished before the timer
                return "done" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "done" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"


def _final_state(run: Path) -> dict:
    path = checkpoints(run / "checkpoints")[0]
    tensors, meta = load_checkpoint(path)
    m = dict(meta["meta"])
    m.pop("train_time")  # wall time
    m["config"] = {k: v for k, v in m["config"].items() if k != "out_dir"}
    return {"step": meta["step"], "tensors": tensors, "optim": meta["optim"], "moe": meta["moe"], "meta": m}


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _compare(run: Path, ref: Path) -> list[str]:
    """Differences between a finished run and the reference (empty when bit-identical)."""
    problems = []
    a, b = _final_state(run), _final_state(ref)
    if a["step"] != STEPS:
        problems.append(f"final checkpoint at step {a['step']}")
    if sorted(a["tensors"]) != sorted(b["tensors"]):
        problems.append("tensor names differ")
    problems += [f"tensor {k} differs" for k in b["tensors"]
                 if k in a["tensors"] and not torch.equal(a["tensors"][k], b["tensors"][k])]
    problems += [f"{k} differs" for k in ("optim", "moe", "meta") if a[k] != b[k]]
    if _rows(run) != _rows(ref):
        problems.append("metrics.jsonl rows differ")
    json.loads((run / "config.json").read_text())
    temps = [p.name for p in (*run.iterdir(), *(run / "checkpoints").iterdir()) if p.name.endswith(".tmp")]
    if temps:
        problems.append(f"temporary files left: {temps}")
    return problems


def campaign(out: Path, kills: int, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = fake_data()
    # Building the optimizer imports torch._dynamo (seconds): do it once here, not in every child.
    Trainer(config(out / "unused"), data)
    ref = out / "reference"
    start = time.perf_counter()
    assert _attempt(ref, data, counts_file=out / "counts.json") == "done", "the reference run failed"
    duration = time.perf_counter() - start
    counts = json.loads((out / "counts.json").read_text())
    counts["replaced"] = counts["replace"]
    rng = random.Random(seed)
    summary = {"kills": 0, "by_kind": {k: 0 for k in ("timer", *OPS)}, "episodes": 0, "resumes": 0,
               "bit_identical_episodes": 0, "kills_survived": 0, "failures": [],
               "reference_run_s": round(duration, 3)}
    episode, run, kills_in_episode = 0, out / "run0", 0
    attempts = 0
    while summary["kills"] < kills:
        kind = KINDS[attempts % len(KINDS)]
        attempts += 1
        if kind == "timer":
            outcome = _attempt(run, data, delay=rng.uniform(0.0, duration))
        else:
            outcome = _attempt(run, data, kill=(kind, rng.randint(1, max(1, counts[kind]))))
        if outcome == "killed":
            summary["kills"] += 1
            summary["by_kind"][kind] += 1
            kills_in_episode += 1
            summary["resumes"] += 1
            continue
        if outcome == "failed":
            summary["failures"].append(f"{run.name}: an attempt after {kills_in_episode} kill(s) failed")
        elif kills_in_episode:
            problems = _compare(run, ref)
            summary["failures"] += [f"{run.name}: {p}" for p in problems]
            summary["bit_identical_episodes"] += not problems
            summary["kills_survived"] += 0 if problems else kills_in_episode
            summary["episodes"] += 1
        # done or failed: the next kills go to a fresh run (a done without a kill: the timer came too
        # late or n was past the calls left)
        episode, kills_in_episode = episode + 1, 0
        run = out / f"run{episode}"
    while kills_in_episode:  # finish the last episode without kills
        outcome = _attempt(run, data)
        if outcome != "done":
            summary["failures"].append(f"{run.name}: the final resume ended {outcome}")
            break
        problems = _compare(run, ref)
        summary["failures"] += [f"{run.name}: {p}" for p in problems]
        summary["bit_identical_episodes"] += not problems
        summary["kills_survived"] += 0 if problems else kills_in_episode
        summary["episodes"] += 1
        kills_in_episode = 0
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.stdout.write(json.dumps(campaign(args.out, args.kills, args.seed)) + "\n")
