"""Prefill and decode speed of a converted MoE model: transformers' experts implementations vs
moekit's in-place mode (``moekit.hf.patch_model``) and moekit's own LM (``moekit.hf.from_hf``).

One random Qwen3-MoE model (default 64 experts, top-8) is built with transformers' classes and
timed in one process, on the same weights:
  hf_<impl>               transformers' model with experts implementation <impl> (eager,
                          grouped_mm, batched_mm). Ratios compare with the fastest HF
                          implementation of each phase (prefill and decode separately).
  moekit_inplace          the same model after patch_model (moekit dispatch, stats, finite checks).
  moekit_inplace_nocheck  patch_model(check_finite=False): no host sync on the finite checks.
  moekit_lm               the checkpoint converted by from_hf, generating with moekit.lm.generate.
With ``--quantize int8`` three more rows of moekit's LM (moekit.experts.quantize_experts, applied after
loading as ``moekit convert --dtype ... --quantize int8`` does):
  moekit_lm_bf16          the whole LM cast to bfloat16.
  moekit_lm_int8          experts weight-only int8 (per-channel scales), the rest float32.
  moekit_lm_int8_bf16     cast to bfloat16, then experts int8 (bf16 activations: decode rows take
                          ATen's int8 x bf16 kernel).
Each of these also records its logits' relative error (Frobenius) against moekit_lm on the prompt.
Prefill: tokens/s of one forward over a (B, S) prompt. Decode: new tokens/s of greedy KV-cache
generation, (B * (N - 1)) / (time(N new tokens) - time(1 new token)), so prefill is excluded.
Variants are timed in interleaved rounds (each round runs every variant once, after one
warm-up round), and each time is the fastest over the rounds, so a burst of load from other
processes on a shared machine hits every variant alike instead of one.

``--dtype bfloat16`` runs every variant in bfloat16 (default float32).

Run ``python benchmarks/hf_generate.py`` (``--quick`` for a smaller model); prints a table and
writes benchmarks/results/hf_generate.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import moekit
from moekit.hf import from_hf, patch_model, unpatch_model
from moekit.experts import quantize_experts
from moekit.hf.testing import randomize_
from moekit.lm import generate as lm_generate


def timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Variant:
    """One way of running the model: ``enter``/``leave`` switch it on and off around each round."""

    def __init__(self, name: str, prefill: Callable[[], object], gen: Callable[[int], torch.Tensor],
                 enter: Callable[[], object] = lambda: None, leave: Callable[[], object] = lambda: None) -> None:
        self.name, self.prefill, self.gen, self.enter, self.leave = name, prefill, gen, enter, leave
        self.times: dict[str, list[float]] = {"prefill": [], "gen_one": [], "gen_many": []}

    def run_round(self, new: int) -> None:
        self.enter()
        try:
            self.times["prefill"].append(timed(self.prefill))
            self.times["gen_one"].append(timed(lambda: self.gen(1)))
            self.times["gen_many"].append(timed(lambda: self.gen(new)))
        finally:
            self.leave()

    def tokens(self, new: int) -> torch.Tensor:
        self.enter()
        try:
            return self.gen(new)
        finally:
            self.leave()

    def result(self, tokens: int, batch: int, new: int) -> dict[str, float]:
        t_prefill, t_one, t_many = (min(self.times[k][1:]) for k in ("prefill", "gen_one", "gen_many"))
        # Under heavy outside load the difference can vanish; NaN then, rather than a huge rate.
        decode = batch * (new - 1) / (t_many - t_one) if t_many > t_one else float("nan")
        return {"prefill_tok_s": tokens / t_prefill, "decode_tok_s": decode, "prefill_s": t_prefill,
                "generate_s": t_many}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer tokens")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 keeps timings steady on a machine "
                             "shared with other jobs, where idle OpenMP threads spin while a partner is descheduled")
    parser.add_argument("--dim", type=int, default=None, help="model dim (default 256, 128 with --quick)")
    parser.add_argument("--expert-hidden", type=int, default=None, help="expert hidden size (default dim / 2)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, 2 with --quick)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of every variant (transformers' model and moekit's LM alike)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="add moekit LM rows in bf16, int8 experts, and int8 experts with bf16 activations")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_generate.json"))
    args = parser.parse_args()

    import transformers

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dim, layers, hidden = (128, 2, 64) if args.quick else (256, 4, 128)
    dim, layers = args.dim or dim, args.layers or layers
    hidden = args.expert_hidden or (dim // 2 if args.dim else hidden)
    prompt_len, new = (32, 24) if args.quick else (args.prompt, args.new)
    config = transformers.Qwen3MoeConfig(
        vocab_size=2048, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        head_dim=32, intermediate_size=4 * dim, moe_intermediate_size=hidden, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, max_position_embeddings=prompt_len + new + 8)
    torch.manual_seed(0)
    model = randomize_(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32), std=0.05).eval()
    model.to(args.device, getattr(torch, args.dtype))
    ids = torch.randint(0, config.vocab_size, (args.batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    tokens = ids.numel()

    def hf_gen(n: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)

    def hf_prefill() -> torch.Tensor:
        return model(ids, attention_mask=mask).logits

    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, torch.Tensor] = {}
    variants: list[Variant] = []
    for impl in ("eager", "grouped_mm", "batched_mm"):
        try:
            model.set_experts_implementation(impl)
        except (ValueError, ImportError) as err:
            results[f"hf_{impl}"] = {"error": str(err)}
            continue
        variants.append(Variant(f"hf_{impl}", hf_prefill, hf_gen,
                                enter=lambda i=impl: model.set_experts_implementation(i)))
    # A patched model keeps transformers' attention; its own experts code is no longer called.
    for name, overrides in (("moekit_inplace", {}), ("moekit_inplace_nocheck", {"check_finite": False})):
        variants.append(Variant(name, hf_prefill, hf_gen, enter=lambda o=overrides: patch_model(model, **o),
                                leave=lambda: (moekit.reset_routing_stats(model), unpatch_model(model))))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        lm = from_hf(folder, check_finite=False).to(args.device, getattr(torch, args.dtype))
    variants.append(Variant("moekit_lm", lambda: lm(ids), lambda n: lm_generate(lm, ids, n)))
    logits_err: dict[str, float] = {}
    if args.quantize is not None:
        with torch.no_grad():
            ref_logits = lm(ids).double()
            for name, dtype, quantize in (("moekit_lm_bf16", torch.bfloat16, None),
                                          (f"moekit_lm_{args.quantize}", None, args.quantize),
                                          (f"moekit_lm_{args.quantize}_bf16", torch.bfloat16, args.quantize)):
                other = copy.deepcopy(lm)
                if dtype is not None:
                    other.to(dtype)
                if quantize is not None:
                    quantize_experts(other, quantize)
                logits_err[name] = float((other(ids).double() - ref_logits).norm() / ref_logits.norm())
                variants.append(Variant(name, lambda m=other: m(ids), lambda n, m=other: lm_generate(m, ids, n)))
    load_before = os.getloadavg()
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            for variant in variants:
                variant.run_round(new)
        for variant in variants:
            results[variant.name] = variant.result(tokens, args.batch, new)
            outputs[variant.name] = variant.tokens(new)
    ok = [k for k in results if "error" not in results[k] and k.startswith("hf_")]
    best_prefill = max(ok, key=lambda k: results[k]["prefill_tok_s"])
    best = max(ok, key=lambda k: results[k]["decode_tok_s"] if results[k]["decode_tok_s"] > 0 else 0.0)

    ref = outputs[best]
    same = {k: bool(torch.equal(v, ref)) for k, v in outputs.items()}
    base_prefill, base_decode = results[best_prefill]["prefill_tok_s"], results[best]["decode_tok_s"]
    print(f"Qwen3-MoE D={dim} layers={layers} E={args.experts} K={args.top_k} F={hidden}, batch={args.batch}, "
          f"prompt={prompt_len}, new={new}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.device}, {args.dtype}, {torch.get_num_threads()} CPU threads")
    print(f"ratios: prefill vs the fastest HF prefill ({best_prefill}), decode vs the fastest HF decode ({best})")
    print(f"{'impl':24s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'prefill x':>10s} {'decode x':>9s} same_tokens")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:24s} error: {r['error'][:60]}")
            continue
        r["prefill_vs_hf_best"] = r["prefill_tok_s"] / base_prefill
        r["decode_vs_hf_best"] = r["decode_tok_s"] / base_decode
        r["same_tokens_as_hf_best"] = same[name]
        if name in logits_err:
            r["logits_rel_err_vs_moekit_lm"] = logits_err[name]
        print(f"{name:24s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} {r['prefill_vs_hf_best']:10.2f} "
              f"{r['decode_vs_hf_best']:9.2f} {same[name]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"config": {"dim": dim, "layers": layers, "experts": args.experts, "top_k": args.top_k, "dtype": args.dtype,
                         "expert_hidden": hidden, "batch": args.batch, "prompt": prompt_len, "new": new,
                         "repeats": args.repeats, "quantize": args.quantize},
              "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "device": args.device,
                      "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                      "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
              "hf_best_prefill": best_prefill, "hf_best_decode": best, "results": results,
              "times_s": {v.name: v.times for v in variants}}
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
