"""Benchmark: a LoRA fine-tuning step against a full fine-tuning step of the demo MoE model.

The model and step are benchmarks/lm_step.py's (demo size small: dim 128, 4 layers, 16 experts of
hidden 128, top-4, batch 16 x 128 tokens; forward, loss + balancing losses, backward, clipping,
AdamW). Variants, each its own model from the same seed:

  full            every parameter trains
  lora_experts    moekit.adapters.apply_lora: rank-8 adapters on every expert's stacked weights
  lora_all        the same plus the routers and attention q/k/v/o
  parametrize     the same expert update through torch.nn.utils.parametrize: the parametrized
                  module is a generated subclass, so the layer leaves the fused expert op for the
                  plain composition (permute, grouped products, combine; ``fused_path`` false)
  *_composition   full and lora_experts with the experts made a trivial subclass, so they too run
                  the plain composition: the fair baseline for ``parametrize``

Times are interleaved (each repeat runs a few steps of every variant) and each ratio to ``full``
is the median of per-repeat ratios, so machine load mostly cancels. torch's default threads and
the user's OpenMP environment; the JSON records both, the CPU flags and the load average.

    python benchmarks/lora_step.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).parent))
from lm_step import DEMO, build, cpu_info  # noqa: E402

from moekit import aux_loss  # noqa: E402
from moekit.adapters import LoraConfig, apply_lora, count_lora_parameters  # noqa: E402
from moekit.dispatch.run import kernel_weights  # noqa: E402
from moekit.layer import MoE  # noqa: E402

RANK = 8


class LowRankUpdate(nn.Module):
    """parametrize's form of the same update: W -> W + s * B @ A, A (E, r, Y), B (E, X, r)."""

    def __init__(self, w: torch.Tensor, rank: int, scale: float) -> None:
        super().__init__()
        E, X, Y = w.shape
        self.scale = scale
        self.A = nn.Parameter(torch.randn(E, rank, Y) / Y**0.5)
        self.B = nn.Parameter(torch.zeros(E, X, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * torch.matmul(self.B, self.A)


def variant(kind: str) -> tuple[nn.Module, list[nn.Parameter]]:
    model = build("moe")
    if kind.endswith("_composition"):
        kind = kind.removesuffix("_composition")
        for layer in (m for m in model.modules() if isinstance(m, MoE)):
            layer.experts.__class__ = type("Composition" + type(layer.experts).__name__, (type(layer.experts),), {})
    if kind == "full":
        return model, list(model.parameters())
    if kind == "parametrize":
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in (m for m in model.modules() if isinstance(m, MoE)):
            for name in ("gate_up_proj", "down_proj"):
                parametrize.register_parametrization(layer.experts, name,
                                                     LowRankUpdate(getattr(layer.experts, name), RANK, 2.0))
        return model, [p for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"] if kind == "lora_all" else []
    apply_lora(model, LoraConfig(rank=RANK, alpha=2.0 * RANK, router=kind == "lora_all", attention=attention))
    return model, [p for p in model.parameters() if p.requires_grad]


def make_step(model: nn.Module, params: list[nn.Parameter]) -> Callable[[torch.Tensor], None]:
    opt = torch.optim.AdamW(params, lr=DEMO["lr"], weight_decay=0.0)

    def step(batch: torch.Tensor) -> None:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)) + aux_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 repeats of 2 steps")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_step.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, steps = (3, 2) if args.quick else (args.repeats, 3)
    kinds = ["full", "lora_experts", "lora_all", "full_composition", "lora_experts_composition", "parametrize"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 257, (DEMO["batch_size"], DEMO["seq_len"] + 1), generator=gen) for _ in range(4)]
    runs, info = {}, {}
    for kind in kinds:
        model, params = variant(kind)
        layer = next(m for m in model.modules() if isinstance(m, MoE))
        fused = kernel_weights(layer.experts, torch.zeros(1, DEMO["dim"])) is not None
        trainable = sum(p.numel() for p in params)
        info[kind] = {"trainable_params": trainable, "adam_state_mib": round(2 * 4 * trainable / 2**20, 3),
                      "fused_path": fused}
        if kind.startswith("lora"):
            assert count_lora_parameters(model) == trainable
        runs[kind] = make_step(model, params)
    load_before = os.getloadavg()
    for kind, step in runs.items():
        for i in range(2):
            step(batches[i])
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        for kind, step in runs.items():
            start = time.perf_counter()
            for i in range(steps):
                step(batches[(r * steps + i) % len(batches)])
            times[kind].append((time.perf_counter() - start) / steps * 1e3)
    rows = {}
    for kind in kinds:
        ratios = [t / f for t, f in zip(times[kind], times["full"])]
        base = "full_composition" if kind in ("lora_experts_composition", "parametrize") else "full"
        same_path = [t / f for t, f in zip(times[kind], times[base])]
        rows[kind] = {**info[kind], "step_ms": round(statistics.median(times[kind]), 1),
                      "over_full": round(statistics.median(ratios), 3),
                      "over_full_same_path": round(statistics.median(same_path), 3),
                      "step_ms_all": [round(t, 1) for t in times[kind]]}
    result = {"benchmark": "lora_step", "command": " ".join(["python", *sys.argv]), "shapes": DEMO, "rank": RANK,
              "repeats": repeats, "steps_per_repeat": steps, "load_avg_before": load_before,
              "load_avg_after": os.getloadavg(), "system": cpu_info(), "variants": rows}
    print(f"{'variant':25} {'trainable':>10} {'Adam MiB':>9} {'fused':>6} {'step ms':>8} {'/ full':>7} "
          f"{'/ full, same path':>18}")
    for kind, row in rows.items():
        print(f"{kind:25} {row['trainable_params']:>10,} {row['adam_state_mib']:>9} {str(row['fused_path']):>6} "
              f"{row['step_ms']:>8} {row['over_full']:>7} {row['over_full_same_path']:>18}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
