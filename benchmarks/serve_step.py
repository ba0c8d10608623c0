"""Benchmark: the serving engine's forward steps on the load test's model (``serve_load.py``: dim
128, 4 layers, 8 experts top-2, byte vocabulary), in-process, no HTTP.

Pairs, each timed interleaved (one call of each, repeated) in the same process, minimum kept:
  * admitting a 31-token prompt while 15 rows decode: one ``mixed_step`` (the engine now) against
    a lone prefill then a 16-row ``decode_step`` (the engine before);
  * a 15-row ``decode_step`` against 15 one-row decode forwards (what batching saves in the model).

    python benchmarks/serve_step.py     # ~10 s; prints a table, writes results/serve_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm_step import cpu_info  # noqa: E402
from opsbench import time_pair  # noqa: E402

from moekit.config import moe_config  # noqa: E402
from moekit.lm import LM, LMConfig  # noqa: E402
from moekit.serve.batched import KVPool, SlotCache, decode_step, mixed_step, prefill_step  # noqa: E402

ROWS, PROMPT, CACHED = 15, 31, 40


def build(dim: int) -> LM:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=257, dim=dim, n_layers=4, n_heads=4, max_seq_len=256, ffn_hidden=2 * dim,
                   moe=moe_config(dim=dim, num_experts=8, expert_hidden=dim, top_k=2))
    return LM(cfg).eval()


def cases(model: LM) -> list[tuple[str, str, Callable[[], object], str, Callable[[], object]]]:
    """(case, new step's name, new step, baseline's name, baseline) pairs over one KV pool."""
    pool = KVPool(model.config.n_layers, ROWS + 2, model.config.max_seq_len)
    rows = [pool.acquire() for _ in range(ROWS)]
    gen = torch.Generator().manual_seed(1)
    prefill_step(model, [torch.randint(0, 257, (CACHED,), generator=gen) for _ in rows], rows)
    prompt = torch.randint(0, 257, (PROMPT,), generator=gen)
    tokens = torch.randint(0, 257, (ROWS + 1,), generator=gen)

    def rewind() -> SlotCache:
        for c in rows:
            c.length = CACHED
        return SlotCache(pool, ROWS)  # the joining request's slot, empty

    def mixed() -> None:
        mixed_step(model, tokens[:ROWS], rows, [prompt], [rewind()])

    def separate() -> None:
        fresh = rewind()
        model(prompt[None], cache=fresh)
        decode_step(model, tokens, rows + [fresh])

    def batched() -> None:
        rewind()
        decode_step(model, tokens[:ROWS], rows)

    def one_by_one() -> None:
        rewind()
        for b, c in enumerate(rows):
            model(tokens[b:b + 1, None], cache=c)

    return [(f"{ROWS} rows decode + one {PROMPT}-token prompt", "mixed_step", mixed, "prefill + decode_step", separate),
            (f"{ROWS} rows decode", "decode_step", batched, f"{ROWS} one-row forwards", one_by_one)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the load test's server uses 1)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds per pair")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.dim)
    rows = []
    print(f"{'case':42s} {'new':>12s} {'ms':>7s} {'baseline':>12s} {'ms':>7s} {'x':>6s}")
    with torch.no_grad():
        for label, new_name, new, base_name, base in cases(model):
            new_s, base_s, calls = time_pair(new, base, args.budget)
            rows.append({"case": label, "new": new_name, "new_ms": new_s * 1e3, "baseline": base_name,
                         "baseline_ms": base_s * 1e3, "baseline_over_new": base_s / new_s, "calls": calls})
            print(f"{label:42s} {new_name:>12s} {new_s * 1e3:7.2f} {base_name[:12]:>12s} {base_s * 1e3:7.2f} "
                  f"{base_s / new_s:6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "serve_step", "timing": "min over interleaved calls",
                               "torch": torch.__version__, "threads": args.threads, "dim": args.dim,
                               "load_avg": os.getloadavg(), "cpu": cpu_info(), "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
