"""Load test of ``moekit serve`` on loopback: throughput, latency and time to first token at 1, 4 and
16 concurrent clients, with continuous batching on (``--max-batch 16``) and off (``--max-batch 1``,
one request at a time).

A random-init MoE LM checkpoint (default: dim 128, 4 layers, 8 experts top-2) is written to a
temporary folder and served by ``moekit serve`` in a subprocess (so the clients do not share the
server's interpreter). For each mode and client count, N clients share a fixed number of streamed
requests (``--requests`` of up to ``--max-tokens`` tokens, seeded temperature-1 sampling; a
request ends early only if it draws the end-of-document byte), one after another per client.
The clients are aiohttp's (as vLLM's serving benchmark), which parse a stream with less CPU than
httpx's: the load generator shares the machine with the server, and a client that takes more CPU
per token takes more from the faster mode.

Reported per run: completion tokens/s over the run's wall time, p50/p99 request latency and
p50/p99 time to first token, the server's CPU time per completion token (user + system, all
threads, from /proc on Linux; also split into the event-loop thread and the others) and the
clients' CPU seconds. The two modes alternate ``--rounds`` times at each client count (both
servers stay up); a round's ratio compares its two runs, which ran one after the other, and the
summary gives each mode's median run and the median (min-max) of the rounds' ratios. Then the
same requests go through the engine alone in this process (no HTTP, no client CPU;
``engine_alone`` in the record), which separates what batching gains in the model and engine from
what the HTTP layer and the clients take. The machine may be shared, and on a VM a neighbour's
load moves the speed of both modes by 10-30% between runs: compare ratios, not absolute numbers.

Run ``python benchmarks/serve_load.py`` (``--quick`` for fewer requests, one round); prints a table
and writes benchmarks/results/serve_load.json. ``--hf mixtral`` (or qwen3_moe, deepseek_v3, ...)
serves a converted Hugging Face checkpoint instead: a random-init transformers model of that
family at ``--dim``/``--layers`` (other sizes as in ``moekit.hf.testing``), saved with a
byte-level BPE tokenizer trained here and converted with ``moekit convert --from-hf``; it writes
serve_load_hf_<family>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import torch

import moekit
from moekit.config import moe_config
from moekit.lm import LM, LMConfig
from moekit.serve.engine import GenRequest, ServeLimits
from moekit.serve.server import free_port, load_engine
from moekit.train.checkpoint import save_checkpoint
from moekit.train.trainer import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from lm_step import cpu_info  # noqa: E402


def write_checkpoint(folder: Path, args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    model_cfg = LMConfig(vocab_size=257, dim=args.dim, n_layers=args.layers, n_heads=4, max_seq_len=256,
                         ffn_hidden=2 * args.dim, moe=moe_config(dim=args.dim, num_experts=args.experts,
                                                                 expert_hidden=args.dim, top_k=2))
    cfg = TrainConfig(model=model_cfg, seq_len=128)
    save_checkpoint(folder, 0, LM(cfg.model), None, {"config": cfg.to_dict()})
    return folder


def write_hf_checkpoint(folder: Path, args: argparse.Namespace) -> Path:
    """A converted Hugging Face checkpoint of family ``args.hf`` with its own tokenizer files."""
    from moekit.hf.convert import convert_folder
    from moekit.hf.testing import tiny_hf_model, tiny_tokenizer

    tok = tiny_tokenizer(folder / "hf", vocab_size=512)
    end = tok.token_to_id("<|im_end|>")
    model = tiny_hf_model(args.hf, vocab_size=tok.get_vocab_size(), hidden_size=args.dim,
                          num_hidden_layers=args.layers, eos_token_id=end, bos_token_id=tok.token_to_id("<s>"),
                          pad_token_id=tok.token_to_id("<|endoftext|>"))
    model.save_pretrained(folder / "hf")
    return convert_folder(folder / "hf", folder / "converted")


def stat_cpu_seconds(stat: str) -> float | None:
    """User + system CPU seconds in a /proc ``stat`` file (a process's or one thread's); None when
    it cannot be read (off Linux, or the thread is gone)."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads) from /proc; None off Linux."""
    return stat_cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid: int) -> dict[str, float] | None:
    """CPU seconds of process ``pid``'s main thread (the server's event loop) and of its other
    threads together (the engine thread, torch's and uvicorn's), from /proc; None off Linux."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    times = {tid: stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat") for tid in tids}
    if None in times.values():
        return None
    main = times.pop(str(pid), 0.0)
    return {"event_loop": main, "other_threads": sum(times.values())}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def one_request(session: aiohttp.ClientSession, i: int, max_tokens: int) -> dict[str, float]:
    body = {"prompt": f"Request {i}: the quick brown fox", "max_tokens": max_tokens, "temperature": 1.0,
            "seed": i, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with session.post("/v1/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:  # one line at a time
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            event = json.loads(raw[6:])
            if first is None and event["choices"] and event["choices"][0].get("token_ids"):
                first = time.perf_counter()
            if event.get("usage"):  # the last chunk (OpenAI's include_usage); earlier chunks have None
                tokens = event["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": (first or time.perf_counter()) - t0, "tokens": tokens}


async def load(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[dict[str, float]] = []

    async def client_loop(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            results.append(await one_request(session, queue.get_nowait(), max_tokens))

    connector = aiohttp.TCPConnector(limit=clients + 1)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        # Warm-up: one short request per client at once, so first-call costs of the batched paths
        # (a step over many rows, a packed prefill) are not timed either.
        await asyncio.gather(*(one_request(session, 10**6 + c, 4) for c in range(clients)))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client_loop(session) for _ in range(clients)))
        wall, client_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_latency_s": percentile(latencies, 50),
            "p99_latency_s": percentile(latencies, 99), "mean_latency_s": statistics.fmean(latencies),
            "p50_ttft_s": percentile(ttfts, 50), "p99_ttft_s": percentile(ttfts, 99),
            "client_cpu_s": client_cpu}


def in_process(checkpoint: Path, max_batch: int, clients: int, requests: int, max_tokens: int,
               threads: int) -> dict[str, float]:
    """The same requests through the engine alone (``moekit.serve.engine.Engine`` in this process,
    no HTTP): each of ``clients`` submits its next request when its last one is done. What batching
    gains in the model and the engine, apart from the HTTP layer and the clients' CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    engine = load_engine(checkpoint, ServeLimits(max_batch=max_batch, queue_size=requests + clients))
    tok = engine.tokenizer
    ids = iter(range(requests))
    lock, finished = threading.Lock(), threading.Semaphore(0)
    tokens = [0]

    def submit_next() -> None:
        with lock:
            i = next(ids, None)
        if i is not None:
            engine.submit(GenRequest(prompt_ids=tok.encode(f"Request {i}: the quick brown fox"), max_tokens=max_tokens,
                                     temperature=1.0, seed=i, on_event=on_event))

    def on_event(event: dict) -> None:
        if event["type"] in ("done", "error"):  # engine thread: this client's next request
            tokens[0] += event.get("usage", {}).get("completion_tokens", 0)
            finished.release()
            submit_next()

    try:
        engine.start()
        t0 = time.perf_counter()
        for _ in range(clients):
            submit_next()
        for _ in range(requests):
            finished.acquire()
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
        torch.set_num_threads(before)
    return {"clients": clients, "max_batch": max_batch, "tokens": tokens[0], "wall_s": wall,
            "tokens_per_s": tokens[0] / wall}


def serve(checkpoint: Path, max_batch: int, threads: int, queue_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moekit", "serve", str(checkpoint), "--port", str(port), "--max-batch",
           str(max_batch), "--queue-size", str(queue_size), "--threads", str(threads), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moekit serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"moekit serve did not answer on {url} within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=128, help="requests per run (shared by the clients)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each mode per client count, alternating")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--quick", action="store_true", help="16 requests of 16 tokens, one round")
    parser.add_argument("--hf", default=None, metavar="FAMILY", help="serve a converted HF model of this family")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = parser.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.rounds = 16, 16, 1
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: need at least 1")
    client_counts = [int(c) for c in args.clients.split(",")]
    modes = {"batching": max(client_counts), "one_at_a_time": 1}
    runs = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_hf_checkpoint(Path(tmp), args) if args.hf else write_checkpoint(Path(tmp) / "ckpt", args)
        servers = {}
        try:
            for mode, max_batch in modes.items():
                servers[mode] = serve(checkpoint, max_batch, args.threads, queue_size=args.requests + 1)
            # Both servers stay up (idle costs nothing); the modes alternate, round after round at
            # each client count, so that a change in the machine's load hits both alike.
            for clients in client_counts:
                for round_ in range(args.rounds):
                    for mode, max_batch in modes.items():
                        pid = servers[mode][0].pid
                        cpu_before, threads_before = cpu_seconds(pid), thread_cpu_seconds(pid)
                        run = asyncio.run(load(servers[mode][1], clients, args.requests, args.max_tokens))
                        cpu_after, threads_after = cpu_seconds(pid), thread_cpu_seconds(pid)
                        if threads_before is not None and threads_after is not None:
                            run["server_cpu_s_by_thread"] = {k: threads_after[k] - threads_before.get(k, 0.0)
                                                             for k in threads_after}
                        # The warm-up requests' few tokens are in the CPU time too (one per client: 1-2% of a run's).
                        run["server_cpu_ms_per_token"] = (None if cpu_before is None or cpu_after is None
                                                          else 1000 * (cpu_after - cpu_before) / run["tokens"])
                        runs.append({"mode": mode, "max_batch": max_batch, "round": round_, **run})
                        print(f"{mode:>14} clients={clients:>2} round {round_ + 1}: {run['tokens_per_s']:8.1f} tok/s",
                              file=sys.stderr)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
        # The engine alone at the largest client count, the modes alternating as above.
        engine_runs = []
        for round_ in range(args.rounds):
            for mode, max_batch in modes.items():
                run = in_process(checkpoint, max_batch, max(client_counts), args.requests, args.max_tokens,
                                 args.threads)
                engine_runs.append({"mode": mode, "round": round_, **run})
    summary = summarize(runs, client_counts, list(modes))
    print_table(summary)
    engine_ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(engine_runs[::2], engine_runs[1::2])]
    engine_summary = {"clients": max(client_counts), "tokens_per_s_vs_one_at_a_time": statistics.median(engine_ratios),
                      "tokens_per_s_vs_one_at_a_time_min": min(engine_ratios),
                      "tokens_per_s_vs_one_at_a_time_max": max(engine_ratios),
                      **{f"{mode}_tokens_per_s": statistics.median(r["tokens_per_s"] for r in engine_runs
                                                                    if r["mode"] == mode) for mode in modes}}
    print(f"engine alone (no HTTP), {max(client_counts)} clients: batching "
          f"{engine_summary['batching_tokens_per_s']:.1f} tok/s, one at a time "
          f"{engine_summary['one_at_a_time_tokens_per_s']:.1f} tok/s, x {statistics.median(engine_ratios):.2f} "
          f"({min(engine_ratios):.2f}-{max(engine_ratios):.2f})")
    record = {"benchmark": "serve_load", "moekit": moekit.__version__, "torch": torch.__version__,
              "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu": cpu_info(),
              "torch_threads_server": args.threads, "client": f"aiohttp {aiohttp.__version__}",
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "summary": summary,
              "engine_alone": {"summary": engine_summary, "runs": engine_runs}, "runs": runs}
    out = Path(args.out)
    if args.hf and args.out == parser.get_default("out"):
        out = out.with_name(f"serve_load_hf_{args.hf}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"1-minute load average: {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (shared machine)")
    print(f"wrote {out}")


def summarize(runs: list[dict], client_counts: list[int], modes: list[str]) -> list[dict]:
    """Per client count and mode: the median run's figures (by tokens/s) and the rounds' ratios
    against one at a time (each round's two runs ran one after the other): median, min and max."""
    summary = []
    for clients in client_counts:
        base = {r["round"]: r for r in runs if r["clients"] == clients and r["mode"] == "one_at_a_time"}
        for mode in modes:
            mine = [r for r in runs if r["clients"] == clients and r["mode"] == mode]
            ratios = [r["tokens_per_s"] / base[r["round"]]["tokens_per_s"] for r in mine]
            cpu_ratios = [base[r["round"]]["server_cpu_ms_per_token"] / r["server_cpu_ms_per_token"] for r in mine
                          if r["server_cpu_ms_per_token"] and base[r["round"]]["server_cpu_ms_per_token"]]
            middle = sorted(mine, key=lambda r: r["tokens_per_s"])[len(mine) // 2]
            summary.append({**{k: v for k, v in middle.items() if k != "round"}, "rounds": len(mine),
                            "tokens_per_s_all": [r["tokens_per_s"] for r in mine],
                            "tokens_per_s_vs_one_at_a_time": statistics.median(ratios),
                            "tokens_per_s_vs_one_at_a_time_min": min(ratios),
                            "tokens_per_s_vs_one_at_a_time_max": max(ratios),
                            # How many times less server CPU a token took than one at a time (load-independent).
                            "cpu_per_token_vs_one_at_a_time": statistics.median(cpu_ratios) if cpu_ratios else None})
    return summary


def print_table(summary: list[dict]) -> None:
    header = (f"{'mode':<14} {'clients':>7} {'tok/s':>8} {'x off (min-max)':>17} {'p50 lat s':>9} {'p99 lat s':>9} "
              f"{'p50 TTFT s':>10} {'p99 TTFT s':>10} {'CPU ms/tok':>10} {'x CPU':>6} {'client CPU s':>12}")
    print(header)
    print("-" * len(header))
    for r in summary:
        spread = (f"{r['tokens_per_s_vs_one_at_a_time']:.2f} ({r['tokens_per_s_vs_one_at_a_time_min']:.2f}-"
                  f"{r['tokens_per_s_vs_one_at_a_time_max']:.2f})")
        print(f"{r['mode']:<14} {r['clients']:>7} {r['tokens_per_s']:>8.1f} {spread:>17} {r['p50_latency_s']:>9.3f} "
              f"{r['p99_latency_s']:>9.3f} {r['p50_ttft_s']:>10.3f} {r['p99_ttft_s']:>10.3f} "
              f"{r['server_cpu_ms_per_token'] or 0:>10.2f} {r['cpu_per_token_vs_one_at_a_time'] or 0:>6.2f} "
              f"{r['client_cpu_s']:>12.2f}")


if __name__ == "__main__":
    main()
