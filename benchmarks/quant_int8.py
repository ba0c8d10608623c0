"""Accuracy of weight-only int8 experts (``moekit.experts.quantize_experts``) against float32.

1. Converted Hugging Face models: for every convertible family with stacked experts, a tiny random
   transformers model (``moekit.hf.testing.tiny_hf_model``, weights N(0, 0.1)) is converted with
   ``from_hf``, then quantised; reported: the logits' relative error (Frobenius) on a (4, 32) prompt,
   the share of positions whose top-1 token is unchanged, and whether 16 greedy tokens agree.
2. A trained run (``--run RUN_FOLDER``, optional): validation loss of the float model and of its
   int8-expert copy over the same tokens (``Trainer.evaluate``), as ``moekit eval --quantize int8``.

Run ``python benchmarks/quant_int8.py [--run runs/x --data-dir DIR --tokens N]``; prints a table and
writes benchmarks/results/quant_int8.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch

from moekit.experts import quantize_experts
from moekit.hf import from_hf
from moekit.hf.convert import CONVERTIBLE
from moekit.hf.testing import tiny_hf_model
from moekit.lm import generate


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def converted_families() -> dict[str, dict[str, float | bool]]:
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for family in CONVERTIBLE:
        if family == "gpt_oss":  # clamped SwiGLU experts with biases: no int8 path
            continue
        with tempfile.TemporaryDirectory() as folder:
            tiny_hf_model(family).save_pretrained(folder)
            model = from_hf(folder)
        q8 = copy.deepcopy(model)
        quantize_experts(q8)
        ref, got = model(ids), q8(ids)
        out[family] = {"logits_rel_err": rel(got, ref),
                       "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
                       "greedy16_same": bool(torch.equal(generate(q8, ids[:1], 16), generate(model, ids[:1], 16)))}
    return out


def trained_run(run: str, data_dir: str | None, tokens: int | None) -> dict[str, float]:
    from moekit.cli.common import load_run
    from moekit.train.trainer import Trainer

    loaded = load_run(run, data_dir)
    data = loaded.data()
    model = loaded.model
    result = {}
    for name in ("float32", "int8"):
        if name == "int8":
            quantize_experts(model)
        r = Trainer(loaded.cfg, data, model=model).evaluate(max_tokens=tokens, routing_by_label=False)
        result[f"val_loss_{name}"] = r["loss"]
        result["tokens"] = sum(r["tokens_per_label"].values())
    result["delta"] = result["val_loss_int8"] - result["val_loss_float32"]
    result["parameters"] = sum(p.numel() for p in loaded.model.parameters())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a trained run folder or checkpoint to evaluate in both forms")
    parser.add_argument("--data-dir", default=None, help="folder holding the run's corpus")
    parser.add_argument("--tokens", type=int, default=None, help="validation tokens (default: the run's config)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_int8.json"))
    args = parser.parse_args()

    families = converted_families()
    print(f"{'family':14s} {'logits rel err':>14s} {'top-1 agree':>12s} greedy16_same")
    for family, r in families.items():
        print(f"{family:14s} {r['logits_rel_err']:14.2e} {r['top1_agree']:12.4f} {r['greedy16_same']}")
    record = {"torch": torch.__version__, "families": families, "loadavg_1m": os.getloadavg()[0]}
    if args.run is not None:
        run = trained_run(args.run, args.data_dir, args.tokens)
        record["run"] = {"path": args.run, **run}
        print(f"{args.run}: validation loss float32 {run['val_loss_float32']:.6f}, int8 experts "
              f"{run['val_loss_int8']:.6f} (delta {run['delta']:+.2e} nats/token over {run['tokens']:,} tokens)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
