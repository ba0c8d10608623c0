"""The HTTP API: OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` (JSON or
server-sent events), ``/v1/models``, ``/health``, ``/metrics`` (Prometheus text), ``/v1/stats``
(JSON for the dashboard), ``/dashboard``, and ``/admin/experts/mask|unmask`` to take experts out
of service while requests keep flowing.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, everywhere (404 and
405 included), with ``param`` naming the offending field: bad input is a 400, an unknown model a
404 ``model_not_found``, a body over ``max_body_bytes`` a 413 (refused while reading), a full queue
a 429 with Retry-After; none of them stops the server. A streamed request that fails after its
200 sends one ``data: {"error": {...}}`` event and ends without ``data: [DONE]`` (the official
client raises ``APIError`` on that event).

Security: the admin endpoints exist only with an admin token, and the token is checked before the
body is read (401 before 400); ``protect_stats`` puts ``/v1/stats`` and ``/metrics`` behind it too.
``/docs`` and ``/redoc`` are off (they load Swagger UI from a CDN); ``/openapi.json`` states the
server's limits (see ``moekit.serve.schemas``).

``create_app(engine, limits)`` builds the app; the app starts the engine's thread when it starts
and stops it on shutdown. Run it with any ASGI server (``moekit serve`` uses uvicorn).
"""

import asyncio
import base64
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ConfigError
from .engine import Engine, GenRequest, QueueFullError, ServeLimits, prompt_room
from .metrics import ServeMetrics
from .schemas import UNSUPPORTED, FieldLimits, admin_models, request_models

# Seconds between checks that a client waiting for a non-streamed answer is still connected.
_DISCONNECT_POLL_S = 0.25
# OpenAI's default max_tokens for /v1/completions (chat defaults to the room left in the context).
_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers, self.code = \
            status, message, param, kind, headers, code


def _error_body(message: str, param: str | None, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Json(JSONResponse):
    """JSON with any lone surrogate escaped rather than a UnicodeEncodeError."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None, code: str | None = None) -> _Json:
    return _Json(_error_body(message, param, kind, code), status_code=status, headers=headers)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """First pydantic error as ("field: problem", field); of a union's members, one that failed a
    constraint (the member the input's type matched) rather than a type check."""
    errors = err.errors()
    first = errors[0]
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    first = next((e for e in same_field if not str(e.get("type", "")).endswith("_type")), first)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    if first.get("type") == "extra_forbidden":
        if len(loc) == 1 and loc[0] in UNSUPPORTED:
            return f"{loc[0]}: not supported by this server", loc[0]
        return f"{'.'.join(loc)}: unknown field", loc[0] if loc else None
    if not loc:
        return f"request body: {first['msg']} (expected a JSON object)", None
    # Union members add the member type to the location (stop.str); name the field itself.
    field_name = loc[0]
    return f"{field_name}: {first['msg']}", field_name


def _has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer.render_chat`` renders a conversation (ValueError: the model has no template)."""
    render = getattr(tokenizer, "render_chat", None)
    if not callable(render):
        return False
    try:
        render([{"role": "user", "content": "hi"}])
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------- the guard (pure ASGI)
class _Guard:
    """Checks, before the app reads a body: the admin token on protected paths (401; 404 when the
    admin endpoints are off), and the body size (413 on a Content-Length over the cap, or as soon as
    the bytes read pass it). The body read here is handed to the app unchanged."""

    def __init__(self, app: Any, limits: ServeLimits, protected: Callable[[str], bool],
                 admin_path: Callable[[str], bool]) -> None:
        self.app, self.limits, self.protected, self.admin_path = app, limits, protected, admin_path

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.admin_path(path) and self.limits.admin_token is None:
            return await _error(404, f"{path}: the admin endpoints are off; start the server with an admin "
                                     "token (--admin-token-file or MOEKIT_ADMIN_TOKEN)", None,
                                "invalid_request_error", code="not_found")(scope, receive, send)
        if self.protected(path):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            expected = f"Bearer {self.limits.admin_token}".encode()
            if not hmac.compare_digest(given, expected):
                return await _error(401, f"{path} needs the header 'Authorization: Bearer <admin token>'",
                                    None, "authentication_error",
                                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        cap = self.limits.max_body_bytes
        too_large = _error(413, f"request body: more than the limit of {cap} bytes", None,
                           "invalid_request_error", code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            if not length.isdigit():
                return await _error(400, "Content-Length: not a number")(scope, receive, send)
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        return await self.app(scope, replay, send)


# ---------------------------------------------------------------------- engine thread -> event loop
class _Handoff:
    """Engine events into the asyncio queues of one event loop, with one loop wake-up for all the
    events of a step: events put on the engine thread wait for ``flush`` (the engine calls it after
    each step), so the loop wakes once per step, not at the step's first event to run beside the
    rest of it; events from any other thread wake the loop at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
        self.loop, self.engine = loop, engine
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any, GenRequest]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue, item: Any, req: GenRequest) -> None:
        """Queue ``item`` for ``queue``; ``req`` is cancelled if the loop is gone (nobody reads it)."""
        with self._lock:
            self._items.append((queue, item, req))
            if self._scheduled or self.engine.on_engine_thread():
                return
            self._scheduled = True
        self._wake()

    def flush(self) -> None:
        """Wake the loop for the events put since its last wake-up (called after each engine step)."""
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self._wake()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody will read these requests' further tokens
            with self._lock:
                items, self._items, self._scheduled = self._items, [], False
            for _, _, req in items:
                req.cancelled = True

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item, _ in items:
            queue.put_nowait(item)


# ---------------------------------------------------------------------- one HTTP request's choices
@dataclass
class _Choice:
    """One sequence of a request: its GenRequest and what has come back so far."""

    index: int
    prompt_index: int
    req: GenRequest
    prompt_text: str
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any] | None] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    started: bool = False


def create_app(engine: Engine, limits: ServeLimits | None = None) -> FastAPI:
    """FastAPI app serving ``engine``; ``limits`` (default: the engine's) bound every request."""
    if limits is not None:
        engine.limits = limits
    limits = engine.limits
    if limits.protect_stats and limits.admin_token is None:
        raise ConfigError("ServeLimits.protect_stats=True needs an admin_token")
    metrics: ServeMetrics = engine.metrics if engine.metrics is not None else ServeMetrics()
    if engine.metrics is None:
        engine.metrics = metrics
        metrics.attach(engine)
    tokenizer = engine.tokenizer
    model_cfg = engine.model.config
    context = model_cfg.max_seq_len
    room = prompt_room(engine.model, limits)
    max_tokens_limit = min(limits.max_tokens, context - 1)
    has_chat = _has_chat_template(tokenizer)
    admin_on = limits.admin_token is not None
    created_at = int(time.time())
    field_limits = FieldLimits(
        vocab_size=model_cfg.vocab_size, max_tokens=max_tokens_limit, prompt_tokens=room,
        prompt_chars=limits.max_prompt_chars or 8 * room, max_prompts=limits.max_prompts,
        max_choices=limits.max_choices, max_stop=limits.max_stop, max_stop_chars=limits.max_stop_chars,
        max_messages=limits.max_messages,
        num_experts=max((layer.num_experts for layer in engine.layers.values()), default=1))
    CompletionRequest, ChatRequest = request_models(field_limits)
    MaskRequest, UnmaskRequest = admin_models(field_limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="moekit serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=_Json)
    app.state.engine = engine

    def admin_path(path: str) -> bool:
        return path == "/admin" or path.startswith("/admin/")

    def protected(path: str) -> bool:
        return admin_path(path) or (limits.protect_stats and path in ("/v1/stats", "/metrics"))

    app.add_middleware(_Guard, limits=limits, protected=protected, admin_path=admin_path)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> Response:
        if 400 <= err.status < 500 and err.status != 429:
            metrics.bad_requests.inc()
        return _error(err.status, err.message, err.param, err.kind, err.headers, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> Response:
        metrics.bad_requests.inc()
        message, param = _validation_message(err)
        content_type = request.headers.get("content-type", "")
        if param is None and "json" not in content_type:
            message = (f"request body must be JSON sent with 'Content-Type: application/json' "
                       f"(got {content_type or 'no content type'!r})")
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        if err.status_code == 404:
            message = f"{request.method} {request.url.path!r}: no such endpoint"
        elif err.status_code == 405:
            message = f"{request.url.path!r} does not take {request.method} (allowed: {(err.headers or {}).get('Allow')})"
        else:
            message = str(err.detail)
        return _error(err.status_code, message, None, "invalid_request_error", headers=err.headers,
                      code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _crash(_: Request, err: Exception) -> Response:
        return _error(500, f"internal error: {type(err).__name__}: {err}", None, "server_error")

    # ------------------------------------------------------------------ status
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, "active": engine.active,
                "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=content_type)

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return await asyncio.to_thread(engine.snapshot)

    def model_card() -> dict[str, Any]:
        return {"id": engine.model_name, "object": "model", "created": created_at, "owned_by": "moekit",
                "max_seq_len": context}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {engine.model_name!r}",
                           "model", code="model_not_found")

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: Annotated[str, Path(examples=[engine.model_name])]) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    # ------------------------------------------------------------------ generation
    def utf8(param: str, text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ApiError(400, f"{param}: holds a lone surrogate ({text[err.start:err.end]!a} at character "
                                f"{err.start}); send valid UTF-8 text", param) from None

    def encode(param: str, text: str) -> list[int]:
        utf8(param, text)
        ids = tokenizer.encode(text)
        if not ids:
            raise ApiError(400, f"{param}: encodes to no tokens", param)
        return ids

    def check_prompt(ids: list[int], max_tokens: int, param: str) -> None:
        if len(ids) > room:
            raise ApiError(400, f"{param}: {len(ids)} tokens, more than the limit of {room}", param,
                           code="context_length_exceeded")
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {context} tokens", "max_tokens", code="context_length_exceeded")

    def sampling(body: Any, prompts: list[tuple[list[int], str]], max_tokens: int, logprobs: int | None,
                 echo_logprobs: bool, prefix: str) -> list[_Choice]:
        """One GenRequest per prompt and choice (index = prompt * n + choice), checked and built."""
        stop = body.stop_list()
        for s in stop:
            utf8("stop", s)
        for ids, _ in prompts:
            check_prompt(ids, max_tokens, "prompt" if prefix == "cmpl" else "messages")
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        n = body.n or 1
        choices = []
        for p, (ids, text) in enumerate(prompts):
            for i in range(n):
                seed = None if body.seed is None else (body.seed + i) % 2**63
                req = GenRequest(prompt_ids=ids, max_tokens=max_tokens,
                                 temperature=1.0 if body.temperature is None else body.temperature,
                                 top_p=1.0 if body.top_p is None else body.top_p, seed=seed, stop=stop,
                                 trace=bool(body.routing_trace), record_routing=bool(body.routing_record),
                                 logprobs=logprobs, echo_logprobs=echo_logprobs,
                                 presence_penalty=body.presence_penalty or 0.0,
                                 frequency_penalty=body.frequency_penalty or 0.0, logit_bias=bias)
                choices.append(_Choice(index=p * n + i, prompt_index=p, req=req, prompt_text=text))
        return choices

    handoffs: dict[asyncio.AbstractEventLoop, _Handoff] = {}
    engine.add_step_listener(lambda: [handoff.flush() for handoff in list(handoffs.values())])

    def submit(choices: list[_Choice], events: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        handoff = handoffs.get(loop)
        if handoff is None or handoff.loop.is_closed():
            handoffs.clear()  # one server runs one loop; a closed one's handoff is not needed
            handoff = handoffs[loop] = _Handoff(loop, engine)
        for choice in choices:
            req = choice.req

            def on_event(event: dict[str, Any], index: int = choice.index, req: GenRequest = req) -> None:
                handoff.put(events, (index, event), req)

            req.on_event = on_event
        try:
            engine.submit_all([c.req for c in choices])
        except QueueFullError as err:
            raise ApiError(429, str(err), None, "rate_limit_error",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        except ValueError as err:
            raise ApiError(400, str(err), None) from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:  # type: ignore[valid-type]
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            raw: list[str | list[int]] = [prompt]
        elif isinstance(prompt[0], int):
            raw = [prompt]
        else:
            raw = list(prompt)
        prompts = [(encode("prompt", p), p) if isinstance(p, str) else (list(p), tokenizer.decode(list(p)))
                   for p in raw]
        max_tokens = body.max_tokens or _DEFAULT_MAX_TOKENS
        if max_tokens > max_tokens_limit:  # the default itself can pass a small limit
            max_tokens = max_tokens_limit
        choices = sampling(body, prompts, max_tokens, body.logprobs, bool(body.echo) and body.logprobs is not None,
                           "cmpl")
        return await respond(body, request, choices, chat=False, echo=bool(body.echo))

    @app.post("/v1/chat/completions", include_in_schema=has_chat)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:  # type: ignore[valid-type]
        check_model(body.model)
        if not has_chat:
            raise ApiError(400, f"model {engine.model_name!r} has no chat template; use /v1/completions",
                           "messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for m in messages:
            utf8("messages", m["content"])
        try:
            text = tokenizer.render_chat(messages)
        except ValueError as err:
            raise ApiError(400, str(err), "messages", code="no_chat_template") from None
        ids = encode("messages", text)
        asked = body.max_completion_tokens or body.max_tokens
        max_tokens = asked or max(1, min(max_tokens_limit, context - len(ids)))
        choices = sampling(body, [(ids, text)], max_tokens,
                           (body.top_logprobs or 0) if body.logprobs else None, False, "chat")
        return await respond(body, request, choices, chat=True, echo=False)

    async def respond(body: Any, request: Request, choices: list[_Choice], chat: bool, echo: bool) -> Response:
        events: asyncio.Queue[tuple[int, dict[str, Any]]] = asyncio.Queue()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        for c in choices:
            c.req.request_id = rid if len(choices) == 1 else f"{rid}-{c.index}"
        submit(choices, events)
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(rid, created, choices, events, chat, echo, usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(rid, created, choices, events, request, chat, echo)

    def cancel(choices: list[_Choice]) -> None:
        for c in choices:
            engine.cancel(c.req)

    def token_str(token: int) -> str:
        text = tokenizer.decode([token])
        if "\ufffd" in text and getattr(tokenizer, "name", "") == "byte" and token < 256:
            return f"bytes:\\x{token:02x}"
        return text

    def completion_logprobs(entries: list[dict[str, Any] | None], ids: list[int], k: int | None,
                            offset: int) -> dict[str, Any]:
        tokens = [token_str(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [None if e is None else e["logprob"] for e in entries],
                "top_logprobs": [None if e is None else {token_str(t): lp for t, lp in e["top"][:k]}
                                 for e in entries],
                "text_offset": offsets}

    def chat_logprobs(entries: list[dict[str, Any] | None], ids: list[int]) -> dict[str, Any]:
        def item(token: int, logprob: float) -> dict[str, Any]:
            text = token_str(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(t, e["logprob"]), "top_logprobs": [item(a, lp) for a, lp in e["top"]]}
                            for t, e in zip(ids, entries) if e is not None]}

    def take(choice: _Choice, event: dict[str, Any]) -> None:
        """Record a token or done event on its choice."""
        choice.text.append(event["text"])
        if event["type"] == "token":
            choice.token_ids.append(event["token_id"])
            choice.logprobs.append(event.get("logprob"))
            if choice.req.trace:
                choice.trace.append({"token_id": event["token_id"], "experts": event["experts"]})
        else:
            choice.finish_reason, choice.usage = event["finish_reason"], event["usage"]

    def usage_of(choices: list[_Choice]) -> dict[str, int]:
        prompt = sum({c.prompt_index: len(c.req.prompt_ids) for c in choices}.values())
        completion = sum(c.usage["completion_tokens"] for c in choices if c.usage)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def routing_record_b64(c: _Choice) -> str:
        """The choice's RoutingRecord file (moekit.replay), base64: RoutingRecord.from_bytes(b64decode(s))."""
        return base64.b64encode(engine.routing_record(c.req).to_bytes()).decode("ascii")

    def final_choice(c: _Choice, chat: bool, echo: bool) -> dict[str, Any]:
        kept = c.usage["completion_tokens"] if c.usage else len(c.token_ids)
        ids, entries = c.token_ids[:kept], c.logprobs[:kept]
        text = "".join(c.text)
        logprobs = None
        if chat:
            if c.req.logprobs is not None:
                logprobs = chat_logprobs(entries, ids)
            out = {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                   "finish_reason": c.finish_reason}
        else:
            if c.req.logprobs is not None:
                if echo:
                    prompt_entries = c.req.prompt_logprobs or [None] * len(c.req.prompt_ids)
                    logprobs = completion_logprobs(prompt_entries + entries, c.req.prompt_ids + ids,
                                                   c.req.logprobs, 0)
                else:
                    logprobs = completion_logprobs(entries, ids, c.req.logprobs, 0)
            out = {"text": (c.prompt_text if echo else "") + text, "index": c.index, "logprobs": logprobs,
                   "finish_reason": c.finish_reason}
        out["token_ids"] = ids
        if c.req.trace:
            out["routing_trace"] = c.trace[:kept]
        if c.req.record_routing:
            out["routing_record"] = routing_record_b64(c)
        return out

    async def _collect(rid: str, created: int, choices: list[_Choice], events: asyncio.Queue,
                       request: Request, chat: bool, echo: bool) -> Response:
        by_index = {c.index: c for c in choices}
        pending = len(choices)
        while pending:
            try:
                index, event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(choices)
                    return Response(status_code=499)
                continue
            if event["type"] == "error":
                cancel(choices)
                raise ApiError(500, event["message"], None, "server_error")
            take(by_index[index], event)
            pending -= event["type"] == "done"
        return _Json({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                      "model": engine.model_name,
                      "choices": [final_choice(c, chat, echo) for c in choices], "usage": usage_of(choices)})

    def sse(data: dict[str, Any]) -> str:
        return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"

    async def _stream(rid: str, created: int, choices: list[_Choice], events: asyncio.Queue, chat: bool,
                      echo: bool, include_usage: bool) -> AsyncIterator[str]:
        by_index = {c.index: c for c in choices}
        kind = "chat.completion.chunk" if chat else "text_completion"

        # The fields around a chunk's choice, encoded once per stream: each token encodes its choice only
        # (the same text as encoding the whole chunk, {"id", "object", "created", "model", "choices"[, "usage"]}).
        head = json.dumps({"id": rid, "object": kind, "created": created, "model": engine.model_name},
                          ensure_ascii=False)
        opening, closing = "data: " + head[:-1] + ', "choices": [', ('], "usage": null}' if include_usage else "]}") + "\n\n"

        def chunk(choice: dict[str, Any]) -> str:
            return opening + json.dumps(choice, ensure_ascii=False) + closing

        def piece(c: _Choice, text: str, ids: list[int], event: dict[str, Any] | None,
                  finish: str | None) -> dict[str, Any]:
            """The chunk's choice for tokens ``ids`` (one token's ``event`` when it has logprobs or a trace)."""
            entries = [event.get("logprob")] if ids and event else []
            logprobs = None
            if c.req.logprobs is not None:
                logprobs = chat_logprobs(entries, ids) if chat else completion_logprobs(entries, ids, c.req.logprobs, 0)
            if chat:
                delta: dict[str, Any] = {} if finish and not text else {"content": text}
                if not c.started:
                    delta = {"role": "assistant", **delta}
                out = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                if echo and not c.started:
                    text = c.prompt_text + text
                out = {"text": text, "index": c.index, "logprobs": logprobs, "finish_reason": finish}
            c.started = True
            out["token_ids"] = ids
            if c.req.trace and ids:
                out["routing_trace"] = [{"token_id": ids[0], "experts": event["experts"]}]
            if c.req.record_routing and finish:
                out["routing_record"] = routing_record_b64(c)
            return out

        pending = len(choices)
        try:
            while pending:
                # The events queued by now go out in one write (a client that fell behind, n > 1).
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                # A choice's queued tokens go in one chunk (text and token_ids of all), unless each one
                # carries logprobs or a routing trace.
                out: list[str] = []
                held: dict[int, tuple[list[str], list[int]]] = {}

                def release(c: _Choice) -> None:
                    texts, ids = held.pop(c.index, ([], []))
                    if ids:
                        out.append(chunk(piece(c, "".join(texts), ids, None, None)))

                for index, event in batch:
                    c = by_index[index]
                    if event["type"] == "error":
                        for other in choices:
                            release(other)
                        out.append(sse(_error_body(event["message"], None, "server_error")))
                        yield "".join(out)
                        return  # as OpenAI's API does: the error event ends the stream, no [DONE]
                    take(c, event)
                    if event["type"] == "token" and c.req.logprobs is None and not c.req.trace:
                        texts, ids = held.setdefault(index, ([], []))
                        texts.append(event["text"])
                        ids.append(event["token_id"])
                        continue
                    release(c)
                    if event["type"] == "token":
                        out.append(chunk(piece(c, event["text"], [event["token_id"]], event, None)))
                    else:
                        pending -= 1
                        out.append(chunk(piece(c, event["text"], [], None, event["finish_reason"])))
                for c in choices:
                    release(c)
                yield "".join(out)
            if include_usage:
                yield sse({"id": rid, "object": kind, "created": created, "model": engine.model_name,
                           "choices": [], "usage": usage_of(choices)})
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the client disconnects mid-stream too: free the slots.
            cancel(choices)

    # ------------------------------------------------------------------ admin
    def _expert_call(fn: Any, layer: str | int, experts: list[int] | None) -> dict[str, Any]:
        try:
            name, _ = engine.layer(layer)
            masked = fn(layer, experts)
        except KeyError as err:
            raise ApiError(404, f"layer: {err.args[0]}", "layer", code="not_found") from None
        except IndexError as err:
            raise ApiError(400, f"experts: {err}", "experts") from None
        except ValueError as err:  # the layer's current state refuses it (fewer than top-k experts left)
            raise ApiError(409, f"experts: {err}", "experts", code="conflict") from None
        return {"layer": name, "masked": masked, "quarantined": sorted(engine.quarantined[name])}

    if admin_on:
        @app.get("/admin/experts")
        async def experts() -> dict[str, Any]:
            return {"layers": await asyncio.to_thread(engine.expert_snapshot)}

        @app.post("/admin/experts/mask")
        async def mask(body: MaskRequest) -> dict[str, Any]:  # type: ignore[valid-type]
            return await asyncio.to_thread(_expert_call, engine.mask, body.layer, body.experts)

        @app.post("/admin/experts/unmask")
        async def unmask(body: UnmaskRequest) -> dict[str, Any]:  # type: ignore[valid-type]
            return await asyncio.to_thread(_expert_call, engine.unmask, body.layer, body.experts)

    # ------------------------------------------------------------------ dashboard
    static = resources.files("moekit.serve") / "static"

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse((static / "dashboard.html").read_text(encoding="utf-8"))

    @app.get("/dashboard.js", include_in_schema=False)
    async def dashboard_js() -> Response:
        return Response((static / "dashboard.js").read_text(encoding="utf-8"), media_type="text/javascript")

    app.openapi = lambda: _openapi(app, protected)  # type: ignore[method-assign]
    return app


_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


# One server-sent event of a stream (stream: true): its data is a JSON chunk, an error object, or [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"], "description": "one server-sent event",
              "properties": {"data": {"type": "string", "description": "a JSON chunk, {\"error\": ...}, or [DONE]"}}}


def _openapi(app: FastAPI, protected: Callable[[str], bool]) -> dict[str, Any]:
    """FastAPI's schema made true: errors are 400 (never 422) in OpenAI's shape, 404/405/413/429/500
    where they happen, streams and Prometheus text documented with their media types, the admin token
    as a bearer security scheme."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version="1", routes=app.routes)
    schema["components"]["schemas"]["Error"] = _ERROR_SCHEMA
    schema["components"]["securitySchemes"] = {"adminToken": {"type": "http", "scheme": "bearer"}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    def err(text: str, **extra: Any) -> dict[str, Any]:
        return {"description": text, **error, **extra}

    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            responses.pop("422", None)
            responses["405"] = err("Method not allowed", headers={"Allow": {"schema": {"type": "string"}}})
            if method == "post":
                responses["400"] = err("Bad input: the message names the field (param)")
                responses["413"] = err("Request body over the server's limit")
            if path in ("/v1/completions", "/v1/chat/completions"):
                responses["404"] = err("Unknown model (code model_not_found)")
                responses["429"] = err("Queue full", headers={"Retry-After": {"schema": {"type": "string"}}})
                responses["500"] = err("The request's sequence failed")
                responses["200"]["content"]["text/event-stream"] = {"schema": _SSE_EVENT}
            if path.startswith("/v1/models/"):
                responses["404"] = err("Unknown model (code model_not_found)")
            if path.startswith("/admin/experts/"):
                responses["404"] = err("Unknown layer")
                responses["409"] = err("The layer's state refuses the change (fewer than top-k experts left)")
            if path == "/metrics":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
            if protected(path):
                op["security"] = [{"adminToken": []}]
                responses["401"] = err("Missing or wrong admin token")
    app.openapi_schema = schema
    return schema
