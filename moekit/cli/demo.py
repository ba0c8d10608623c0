"""`moekit demo`: build a corpus (the polyglot corpus by default, or the user's), train a dense
model and an MoE model with the same active parameters per token on the same tokens, and write
``runs/demo/`` with summary.json, report.html (plots embedded) and a terminal summary.

The MoE replaces each dense SwiGLU block of hidden F with E routed experts of hidden
h = F / (k + s), top-k, plus s shared experts of hidden h that every token passes through
(DeepSeekMoE), so both models spend the same matmul FLOPs per token (the router adds D * E per
layer); the MoE holds (E + s) / (k + s) times the feed-forward parameters.

The comparison reads the models' validation curves: at equal tokens, at equal wall-clock, and
where the MoE's curve (interpolated linearly in wall-clock) first reaches dense's final loss.
With several seeds the seed-to-seed spread says whether a difference is beyond noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import NONNEGATIVE_INT, NONNEGATIVE_NUMBER, POSITIVE_INT, number_in

# What a previous demo leaves in its --out-dir; anything else there is not ours to delete.
DEMO_OUTPUTS = {"dense", "moe", "summary.json", "report.html", "report.html.tmp"}
SEED_RUN = re.compile(r"(dense|moe)_seed\d+")

SIZES: dict[str, dict[str, Any]] = {
    # About ten minutes on two CPU cores, corpus build included.
    # lr and warm-up: dense's best of the sweep in docs/training.md ("The full-budget sweep").
    "small": {"dim": 128, "n_layers": 4, "n_heads": 4, "ffn_hidden": 512, "seq_len": 128, "batch_size": 16,
              "steps": 600, "eval_every": 50, "eval_tokens": 32768, "lr": 2e-3, "warmup_steps": 100},
    # Seconds: for tests and a quick look.
    "tiny": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden": 64, "seq_len": 32, "batch_size": 4,
             "steps": 8, "eval_every": 4, "eval_tokens": 1024, "lr": 3e-3, "warmup_steps": 2},
}

# Seed-to-seed spread (max - min of the final validation loss over seeds 0 and 1, nats/byte)
# measured once on the polyglot corpus; used when a demo runs one seed. None: not measured.
STORED_SEED_SPREAD: dict[str, dict[str, float] | None] = {"small": {"dense": 0.0008, "moe": 0.0117}, "tiny": None}
STORED_SEED_SPREAD_SOURCE = ("stored: seeds 0 and 1 at the full 600 steps, the default MoE 64 x 64 top-7 + 1 shared "
                             "and dense (lr 3e-3), 100 warm-up steps (docs/training.md, the full-budget sweep)")

# The targets: MoE loss >= 5% below dense at equal tokens; MoE reaches dense's final loss
# in <= 0.8x dense's training time; active parameters equal within 5%.
TARGETS = {"equal_tokens_gain": 0.05, "time_to_dense_loss": 0.8, "active_params_tolerance": 0.05}


@dataclass
class DemoMoE:
    """The demo MoE's design, on top of the size's dense model.

    ``balance``: "aux" (the Switch load-balancing loss, ``aux_loss_coef``) or "bias" (DeepSeek-V3's
    aux-loss-free per-expert bias, ``bias_update_rate``); ``z_loss_coef``: the ST-MoE router z-loss.
    ``lr``/``warmup_steps`` None: dense's."""

    # 64 experts of hidden 64, top-7 + 1 shared, lr 3e-3: the best equal-token loss of the sweeps in
    # docs/training.md ("Choosing the MoE", "The full-budget sweep"); the MoE keeps dense's warm-up.
    num_experts: int = 64
    top_k: int = 7
    shared_experts: int = 1
    balance: str = "aux"
    aux_loss_coef: float = 0.01
    bias_update_rate: float = 1e-3
    z_loss_coef: float = 1e-3
    lr: float | None = 3e-3
    warmup_steps: int | None = None

    def expert_hidden(self, ffn_hidden: int) -> int:
        """Hidden size of each routed and shared expert: ffn_hidden / (top_k + shared_experts)."""
        from ..config import ConfigError

        active = self.top_k + self.shared_experts
        if ffn_hidden % active:
            raise ConfigError(f"--top-k {self.top_k} + --shared-experts {self.shared_experts} = {active} does not "
                              f"divide ffn_hidden={ffn_hidden} (expert hidden = ffn_hidden / (top_k + shared))")
        return ffn_hidden // active

    def describe(self, ffn_hidden: int) -> str:
        h = self.expert_hidden(ffn_hidden)
        shared = f" + {self.shared_experts} shared" if self.shared_experts else ""
        bal = f"aux loss {self.aux_loss_coef:g}" if self.balance == "aux" else f"bias balancing {self.bias_update_rate:g}"
        return f"{self.num_experts} x SwiGLU {h}, top-{self.top_k}{shared}, {bal}"


def demo_configs(size: str, out_dir: Path, data_dir: str, moe: DemoMoE | None = None, steps: int | None = None,
                 seed: int = 0, corpus: str = "polyglot", suffix: str = "") -> dict[str, Any]:
    """{"dense": TrainConfig, "moe": TrainConfig} with equal active parameters per token; run
    folders ``out_dir/dense{suffix}`` and ``out_dir/moe{suffix}``."""
    from ..config import ConfigError, moe_config
    from ..lm.config import LMConfig
    from ..train import TrainConfig

    moe = moe or DemoMoE()
    if moe.balance not in ("aux", "bias"):
        raise ConfigError(f"--balance {moe.balance!r} is not one of ['aux', 'bias']")
    s = SIZES[size]
    h = moe.expert_hidden(s["ffn_hidden"])
    if moe.top_k > moe.num_experts:
        raise ConfigError(f"--top-k {moe.top_k} exceeds --num-experts {moe.num_experts}")
    common_model = {k: s[k] for k in ("dim", "n_layers", "n_heads", "ffn_hidden")}
    common_train = {k: s[k] for k in ("seq_len", "batch_size", "eval_every", "eval_tokens", "lr", "warmup_steps")}
    common_train.update(steps=steps or s["steps"], data_dir=data_dir, corpus=corpus, seed=seed,
                        ckpt_every=10**9, threads=None, tensorboard=True)
    shared = {"shared_experts": moe.shared_experts, "shared_expert_hidden": moe.shared_experts * h} \
        if moe.shared_experts else {}
    balance = ({"aux_loss_coef": moe.aux_loss_coef} if moe.balance == "aux"
               else {"aux_loss_coef": 0.0, "bias_update_rate": moe.bias_update_rate})
    moe_cfg = moe_config(dim=s["dim"], num_experts=moe.num_experts, expert_hidden=h, top_k=moe.top_k,
                         z_loss_coef=moe.z_loss_coef, **balance, **shared)
    moe_train = {**common_train, "lr": moe.lr or s["lr"],
                 "warmup_steps": s["warmup_steps"] if moe.warmup_steps is None else moe.warmup_steps}
    return {
        "dense": TrainConfig(model=LMConfig(max_seq_len=s["seq_len"], **common_model),
                             out_dir=str(out_dir / f"dense{suffix}"), **common_train),
        "moe": TrainConfig(model=LMConfig(max_seq_len=s["seq_len"], moe=moe_cfg, **common_model),
                           out_dir=str(out_dir / f"moe{suffix}"), **moe_train),
    }


def interpolate(evals: list[dict[str, Any]], x: str, at: float) -> float | None:
    """Validation loss at ``x == at`` by linear interpolation between evals (None if outside)."""
    pts = [(e[x], e["loss"]) for e in evals]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return None


def first_reach(evals: list[dict[str, Any]], x: str, target: float) -> float | None:
    """The first ``x`` (tokens or time_s) at which the eval curve falls to ``target``, linearly
    interpolated between the two evals around the crossing (None if it never does)."""
    pts = [(e[x], e["loss"]) for e in evals]
    if pts and pts[0][1] <= target:
        return pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y1 <= target < y0:
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def label_expert_mi(counts_NE: list[list[float]]) -> float:
    """Mutual information (nats) between a token's label and the experts it picks: 0 when every
    label uses the experts alike, up to ln E when each label has its own experts."""
    total = sum(map(sum, counts_NE))
    if total == 0:
        return 0.0
    row = [sum(r) / total for r in counts_NE]
    col = [sum(r[e] for r in counts_NE) / total for e in range(len(counts_NE[0]))]
    mi = 0.0
    for i, r in enumerate(counts_NE):
        for e, c in enumerate(r):
            if c > 0:
                p = c / total
                mi += p * math.log(p / (row[i] * col[e]))
    return mi


def label_entropy(counts_NE: list[list[float]]) -> float:
    """Entropy (nats) of the label of a pick: the most ``label_expert_mi`` can reach besides ln E."""
    total = sum(map(sum, counts_NE))
    rows = [sum(r) / total for r in counts_NE] if total else []
    return -sum(p * math.log(p) for p in rows if p > 0)


def train_one(name: str, cfg: Any, data: Any) -> dict[str, Any]:
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..lm.generate import generate
    from ..train import Trainer

    start = time.perf_counter()
    load_before = _load_average()
    trainer = Trainer(cfg, data)
    print(f"\n== {name}: {trainer.model.num_params():,} parameters, {trainer.model.num_active_params():,} active "
          f"per token, {cfg.steps} steps x {cfg.tokens_per_step} tokens, lr {cfg.lr:g}, seed {cfg.seed}")
    trainer.fit()
    wall = time.perf_counter() - start
    final = trainer.evals[-1]
    tok = load_tokenizer(cfg.tokenizer)
    prompt = "The "
    out = generate(trainer.model, torch.tensor([tok.encode(prompt)]), 160, temperature=0.7, top_p=0.9, seed=0)
    summary = trainer.model.param_summary()
    result = {
        "name": name, "seed": cfg.seed, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
        "total_params": summary["total_params"], "active_params": summary["active_params"],
        "flops_per_token": summary["flops_per_token"], "moe_layers": summary["moe_layers"],
        "tokens": trainer.tokens_seen, "train_time_s": trainer.train_time, "wall_clock_s": wall,
        "tokens_per_s": trainer.tokens_seen / trainer.train_time,
        "final_val_loss": final["loss"], "final_val_loss_per_label": final["per_label"],
        "sample_prompt": prompt, "sample": tok.decode(out[0].tolist()),
        "evals": trainer.evals,
        # Other processes on the machine slow both runs; timings are comparable only under similar load.
        "load_average_1min": {"start": load_before, "end": _load_average()},
    }
    if summary["moe_layers"]:
        result["experts"] = {
            layer: {"utilisation": r["utilization"], "dropped_fraction": r["dropped_fraction"],
                    "routing_entropy": r["mean_entropy"], "max_entropy": r["max_entropy"],
                    "max_over_mean_load": r["max_over_mean_load"],
                    "label_expert_mutual_information": label_expert_mi(final["routing_by_label"][layer]),
                    "label_entropy": label_entropy(final["routing_by_label"][layer]),
                    "top_experts_per_label": {
                        lab: sorted(range(len(row)), key=lambda e: -row[e])[:2]
                        for lab, row in zip(data.label_names, final["routing_by_label"][layer]) if sum(row) > 0}}
            for layer, r in final["routing"].items()}
    return result


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------- comparison
def compare(dense: dict[str, Any], moe: dict[str, Any]) -> dict[str, Any]:
    """One dense/MoE pair (same seed). Equal tokens: final losses. Equal wall-clock: the slower
    model's loss when the faster finished. Time to dense's loss: where the MoE's eval curve,
    interpolated in wall-clock, first reaches dense's final loss, as a fraction of dense's time."""
    fast, slow = (dense, moe) if dense["train_time_s"] <= moe["train_time_s"] else (moe, dense)
    at = fast["train_time_s"]
    slow_at = interpolate(slow["evals"], "time_s", at)
    diff = moe["final_val_loss"] - dense["final_val_loss"]
    rel = diff / dense["final_val_loss"]
    lines = [f"equal tokens ({dense['tokens']:,}): dense {dense['final_val_loss']:.4f}, MoE {moe['final_val_loss']:.4f} "
             f"-> MoE {'better' if diff < 0 else 'worse'} by {abs(diff):.4f} nats/token ({abs(rel):.1%})"]
    if slow_at is not None:
        eq_dense = dense["final_val_loss"] if fast is dense else slow_at
        eq_moe = moe["final_val_loss"] if fast is moe else slow_at
        lines.append(f"equal wall-clock ({at:.0f} s of training): dense {eq_dense:.4f}, MoE {eq_moe:.4f} "
                     f"-> MoE {'better' if eq_moe < eq_dense else 'worse'} by {abs(eq_moe - eq_dense):.4f}")
    else:
        eq_dense = eq_moe = None
    reach_s = first_reach(moe["evals"], "time_s", dense["final_val_loss"])
    reach_tok = first_reach(moe["evals"], "tokens", dense["final_val_loss"])
    frac = None if reach_s is None else reach_s / dense["train_time_s"]
    if frac is not None:
        lines.append(f"MoE reaches dense's final loss at {frac:.2f}x dense's training time ({reach_s:.0f} of "
                     f"{dense['train_time_s']:.0f} s) and {reach_tok / dense['tokens']:.2f}x its tokens")
    else:
        lines.append("MoE does not reach dense's final loss within its run")
    ratio = moe["tokens_per_s"] / dense["tokens_per_s"]
    lines.append(f"throughput: dense {dense['tokens_per_s']:.0f} tokens/s, MoE {moe['tokens_per_s']:.0f} tokens/s "
                 f"(MoE step costs {1 / ratio:.2f}x dense's)")
    better = [lab for lab in dense["final_val_loss_per_label"]
              if moe["final_val_loss_per_label"][lab] < dense["final_val_loss_per_label"][lab]]
    lines.append(f"MoE better on {len(better)}/{len(dense['final_val_loss_per_label'])} labels: {', '.join(better)}")
    return {"equal_tokens": {"tokens": dense["tokens"], "dense": dense["final_val_loss"], "moe": moe["final_val_loss"],
                             "moe_minus_dense": diff, "relative": rel},
            "equal_wall_clock": {"seconds": at, "dense": eq_dense, "moe": eq_moe,
                                 "moe_minus_dense": None if eq_moe is None else eq_moe - eq_dense},
            "moe_reaches_dense_final_loss": {
                "time_s": reach_s, "fraction_of_dense_time": frac, "tokens": reach_tok,
                "fraction_of_dense_tokens": None if reach_tok is None else reach_tok / dense["tokens"]},
            "tokens_per_s": {"dense": dense["tokens_per_s"], "moe": moe["tokens_per_s"], "moe_over_dense": ratio},
            "labels_moe_better": better,
            "verdict": "\n".join(lines)}


def seed_statistics(pairs: list[tuple[dict[str, Any], dict[str, Any]]], size: str) -> dict[str, Any]:
    """Final losses per seed, their mean and spread (max - min), and whether the mean equal-token
    gain exceeds the larger of the two models' spreads. One seed: the stored spread, if any."""
    dense = [d["final_val_loss"] for d, _ in pairs]
    moe = [m["final_val_loss"] for _, m in pairs]
    gain = sum(d - m for d, m in zip(dense, moe)) / len(pairs)
    if len(pairs) >= 2:
        spread, source = {"dense": max(dense) - min(dense), "moe": max(moe) - min(moe)}, "measured in this run"
    else:
        spread, source = STORED_SEED_SPREAD.get(size), STORED_SEED_SPREAD_SOURCE
    noise = None if spread is None else max(spread.values())
    return {"seeds": [d["seed"] for d, _ in pairs], "dense_final": dense, "moe_final": moe,
            "dense_mean": sum(dense) / len(dense), "moe_mean": sum(moe) / len(moe), "mean_gain": gain,
            "spread": spread, "spread_source": source if spread is not None else "not measured",
            "beyond_noise": None if noise is None else abs(gain) > noise}


def specialisation(moe: dict[str, Any], label_names: list[str]) -> dict[str, Any]:
    """Per MoE layer: I(label; expert), its ceiling min(H(label), ln E) and the ratio, and each
    label's share of picks on its favourite expert (uniform would be 1/E)."""
    counts = moe["evals"][-1]["routing_by_label"]
    out = {}
    for layer, rows in counts.items():
        e = moe["experts"][layer]
        n_experts = len(rows[0])
        ceiling = min(e["label_entropy"], math.log(n_experts))
        fav = {}
        for lab, row in zip(label_names, rows):
            total = sum(row)
            if total > 0:
                best = max(range(n_experts), key=lambda i: row[i])
                fav[lab] = {"expert": best, "share": row[best] / total}
        out[layer] = {"mutual_information": e["label_expert_mutual_information"], "ceiling": ceiling,
                      "fraction_of_ceiling": e["label_expert_mutual_information"] / ceiling if ceiling > 0 else 0.0,
                      "uniform_share": 1 / n_experts, "favourite_expert_per_label": fav}
    return out


def plain_words(comparison: dict[str, Any], seeds: dict[str, Any], spec: dict[str, Any]) -> str:
    """One paragraph, generated from the numbers, of what the MoE gained and what its experts learned."""
    eq = comparison["equal_tokens"]
    rel = -eq["relative"]
    parts = [f"Trained on the same {eq['tokens']:,} tokens with the same active parameters per token, the MoE's "
             f"validation loss is {abs(rel):.1%} {'lower' if rel > 0 else 'higher'} than the dense model's."]
    if seeds["beyond_noise"] is not None:
        noise = max(seeds["spread"].values())
        parts.append(f"That difference ({abs(seeds['mean_gain']):.3f} nats) is "
                     f"{'larger' if seeds['beyond_noise'] else 'not larger'} than the seed-to-seed spread "
                     f"({noise:.3f}, {seeds['spread_source']}), so it is "
                     f"{'beyond' if seeds['beyond_noise'] else 'within'} noise.")
    reach = comparison["moe_reaches_dense_final_loss"]
    ratio = comparison["tokens_per_s"]["moe_over_dense"]
    if reach["fraction_of_dense_time"] is not None:
        parts.append(f"Its steps cost {1 / ratio:.2f}x the dense steps, and it reached the dense model's final loss "
                     f"after {reach['fraction_of_dense_time']:.0%} of the dense model's training time.")
    else:
        parts.append(f"Its steps cost {1 / ratio:.2f}x the dense steps, and it did not reach the dense model's final "
                     f"loss within its run.")
    if spec:
        layer, last = list(spec.items())[-1]
        fav = last["favourite_expert_per_label"]
        by_expert: dict[int, list[str]] = {}
        for lab, f in fav.items():
            by_expert.setdefault(f["expert"], []).append(lab)
        shared = [f"{' and '.join(labs)} share expert {e}" for e, labs in sorted(by_expert.items()) if len(labs) > 1]
        strongest = max(fav, key=lambda lab: fav[lab]["share"])
        first_mi = next(iter(spec.values()))["mutual_information"]
        depth = ("more in deeper layers" if last["mutual_information"] > 1.1 * first_mi else
                 "less in deeper layers" if last["mutual_information"] < first_mi / 1.1 else "about as much in every layer")
        parts.append(f"The experts specialise by label, {depth}: in {layer} a token's expert choice "
                     f"carries {last['mutual_information']:.3f} nats about its label ({last['fraction_of_ceiling']:.0%} "
                     f"of the most it could), against {first_mi:.3f} in the "
                     f"first MoE layer. There, {strongest} is the most concentrated label "
                     f"({fav[strongest]['share']:.1%} of its picks on expert {fav[strongest]['expert']}, where an even "
                     f"split gives {last['uniform_share']:.1%})"
                     + (f"; {'; '.join(shared)}." if shared else "; each label has its own favourite expert."))
    return " ".join(parts)


def targets_met(comparison: dict[str, Any], seeds: dict[str, Any], dense: dict[str, Any], moe: dict[str, Any]
                ) -> dict[str, Any]:
    """The issue's targets as booleans beside the measured values (None where not measurable)."""
    frac = comparison["moe_reaches_dense_final_loss"]["fraction_of_dense_time"]
    active_rel = abs(moe["active_params"] - dense["active_params"]) / dense["active_params"]
    gain = seeds["mean_gain"] / seeds["dense_mean"]
    return {"equal_tokens_gain": gain, "equal_tokens_gain_met": gain >= TARGETS["equal_tokens_gain"],
            "time_to_dense_loss": frac,
            "time_to_dense_loss_met": frac is not None and frac <= TARGETS["time_to_dense_loss"],
            "active_params_relative_difference": active_rel,
            "active_params_met": active_rel <= TARGETS["active_params_tolerance"],
            "gain_beyond_seed_spread": seeds["beyond_noise"], "thresholds": TARGETS}


# ---------------------------------------------------------------------- report
def make_report(out_dir: Path, runs: list[dict[str, Any]], comparison: dict[str, Any], corpus: dict[str, Any],
                label_names: list[str], seeds: dict[str, Any] | None = None, spec: dict[str, Any] | None = None,
                paragraph: str = "", title: str = "moekit demo: dense vs MoE language model") -> Path:
    """report.html: ``runs`` are the first seed's dense and MoE records (plotted)."""
    from ..report import plots
    from ..report.html import pre, write_report

    table_rows = [[r["name"], f"{r['total_params']:,}", f"{r['active_params']:,}",
                   f"{r['flops_per_token']['train'] / 1e6:.2f}", f"{r['tokens_per_s']:.0f}", r["tokens"],
                   r["final_val_loss"], f"{r['wall_clock_s']:.0f}"] for r in runs]
    labels = sorted(runs[0]["final_val_loss_per_label"])
    label_rows = [[lab] + [r["final_val_loss_per_label"].get(lab, float("nan")) for r in runs] for lab in labels]
    result: list[Any] = [pre(paragraph)] if paragraph else []
    result += [pre(comparison["verdict"]),
               ("table", ["model", "total params", "active params", "train MFLOPs/token", "tokens/s",
                          "tokens", "final val loss", "wall-clock s"], table_rows),
               ("table", ["label"] + [r["name"] for r in runs], label_rows)]
    if seeds is not None:
        seed_rows = [[s, d, m, m - d] for s, d, m in zip(seeds["seeds"], seeds["dense_final"], seeds["moe_final"])]
        spread = seeds["spread"]
        result += [("table", ["seed", "dense val loss", "MoE val loss", "MoE - dense"], seed_rows),
                   pre("seed-to-seed spread (max - min): " + (
                       "not measured" if spread is None else
                       f"dense {spread['dense']:.4f}, MoE {spread['moe']:.4f} ({seeds['spread_source']})"))]
    sections: list[tuple[str, list[Any]]] = [
        ("Result", result),
        ("Validation loss", [(plots.loss_curves(runs, "tokens"), "loss vs tokens"),
                             (plots.loss_curves(runs, "time_s"), "loss vs wall-clock"),
                             (plots.per_label_bars(runs), "loss per label")]),
    ]
    moe = next((r for r in runs if r.get("experts")), None)
    if moe is not None:
        last = moe["evals"][-1]
        heatmaps = [(plots.routing_heatmap(layer, counts, label_names), f"routing heatmap {layer}")
                    for layer, counts in last["routing_by_label"].items()]
        rows = [[layer, " ".join(f"{u:.2f}" for u in e["utilisation"]), e["dropped_fraction"], e["routing_entropy"],
                 e["label_expert_mutual_information"],
                 (spec or {}).get(layer, {}).get("fraction_of_ceiling", float("nan"))]
                for layer, e in moe["experts"].items()]
        sections.append(("Experts", [
            ("table", ["layer", "utilisation per expert (validation)", "dropped", "entropy (nats)",
                       "I(label; expert) nats", "of its ceiling"], rows),
            *heatmaps,
            (plots.utilisation_over_training(moe), "utilisation over training"),
            (plots.entropy_over_training(moe), "routing entropy over training")]))
    sections.append(("Samples", [pre(f"{r['name']}: {r['sample']}") for r in runs]))
    corpus_rows = [[lab, c["train_docs"], c["val_docs"], c["train_bytes"], c["val_bytes"]]
                   for lab, c in corpus["per_label"].items()]
    sections.append(("Corpus", [("table", ["label", "train docs", "val docs", "train bytes", "val bytes"], corpus_rows),
                                pre("\n".join(corpus.get("notes", [])) or "no notes")]))
    return write_report(out_dir / "report.html", title, sections)


# ---------------------------------------------------------------------- the demo
def load_corpus(corpus: str, data_dir: str, use_apt: bool) -> tuple[dict[str, Any], Any]:
    """(corpus report, TokenData) of ``corpus``: "polyglot" (built here, Debian packages unless
    ``use_apt`` is False), a folder / .jsonl file / hf:<name> to build, or a corpus built under ``data_dir``."""
    from ..data.corpus import build_polyglot, load_tokens
    from ..data.prepare import corpus_folder, prepare_corpus
    from ..data.tokenizer import ByteTokenizer

    if corpus == "polyglot":
        report = build_polyglot(data_dir, use_apt=use_apt)
        return report, load_tokens(Path(data_dir) / "polyglot", ByteTokenizer())
    data = prepare_corpus(corpus, data_dir, "byte")
    report = json.loads((corpus_folder(corpus, data_dir) / "report.json").read_text(encoding="utf-8"))
    return report, data


def run_demo(out_dir: str | Path = "runs/demo", data_dir: str = "data_cache", size: str = "small",
             steps: int | None = None, moe: DemoMoE | None = None, seed: int = 0, seeds: int = 1,
             corpus: str = "polyglot", use_apt: bool = True, progress: bool = True,
             threads: int | None = 2) -> dict[str, Any]:
    """Train dense and MoE for seeds ``seed .. seed + seeds - 1`` on ``corpus``; write summary.json
    and report.html under ``out_dir`` (replaced) and print the summary. Returns the summary."""
    import shutil

    import torch

    from ..config import ConfigError
    from .data import print_report

    start = time.perf_counter()
    out_dir = Path(out_dir)
    moe = moe or DemoMoE()
    cfg_sets = [demo_configs(size, out_dir, data_dir, moe, steps, seed + i, corpus, "" if i == 0 else f"_seed{seed + i}")
                for i in range(seeds)]
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is a file, not a folder")
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} is a file, not a folder")
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in DEMO_OUTPUTS and not SEED_RUN.fullmatch(p.name)) if out_dir.is_dir() else []
    if foreign:
        raise ConfigError(f"--out-dir {out_dir} holds files that are not a demo's ({', '.join(foreign[:3])}); "
                          f"the demo replaces its folder, so give a new or empty one")
    if threads:
        torch.set_num_threads(threads)
    corpus_report, data = load_corpus(corpus, data_dir, use_apt)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    print_report(corpus_report, data.corpus_dir)
    pairs = []
    for cfgs in cfg_sets:
        pair = []
        for name, cfg in cfgs.items():
            cfg.progress = progress
            pair.append(train_one(name, cfg, data))
        pairs.append((pair[0], pair[1]))
    dense, moe_run = pairs[0]
    comparisons = [compare(d, m) for d, m in pairs]
    comparison = comparisons[0]
    seed_stats = seed_statistics(pairs, size)
    spec = specialisation(moe_run, data.label_names)
    paragraph = plain_words(comparison, seed_stats, spec)
    fracs = [c["moe_reaches_dense_final_loss"]["fraction_of_dense_time"] for c in comparisons]
    seed_stats["time_to_dense_loss_per_seed"] = fracs
    targets = targets_met(comparison, seed_stats, dense, moe_run)
    summary = {
        "demo_wall_clock_s": time.perf_counter() - start, "size": size, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "corpus": {"name": corpus, "folder": str(data.corpus_dir),
                   **{k: corpus_report.get(k) for k in ("documents", "bytes", "per_label", "notes", "fallback")}},
        "moe_design": {**asdict(moe), "expert_hidden": moe.expert_hidden(SIZES[size]["ffn_hidden"]),
                       "description": moe.describe(SIZES[size]["ffn_hidden"])},
        "comparison": comparison,
        "seeds": seed_stats,
        "specialisation": spec,
        "plain_words": paragraph,
        "targets": targets,
        "models": {r["name"]: {k: v for k, v in r.items() if k != "evals"} for r in (dense, moe_run)},
        "curves": {r["name"]: [{k: e[k] for k in ("step", "tokens", "time_s", "loss")} for e in r["evals"]]
                   for r in (dense, moe_run)},
    }
    report = make_report(out_dir, [dense, moe_run], comparison, corpus_report, data.label_names, seed_stats, spec,
                         paragraph, title=f"moekit demo: dense vs MoE on {corpus}")
    summary["demo_wall_clock_s"] = time.perf_counter() - start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print_summary([dense, moe_run], comparison, summary, out_dir, report)
    return summary


def print_summary(runs: list[dict[str, Any]], comparison: dict[str, Any], summary: dict[str, Any], out_dir: Path,
                  report: Path) -> None:
    print("\n" + "=" * 78)
    print(f"MoE: {summary['moe_design']['description']}")
    print(f"{'model':<7}{'total params':>14}{'active':>11}{'MFLOPs/tok':>12}{'tokens/s':>10}{'val loss':>10}"
          f"{'wall s':>8}")
    for r in runs:
        print(f"{r['name']:<7}{r['total_params']:>14,}{r['active_params']:>11,}"
              f"{r['flops_per_token']['train'] / 1e6:>12.2f}{r['tokens_per_s']:>10.0f}{r['final_val_loss']:>10.4f}"
              f"{r['wall_clock_s']:>8.0f}")
    labels = sorted(runs[0]["final_val_loss_per_label"])
    print("per label: " + "  ".join(f"{lab} " + "/".join(f"{r['final_val_loss_per_label'][lab]:.3f}" for r in runs)
                                    for lab in labels) + "   (dense/moe)")
    print(comparison["verdict"])
    seeds = summary["seeds"]
    if len(seeds["seeds"]) > 1:
        print("seeds " + ", ".join(map(str, seeds["seeds"])) + ": dense " + " ".join(f"{v:.4f}" for v in
              seeds["dense_final"]) + ", MoE " + " ".join(f"{v:.4f}" for v in seeds["moe_final"]))
    loads = [(r["name"], r.get("load_average_1min") or {}) for r in runs]
    if all(v.get("start") is not None for _, v in loads):
        print("machine load (1-min average, start -> end): "
              + ", ".join(f"{name} {v['start']:.1f} -> {v['end']:.1f}" for name, v in loads))
    for r in runs:
        for layer, e in (r.get("experts") or {}).items():
            print(f"{layer}: utilisation " + " ".join(f"{u:.2f}" for u in e["utilisation"])
                  + f"  dropped {e['dropped_fraction']:.1%}  I(label;expert) {e['label_expert_mutual_information']:.3f}"
                  + " nats  top experts: " + " ".join(f"{lab}{v}" for lab, v in e["top_experts_per_label"].items()))
    t = summary["targets"]
    frac = t["time_to_dense_loss"]
    print(f"targets: equal-token gain {t['equal_tokens_gain']:.1%} (>= {TARGETS['equal_tokens_gain']:.0%}: "
          f"{'met' if t['equal_tokens_gain_met'] else 'not met'}), time to dense's loss "
          f"{'never' if frac is None else f'{frac:.2f}x'} (<= {TARGETS['time_to_dense_loss']}x: "
          f"{'met' if t['time_to_dense_loss_met'] else 'not met'})")
    print("\n" + summary["plain_words"])
    for r in runs:
        print(f"\n[{r['name']} sample] {r['sample']!r}")
    print(f"\ndemo finished in {summary['demo_wall_clock_s']:.0f} s; wrote {out_dir / 'summary.json'} and {report}")


def run(args: argparse.Namespace) -> int:
    moe = DemoMoE(num_experts=args.num_experts, top_k=args.top_k, shared_experts=args.shared_experts,
                  balance=args.balance, aux_loss_coef=args.aux_loss_coef, bias_update_rate=args.bias_update_rate,
                  z_loss_coef=args.z_loss_coef, lr=args.moe_lr, warmup_steps=args.moe_warmup)
    run_demo(args.out_dir, args.data_dir, args.size, args.steps, moe, args.seed, args.seeds, args.corpus,
             use_apt=not args.no_apt, progress=not args.no_progress, threads=args.threads)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    d = DemoMoE()
    p = subparsers.add_parser("demo", help="build a corpus, train dense vs MoE LMs, write runs/demo/")
    p.add_argument("--corpus", default="polyglot",
                   help="polyglot (default), a folder (one sub-folder per label), a .jsonl file (text, label), "
                        "hf:<name>, or the name of a corpus built under --data-dir")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--data-dir", default="data_cache", help="where corpora are built and cached")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=POSITIVE_INT, default=None, help="override the size's step count")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1,
                   help="train each model with this many seeds (from --seed) to measure the seed-to-seed spread")
    # The defaults come from the sweep in docs/training.md ("Choosing the MoE").
    p.add_argument("--num-experts", type=POSITIVE_INT, default=d.num_experts)
    p.add_argument("--top-k", type=POSITIVE_INT, default=d.top_k,
                   help="experts per token; expert hidden = ffn_hidden / (top_k + shared_experts)")
    p.add_argument("--shared-experts", type=NONNEGATIVE_INT, default=d.shared_experts)
    p.add_argument("--balance", choices=["aux", "bias"], default=d.balance,
                   help="aux: Switch load-balancing loss; bias: aux-loss-free expert bias (DeepSeek-V3)")
    p.add_argument("--aux-loss-coef", type=NONNEGATIVE_NUMBER, default=d.aux_loss_coef)
    p.add_argument("--bias-update-rate", type=number_in(0, low_open=True), default=d.bias_update_rate)
    p.add_argument("--z-loss-coef", type=NONNEGATIVE_NUMBER, default=d.z_loss_coef,
                   help="router z-loss (ST-MoE) coefficient; 0 disables it")
    p.add_argument("--moe-lr", type=number_in(0, 1, low_open=True), default=d.lr,
                   help="MoE learning rate (default: the sweep's best for the MoE; dense uses the size's)")
    p.add_argument("--moe-warmup", type=NONNEGATIVE_INT, default=d.warmup_steps,
                   help="MoE warm-up steps (default: dense's)")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--threads", type=POSITIVE_INT, default=2)
    p.add_argument("--no-apt", action="store_true", help="skip Debian packages (Python stdlib fallback corpus)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
