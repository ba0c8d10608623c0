"""The HTTP API: an OpenAI-compatible ``/v1/completions`` (JSON or server-sent events), ``/health``,
``/metrics`` (Prometheus text), ``/v1/stats`` (JSON for the dashboard), ``/dashboard``, and
``/admin/experts/mask|unmask`` to take experts out of service while requests keep flowing.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with ``param``
naming the offending field; bad input is a 400 (401 without the admin token, 404 for an unknown
layer, 429 with Retry-After when the queue is full) and never stops the server.

``create_app(engine, limits)`` builds the app; the app starts the engine's thread when it starts
and stops it on shutdown. Run it with any ASGI server (``moekit serve`` uses uvicorn).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .engine import Engine, GenRequest, QueueFullError, ServeLimits, prompt_room
from .metrics import ServeMetrics
from .schemas import CompletionRequest, MaskRequest, UnmaskRequest

# Seconds between checks that a client waiting for a non-streamed answer is still connected.
_DISCONNECT_POLL_S = 0.25


class ApiError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error_body(message: str, param: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """First pydantic error as ("field: problem", field)."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    if first.get("type") == "extra_forbidden":
        return f"{'.'.join(loc)}: unknown field", loc[0] if loc else None
    if not loc:
        return f"request body: {first['msg']} (expected a JSON object)", None
    # Union members add the member type to the location (stop.str); name the field itself.
    field = loc[0]
    return f"{field}: {first['msg']}", field


def create_app(engine: Engine, limits: ServeLimits | None = None) -> FastAPI:
    """FastAPI app serving ``engine``; ``limits`` (default: the engine's) bound every request."""
    if limits is not None:
        engine.limits = limits
    limits = engine.limits
    metrics: ServeMetrics = engine.metrics if engine.metrics is not None else ServeMetrics()
    if engine.metrics is None:
        engine.metrics = metrics
        metrics.attach(engine)
    model_cfg = engine.model.config
    room = prompt_room(engine.model, limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="moekit serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        if 400 <= err.status < 500 and err.status != 429:
            metrics.bad_requests.inc()
        return JSONResponse(_error_body(err.message, err.param, err.kind), status_code=err.status,
                            headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        metrics.bad_requests.inc()
        message, param = _validation_message(err)
        content_type = request.headers.get("content-type", "")
        if param is None and "json" not in content_type:
            message = (f"request body must be JSON sent with 'Content-Type: application/json' "
                       f"(got {content_type or 'no content type'!r})")
        return JSONResponse(_error_body(message, param, "invalid_request_error"), status_code=400)

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

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "owned_by": "moekit",
                                            "max_seq_len": model_cfg.max_seq_len}]}

    # ------------------------------------------------------------------ completions
    def _check_request(body: CompletionRequest) -> tuple[list[int], list[str]]:
        if not body.prompt:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        prompt_ids = engine.tokenizer.encode(body.prompt)
        if not prompt_ids:
            raise ApiError(400, "prompt: encodes to no tokens", "prompt")
        if len(prompt_ids) > room:
            raise ApiError(400, f"prompt: {len(prompt_ids)} tokens, more than the limit of {room}", "prompt")
        if body.max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens: {body.max_tokens} is more than the limit of {limits.max_tokens}",
                           "max_tokens")
        if len(prompt_ids) + body.max_tokens > model_cfg.max_seq_len:
            raise ApiError(400, f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({body.max_tokens}) "
                                f"exceeds the model's context of {model_cfg.max_seq_len} tokens", "max_tokens")
        stop = body.stop_list()
        if len(stop) > limits.max_stop:
            raise ApiError(400, f"stop: {len(stop)} strings, more than the limit of {limits.max_stop}", "stop")
        for s in stop:
            if not s or len(s) > limits.max_stop_chars:
                raise ApiError(400, f"stop: {s!r} must hold 1 to {limits.max_stop_chars} characters", "stop")
        return prompt_ids, stop

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt_ids, stop = _check_request(body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        req = GenRequest(prompt_ids=prompt_ids, max_tokens=body.max_tokens, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed, stop=stop, trace=body.routing_trace,
                         request_id=f"cmpl-{uuid.uuid4().hex[:24]}")

        def on_event(event: dict[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the client's event loop is gone: nobody will read further tokens
                req.cancelled = True

        req.on_event = on_event
        try:
            engine.submit(req)
        except QueueFullError as err:
            raise ApiError(429, str(err), None, "rate_limit_error",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_stream(req, events, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(req, events, created, request)

    def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    async def _collect(req: GenRequest, events: asyncio.Queue, created: int, request: Request) -> Response:
        text, token_ids, trace = [], [], []
        while True:
            try:
                event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(req)
                    return Response(status_code=499)
                continue
            if event["type"] == "error":
                raise ApiError(500, event["message"], None, "server_error")
            text.append(event["text"])
            if event["type"] == "token":
                token_ids.append(event["token_id"])
                if req.trace:
                    trace.append({"token_id": event["token_id"], "experts": event["experts"]})
                continue
            choice = _choice("".join(text), event["finish_reason"])
            choice["token_ids"] = token_ids
            if req.trace:
                choice["routing_trace"] = trace
            return JSONResponse({"id": req.request_id, "object": "text_completion", "created": created,
                                 "model": engine.model_name, "choices": [choice], "usage": event["usage"]})

    async def _stream(req: GenRequest, events: asyncio.Queue, created: int) -> AsyncIterator[str]:
        def chunk(choice: dict[str, Any], **extra: Any) -> str:
            body = {"id": req.request_id, "object": "text_completion", "created": created,
                    "model": engine.model_name, "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            while True:
                event = await events.get()
                if event["type"] == "error":
                    yield f"data: {json.dumps(_error_body(event['message'], None, 'server_error'))}\n\n"
                    break
                if event["type"] == "token":
                    choice = _choice(event["text"], None)
                    choice["token_ids"] = [event["token_id"]]
                    if req.trace:
                        choice["routing_trace"] = [{"token_id": event["token_id"], "experts": event["experts"]}]
                    yield chunk(choice)
                    continue
                yield chunk(_choice(event["text"], event["finish_reason"]), usage=event["usage"])
                break
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the client disconnects mid-stream too: free the slot.
            engine.cancel(req)

    # ------------------------------------------------------------------ admin
    def _authorise(request: Request) -> None:
        if limits.admin_token is not None and request.headers.get("authorization") != f"Bearer {limits.admin_token}":
            raise ApiError(401, "admin endpoints need the header 'Authorization: Bearer <admin token>'", None,
                           "authentication_error")

    def _expert_call(fn: Any, layer: str | int, experts: list[int] | None) -> dict[str, Any]:
        try:
            name, _ = engine.layer(layer)
            masked = fn(layer, experts)
        except KeyError as err:
            raise ApiError(404, f"layer: {err.args[0]}", "layer") from None
        except (ValueError, IndexError) as err:
            raise ApiError(400, f"experts: {err}", "experts") from None
        return {"layer": name, "masked": masked, "quarantined": sorted(engine.quarantined[name])}

    @app.get("/admin/experts")
    async def experts(request: Request) -> dict[str, Any]:
        _authorise(request)
        return {"layers": await asyncio.to_thread(engine.expert_snapshot)}

    @app.post("/admin/experts/mask")
    async def mask(body: MaskRequest, request: Request) -> dict[str, Any]:
        _authorise(request)
        return await asyncio.to_thread(_expert_call, engine.mask, body.layer, body.experts)

    @app.post("/admin/experts/unmask")
    async def unmask(body: UnmaskRequest, request: Request) -> dict[str, Any]:
        _authorise(request)
        return await asyncio.to_thread(_expert_call, engine.unmask, body.layer, body.experts)

    # ------------------------------------------------------------------ dashboard
    static = resources.files("moekit.serve") / "static"

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse((static / "dashboard.html").read_text(encoding="utf-8"))

    @app.get("/dashboard.js")
    async def dashboard_js() -> Response:
        return Response((static / "dashboard.js").read_text(encoding="utf-8"), media_type="text/javascript")

    return app
