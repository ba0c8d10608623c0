"""`moekit serve` over real HTTP on loopback: a tiny random-init checkpoint written here, served by
uvicorn in a background thread, driven by httpx."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed; pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed; pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed; pip install -e '.[dev]'")

from moekit.config import moe_config  # noqa: E402
from moekit.lm import LM, LMConfig  # noqa: E402
from moekit.lm.generate import generate  # noqa: E402
from moekit.serve import BackgroundServer, ServeLimits, create_app, load_engine  # noqa: E402
from moekit.train.checkpoint import save_checkpoint  # noqa: E402
from moekit.train.trainer import TrainConfig  # noqa: E402

EOS = 256
ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


pytestmark = pytest.mark.usefixtures("one_thread_module")


def write_checkpoint(folder, seed: int = 0, nan_expert: int | None = None):
    torch.manual_seed(seed)
    model_cfg = LMConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                         ffn_hidden=48, init_std=0.2,
                         moe=moe_config(dim=32, num_experts=4, expert_hidden=24, top_k=2))
    cfg = TrainConfig(model=model_cfg, seq_len=32, tokenizer="byte")
    model = LM(cfg.model)
    if nan_expert is not None:
        with torch.no_grad():
            model.layers[0].mlp.experts.down_proj[nan_expert].fill_(float("nan"))
    save_checkpoint(folder, 0, model, None, {"config": cfg.to_dict()})
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))


def start(checkpoint, **limits):
    limits = {"max_batch": 4, "queue_size": 16, "max_tokens": 64, "max_prompt_tokens": 40, **limits}
    engine = load_engine(checkpoint, ServeLimits(**limits), model_name="tiny")
    return engine, BackgroundServer(create_app(engine))


@pytest.fixture(scope="module")
def served(checkpoint):
    engine, server = start(checkpoint, admin_token=ADMIN_TOKEN)
    with server:
        with httpx.Client(base_url=server.url, timeout=60, headers=ADMIN) as client:
            yield client, engine


def complete(client, **body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def offline(engine, prompt: str, n: int, temperature: float, top_p: float, seed: int | None) -> list[int]:
    ids = list(prompt.encode())
    with engine.model_lock:  # the engine thread may be running a step on the same model
        out = generate(engine.model, torch.tensor([ids]), n, temperature=temperature, top_p=top_p, seed=seed,
                       stop_token=EOS)
    return out[0, len(ids):].tolist()


def test_health_models_and_completion_shape(served):
    client, engine = served
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    out = complete(client, prompt="Hello", max_tokens=5, temperature=0, model="tiny")
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    choice = out["choices"][0]
    assert len(choice["token_ids"]) == out["usage"]["completion_tokens"] <= 5
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["total_tokens"] == 5 + len(choice["token_ids"])
    assert choice["finish_reason"] in ("length", "stop")
    assert choice["text"] == bytes(t for t in choice["token_ids"] if t != EOS).decode("utf-8", "replace")


@pytest.mark.parametrize("temperature,top_p,seed", [(0.0, 1.0, None), (0.8, 0.95, 1), (1.5, 0.7, 12345)])
def test_seeded_completion_equals_offline_generate(served, temperature, top_p, seed):
    client, engine = served
    out = complete(client, prompt="The cat", max_tokens=12, temperature=temperature, top_p=top_p, seed=seed)
    assert out["choices"][0]["token_ids"] == offline(engine, "The cat", 12, temperature, top_p, seed)


@pytest.mark.slow  # a fresh interpreter importing torch: 15-40 s on a shared 2-core machine
def test_seeded_completion_equals_the_generate_cli(served, checkpoint):
    client, _ = served
    out = complete(client, prompt="Once upon", max_tokens=10, temperature=0.8, top_p=0.95, seed=7)
    cli = subprocess.run([sys.executable, "-m", "moekit", "generate", str(checkpoint), "--prompt", "Once upon",
                          "--max-new-tokens", "10", "--temperature", "0.8", "--top-p", "0.95", "--seed", "7",
                          "--stop-at-eos"], capture_output=True, timeout=120, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.stdout.decode("utf-8") == "Once upon" + out["choices"][0]["text"] + "\n"


def test_concurrent_requests_are_batched_and_all_correct(served):
    client, engine = served
    steps_before = engine.counts["batched_steps"]
    jobs = [(f"prompt number {i}", 0.0 if i % 2 else 0.9, 0.9, 100 + i) for i in range(8)]
    results: dict[int, dict] = {}

    def worker(i):
        prompt, t, p, s = jobs[i]
        results[i] = complete(client, prompt=prompt, max_tokens=10, temperature=t, top_p=p, seed=s)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert sorted(results) == list(range(len(jobs)))
    for i, (prompt, t, p, s) in enumerate(jobs):
        assert results[i]["choices"][0]["token_ids"] == offline(engine, prompt, 10, t, p, s), i
    assert engine.counts["batched_steps"] > steps_before


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_streaming_equals_the_plain_answer(served):
    client, _ = served
    body = {"prompt": "Stream me", "max_tokens": 12, "temperature": 0.9, "seed": 3, "routing_trace": True}
    plain = complete(client, **body)
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == plain["choices"][0]["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    assert all(list(c) == ["id", "object", "created", "model", "choices"] and c["object"] == "text_completion"
               and c["id"] == chunks[0]["id"] and c["model"] == plain["model"] for c in chunks)
    with client.stream("POST", "/v1/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        with_usage = sse_events(r)[:-1]
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    trace = [t for c in chunks[:-1] for t in c["choices"][0]["routing_trace"]]
    assert trace == plain["choices"][0]["routing_trace"]


def test_routing_trace_names_top_k_experts_per_layer_per_token(served):
    client, _ = served
    out = complete(client, prompt="trace", max_tokens=6, temperature=0, routing_trace=True)
    choice = out["choices"][0]
    assert [t["token_id"] for t in choice["routing_trace"]] == choice["token_ids"]
    for step in choice["routing_trace"]:
        assert set(step["experts"]) == {"layers.0.mlp", "layers.1.mlp"}
        for ids in step["experts"].values():
            assert len(set(ids)) == 2 and all(0 <= e < 4 for e in ids)
    assert "routing_trace" not in complete(client, prompt="trace", max_tokens=2)["choices"][0]


def test_stop_string_cuts_the_text(served):
    client, _ = served
    body = {"prompt": "abc", "max_tokens": 24, "temperature": 0}
    full = complete(client, **body)["choices"][0]["text"]
    stop = full[4:6]
    assert stop, full
    cut = full.find(stop)
    out = complete(client, **body, stop=[stop, "never-seen-zz"])["choices"][0]
    assert out["text"] == full[:cut] and out["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as r:
        chunks = sse_events(r)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:cut]


BAD_BODIES = [
    (b'{"prompt": "hi", ', None, "not valid JSON"),
    (b'["hi"]', None, "JSON object"),
    (b'{"max_tokens": 3}', "prompt", "prompt: Field required"),
    (b'{"prompt": 5}', "prompt", "prompt: Input should be a valid string"),
    (b'{"prompt": ""}', "prompt", "at least 1 character"),
    (b'{"prompt": []}', "prompt", "prompt: "),
    (b'{"prompt": [300]}', "prompt", "less than 257"),
    (json.dumps({"prompt": "x" * 41}).encode(), "prompt", "41 tokens, more than the limit of 40"),
    (b'{"prompt": "hi", "max_tokens": 0}', "max_tokens", "greater than or equal to 1"),
    (b'{"prompt": "hi", "max_tokens": 65}', "max_tokens", "less than or equal to 64"),
    (b'{"prompt": "hi", "max_tokens": "5"}', "max_tokens", "valid integer"),
    (b'{"prompt": "hi", "max_tokens": 2.5}', "max_tokens", "valid integer"),
    (json.dumps({"prompt": "x" * 40, "max_tokens": 60}).encode(), "max_tokens", "exceeds the model's context of 96"),
    (b'{"prompt": "hi", "temperature": -1}', "temperature", "greater than or equal to 0"),
    (b'{"prompt": "hi", "temperature": NaN}', "temperature", "finite number"),
    (b'{"prompt": "hi", "top_p": 0}', "top_p", "greater than 0"),
    (b'{"prompt": "hi", "seed": 1.5}', "seed", "seed: "),
    (b'{"prompt": "hi", "stream": "yes"}', "stream", "valid boolean"),
    (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "stop", "at most 4 items"),
    (b'{"prompt": "hi", "stop": [""]}', "stop", "at least 1 character"),
    (b'{"prompt": "hi", "n": 9}', "n", "less than or equal to 8"),
    (b'{"prompt": "hi", "best_of": 2}', "best_of", "best_of: not supported by this server"),
    (b'{"prompt": "hi", "suffix": "x"}', "suffix", "suffix: not supported by this server"),
    (b'{"prompt": "hi", "frobnicate": 1}', "frobnicate", "frobnicate: unknown field"),
    (b'{"prompt": "hi", "logprobs": 6}', "logprobs", "less than or equal to 5"),
    (b'{"prompt": "hi", "logit_bias": {"257": 1}}', "logit_bias", "logit_bias"),
    (b'{"prompt": "hi", "logit_bias": {"3": 101}}', "logit_bias", "less than or equal to 100"),
    (b'{"prompt": "hi", "presence_penalty": 2.5}', "presence_penalty", "less than or equal to 2"),
    (b'{"prompt": "\\ud800abc"}', "prompt", "prompt: "),
    (json.dumps({"prompt": "hi", "user": "u" * 257}).encode(), "user", "at most 256 characters"),
]


@pytest.mark.parametrize("body,param,message", BAD_BODIES, ids=[m for _, _, m in BAD_BODIES])
def test_bad_input_is_a_400_naming_the_field(served, body, param, message):
    client, _ = served
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_body_without_json_content_type_is_named(served):
    client, _ = served
    r = client.post("/v1/completions", content=b'{"prompt": "hi"}',
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    assert "application/x-www-form-urlencoded" in r.json()["error"]["message"]


def test_server_keeps_serving_after_bad_input(served):
    client, _ = served
    for body, _, _ in BAD_BODIES:
        client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert complete(client, prompt="still here", max_tokens=3)["usage"]["completion_tokens"] >= 1
    metrics = client.get("/metrics").text
    bad = [line for line in metrics.splitlines() if line.startswith("moekit_bad_requests_total ")]
    assert float(bad[0].split()[1]) >= len(BAD_BODIES)


def test_metrics_report_requests_latency_and_expert_utilisation(served):
    client, _ = served
    complete(client, prompt="metrics", max_tokens=4)
    text = client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['moekit_requests_total{status="ok"}'] >= 1
    assert samples["moekit_tokens_generated_total"] >= 4
    assert samples["moekit_request_latency_seconds_count"] >= 1
    assert samples["moekit_time_to_first_token_seconds_count"] >= 1
    assert samples["moekit_queue_depth"] == 0
    for layer in ("layers.0.mlp", "layers.1.mlp"):
        shares = [samples[f'moekit_expert_utilization{{expert="{e}",layer="{layer}"}}'] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0)
        assert samples[f'moekit_masked_experts{{layer="{layer}"}}'] == 0
    assert "moekit_expert_quarantined" in text


def test_masking_an_expert_mid_run_changes_routing_and_nothing_fails(served):
    client, engine = served
    probe = {"prompt": "which expert", "max_tokens": 8, "temperature": 0, "routing_trace": True}
    probe_trace = [t["experts"]["layers.0.mlp"] for t in complete(client, **probe)["choices"][0]["routing_trace"]]
    counts = [sum(e in ids for ids in probe_trace) for e in range(4)]
    busiest = max(range(4), key=counts.__getitem__)
    results, errors = {}, []

    def stream(i):
        body = {"prompt": f"mid-run {i}", "max_tokens": 60, "temperature": 0.7, "seed": i, "stream": True,
                "routing_trace": True}
        try:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = sse_events(r)[:-1]
                results[events[0]["id"]] = [t for e in events for t in e["choices"][0].get("routing_trace", [])]
        except AssertionError as err:
            errors.append(err)

    baseline = engine.counts["tokens_generated"]
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    while engine.counts["tokens_generated"] < baseline + 9 and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        r = client.post("/admin/experts/mask", json={"layer": "layers.0.mlp", "experts": [busiest]})
        assert r.status_code == 200 and r.json()["masked"] == [busiest]
        # Tokens past these counts were generated after the mask took effect.
        with engine.model_lock:
            generated_before = {req.request_id: len(req.generated) for req in engine._active}
        for th in threads:
            th.join(120)
        assert not errors and len(results) == 3
        before = [t for rid, trace in results.items() for t in trace[:generated_before.get(rid, len(trace))]]
        after = [t for rid, trace in results.items() for t in trace[generated_before.get(rid, len(trace)):]]
        assert len(after) >= 10, "too few tokens were generated after the mask"
        assert all(busiest not in t["experts"]["layers.0.mlp"] for t in after)
        assert len(before) >= 9
        metrics = client.get("/metrics").text
        assert f'moekit_expert_masked{{expert="{busiest}",layer="layers.0.mlp"}} 1.0' in metrics
        assert 'moekit_masked_experts{layer="layers.0.mlp"} 1.0' in metrics
        again = [t["experts"]["layers.0.mlp"] for t in complete(client, **probe)["choices"][0]["routing_trace"]]
        assert all(busiest not in ids for ids in again) and again != probe_trace
        # The masked model answers like an offline model with the same expert masked.
        out = complete(client, prompt="masked", max_tokens=8, temperature=0)
        assert out["choices"][0]["token_ids"] == offline(engine, "masked", 8, 0.0, 1.0, None)
    finally:
        r = client.post("/admin/experts/unmask", json={"layer": 0})
    assert r.status_code == 200 and r.json()["masked"] == []


@pytest.mark.parametrize("body,status,param", [
    ({"layer": "layers.9.mlp", "experts": [0]}, 404, "layer"),
    ({"layer": 0, "experts": [7]}, 400, "experts"),
    ({"layer": 0, "experts": [0, 1, 2]}, 409, "experts"),
    ({"layer": 0, "experts": []}, 400, "experts"),
    ({"layer": 0, "experts": [0], "force": True}, 400, "force"),
])
def test_admin_mask_rejects_bad_input(served, body, status, param):
    client, engine = served
    r = client.post("/admin/experts/mask", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert all(not layer.masked_experts for layer in engine.layers.values())


def test_admin_token_is_required_when_set(checkpoint):
    engine, server = start(checkpoint, admin_token="s3cret-token")
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"layer": 1, "experts": [0]}
        assert client.post("/admin/experts/mask", json=body).status_code == 401
        assert client.post("/admin/experts/mask", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 401
        # The token is checked before the body: a bad body without the token is 401, not 400.
        assert client.post("/admin/experts/mask", content=b"{not json").status_code == 401
        r = client.post("/admin/experts/mask", json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200 and r.json() == {"layer": "layers.1.mlp", "masked": [0], "quarantined": []}


def test_admin_endpoints_are_off_without_a_token(checkpoint):
    engine, server = start(checkpoint)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in [("POST", "/admin/experts/mask"), ("GET", "/admin/experts"), ("POST", "/admin/experts/unmask")]:
            r = client.request(method, path, json={"layer": 1, "experts": [0]})
            assert r.status_code == 404 and "admin endpoints are off" in r.json()["error"]["message"]
        assert "/admin/experts/mask" not in client.get("/openapi.json").json()["paths"]
        assert all(not layer.masked_experts for layer in engine.layers.values())


def test_flood_gets_429_with_retry_after_and_the_rest_are_answered(checkpoint):
    engine, server = start(checkpoint, max_batch=1, queue_size=2, retry_after_s=3)
    with server, httpx.Client(base_url=server.url, timeout=120) as client:
        answers = []

        def worker(i):
            r = client.post("/v1/completions", json={"prompt": f"flood {i}", "max_tokens": 48, "temperature": 0})
            answers.append((i, r))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        codes = sorted(r.status_code for _, r in answers)
        assert len(answers) == 12 and set(codes) <= {200, 429}
        rejected = [r for _, r in answers if r.status_code == 429]
        assert rejected and 1 <= codes.count(200) <= 11
        assert all(r.headers["retry-after"] == "3" and r.json()["error"]["type"] == "rate_limit_error"
                   for r in rejected)
        for i, r in answers:
            if r.status_code == 200:
                assert r.json()["choices"][0]["token_ids"] == offline(engine, f"flood {i}", 48, 0.0, 1.0, None)
        assert engine.counts["rejected"] == len(rejected)
        assert complete(client, prompt="after the flood", max_tokens=2)["usage"]["completion_tokens"] >= 1
        assert 'moekit_requests_total{status="rejected"} ' + f"{float(len(rejected))}" in client.get("/metrics").text


def wait_for_stats(client, **expected):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = client.get("/v1/stats").json()
        if all(stats[k] == v for k, v in expected.items()):
            break
        time.sleep(0.05)
    assert all(stats[k] == v for k, v in expected.items()), stats


def test_client_disconnect_frees_its_slot(checkpoint):
    engine, server = start(checkpoint, max_batch=1)
    # The engine is held still (model lock) from the client's departure until the server has noticed
    # it, so on a fast machine the request cannot finish first.
    noticed = threading.Event()
    cancel = engine.cancel

    def cancel_and_tell(req):
        cancel(req)
        noticed.set()

    engine.cancel = cancel_and_tell
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        body = {"prompt": "long story", "max_tokens": 64, "temperature": 0.9, "seed": 1, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
            engine.model_lock.acquire()
        try:
            assert noticed.wait(30), "the server did not notice the streaming client going away"
        finally:
            engine.model_lock.release()
        wait_for_stats(client, cancelled_total=1, active=0)
        assert engine.counts["tokens_generated"] < 64
        # The freed slot serves the next request (max_batch=1: it would wait forever otherwise).
        assert complete(client, prompt="next", max_tokens=3)["usage"]["completion_tokens"] >= 1
        # A client waiting for a non-streamed answer that gives up frees its slot too.
        noticed.clear()
        with engine.model_lock:
            with pytest.raises(httpx.TimeoutException):
                client.post("/v1/completions", json={**body, "stream": False}, timeout=0.5)
            assert noticed.wait(30), "the server did not notice the waiting client going away"
        wait_for_stats(client, cancelled_total=2, active=0)
        assert complete(client, prompt="next", max_tokens=3)["usage"]["completion_tokens"] >= 1


def test_corrupt_expert_weights_are_quarantined_at_load(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "nan", nan_expert=1)
    engine, server = start(checkpoint)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        metrics = client.get("/metrics").text
        assert 'moekit_expert_quarantined{expert="1",layer="layers.0.mlp"} 1.0' in metrics
        assert 'moekit_expert_masked{expert="1",layer="layers.0.mlp"} 1.0' in metrics
        out = complete(client, prompt="corrupt", max_tokens=6, temperature=0, routing_trace=True)
        assert all(1 not in t["experts"]["layers.0.mlp"] for t in out["choices"][0]["routing_trace"])
        assert client.get("/v1/stats").json()["layers"][0]["quarantined"] == [1]


def test_expert_that_turns_nan_mid_run_is_quarantined_and_reported(checkpoint):
    engine, server = start(checkpoint)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        complete(client, prompt="healthy", max_tokens=3)
        with engine.model_lock, torch.no_grad():
            engine.layers["layers.1.mlp"].experts.down_proj[2].fill_(float("inf"))
        for i in range(3):
            out = complete(client, prompt=f"quarantine {i}", max_tokens=6, temperature=0, routing_trace=True)
            assert all(2 not in t["experts"]["layers.1.mlp"] for t in out["choices"][0]["routing_trace"])
        metrics = client.get("/metrics").text
        assert 'moekit_expert_quarantined{expert="2",layer="layers.1.mlp"} 1.0' in metrics
        assert 'moekit_expert_masked{expert="2",layer="layers.1.mlp"} 1.0' in metrics
        assert "moekit_quarantine_events_total 1.0" in metrics
        stats = client.get("/v1/stats").json()
        assert stats["layers"][1]["quarantined"] == [2] and stats["errors_total"] == 0


def test_serving_doc_examples_run(tmp_path, monkeypatch):
    from doc_blocks import ROOT, python_blocks, run_blocks

    doc = ROOT / "docs" / "serving.md"
    blocks = python_blocks(doc)
    assert blocks
    monkeypatch.chdir(tmp_path)
    run_blocks(blocks, doc.name)


def cli_status(argv: list[str]) -> int:
    from moekit.cli import main

    try:
        return main(argv)
    except SystemExit as exit:  # argparse rejects a bad value before run()
        return exit.code


@pytest.mark.parametrize("argv,message", [
    (["--max-batch", "0"], "max-batch"),
    (["--queue-size", "-1"], "queue-size"),
    (["--max-tokens", "96"], "--max-tokens 96 must be below the model's context of 96 tokens"),
    (["--host", "0.0.0.0"], "--host 0.0.0.0 is not loopback: give an admin token"),
    (["--protect-stats"], "--protect-stats needs an admin token"),
    (["--admin-token-file", "/nonexistent/token"], "--admin-token-file /nonexistent/token is not a file"),
])
def test_serve_cli_rejects_bad_limits(checkpoint, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("MOEKIT_ADMIN_TOKEN", raising=False)
    assert cli_status(["serve", str(checkpoint), *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_cli_names_a_missing_checkpoint(tmp_path, capsys):
    from moekit.cli import main

    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_events_of_a_step_reach_the_event_loop_in_one_wake_up():
    """On the engine thread events wait for the end of the step (one wake-up for all of them); from
    another thread they wake the loop at once; a closed loop cancels the requests it would feed."""
    import asyncio

    from moekit.serve.app import _Handoff
    from moekit.serve.engine import GenRequest

    class FakeEngine:
        engine_thread = True

        def on_engine_thread(self):
            return self.engine_thread

    loop = asyncio.new_event_loop()
    wakes = []
    wake = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda fn: wakes.append(fn) or wake(fn)
    engine, queue, reqs = FakeEngine(), asyncio.Queue(), [GenRequest(prompt_ids=[1], max_tokens=1) for _ in range(3)]
    handoff = _Handoff(loop, engine)
    for i, req in enumerate(reqs):
        handoff.put(queue, i, req)
    assert not wakes
    handoff.flush()
    handoff.flush()
    assert len(wakes) == 1
    loop.run_until_complete(asyncio.sleep(0))
    assert [queue.get_nowait() for _ in range(3)] == [0, 1, 2]
    engine.engine_thread = False
    handoff.put(queue, 3, reqs[0])
    handoff.put(queue, 4, reqs[1])
    assert len(wakes) == 2
    loop.run_until_complete(asyncio.sleep(0))
    assert [queue.get_nowait() for _ in range(2)] == [3, 4]
    loop.close()
    handoff.put(queue, 5, reqs[2])
    assert reqs[2].cancelled and not reqs[0].cancelled


def test_a_stream_behind_the_engine_gets_its_queued_tokens_in_one_chunk(checkpoint):
    """When several tokens of a choice wait by the time its stream runs (here: the event loop is
    woken every 4th step only, or when idle), they go out as one chunk (their text, all their token_ids); a choice
    with logprobs keeps one chunk per token. Either way the stream equals the plain answer."""
    engine, server = start(checkpoint)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        flush = engine._step_listeners[0]
        steps = iter(range(10**6))
        engine._step_listeners[0] = lambda: (next(steps) % 4 == 3 or not engine.active) and flush()
        for logprobs in (None, 1):
            body = {"prompt": "Behind", "max_tokens": 16, "temperature": 0.9, "seed": 5, "logprobs": logprobs}
            plain = complete(client, **body)
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                chunks = sse_events(r)[:-1]
            ids = [c["choices"][0]["token_ids"] for c in chunks]
            assert [t for i in ids for t in i] == plain["choices"][0]["token_ids"]
            assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
            if logprobs is None:
                assert max(len(i) for i in ids) > 1 and len(chunks) < len(plain["choices"][0]["token_ids"])
            else:
                assert all(len(i) == 1 for i in ids[:-1])
                got = [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]
                assert got == pytest.approx(plain["choices"][0]["logprobs"]["token_logprobs"])
