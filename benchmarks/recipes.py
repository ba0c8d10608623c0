"""Every recipe of ``moekit.recipes`` (and the fault-tolerance and explanation tools) on the
polyglot demo corpus at a small budget, in one process, with the comparisons of issue 5:

  upcycle      dense base -> (a) dense continued, (b) upcycled MoE (Komatsuzaki et al. 2022)
               continued, same continuation tokens; validation loss overall and per label.
  mask sweep   the upcycled MoE's validation loss with 0..E-k experts masked per layer
               (random draws and most-used first); plot.
  supervised   continue the upcycled-at-init MoE with and without the label-routing loss; routing
               purity (majority-label share of each expert's picks) and loss.
  btx          Branch-Train-MiX (Sukhbaatar et al. 2024) from the dense base: one branch per label
               group, mixed, fine-tuned; against a joint MoE of the same size upcycled from the
               same base and trained on all labels for the same total tokens; per-label loss.
  selective    fine-tune one label's two most-used experts per layer on that label; untouched
               experts bit-identical; per-label loss before/after; expert drift and routing change.
  surgery      add 2 experts (loss unchanged at first), remove 1, merge 2; checkpoint round-trip.
  diagnose     per-expert loss, latency breakdown, an explained sentence (terminal + HTML).

Writes runs/recipes/summary.json, mask_sweep.png, btx_per_label.png, upcycle_curves.png,
explain.html, and prints a table. ``--scale 0.1`` for a quick smoke run. Single-threaded torch
(on a shared 2-core machine that is much faster than 2 threads under contention).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from moekit.explain import (explain_text, label_affinity, latency_breakdown, per_expert_loss, render_html,
                            render_terminal, routing_change, weight_drift)
from moekit.explain.mask_sweep import mask_sweep, plot_mask_sweep
from moekit.lm import LM, LMConfig
from moekit.model_ops import moe_layers
from moekit.recipes import (LabelRoutingLoss, add_experts, btx, filter_labels, finetune_experts, merge_experts,
                            remove_experts, routing_purity, save_model, upcycle)
from moekit.recipes.selective import most_used_experts
from moekit.train import TrainConfig, Trainer
from moekit.train.trainer import eval_batches, load_trained, prepare_data

BTX_GROUPS = [["de", "en", "es", "it"], ["fr", "pl", "ru"], ["ja", "zh"], ["python"]]


def steps_at(scale: float) -> dict[str, int]:
    base = {"dense": 600, "continue": 300, "supervised": 200, "branch": 150, "mix": 100, "selective": 100,
            "surgery": 60}
    return {k: max(2, int(v * scale)) for k, v in base.items()}


def base_config(out: Path, data_dir: str, steps: int, seed: int, eval_tokens: int) -> TrainConfig:
    model = LMConfig(dim=64, n_layers=2, n_heads=2, ffn_hidden=128, max_seq_len=64)
    return TrainConfig(model=model, corpus="polyglot", data_dir=data_dir, out_dir=str(out), seq_len=64,
                       batch_size=16, steps=steps, lr=3e-3, warmup_steps=20, eval_every=max(1, steps // 4),
                       eval_tokens=eval_tokens, ckpt_every=10**9, threads=1, seed=seed, tensorboard=False,
                       progress=False)


def final(trainer: Trainer) -> dict[str, Any]:
    ev = trainer.evals[-1]
    return {"loss": ev["loss"], "per_label": ev["per_label"], "tokens": trainer.tokens_seen,
            "train_time_s": trainer.train_time}


def run_cfg(cfg: TrainConfig, out: Path, model: LM, steps: int, seed: int | None = None) -> TrainConfig:
    """A continuation run's config: ``cfg`` with this model, folder and budget."""
    return dataclasses.replace(cfg, model=model.config, out_dir=str(out), steps=steps,
                               eval_every=max(1, steps // 4), seed=cfg.seed if seed is None else seed,
                               warmup_steps=min(cfg.warmup_steps, max(1, steps // 5)))


def purity_of(ev: dict[str, Any]) -> dict[str, float]:
    per_layer = {name: routing_purity(c)["purity"] for name, c in ev["routing_by_label"].items()}
    return {"mean": sum(per_layer.values()) / len(per_layer), **per_layer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--data-dir", default="data_cache")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step budget")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cont-lr", type=float, default=1e-3,
                    help="peak lr of every run that continues from the dense base (the base uses 3e-3)")
    ap.add_argument("--results", default="benchmarks/results/recipes.json",
                    help="also write summary.json here (runs/ is not tracked); '' to skip")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    S = steps_at(args.scale)
    E, K = args.experts, args.top_k
    t_start = time.perf_counter()
    summary: dict[str, Any] = {"steps": S, "experts": E, "top_k": K, "tokens_per_step": 64 * 16,
                               "eval_tokens": args.eval_tokens}
    cfg0 = base_config(out / "dense_base", args.data_dir, S["dense"], args.seed, args.eval_tokens)
    data = prepare_data(cfg0)
    cont = dataclasses.replace(cfg0, lr=args.cont_lr)
    summary["labels"] = data.label_names
    val = eval_batches(data.val, 16, 64, 8192)

    # ------------------------------------------------------------ dense base
    base = Trainer(cfg0, data)
    base.fit()
    save_model(out / "dense_base" / "checkpoints", base.model, cfg0, data.label_names)
    summary["dense_base"] = final(base)
    dense = base.model
    print(f"dense base: {summary['dense_base']['loss']:.4f} after {S['dense']} steps")

    # ------------------------------------------------------------ sparse upcycling
    cont_seed = args.seed + 1
    d_tr = Trainer(run_cfg(cont, out / "dense_continued", dense, S["continue"], cont_seed), data,
                   model=copy.deepcopy(dense))
    d_tr.fit()
    up_init = upcycle(dense, E, K, noise=0.01, seed=args.seed, aux_loss_coef=0.01)
    with torch.no_grad():
        x = val[0].input_ids[:4]
        init_gap = float((up_init.eval()(x) - dense.eval()(x)).abs().max())
    up_noiseless = upcycle(dense, E, K, noise=0.0).eval()
    with torch.no_grad():
        exact_gap = float((up_noiseless(x) - dense(x)).abs().max())
    u_tr = Trainer(run_cfg(cont, out / "upcycled", up_init, S["continue"], cont_seed), data,
                   model=copy.deepcopy(up_init))
    u_tr.fit()
    save_model(out / "upcycled" / "checkpoints", u_tr.model, u_tr.cfg, data.label_names)
    summary["upcycle"] = {
        "dense_continued": final(d_tr), "upcycled": final(u_tr),
        "max_logit_gap_at_init_noise0": exact_gap, "max_logit_gap_at_init_noise0.01": init_gap,
        "dense_train_flops_per_token": dense.flops_per_token(64)["train"],
        "upcycled_train_flops_per_token": u_tr.model.flops_per_token(64)["train"],
        "curves": {"dense_continued": [(e["tokens"], e["loss"]) for e in d_tr.evals],
                   "upcycled": [(e["tokens"], e["loss"]) for e in u_tr.evals]}}
    print(f"upcycle: dense continued {d_tr.evals[-1]['loss']:.4f}, upcycled {u_tr.evals[-1]['loss']:.4f}")
    moe = u_tr.model

    # ------------------------------------------------------------ masking degradation
    sweep_tr = Trainer(run_cfg(cont, out / "mask_sweep", moe, 1), data, model=moe)
    curves = {s: mask_sweep(sweep_tr, strategy=s, repeats=3, max_tokens=args.eval_tokens // 2)
              for s in ("random", "most_used")}
    (out / "mask_sweep.png").write_bytes(plot_mask_sweep(curves))
    summary["mask_sweep"] = {s: [{k: r[k] for k in ("masked", "loss", "loss_std")} for r in rows]
                             for s, rows in curves.items()}
    print("mask sweep (random): " + ", ".join(f"{r['masked']}:{r['loss']:.3f}" for r in curves["random"]))

    # ------------------------------------------------------------ supervised routing
    sup = {}
    for coef in (0.0, 0.1, 1.0):
        model = copy.deepcopy(up_init)
        tr = Trainer(run_cfg(cont, out / f"supervised_{coef}", model, S["supervised"], cont_seed), data,
                     model=model)
        loss = LabelRoutingLoss(model, coef)
        tr.add_loss("route", loss)
        tr.fit()
        loss.close()
        ev = tr.evals[-1]
        sup[str(coef)] = {**final(tr), "purity": purity_of(ev),
                          "route_ce_first": tr.history[0]["route"] / max(coef, 1e-12) if coef else None,
                          "route_ce_last": tr.history[-1]["route"] / coef if coef else None}
    summary["supervised_routing"] = sup
    print("supervised routing: purity " + ", ".join(f"coef {c}: {v['purity']['mean']:.3f} (loss {v['loss']:.4f})"
                                                     for c, v in sup.items()))

    # ------------------------------------------------------------ Branch-Train-MiX vs joint MoE
    groups = [[g for g in grp if g in data.label_names] for grp in BTX_GROUPS]
    groups = [g for g in groups if g]
    n_branch = len(groups)
    btx_cfg = run_cfg(cont, out / "btx", dense, S["branch"], cont_seed)
    mixed, record = btx(dense, btx_cfg, data, groups, S["branch"], S["mix"], finetune="all", top_k=K,
                        aux_loss_coef=0.01)
    joint_steps = n_branch * S["branch"] + S["mix"]
    joint_init = upcycle(dense, n_branch, K, noise=0.01, seed=args.seed, aux_loss_coef=0.01)
    j_tr = Trainer(run_cfg(cont, out / "btx_joint", joint_init, joint_steps, cont_seed), data, model=joint_init)
    j_tr.fit()
    summary["btx"] = {"groups": groups, "branch_steps": S["branch"], "mix_steps": S["mix"],
                      "btx": {"loss": record["mix"]["loss"], "per_label": record["mix"]["per_label"],
                              "purity": purity_of(record["mix"]) if "routing_by_label" in record["mix"] else None},
                      "joint_moe": {**final(j_tr), "steps": joint_steps},
                      "branches": record["branches"]}
    from moekit.report.plots import per_label_bars

    (out / "btx_per_label.png").write_bytes(per_label_bars([
        {"name": "BTX", "evals": [record["mix"]]}, {"name": "joint MoE", "evals": j_tr.evals},
        {"name": "dense base", "evals": base.evals}]))
    print(f"btx: {record['mix']['loss']:.4f} vs joint MoE {j_tr.evals[-1]['loss']:.4f}")

    # ------------------------------------------------------------ selective fine-tuning
    before_model = copy.deepcopy(moe)
    label = "pl" if "pl" in data.label_names else data.label_names[0]
    lid = data.label_names.index(label)
    ev0 = sweep_tr.evaluate(routing_by_label=True)
    chosen = {int(n.split(".")[1]): most_used_experts(c, lid, 2) for n, c in ev0["routing_by_label"].items()}
    ft_model = copy.deepcopy(moe)
    ft = finetune_experts(ft_model, run_cfg(cont, out / "selective", ft_model, S["selective"], cont_seed),
                          filter_labels(data, [label]), chosen, train_router=False)
    after = ft.evaluate()
    full_model = copy.deepcopy(moe)
    full = Trainer(run_cfg(cont, out / "selective_full", full_model, S["selective"], cont_seed),
                   filter_labels(data, [label]), model=full_model)
    full.fit()
    full_after = full.evaluate()
    identical, changed = True, 0
    for (name, la), (_, lb) in zip(moe_layers(before_model), moe_layers(ft_model)):
        keep = chosen[int(name.split(".")[1])]
        for pa, pb in zip(la.experts.parameters(), lb.experts.parameters()):
            for e in range(la.num_experts):
                same = torch.equal(pa[e], pb[e])
                if e in keep:
                    changed += not same
                else:
                    identical &= same
    drift = weight_drift(before_model, ft_model)
    stab = routing_change(before_model, ft_model, [b.input_ids for b in val])
    summary["selective"] = {
        "label": label, "experts": chosen, "untouched_bit_identical": identical,
        "changed_expert_tensors": changed,
        "loss_before": {"loss": ev0["loss"], "per_label": ev0["per_label"]},
        "loss_after": {"loss": after["loss"], "per_label": after["per_label"]},
        "full_finetune_after": {"loss": full_after["loss"], "per_label": full_after["per_label"]},
        "weight_drift": drift, "routing_change": stab}
    others = [k for k in ev0["per_label"] if k != label]
    summary["selective"]["target_delta"] = after["per_label"][label] - ev0["per_label"][label]
    summary["selective"]["others_mean_abs_delta"] = sum(
        abs(after["per_label"][k] - ev0["per_label"][k]) for k in others) / len(others)
    summary["selective"]["full_target_delta"] = full_after["per_label"][label] - ev0["per_label"][label]
    summary["selective"]["full_others_mean_abs_delta"] = sum(
        abs(full_after["per_label"][k] - ev0["per_label"][k]) for k in others) / len(others)
    sel = summary["selective"]
    print(f"selective on {label}: target {sel['target_delta']:+.4f}, others mean |d| "
          f"{sel['others_mean_abs_delta']:.4f}, untouched identical {identical}; full fine-tune: target "
          f"{sel['full_target_delta']:+.4f}, others mean |d| {sel['full_others_mean_abs_delta']:.4f}")

    # ------------------------------------------------------------ surgery
    surg: dict[str, Any] = {"before": ev0["loss"]}
    calib = torch.cat([b.input_ids for b in eval_batches(data.val, 16, 64, args.eval_tokens)])
    bigger = add_experts(moe, 2, calibration=calib, bias_update_rate=0.005)
    b_tr = Trainer(run_cfg(cont, out / "surgery_add", bigger, S["surgery"], cont_seed), data, model=bigger)
    surg["add2_at_init"] = b_tr.evaluate()["loss"]
    b_tr.fit()
    surg["add2_after_training"] = b_tr.evals[-1]["loss"]
    util = b_tr.evals[-1]["routing"]
    surg["add2_new_expert_share"] = {n: sum(r["utilization"][E:]) for n, r in util.items()}
    control_model = copy.deepcopy(moe)
    c_tr = Trainer(run_cfg(cont, out / "surgery_control", control_model, S["surgery"], cont_seed), data,
                   model=control_model)
    c_tr.fit()
    surg["control_after_training"] = c_tr.evals[-1]["loss"]
    for name, new in (("remove1", remove_experts(moe, [0])), ("merge2", merge_experts(moe, [[0, 1]]))):
        tr = Trainer(run_cfg(cont, out / f"surgery_{name}", new, 1), data, model=new)
        surg[name] = tr.evaluate()["loss"]
        path = save_model(out / f"surgery_{name}" / "checkpoints", new, tr.cfg, data.label_names)
        loaded, _, _ = load_trained(path)
        with torch.no_grad():
            surg[f"{name}_round_trip_equal"] = bool(torch.equal(loaded(x), new.eval()(x)))
    summary["surgery"] = surg
    print("surgery: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in surg.items()
                                  if not isinstance(v, dict)))

    # ------------------------------------------------------------ diagnosis
    pel = per_expert_loss(moe, val)
    lat = latency_breakdown(moe, val[0].input_ids, repeats=5)
    from moekit.data.tokenizer import load_tokenizer

    expl = explain_text(moe, load_tokenizer("byte"), "Der Hund schläft. The dog sleeps. 犬が寝る。")
    expl.affinity = label_affinity(ev0["routing_by_label"], data.label_names)
    (out / "explain.html").write_text(render_html(expl, "upcycled MoE on a mixed sentence"), encoding="utf-8")
    (out / "explain.txt").write_text(render_terminal(expl, color=False), encoding="utf-8")
    summary["diagnose"] = {"per_expert_loss": pel, "latency": lat}
    summary["wall_s"] = time.perf_counter() - t_start

    _plot_upcycle(out, summary["upcycle"]["curves"])
    text = json.dumps(summary, indent=2, default=_json)
    (out / "summary.json").write_text(text)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(text)
    print_table(summary)


def _json(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


def _plot_upcycle(out: Path, curves: dict[str, list]) -> None:
    from moekit.report.plots import new_figure, png

    fig = new_figure((6, 4))
    ax = fig.subplots()
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("continuation tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("sparse upcycling vs dense continued")
    ax.grid(alpha=0.3)
    ax.legend()
    (out / "upcycle_curves.png").write_bytes(png(fig))


def print_table(s: dict[str, Any]) -> None:
    up = s["upcycle"]
    rows = [("dense base", s["dense_base"]["loss"]), ("dense continued", up["dense_continued"]["loss"]),
            ("upcycled MoE continued", up["upcycled"]["loss"]),
            ("BTX (mixed + fine-tuned)", s["btx"]["btx"]["loss"]),
            ("joint MoE (same tokens)", s["btx"]["joint_moe"]["loss"]),
            *[(f"supervised routing coef {c}", v["loss"]) for c, v in s["supervised_routing"].items()]]
    print(f"\n{'run':<30}{'val loss':>10}")
    for name, loss in rows:
        print(f"{name:<30}{loss:>10.4f}")
    print("\nrouting purity: " + ", ".join(f"coef {c} {v['purity']['mean']:.3f}"
                                         for c, v in s["supervised_routing"].items()))
    print("mask sweep (random, mean of 3): " + ", ".join(f"{r['masked']}: {r['loss']:.3f}"
                                                        for r in s["mask_sweep"]["random"]))
    print("mask sweep (most used first): " + ", ".join(f"{r['masked']}: {r['loss']:.3f}"
                                                      for r in s["mask_sweep"]["most_used"]))
    labels = sorted(s["btx"]["btx"]["per_label"])
    print(f"\n{'label':<8}{'BTX':>8}{'joint':>8}")
    for lab in labels:
        print(f"{lab:<8}{s['btx']['btx']['per_label'][lab]:>8.3f}{s['btx']['joint_moe']['per_label'][lab]:>8.3f}")
    print(f"\ntotal wall-clock {s['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
