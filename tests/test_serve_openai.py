"""`moekit serve` driven by the official `openai` Python client, plus the server's isolation and safety:
one failing sequence among live streams, degenerate sampling values, body limits, locked stats, and
schemathesis (`--checks all`) against the live app's /openapi.json."""

import argparse
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency; pip install -e '.[dev]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed; pip install -e '.[dev]'")

from test_serve import ADMIN, ADMIN_TOKEN, EOS, offline, start, write_checkpoint  # noqa: E402

from moekit.data.tokenizer import ByteTokenizer  # noqa: E402
from moekit.serve import BackgroundServer, ServeLimits, create_app, load_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")


class ChatTokenizer(ByteTokenizer):
    """The byte tokenizer with a tiny chat template (the agreed tokenizer interface's render_chat)."""

    def render_chat(self, messages: list[dict]) -> str:
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    limits = ServeLimits(max_batch=4, queue_size=32, max_tokens=48, max_prompt_tokens=40, admin_token=ADMIN_TOKEN)
    engine = load_engine(write_checkpoint(tmp_path_factory.mktemp("openai_ckpt")), limits, model_name="tiny")
    engine.tokenizer = ChatTokenizer()
    with BackgroundServer(create_app(engine)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            yield client, http, engine


def reference_logprobs(engine, ids: list[int], frequency: float = 0.0, presence: float = 0.0,
                       generated_from: int | None = None) -> torch.Tensor:
    """float64 log-softmax of the model's next-token logits after each prefix of ids, (len(ids), V)."""
    with engine.model_lock, torch.no_grad():
        logits = engine.model(torch.tensor([ids]))[0].double()
    return torch.log_softmax(logits, dim=-1)


def test_completion_matches_offline_generate(served):
    client, _, engine = served
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == offline(engine, "Hello", 6, 0.0, 1.0, None)
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == len(choice.model_extra["token_ids"])
    assert out.model == "tiny" and out.object == "text_completion"


def test_n_choices_and_list_and_token_prompts(served):
    client, _, engine = served
    out = client.completions.create(model="tiny", prompt="Seeded", max_tokens=6, temperature=0.9, n=3, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c in out.choices:  # choice i is seeded with seed + i
        assert c.model_extra["token_ids"] == offline(engine, "Seeded", 6, 0.9, 1.0, 5 + c.index)
    assert out.usage.prompt_tokens == 6  # the prompt counts once
    out = client.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=4, temperature=0, n=2)
    texts = [c.model_extra["token_ids"] for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [offline(engine, "ab", 4, 0.0, 1.0, None)] * 2 + [offline(engine, "cd", 4, 0.0, 1.0, None)] * 2
    by_ids = client.completions.create(model="tiny", prompt=[104, 105], max_tokens=4, temperature=0)
    by_list = client.completions.create(model="tiny", prompt=[[104, 105], [99, 100]], max_tokens=4, temperature=0)
    assert by_ids.choices[0].model_extra["token_ids"] == offline(engine, "hi", 4, 0.0, 1.0, None)
    assert by_list.choices[1].model_extra["token_ids"] == offline(engine, "cd", 4, 0.0, 1.0, None)


def test_logprobs_and_echo_match_a_float64_reference(served):
    client, _, engine = served
    out = client.completions.create(model="tiny", prompt="Log", max_tokens=5, temperature=0, logprobs=3, echo=True)
    choice = out.choices[0]
    generated = choice.model_extra["token_ids"]
    prompt = list(b"Log")
    ids = prompt + generated
    ref = reference_logprobs(engine, ids)
    lp = choice.logprobs
    assert choice.text.startswith("Log") and len(lp.tokens) == len(ids) and lp.tokens[:3] == ["L", "o", "g"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-4), i
        assert len(lp.top_logprobs[i]) == 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    for i in range(len(prompt), len(ids)):  # greedy: the chosen token is the top one
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()), abs=1e-9)
    assert lp.text_offset[:3] == [0, 1, 2]


def test_streaming_with_include_usage_equals_the_plain_answer(served):
    client, _, _ = served
    body = {"model": "tiny", "prompt": "Stream", "max_tokens": 10, "temperature": 0.8, "seed": 2}
    plain = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_chat_plain_streamed_and_with_logprobs(served):
    client, _, engine = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2)
    rendered = ChatTokenizer().render_chat(messages)
    expected = offline(engine, rendered, 6, 0.0, 1.0, None)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.model_extra["token_ids"] == expected
    assert choice.message.content == ByteTokenizer().decode([t for t in expected if t != EOS])
    assert len(choice.logprobs.content) == len(expected)
    assert all(len(item.top_logprobs) == 2 for item in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_without_a_template_is_a_400_naming_it(tmp_path):
    engine, server = start(write_checkpoint(tmp_path / "ckpt"))
    with server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template") as err:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert err.value.code == "no_chat_template"
        assert "/v1/chat/completions" not in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def greedy_with_penalties(engine, prompt: str, n: int, frequency: float, presence: float,
                          bias: dict[int, float]) -> list[int]:
    """Reference: OpenAI's penalties and logit_bias applied to full-sequence float64 logits, argmax."""
    ids, out = list(prompt.encode()), []
    for _ in range(n):
        logits = reference_logprobs(engine, ids + out)[-1]  # log-softmax is a shift: same argmax as logits
        for t, b in bias.items():
            logits[t] += b
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).double()
        logits = logits - frequency * counts - presence * (counts > 0).double()
        out.append(int(logits.argmax()))
        if out[-1] == EOS:
            break
    return out


def test_penalties_and_logit_bias_match_a_reference(served):
    client, _, engine = served
    out = client.completions.create(model="tiny", prompt="Penalty", max_tokens=8, temperature=0,
                                    frequency_penalty=1.5, presence_penalty=0.5, logit_bias={"97": 3.0})
    assert out.choices[0].model_extra["token_ids"] == greedy_with_penalties(engine, "Penalty", 8, 1.5, 0.5, {97: 3.0})
    forced = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=1.0, logit_bias={"65": 100})
    assert forced.choices[0].text == "AAAA"


def test_errors_in_openai_shape(served):
    client, http, _ = served
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.list().data[0].created > 0
    with pytest.raises(openai.BadRequestError, match="best_of: not supported"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, best_of=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=100)
    for r in (http.get("/no/such/path"), http.delete("/v1/completions")):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # Explicit null is the default.
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": None, "temperature": None, "top_p": None,
                                           "n": None, "stop": None, "seed": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16


def test_completion_tokens_do_not_count_the_stop_match(served):
    client, _, engine = served
    full = offline(engine, "stop here", 24, 0.0, 1.0, None)
    text = ByteTokenizer().decode(full)
    stop = text[5:7]
    out = client.completions.create(model="tiny", prompt="stop here", max_tokens=24, temperature=0, stop=[stop])
    choice = out.choices[0]
    kept = choice.model_extra["token_ids"]
    assert choice.finish_reason == "stop" and choice.text == text[:text.find(stop)]
    assert out.usage.completion_tokens == len(kept) and kept == full[:len(kept)]
    assert len(ByteTokenizer().decode(full[:len(kept)])) <= len(choice.text)
    assert len(ByteTokenizer().decode(full[:len(kept) + 1])) > len(choice.text)


@pytest.mark.parametrize("body", [{"top_p": 1e-61}, {"temperature": 1e-40}, {"temperature": 5e-324, "top_p": 1e-300}])
def test_degenerate_sampling_values_are_greedy(served, body):
    _, http, engine = served
    r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == offline(engine, "Hello", 4, 0.0, 1.0, None)


def test_a_failing_sequence_fails_alone_among_live_streams(served, monkeypatch):
    """A request whose sampling raises (seed 666 here, by fault injection) mid-batch gets an error; the
    N streams around it all finish with their offline tokens."""
    client, http, engine = served
    sample = engine._sample

    def poisoned(req, logits_1V, token=None):  # token: drawn already with the batch's other rows
        if req.seed == 666 and len(req.generated) >= 2:
            raise RuntimeError("invalid multinomial distribution (injected)")
        return sample(req, logits_1V, token)

    monkeypatch.setattr(engine, "_sample", poisoned)
    n, results, errors = 4, {}, []

    def stream(i):
        try:
            chunks = list(client.completions.create(model="tiny", prompt=f"live {i}", max_tokens=30, temperature=0.7,
                                                    seed=i, stream=True))
            results[i] = ([t for c in chunks for t in c.choices[0].model_extra["token_ids"]],
                          chunks[-1].choices[0].finish_reason)
        except Exception as err:  # recorded and asserted on below
            errors.append(err)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    before = engine.counts["tokens_generated"]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    while engine.counts["tokens_generated"] < before + 2 * n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.active >= 2, "the streams should be running when the poisoned request arrives"
    with pytest.raises(openai.APIError, match="invalid multinomial distribution"):
        list(client.completions.create(model="tiny", prompt="poison", max_tokens=20, seed=666, stream=True))
    with pytest.raises(openai.InternalServerError, match="invalid multinomial"):
        client.completions.create(model="tiny", prompt="poison", max_tokens=20, seed=666)
    for th in threads:
        th.join(120)
    assert not errors and sorted(results) == list(range(n))
    for i, (tokens, reason) in results.items():
        assert reason in ("length", "stop") and tokens == offline(engine, f"live {i}", 30, 0.7, 1.0, i)
    with http.stream("POST", "/v1/completions", json={"prompt": "poison", "max_tokens": 20, "seed": 666,
                                                      "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and '"error"' in lines[-1] and "[DONE]" not in lines[-1]


def test_body_limit_is_enforced_while_reading(tmp_path):
    engine, server = start(write_checkpoint(tmp_path / "ckpt"), max_body_bytes=4096)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        big = b'{"prompt": "' + b"x" * 10_000 + b'"}'
        r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

        def answer_after(headers: bytes, chunked: bool) -> tuple[bytes, int]:
            """Send a request's headers, then up to 50 MB of body in 64 KiB pieces until the server answers."""
            with socket.create_connection((server.host, server.port), timeout=30) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             + headers + b"\r\n")
                sent = 0
                while sent < 50 << 20:
                    if select.select([sock], [], [], 0.05)[0]:
                        return sock.recv(4096), sent
                    piece = b"x" * 65536
                    sock.sendall(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
                    sent += len(piece)
                return b"", sent

        # A Content-Length over the cap is refused before any of the body is read, a chunked body as soon
        # as the bytes read pass the cap: long before 50 MB.
        for headers, chunked in [(b"Content-Length: 52428800\r\n", False), (b"Transfer-Encoding: chunked\r\n", True)]:
            reply, sent = answer_after(headers, chunked)
            assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
            assert sent < 1 << 20, f"{sent} bytes went out before the 413"
        ok = client.post("/v1/completions", json={"prompt": "small", "max_tokens": 2})
        assert ok.status_code == 200


def test_stats_and_metrics_can_be_put_behind_the_token(tmp_path):
    engine, server = start(write_checkpoint(tmp_path / "ckpt"), admin_token=ADMIN_TOKEN, protect_stats=True)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/v1/stats", "/metrics"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers=ADMIN).status_code == 200
        assert client.get("/health").status_code == 200


def test_default_max_tokens_stays_within_the_context(tmp_path):
    engine, server = start(write_checkpoint(tmp_path / "ckpt"), max_tokens=256, max_prompt_tokens=None)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]
        assert schema["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 95  # context 96
        assert schema["properties"]["prompt"]["anyOf"][0]["minLength"] == 1
        assert client.get("/docs").status_code == 404  # no Swagger UI from a CDN


def test_admin_token_from_file_or_environment(tmp_path, monkeypatch):
    from moekit.cli.serve import admin_token
    from moekit.config import ConfigError

    def args(**kw):
        return argparse.Namespace(**{"admin_token_file": None, "host": "127.0.0.1", "protect_stats": False, **kw})

    monkeypatch.delenv("MOEKIT_ADMIN_TOKEN", raising=False)
    assert admin_token(args()) is None
    (tmp_path / "token").write_text("file-token-123\n")
    assert admin_token(args(admin_token_file=str(tmp_path / "token"), host="0.0.0.0")) == "file-token-123"
    monkeypatch.setenv("MOEKIT_ADMIN_TOKEN", "env-token-456")
    assert admin_token(args(host="::")) == "env-token-456"
    monkeypatch.setenv("MOEKIT_ADMIN_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        admin_token(args())


@pytest.mark.slow  # schemathesis generates some hundreds of requests: 20-60 s on a shared 2-core machine
@pytest.mark.parametrize("auth", [False, True], ids=["anonymous", "admin"])
def test_schemathesis_finds_no_failure(tmp_path, auth):
    pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency; pip install -e '.[dev]'")
    # Limits chosen so that every schema-valid prompt fits: 16 characters are at most 64 UTF-8 bytes
    # (tokens of the byte tokenizer), and 64 prompt tokens + 4 new ones stay within the context of 96.
    engine, server = start(write_checkpoint(tmp_path / "ckpt"), max_tokens=4, max_prompt_tokens=64,
                           max_prompt_chars=16, max_prompts=2, max_choices=2, queue_size=64,
                           admin_token=ADMIN_TOKEN)
    st = Path(sys.executable).with_name("st")
    headers = ["-H", f"Authorization: Bearer {ADMIN_TOKEN}"] if auth else []
    with server:
        result = subprocess.run([str(st), "run", f"{server.url}/openapi.json", "--checks", "all", "-n", "12",
                                 "--seed", "1", "--no-color", "--generation-database", "none", *headers],
                                capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
