"""The serving engine: a bounded request queue and a background thread running continuous batching.

Continuous batching follows Orca (Yu et al., OSDI 2022): the batch is re-formed at every decode
step, so a request joins as soon as a slot frees and leaves as soon as it finishes. Each step
admits waiting requests up to ``max_batch`` running sequences; each sequence keeps its own KV
cache, a slot of a preallocated ``KVPool``. When sequences are running, the new prompts join
their decode step: one forward feeds every running sequence's last token and every new prompt
(``moekit.serve.batched.mixed_step``, a mixed prefill/decode batch as Sarathi-Serve's and
vLLM's chunked prefill form them, here with whole prompts, not chunks), so an admission costs no
forward of its own. Otherwise the prompts are prefilled (one ``LM.forward`` for a lone prompt,
else all packed into one pass, ``moekit.serve.batched.prefill_step``), then every running
sequence's last token goes through one batched forward (``moekit.serve.batched.decode_step``).

Determinism: each request owns a ``torch.Generator`` seeded like offline ``moekit generate``
(``moekit.lm.generate``) and draws its tokens as ``sample_next`` does on its own (1, V) logits
row (a step's rows share one ``nucleus_probs`` call, which computes each row on its own, and one
``draw``, whose noise for each row comes from that row's generator), so a seeded request gives the
offline tokens whether it runs alone (the same
``LM.forward`` calls) or batched (logits equal up to float rounding; dropless token-choice
routing is batch-independent, capacity-limited or expert-choice routing is not).

Fault tolerance: experts can be masked and unmasked between steps (``mask``/``unmask``, run by
the engine thread before its next step, so a steady stream of steps cannot starve them). With
``check_finite`` on in the MoE config, an expert that produces NaN/Inf raises
``ExpertNonFiniteError``; the engine quarantines it (masks it and records it), undoes the step's
partial cache writes and runs the step again, so requests keep flowing.

Shape legend: B running sequences, S prompt length, V vocabulary, K top-k.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config_base import Config, check, spec
from ..layer import ExpertNonFiniteError, MoE
from ..lm.generate import draw, nucleus_probs, sample_next
from ..lm.model import LM, KVCache
from ..model_ops import capture_routing, moe_layers
from ..ops import all_finite
from ..stats import DECODE_UPDATE_EVERY
from .batched import KVPool, SlotCache, can_batch, decode_step, mixed_step, prefill_step, truncate_cache
from .text import stop_ids, stream_decoder

log = logging.getLogger("moekit.serve")

Event = dict[str, Any]

@dataclass
class ServeLimits(Config):
    """Limits of one server; every request is checked against them (errors name the field). A
    ``moekit.config_base.Config``: JSON ``save``/``load`` and ``key=value`` overrides."""

    section = "ServeLimits"

    # Running sequences per decode step; 1 serves one request at a time (no batching).
    max_batch: int = spec(8, ge=1)
    # Requests waiting for a slot; one more is answered 429 with Retry-After.
    queue_size: int = spec(64, ge=1)
    # Largest max_tokens a request may ask for.
    max_tokens: int = spec(256, ge=1)
    # Longest prompt in tokens (None: the model's max_seq_len - 1).
    max_prompt_tokens: int | None = spec(None, ge=1)
    # Most stop strings per request, and their longest length in characters.
    max_stop: int = spec(4, ge=1)
    max_stop_chars: int = spec(64, ge=1)
    # Seconds a client is told to wait after a 429.
    retry_after_s: int = spec(1, ge=1)
    # Bearer token the /admin endpoints require (None: the admin endpoints are off). Never shown in errors.
    admin_token: str | None = spec(None, secret=True)
    # Also require the admin token for /v1/stats and /metrics (they show masked/quarantined experts).
    protect_stats: bool = False
    # Largest request body in bytes (413 past it, checked while reading).
    max_body_bytes: int = spec(1 << 20, ge=1)
    # Longest prompt string in characters (None: 8 x the longest prompt in tokens); a JSON schema
    # can state characters, not tokens.
    max_prompt_chars: int | None = spec(None, ge=1)
    # Most prompts in one request, choices (n) per prompt, and chat messages.
    max_prompts: int = spec(8, ge=1)
    max_choices: int = spec(8, ge=1)
    max_messages: int = spec(256, ge=1)

    def validate(self) -> None:
        check(self.admin_token is None or len(self.admin_token) >= 8,
              "ServeLimits.admin_token must be None or a string of at least 8 characters")
        check(not self.protect_stats or self.admin_token is not None,
              "ServeLimits.protect_stats=True needs an admin_token")


class QueueFullError(RuntimeError):
    """The waiting queue holds ``queue_size`` requests already."""


@dataclass(eq=False)
class GenRequest:
    """One completion request; ``on_event`` is called from the engine thread with each event:
    {"type": "token", "token_id", "text" (new text, may be ""), "experts" (trace or None),
    "logprob" (None, or {"logprob", "top": [(id, logprob)] best first} with ``logprobs`` set)},
    then one {"type": "done", "finish_reason", "text" (text not yet sent), "usage"} or
    {"type": "error", "message"}. ``usage.completion_tokens`` leaves out tokens that only completed
    a stop string."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    trace: bool = False
    # Router replay: keep every fed token's experts (prompt, then each generated token but the last);
    # ``Engine.routing_record(req)`` returns them as a moekit.replay.RoutingRecord.
    record_routing: bool = False
    # Top alternatives to report per generated token (None: no logprobs; 0: the chosen token's only).
    logprobs: int | None = None
    # Also compute the prompt tokens' logprobs (``prompt_logprobs``: None for the first token).
    echo_logprobs: bool = False
    # OpenAI's penalties over the tokens generated so far, and additive biases per token id.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    on_event: Callable[[Event], None] | None = None
    request_id: str = ""
    # Set by the engine.
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    t_submit: float = 0.0
    t_first: float | None = None
    cache: KVCache | None = None
    generator: torch.Generator | None = None
    # Incremental detokeniser of the generated ids (moekit.serve.text.StreamDecoder).
    detok: Any = None
    prompt_logprobs: list[dict[str, Any] | None] = field(default_factory=list)
    # Set by the engine with record_routing: (L, n, K) expert ids of each forward's rows of this request.
    routing_rows: list[torch.Tensor] = field(default_factory=list)


class Engine:
    """Runs ``model`` for many requests at once in a background thread; start with ``start()``."""

    def __init__(self, model: LM, tokenizer: Any, limits: ServeLimits | None = None, model_name: str = "moekit",
                 metrics: Any | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.limits = limits or ServeLimits()
        self.model_name = model_name
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self.layers: dict[str, MoE] = dict(moe_layers(model))
        for layer in self.layers.values():
            layer.stats.defer_updates(DECODE_UPDATE_EVERY)
        # (T, K) expert ids per layer of the last forward, captured when one of its requests traces
        # or records routing (moekit.capture_routing; the layers keep no routing themselves).
        self._last_topk: dict[str, torch.Tensor | None] = {}
        self.quarantined: dict[str, set[int]] = {name: set() for name in self.layers}
        self.batchable = can_batch(model)
        self._stop_ids = stop_ids(tokenizer)
        self.counts = {"requests": 0, "rejected": 0, "cancelled": 0, "errors": 0, "tokens_generated": 0,
                       "prompt_tokens": 0, "quarantine_events": 0, "steps": 0, "batched_steps": 0,
                       "packed_prefills": 0, "mixed_steps": 0}
        self.started_at = time.time()
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._active: list[GenRequest] = []
        self._cv = threading.Condition()
        # Held for each step and for every read or change of the model from other threads.
        self.model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # Changes to the model (masking) queued for the engine thread to run between two steps.
        self._commands: list[Callable[[], None]] = []
        # Static KV caches for the running sequences (batchable models), allocated when the thread starts.
        self._pool: KVPool | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        # Called on the engine thread after each step (the app wakes its event loop once per step).
        self._step_listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            if self.batchable:
                self._pool = KVPool(self.model.config.n_layers, self.limits.max_batch, self.model.config.max_seq_len)
            self._thread = threading.Thread(target=self._loop, name="moekit-serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def add_step_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the engine thread after each step, once the events the step emitted are
        all out (an app hands them to its event loop in one wake-up)."""
        self._step_listeners.append(fn)

    def on_engine_thread(self) -> bool:
        """True when called from the engine's own thread (in a step, events come in batches)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def _steps_done(self) -> None:
        for fn in self._step_listeners:
            try:
                fn()
            except Exception:  # a listener's failure must not stop the engine
                log.exception("step listener failed")

    # ------------------------------------------------------------------ requests
    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request; raises QueueFullError when ``queue_size`` requests are waiting already,
        ValueError naming the field when the request cannot run on this model."""
        self.submit_all([req])
        return req

    def submit_all(self, reqs: list[GenRequest]) -> None:
        """Queue all of ``reqs`` (the choices of one HTTP request) or none: QueueFullError when they do
        not all fit in the queue."""
        for req in reqs:
            self._validate(req)
        with self._cv:
            if len(self._waiting) + len(reqs) > self.limits.queue_size:
                self.counts["rejected"] += 1
                if self.metrics is not None:
                    self.metrics.request_finished("rejected", None)
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (queue_size="
                                     f"{self.limits.queue_size}), no room for {len(reqs)} more; retry in "
                                     f"{self.limits.retry_after_s} s")
            for req in reqs:
                req.request_id = req.request_id or f"cmpl-{next(self._ids)}"
                req.t_submit = time.perf_counter()
                seed = req.seed if req.seed is not None else random.SystemRandom().getrandbits(63)
                req.generator = torch.Generator(device=self.device).manual_seed(seed)
                self._waiting.append(req)
            self._cv.notify_all()

    def _validate(self, req: GenRequest) -> None:
        context = self.model.config.max_seq_len
        if not req.prompt_ids:
            raise ValueError("prompt_ids: empty; a request needs at least one prompt token")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ValueError(f"max_tokens={req.max_tokens!r} must be an int >= 1")
        if len(req.prompt_ids) + req.max_tokens > context:
            raise ValueError(f"max_tokens={req.max_tokens}: prompt ({len(req.prompt_ids)} tokens) + max_tokens "
                             f"exceeds the model's context of {context} tokens")
        if not req.temperature >= 0:
            raise ValueError(f"temperature={req.temperature} must be >= 0")
        if not 0 < req.top_p <= 1:
            raise ValueError(f"top_p={req.top_p} must be in (0, 1]")
        vocab = self.model.config.vocab_size
        bad = [t for t in [*req.prompt_ids, *req.logit_bias] if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {vocab}")

    def cancel(self, req: GenRequest) -> None:
        """Free the request's slot (a client that went away); a waiting request leaves the queue now."""
        with self._cv:
            if req.finish_reason is not None or req.cancelled:
                return
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self._finish(req, "cancelled")
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ expert control
    def layer(self, name: str | int) -> tuple[str, MoE]:
        """An MoE layer by qualified name ("layers.1.mlp") or by block index (1); KeyError names the choices."""
        if isinstance(name, int) and not isinstance(name, bool):
            name = f"layers.{name}.mlp"
        if name not in self.layers:
            raise KeyError(f"layer {name!r} is not an MoE layer; MoE layers are {sorted(self.layers)}")
        return name, self.layers[name]

    def mask(self, name: str | int, experts: list[int]) -> list[int]:
        """Take experts out of service before the next step; returns the layer's masked experts."""
        name, layer = self.layer(name)

        def apply() -> list[int]:
            layer.mask_experts(experts)
            return layer.masked_experts

        return self.between_steps(apply)

    def unmask(self, name: str | int, experts: list[int] | None) -> list[int]:
        """Put experts back in service (None: all of the layer's) before the next step; clears
        their quarantine."""
        name, layer = self.layer(name)

        def apply() -> list[int]:
            layer.unmask_experts(experts)
            cleared = set(range(layer.num_experts)) if experts is None else set(experts)
            self.quarantined[name] -= cleared
            layer.stats.nonfinite_E[sorted(cleared)] = False
            return layer.masked_experts

        return self.between_steps(apply)

    def between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the engine thread before its next step and return its result (re-raising
        its exception); runs at once when the thread is not running. Unlike waiting for the model
        lock, a queued change cannot be starved by back-to-back steps."""
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def job() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as err:  # handed to the caller, which re-raises it
                outcome["error"] = err
            finally:
                done.set()

        with self._cv:
            queued = (self._thread is not None and not self._stopping
                      and threading.current_thread() is not self._thread)
            if queued:
                self._commands.append(job)
                self._cv.notify_all()
        if not queued:
            with self.model_lock:
                return fn()
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def expert_snapshot(self) -> list[dict[str, Any]]:
        """Per MoE layer: name, tokens per expert and utilisation since start, masked and quarantined experts."""
        out = []
        with self.model_lock:
            for name, layer in self.layers.items():
                tokens = layer.stats.tokens_E.cpu().tolist()
                total = sum(tokens)
                out.append({"name": name, "num_experts": layer.num_experts, "top_k": layer.top_k,
                            "tokens_per_expert": tokens,
                            "utilization": [t / total if total else 0.0 for t in tokens],
                            "masked": layer.masked_experts, "quarantined": sorted(self.quarantined[name])})
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard shows, as JSON-able values."""
        return {"model": self.model_name, "uptime_s": time.time() - self.started_at, "active": self.active,
                "queue_depth": self.queue_depth, "max_batch": self.limits.max_batch,
                "batched_decode": self.batchable, **{f"{k}_total": v for k, v in self.counts.items()},
                "layers": self.expert_snapshot()}

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._active or self._commands):
                        self._cv.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                    admit = []
                    while self._waiting and len(self._active) + len(admit) < self.limits.max_batch:
                        admit.append(self._waiting.popleft())
                with self.model_lock:
                    for command in commands:
                        command()
                    if admit or self._active:
                        try:
                            self._step(admit)
                        except Exception as err:  # the engine thread must outlive a failing step
                            log.exception("engine step failed")
                            for req in admit + self._active:
                                self._finish(req, "error", f"{type(err).__name__}: {err}")
                            self._active = []
                self._steps_done()
                if self.metrics is not None:
                    self.metrics.set_load(self.queue_depth, self.active)
                # Let threads waiting for the model lock (metrics, stats) in between two steps.
                time.sleep(0)
        with self._cv:
            for command in self._commands:
                command()
            self._commands = []
            for req in list(self._waiting) + self._active:
                self._finish(req, "error", "server is shutting down")
            self._waiting.clear()
            self._active = []
        self._steps_done()

    def _step(self, admit: list[GenRequest]) -> None:
        self.counts["steps"] += 1
        fresh = []
        for req in admit:
            if req.cancelled:
                self._finish(req, "cancelled")
            else:
                fresh.append(req)
                self.counts["prompt_tokens"] += len(req.prompt_ids)
        alone = [r for r in fresh if r.echo_logprobs]
        packed = [r for r in fresh if not r.echo_logprobs]
        self._active = [r for r in self._active if self._keep(r)]
        # Prompts join the running rows' decode step (one forward) when there are running rows;
        # else they are prefilled (packed when several), then decoded with the rest.
        joining = packed if self._pool is not None and self._active else []
        if not joining:
            if self.batchable and len(packed) > 1:
                self.counts["packed_prefills"] += 1
                self._prefill(packed)
            else:
                alone = packed + alone
        for req in alone:
            self._prefill([req])
        self._active = [r for r in self._active if self._keep(r)]
        rows = [r for r in self._active if r.finish_reason is None]
        if not rows and not joining:
            return
        if self._pool is not None:
            # Rows in slots 0..B-1, in slot order: read as one view of the pool (RowCaches).
            self._pool.compact([r.cache for r in rows if isinstance(r.cache, SlotCache)])
            rows.sort(key=lambda r: r.cache.slot if isinstance(r.cache, SlotCache) else -1)
        tokens_B = torch.tensor([r.generated[-1] for r in rows], dtype=torch.long, device=self.device)
        if joining:  # with the running rows' decode step (none left when this step's lone prefills failed them)
            self._prefill(joining, rows, tokens_B)
        else:
            self._decode(rows, tokens_B)
        self._active = [r for r in self._active if self._keep(r)]

    def _decode(self, rows: list[GenRequest], tokens_B: torch.Tensor) -> None:
        """Feed each row's last token (``tokens_B``): one batched forward, or row by row for a
        model the engine does not batch."""
        if self.batchable and len(rows) > 1:
            self.counts["batched_steps"] += 1
            logits_BV = self._guarded(rows, lambda: decode_step(self.model, tokens_B, [r.cache for r in rows]))
            if logits_BV is not None:
                for b, r in enumerate(rows):
                    self._record_rows(r, b, 1)
                self._accept_rows(rows, logits_BV, list(range(len(rows))))
            return
        for b, r in enumerate(rows):
            def forward(r: GenRequest = r, b: int = b) -> torch.Tensor:
                return self.model(tokens_B[b:b + 1, None], cache=r.cache)[:, -1]

            logits_1V = self._guarded([r], forward)
            if logits_1V is not None:
                self._record_rows(r, -1, 1)
                self._accept_one(r, logits_1V, lambda: self._trace(-1))

    def _prefill(self, reqs: list[GenRequest], rows: list[GenRequest] | None = None,
                 tokens_B: torch.Tensor | None = None) -> None:
        """Run the prompts of ``reqs`` (one LM.forward, or several packed into one pass) and sample
        their first tokens. With running ``rows``, their last tokens ``tokens_B`` go through the same
        forward (``moekit.serve.batched.mixed_step``) and they sample their next tokens too."""
        rows = rows or []
        prompts = [torch.tensor(r.prompt_ids, dtype=torch.long, device=self.device) for r in reqs]
        if rows:
            self.counts["mixed_steps"] += 1
            self.counts["batched_steps"] += 1

        def forward() -> tuple[torch.Tensor, list[int]]:
            for r in reqs:
                self._new_cache(r)
            if rows:
                return mixed_step(self.model, tokens_B, [r.cache for r in rows], prompts, [r.cache for r in reqs])
            if len(reqs) == 1:
                logits_1SV = self.model(prompts[0][None, :], cache=reqs[0].cache)
                if reqs[0].echo_logprobs:
                    self._prompt_logprobs(reqs[0], logits_1SV[0, :-1])
                return logits_1SV[:, -1], [-1]
            return prefill_step(self.model, prompts, [r.cache for r in reqs])

        try:
            result = self._guarded(rows + reqs, forward, fail=not rows)
        except Exception:  # as before mixed steps: prompts and rows apart, so a failure fails its own only
            log.exception("mixed step failed for %d row(s) and %d prompt(s); running them apart",
                          len(rows), len(reqs))
            self._prefill(reqs)
            self._decode(rows, tokens_B)
            return
        if result is None:
            return
        logits_NV, trace_rows = result
        for b, r in enumerate(rows):
            self._record_rows(r, b, 1)
        for req, row in zip(reqs, trace_rows[len(rows):]):
            self._active.append(req)
            self._record_rows(req, row, len(req.prompt_ids))
        self._accept_rows(rows + reqs, logits_NV, trace_rows)

    def _accept_rows(self, reqs: list[GenRequest], logits_BV: torch.Tensor, trace_rows: list[int]) -> None:
        """``_accept`` for row b of ``logits_BV`` (B, V) and ``reqs[b]``, whose routing is row
        ``trace_rows[b]`` of the last forward. The rows are drawn together (``_draw``); a row it
        leaves out, or every row when it fails, samples on its own (and fails on its own)."""
        tokens: list[int | None] = [None] * len(reqs)
        adjusted_BV = logits_BV
        if len(reqs) > 1:
            try:
                tokens, adjusted_BV = self._draw(reqs, logits_BV)
            except (RuntimeError, ValueError) as err:  # every row samples on its own instead
                log.warning("batched sampling failed, sampling row by row: %s", err)
        for b, req in enumerate(reqs):
            row_1V = (logits_BV if tokens[b] is None else adjusted_BV)[b:b + 1]
            self._accept_one(req, row_1V, lambda row=trace_rows[b]: self._trace(row), tokens[b])

    def _draw(self, reqs: list[GenRequest], logits_BV: torch.Tensor) -> tuple[list[int | None], torch.Tensor]:
        """Next tokens of all rows with finite logits at once, with ``_sample``'s result for each row:
        logit_bias and penalties applied to the rows that set them (``_adjusted``), one argmax for the
        greedy rows, one ``nucleus_probs`` (per-row temperature) for the sampled rows with top_p < 1
        and one for those with top_p = 1, then one ``draw`` in which each row's noise comes from its
        request's generator (``sample_next``'s draw, since both compute every row on its own).
        Returns the tokens (None for rows with NaN/Inf logits, left to ``_sample`` to fail) and the
        adjusted logits (B, V) (the logprobs' source)."""
        tokens: list[int | None] = [None] * len(reqs)
        finite = torch.isfinite(logits_BV).all(dim=-1).tolist()
        adjusted_BV = self._adjusted(reqs, logits_BV)
        greedy = [b for b, r in enumerate(reqs) if finite[b] and r.temperature == 0]
        nucleus = [b for b, r in enumerate(reqs) if finite[b] and r.temperature != 0 and r.top_p < 1]
        full = [b for b, r in enumerate(reqs) if finite[b] and r.temperature != 0 and r.top_p == 1]
        if greedy:
            for b, token in zip(greedy, _rows(adjusted_BV, greedy).argmax(dim=-1).tolist()):
                tokens[b] = token
        for rows in (nucleus, full):
            if not rows:
                continue
            probs_GV = nucleus_probs(_rows(adjusted_BV, rows), _per_row([reqs[b].temperature for b in rows]),
                                     _per_row([reqs[b].top_p for b in rows]))
            for b, token in zip(rows, draw(probs_GV, [reqs[b].generator for b in rows]).tolist()):
                tokens[b] = token
        return tokens, adjusted_BV

    @staticmethod
    def _adjusted(reqs: list[GenRequest], logits_BV: torch.Tensor) -> torch.Tensor:
        """``logits_BV`` (B, V) with row b's ``logit_bias`` added, then OpenAI's penalties over its
        generated tokens subtracted: logit - frequency x count - presence x (count > 0). The same
        tensor when no row sets either; rows that set neither keep their values."""
        biased = [b for b, r in enumerate(reqs) if r.logit_bias]
        penalised = [b for b, r in enumerate(reqs) if (r.presence_penalty or r.frequency_penalty) and r.generated]
        if not biased and not penalised:
            return logits_BV
        V, dtype, device = logits_BV.shape[-1], logits_BV.dtype, logits_BV.device
        out_BV = logits_BV.clone()
        if biased:
            rows = torch.tensor([b for b in biased for _ in reqs[b].logit_bias], device=device)
            ids = torch.tensor([t for b in biased for t in reqs[b].logit_bias], device=device)
            bias = torch.tensor([v for b in biased for v in reqs[b].logit_bias.values()], dtype=dtype, device=device)
            out_BV.index_put_((rows, ids), bias, accumulate=True)  # a request's ids are distinct keys
        if penalised:
            longest = max(len(reqs[b].generated) for b in penalised)
            # Generated ids padded with V (a column past the vocabulary, dropped after counting).
            ids_PN = torch.tensor([reqs[b].generated + [V] * (longest - len(reqs[b].generated)) for b in penalised],
                                  device=device)
            counts_PV = torch.zeros(len(penalised), V + 1, dtype=dtype, device=device).scatter_add_(
                1, ids_PN, torch.ones(ids_PN.shape, dtype=dtype, device=device))[:, :V]
            frequency_P1 = torch.tensor([[reqs[b].frequency_penalty] for b in penalised], dtype=dtype, device=device)
            presence_P1 = torch.tensor([[reqs[b].presence_penalty] for b in penalised], dtype=dtype, device=device)
            index = torch.tensor(penalised, device=device)
            out_BV.index_copy_(0, index, out_BV.index_select(0, index) - frequency_P1 * counts_PV
                               - presence_P1 * (counts_PV > 0).to(dtype))
        return out_BV

    def _accept_one(self, req: GenRequest, logits_1V: torch.Tensor,
                    trace: Callable[[], dict[str, list[int]]], token: int | None = None) -> None:
        """``_accept`` for one sequence; an error there (sampling, decoding) fails this sequence only."""
        try:
            self._accept(req, logits_1V, trace() if req.trace else None, token)
        except Exception as err:  # one sequence's failure must not reach the others in the batch
            log.exception("request %s failed", req.request_id)
            self._finish(req, "error", f"{type(err).__name__}: {err}")

    def _prompt_logprobs(self, req: GenRequest, logits_SV: torch.Tensor) -> None:
        """Logprob of each prompt token after the first given the ones before (the first: None)."""
        logp_SV = torch.log_softmax(logits_SV.double(), dim=-1)
        ids = req.prompt_ids
        req.prompt_logprobs = [None] + [self._logprob_entry(logp_SV[i], ids[i + 1], req.logprobs or 0)
                                        for i in range(len(ids) - 1)]

    @staticmethod
    def _logprob_entry(logp_V: torch.Tensor, token: int, k: int) -> dict[str, Any]:
        top = torch.topk(logp_V, k) if k else None
        return {"logprob": float(logp_V[token]),
                "top": [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))}

    def _sample(self, req: GenRequest, logits_1V: torch.Tensor,
                token: int | None = None) -> tuple[int, dict[str, Any] | None]:
        """The next token after logit_bias and the penalties (``token`` when ``_draw`` drew it
        already from these logits, ``logits_1V`` then adjusted already), and its logprob entry when
        asked for.

        Logprobs are log-softmax of the biased, penalised logits before temperature and top-p (as
        vLLM reports them). Non-finite logits fail the request (``_accept_one``), not the batch."""
        if token is not None:
            if req.logprobs is None:
                return token, None
            return token, self._logprob_entry(torch.log_softmax(logits_1V[0].double(), dim=-1), token, req.logprobs)
        if not all_finite(logits_1V):
            raise FloatingPointError("the model's logits hold NaN/Inf for this sequence")
        logits_1V = self._adjusted([req], logits_1V)
        token = int(sample_next(logits_1V, req.temperature, req.top_p, req.generator)[0])
        if req.logprobs is None:
            return token, None
        return token, self._logprob_entry(torch.log_softmax(logits_1V[0].double(), dim=-1), token, req.logprobs)

    def _new_cache(self, req: GenRequest) -> None:
        """An empty cache for the request: a slot of the pool (reused on a retry), or a KVCache."""
        if self._pool is None:
            req.cache = KVCache(self.model.config.n_layers)
        elif isinstance(req.cache, SlotCache):
            req.cache = SlotCache(self._pool, req.cache.slot)
        else:
            req.cache = self._pool.acquire()

    def _keep(self, req: GenRequest) -> bool:
        if req.cancelled and req.finish_reason is None:
            self._finish(req, "cancelled")
        return req.finish_reason is None

    def _guarded(self, reqs: list[GenRequest], forward: Callable[[], Any], fail: bool = True) -> Any | None:
        """Run a forward pass; quarantine experts that produce NaN/Inf and retry; on any other error
        fail ``reqs`` (the other requests keep running), or with ``fail=False`` raise it to the
        caller. None when the requests failed."""
        want_routing = any(r.trace or r.record_routing for r in reqs)
        for _ in range(1 + sum(layer.num_experts for layer in self.layers.values())):
            try:
                with capture_routing(self.model) if want_routing else contextlib.nullcontext() as cap:
                    out = forward()
                self._last_topk = {} if cap is None else {
                    name: events[-1].routing.topk_idx_TK for name, events in cap.events.items() if events}
                return out
            except ExpertNonFiniteError as err:
                for r in reqs:
                    if r.cache is not None:
                        truncate_cache(r.cache)
                if not self._quarantine(err, reqs):
                    return None
            except Exception as err:  # a failing step must not stop the server: fail its requests
                if not fail:
                    raise
                log.exception("forward pass failed for %d request(s)", len(reqs))
                for r in reqs:
                    self._finish(r, "error", f"{type(err).__name__}: {err}")
                return None
        for r in reqs:
            self._finish(r, "error", "experts kept producing NaN/Inf after quarantine")
        return None

    def _quarantine(self, err: ExpertNonFiniteError, reqs: list[GenRequest]) -> bool:
        name = err.layer
        layer = self.layers.get(name)
        try:
            if layer is None:
                raise ValueError(f"unknown layer {name!r}")
            layer.mask_experts(err.experts)
        except (ValueError, IndexError) as mask_err:
            for r in reqs:
                self._finish(r, "error", f"{err}; quarantine failed: {mask_err}")
            return False
        self.quarantined[name].update(err.experts)
        self.counts["quarantine_events"] += 1
        log.warning("quarantined experts %s of %s after NaN/Inf outputs", err.experts, name)
        if self.metrics is not None:
            self.metrics.quarantine_event()
        return True

    def _trace(self, row: int) -> dict[str, list[int]]:
        """Top-k expert ids per MoE layer for token row ``row`` of the last forward pass."""
        return {name: idx_TK[row].tolist() for name, idx_TK in self._last_topk.items() if idx_TK is not None}

    def _record_rows(self, req: GenRequest, last: int, n: int) -> None:
        """With ``req.record_routing``, keep the experts of the last forward's rows last-n+1..last."""
        if not req.record_routing:
            return
        rows = []
        for name in self.layers:
            idx_TK = self._last_topk[name]
            if idx_TK is None:
                raise ValueError(f"{name}: record_routing needs a token-choice router (it has expert choice)")
            end = last % idx_TK.shape[0] + 1
            rows.append(idx_TK[end - n:end].to(torch.int32))
        req.routing_rows.append(torch.stack(rows).cpu())

    def routing_record(self, req: GenRequest) -> Any:
        """The moekit.replay.RoutingRecord of a finished ``record_routing`` request: B = 1, the prompt
        and every generated token but the last (those fed to the model), with those tokens."""
        from ..replay import RoutingRecord

        if not req.record_routing or not req.routing_rows:
            raise ValueError(f"request {req.request_id!r} recorded no routing (record_routing={req.record_routing})")
        idx_LTK = torch.cat(req.routing_rows, dim=1)
        tokens = torch.tensor([(req.prompt_ids + req.generated)[:idx_LTK.shape[1]]], dtype=torch.long)
        return RoutingRecord(list(self.layers), [m.num_experts for m in self.layers.values()],
                             [idx_TK[None].long() for idx_TK in idx_LTK], tokens)

    def _accept(self, req: GenRequest, logits_1V: torch.Tensor, trace: dict[str, list[int]] | None,
                token: int | None = None) -> None:
        """Sample the request's next token (``token`` when drawn already), update its text, emit the
        new text, and finish it when done."""
        token, logprob = self._sample(req, logits_1V, token)
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
            if self.metrics is not None:
                self.metrics.first_token(now - req.t_submit)
        req.generated.append(token)
        self.counts["tokens_generated"] += 1
        if self.metrics is not None:
            self.metrics.tokens(1)
        eos = token in self._stop_ids
        if req.detok is None:
            req.detok = stream_decoder(self.tokenizer, req.prompt_ids)
        # Only the new token is decoded (in the context of the last few); the end flushes what is held.
        text = req.text + ("" if eos else req.detok.step(token))
        if eos or len(req.generated) >= req.max_tokens:
            text += req.detok.flush()
        reason = "stop" if eos else None
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None and len(req.generated) >= req.max_tokens:
            reason = "length"
        req.text = text
        if reason is None:
            # Hold back what could still turn into a stop string or an unfinished multi-byte character.
            hold = max((len(s) - 1 for s in req.stop), default=0)
            safe = len(text) - hold
            while safe > req.sent and text[safe - 1] == "\ufffd":
                safe -= 1
        else:
            safe = len(text)
        delta = text[req.sent:safe] if safe > req.sent else ""
        req.sent = max(req.sent, safe)
        self._emit(req, {"type": "token", "token_id": token, "text": delta, "experts": trace, "logprob": logprob})
        if reason is not None:
            self._finish(req, reason)

    def _emit(self, req: GenRequest, event: Event) -> None:
        if req.on_event is not None:
            req.on_event(event)

    def _finish(self, req: GenRequest, reason: str, message: str = "") -> None:
        with self._cv:  # also called from cancel() on the server's thread
            if req.finish_reason is not None:
                return
            req.finish_reason = reason
            self._report_finish(req, reason, message)

    def _report_finish(self, req: GenRequest, reason: str, message: str) -> None:
        if isinstance(req.cache, SlotCache):
            req.cache.pool.release(req.cache)
        req.cache = None
        latency = time.perf_counter() - req.t_submit if req.t_submit else None
        if reason == "cancelled":
            self.counts["cancelled"] += 1
            status = "cancelled"
        elif reason == "error":
            self.counts["errors"] += 1
            status = "error"
            self._emit(req, {"type": "error", "message": message})
        else:
            self.counts["requests"] += 1
            status = "ok"
            rest = req.text[req.sent:]
            req.sent = len(req.text)
            kept = self._kept_tokens(req)
            usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": kept,
                     "total_tokens": len(req.prompt_ids) + kept}
            self._emit(req, {"type": "done", "finish_reason": reason, "text": rest, "usage": usage})
        if self.metrics is not None:
            self.metrics.request_finished(status, latency if status == "ok" else None)


    def _kept_tokens(self, req: GenRequest) -> int:
        """Generated tokens that count: after a stop string, not those past the end of the kept text."""
        n = len(req.generated)
        if req.finish_reason != "stop" or not req.generated or req.generated[-1] == self.tokenizer.eos_id:
            return n
        while n > 0 and len(self.tokenizer.decode(req.generated[:n])) > len(req.text):
            n -= 1
        return n


def prompt_room(model: LM, limits: ServeLimits) -> int:
    """Longest prompt a request may send, in tokens."""
    room = model.config.max_seq_len - 1
    return room if limits.max_prompt_tokens is None else min(room, limits.max_prompt_tokens)


def _rows(x_BV: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` of x (B, V): x itself when they are all of its rows in order."""
    return x_BV if rows == list(range(x_BV.shape[0])) else x_BV[rows]


def _per_row(values: list[float]) -> float | torch.Tensor:
    """One number when every row shares it, else the rows' values as a (G,) float64 tensor."""
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, dtype=torch.float64)
