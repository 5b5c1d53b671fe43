"""The FastAPI app around one Engine: auth, limits, the bounded queue, one worker thread, /health, /metrics.

Concurrency. llama.cpp's context is not thread-safe and SO8T scores every token of a generation, so ONE worker
thread runs the requests, in arrival order, from a bounded queue (``max_queue`` requests may wait while one
runs; one more is answered 429 with Retry-After). A request never interrupts another (llama-cpp-python's
server does, with ``interrupt_requests``). The worker sends each event of a job (its start, the deltas that
passed the gate, its end or error) to the request's asyncio queue with ``loop.call_soon_threadsafe``; a
client that goes away (a closed stream, a non-streaming request whose connection closes, or one still
waiting in the queue) sets the job's cancel event, which the engine checks at every token, so the next
request starts at once. The worker never waits for a slow reader: a response's events queue up in memory
(at most max_tokens deltas).

Errors are llama-server's (``{"error": {"code": int, "message": str, "type": str}}``) on the OpenAI routes and
Ollama's (``{"error": str}``) on /api/*, with the same HTTP statuses. A gate decision is never a 5xx (the
openai client retries those): a refused prompt is a normal completion with finish_reason content_filter (HTTP
400 with error code content_filter under ``gate_errors``), and gate responses carry ``x-should-retry: false``.

``create_app(None, ...)`` makes an app that answers 503 "Loading model" (also on /health, as llama-server
does) until ``app.state.so8t.attach(engine)``; ``run_server`` starts uvicorn first and loads the GGUF in a
background thread that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import math
import queue
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..gguf_file import MetadataError
from ..runtime import LlamaError, PromptTooLongError
from .engine import ContextExceededError, Engine, SamplingParams
from .gate import GatedRun, GatePolicy, RunResult

__all__ = ["APIError", "BackgroundServer", "ServerState", "create_app", "run_server", "serve_app"]

REASONING_FIELDS = {"reasoning_content": ("reasoning_content",), "reasoning": ("reasoning",),
                    "both": ("reasoning_content", "reasoning")}
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})
ESCALATE_HEADER = "X-SO8T-Escalate"
NO_RETRY = {"x-should-retry": "false"}
PROBABILITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))

# llama-server's error types (server-common.cpp) by HTTP status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "unavailable_error", 500: "server_error", 501: "not_supported_error",
               503: "unavailable_error"}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("so8t-export")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on sys.path)
        return "0"


# ================================================================================================ errors
class APIError(Exception):
    """An HTTP error answered in the shape of the route's API. ``code`` is the OpenAI error code (llama-server
    uses the HTTP status there, which is the default); ``extra`` goes into the error object (n_ctx, ...)."""

    def __init__(self, status: int, message: str, *, type: str | None = None, code: int | str | None = None,
                 extra: dict | None = None, headers: dict | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.code = status if code is None else code
        self.extra, self.headers, self.body = extra or {}, headers or {}, body or {}


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nothing more is sent."""


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def error_response(path: str, err: APIError) -> JSONResponse:
    if is_ollama_path(path):
        content = {"error": err.message, **err.extra, **err.body}
    else:
        content = {"error": {"code": err.code, "message": err.message, "type": err.type, **err.extra}, **err.body}
    return JSONResponse(content, status_code=err.status, headers=err.headers)


def engine_error(err: BaseException) -> APIError:
    """What the worker raised, as an HTTP error."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ContextExceededError):
        return APIError(400, str(err), type="exceed_context_size_error",
                        extra={"n_prompt_tokens": err.n_prompt_tokens, "n_ctx": err.n_ctx})
    if isinstance(err, PromptTooLongError | ValueError):  # an empty prompt, a template that refuses the input
        return APIError(400, str(err))
    if isinstance(err, LlamaError):
        return APIError(500, str(err))
    return APIError(500, f"{type(err).__name__}: {err}")


def validation_message(errors: Sequence[dict]) -> str:
    """pydantic's errors in one line: 'messages.0.role: Input should be ...; temperature: ...'."""
    parts = []
    for error in errors[:5]:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", error.get("msg", "invalid JSON"))
            parts.append(f"the request body is not valid JSON: {detail}")
            continue
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request"


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as ``model``, whatever the Content-Type says (curl -d sends form-urlencoded; Ollama and
    llama-server read JSON regardless). Bad JSON and invalid fields raise RequestValidationError."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False)) from None


# ================================================================================================ metrics
class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps may share a process)."""

    def __init__(self, state: ServerState):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("so8t_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("so8t_prompt_tokens", "Prompt tokens decoded", registry=registry)
        self.completion_tokens = Counter("so8t_completion_tokens", "Tokens generated", registry=registry)
        self.queue_depth = Gauge("so8t_queue_depth", "Requests waiting for the worker", registry=registry)
        self.queue_depth.set_function(lambda: state.worker.waiting if state.worker else 0)
        self.processing = Gauge("so8t_requests_processing", "Requests the worker is running (0 or 1)",
                                registry=registry)
        self.processing.set_function(lambda: 1 if state.worker and state.worker.busy else 0)
        self.queue_max = Gauge("so8t_queue_max", "Requests that may wait before 429", registry=registry)
        self.queue_max.set(state.max_queue)
        self.rejected = Counter("so8t_queue_rejected", "Requests answered 429 because the queue was full",
                                registry=registry)
        self.cancelled = Counter("so8t_cancelled", "Jobs cancelled because the client went away",
                                 registry=registry)
        self.decisions = Counter("so8t_gate_decisions", "Gate decisions, by decision and stage "
                                 "(input: refuse/escalate/allow; output: stop/allow; moderation: flagged/allow)",
                                 ["decision", "stage"], registry=registry)
        self.unsafe = Histogram("so8t_safety_unsafe_probability", "P(unsafe) from the safety head: at the "
                                "prompt's last token (input), the largest over the generated tokens (output), "
                                "per /v1/moderations input (moderation)", ["stage"], buckets=PROBABILITY_BUCKETS,
                                registry=registry)
        self.escalate = Histogram("so8t_authority_escalate_probability", "P(escalate) from the authority head "
                                  "at the prompt's last token", buckets=PROBABILITY_BUCKETS, registry=registry)
        self.queue_seconds = Histogram("so8t_queue_wait_seconds", "Time from arrival to the worker",
                                       registry=registry)
        self.generation_seconds = Histogram("so8t_generation_seconds", "Prompt decode plus generation time",
                                            registry=registry)
        self.loaded = Gauge("so8t_model_loaded", "1 once the GGUF is loaded", registry=registry)
        self.loaded.set_function(lambda: 1 if state.engine is not None else 0)

    def record_start(self, run: GatedRun) -> None:
        result = run.result
        self.prompt_tokens.inc(result.prompt_tokens)
        so8t = result.so8t
        if so8t.get("safety"):
            self.unsafe.labels("input").observe(so8t["safety"].get("unsafe", 0.0))
        if so8t.get("authority"):
            self.escalate.observe(so8t["authority"].get("escalate", 0.0))
        policy = run.policy
        if run.engine.has_heads and (policy.refuse_above is not None or policy.escalate_above is not None):
            self.decisions.labels(so8t.get("decision", "allow"), "input").inc()

    def record_end(self, run: GatedRun) -> None:
        result = run.result
        self.completion_tokens.inc(result.completion_tokens)
        self.generation_seconds.observe(result.prompt_seconds + result.generation_seconds)
        so8t = result.so8t
        if so8t.get("stage") == "output" or "output" in so8t:
            self.decisions.labels("stop" if so8t.get("decision") == "stop" else "allow", "output").inc()
        if "output" in so8t:
            self.unsafe.labels("output").observe(so8t["output"]["max_unsafe"])

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


# ================================================================================================ the worker
class Job:
    """One unit of work for the worker thread and the asyncio queue its events come back on.

    ``work(engine, job)`` runs in the worker and reports through ``job.emit(kind, payload)``; the worker adds
    ("error", exception) when it raises and ("done", None) at the end."""

    def __init__(self, work: Callable[[Engine, Job], None], *, want_deltas: bool = True):
        self.work, self.want_deltas = work, want_deltas
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.submitted = time.perf_counter()
        self.started: float | None = None

    def emit(self, kind: str, payload: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancel.set()

    async def next_event(self, request: Request | None = None) -> tuple[str, Any]:
        """The next event; with a request, a disconnect while waiting cancels the job and raises ClientGone."""
        if request is None:
            return await self.events.get()
        getter = asyncio.ensure_future(self.events.get())
        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        self.cancel.set()
        raise ClientGone()

    async def wait_for(self, kinds: set[str], request: Request | None = None) -> tuple[str, Any]:
        """Skip events until one of ``kinds`` (or an error) arrives."""
        while True:
            kind, payload = await self.next_event(request)
            if kind in kinds or kind == "error":
                return kind, payload

    async def outcome(self, kind: str, request: Request, ended_early: str) -> Any:
        """The payload of the first ``kind`` event; the worker's error as an APIError, and a job that ended
        ("done") without one as a 500 saying ended_early."""
        got, payload = await self.wait_for({kind, "done"}, request)
        if got == "error":
            raise engine_error(payload)
        if got == "done":
            raise APIError(500, ended_early)
        return payload


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body has been read already, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Worker:
    """The one thread that runs jobs in order. ``max_queue`` jobs may wait while one runs."""

    def __init__(self, state: ServerState, engine: Engine):
        self.state, self.engine = state, engine
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.current: Job | None = None
        self.busy = False
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted and not finished: the one running plus those waiting
        self._stopped = False
        self.mean_seconds = 1.0  # running mean of a job's time, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="so8t-worker", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._stopped:
                raise APIError(503, "the server is shutting down")
            if self._outstanding <= self.state.max_queue:  # room: the worker is free or the queue is not full
                self._outstanding += 1
                self.jobs.put(job)
                return job
        self.state.metrics.rejected.inc()
        retry = max(1, min(60, math.ceil(self.mean_seconds * (self.waiting + 1))))
        raise APIError(429, f"the server is busy: {self.waiting} requests are waiting (--queue-size "
                            f"{self.state.max_queue}); retry in {retry} s", headers={"Retry-After": str(retry)})

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        current = self.current
        if current is not None:
            current.cancel.set()
        while True:  # cancel what waits
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.emit("error", APIError(503, "the server is shutting down"))
                self._done()
        self.jobs.put(None)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():  # the client left while it waited
                self.state.metrics.cancelled.inc()
                self._done()
                continue
            self.current, self.busy = job, True
            job.started = time.perf_counter()
            self.state.metrics.queue_seconds.observe(job.started - job.submitted)
            try:
                job.work(self.engine, job)
            except BaseException as err:  # noqa: BLE001 - reported to the request, the worker carries on
                job.emit("error", err)
            finally:
                job.emit("done")
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - job.started)
                self._done()
                self.current, self.busy = None, False

    def _done(self) -> None:
        with self._lock:
            self._outstanding -= 1


# ================================================================================================ state
@dataclasses.dataclass
class Generation:
    """A generation that has started: the job and its prompt-time result (decision, escalate, scores)."""

    job: Job
    start: RunResult
    received: float
    finished: bool = False  # the end (or an error) has reached the response

    @property
    def refused(self) -> bool:
        return self.start.so8t.get("decision") == "refuse"

    def headers(self, result: RunResult | None = None) -> dict[str, str]:
        """The escalate flag, and no-retry on a gate decision: a refused prompt, or (given the finished
        result) an output the gate stopped."""
        headers = {ESCALATE_HEADER: "true" if self.start.escalate else "false"}
        if self.refused or (result is not None and result.finish_reason == "content_filter"):
            headers.update(NO_RETRY)
        return headers

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("delta", Delta)... then ("end", RunResult) or ("error", exception). Leaving early (the client went
        away and the response task is cancelled) cancels the generation at its next token."""
        try:
            while True:
                kind, payload = await self.job.events.get()
                if kind in ("end", "error"):
                    self.finished = True
                if kind in ("delta", "end", "error"):
                    yield kind, payload
                    if kind != "delta":
                        return
                elif kind == "done":
                    self.finished = True
                    yield "error", APIError(500, "the generation ended without a result")
                    return
        finally:
            self.abandon()

    def abandon(self) -> None:
        """The response is over: a generation still running is cancelled at its next token."""
        if not self.finished:
            self.job.cancel.set()

    async def result(self, request: Request) -> RunResult:
        """The finished result (non-streaming); a disconnect cancels the generation and raises ClientGone."""
        try:
            return await self.job.outcome("end", request, "the generation ended without a result")
        finally:
            self.finished = True


def render_chat(engine: Engine, messages: list[dict], *, without_template: str, tools: list | None = None,
                **template_kwargs) -> str:
    """The GGUF's chat template on a request's messages: 501 (no retry) when the file has none, saying what to
    use instead; a template that fails on these messages is the request's fault, 400."""
    if engine.chat_template is None:
        raise APIError(501, f"the GGUF has no tokenizer.chat_template: {without_template}", headers=NO_RETRY)
    try:
        return engine.render(messages, tools=tools, **template_kwargs)
    except MetadataError as err:
        raise APIError(400, str(err).split(": ", 1)[-1]) from None


class ServerState:
    """What the routes share (``app.state.so8t``): the engine once loaded, the policy, the worker, metrics."""

    def __init__(self, engine: Engine | None, *, policy: GatePolicy, api_keys: Sequence[str], max_queue: int,
                 max_body_bytes: int, model_name: str | None, reasoning_field: str, gate_errors: bool):
        if reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"reasoning_field = {reasoning_field!r}; expected one of {', '.join(REASONING_FIELDS)}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue = {max_queue!r}; expected a number of requests >= 0")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes = {max_body_bytes!r}; expected a positive number of bytes")
        keys = [str(k) for k in api_keys]
        if any(not k for k in keys):
            raise ValueError("an API key is empty")
        self.policy, self.api_keys, self.max_queue = policy, keys, max_queue
        self.max_body_bytes, self._model_name = max_body_bytes, model_name
        self.reasoning_fields = REASONING_FIELDS[reasoning_field]
        self.gate_errors = gate_errors
        self.engine: Engine | None = None
        self.worker: Worker | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.version = _version()
        self.metrics = Metrics(self)
        self._header_cache: dict | None = None
        if engine is not None:
            self.attach(engine)

    # ------------------------------------------------------------------ loading
    def attach(self, engine: Engine) -> None:
        """Serve ``engine`` from now on (the app answered 503 until then)."""
        if self.engine is not None:
            raise RuntimeError("an engine is attached already")
        if self.policy.enabled and not engine.has_heads:
            raise LlamaError(f"{engine.path}: no so8t.* metadata, so no safety/authority heads to gate with; "
                             "serve it with the gate off (--no-gate) or export it with so8t-export")
        self.policy = self.policy.resolved(engine.runtime.metadata)  # what /metrics and the logs report
        self.worker = Worker(self, engine)
        self.engine = engine

    def fail(self, message: str) -> None:
        """Loading failed: /health answers 500 with the reason."""
        self.load_error = message

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    @property
    def model_name(self) -> str:
        if self._model_name:
            return self._model_name
        return self.engine.model_name if self.engine is not None else "so8t"

    def header_fields(self) -> dict:
        """The GGUF's scalar metadata, typed (read once, for /api/show)."""
        if self._header_cache is None:
            from ..gguf_file import read_gguf_header

            fields = {}
            for key, field in read_gguf_header(self.engine.path).fields.items():
                value = field.contents()
                if isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 256):
                    fields[key] = value
            self._header_cache = fields
        return self._header_cache

    # ------------------------------------------------------------------ jobs
    def submit(self, work: Callable[[Engine, Job], None], *, want_deltas: bool = True) -> Job:
        if self.worker is None:
            raise APIError(503, "Loading model")
        return self.worker.submit(Job(work, want_deltas=want_deltas))

    async def generate(self, request: Request, prompt: str, params: SamplingParams, *, split_thinking: bool,
                       stream: bool) -> Generation:
        """Queue a gated generation and wait until its prompt is decoded and judged (ContextExceededError and
        the like come back as APIError, before anything is sent)."""
        received = time.perf_counter()
        policy, metrics = self.policy, self.metrics

        def work(engine: Engine, job: Job) -> None:
            run = GatedRun(engine, policy, prompt, params, split_thinking=split_thinking, cancel=job.cancel)
            run.start()
            metrics.record_start(run)
            job.emit("start", dataclasses.replace(run.result, so8t=dict(run.result.so8t)))
            try:
                for delta in run.stream():
                    if job.want_deltas:
                        job.emit("delta", delta)
            finally:
                metrics.record_end(run)
                if run.result.finish_reason == "cancelled":
                    metrics.cancelled.inc()
            job.emit("end", run.result)

        job = self.submit(work, want_deltas=stream)
        start = await job.outcome("start", request, "the generation ended before it started")
        return Generation(job, start, received)

    async def score(self, request: Request, texts: list[str]) -> list:
        """Head probabilities of each text at its last token (no generation), through the worker."""
        job = self.submit(lambda engine, job: job.emit("end", engine.score_texts(texts)), want_deltas=False)
        return await job.outcome("end", request, "scoring ended without a result")


# ================================================================================================ middleware
class Gatekeeper:
    """Pure ASGI middleware around the routes: counts responses, answers 503 while loading, checks the API key
    and the body size (Content-Length, then the bytes that actually arrive) before a route sees the request.

    Not FastAPI's ``max_body_size``: Starlette's RequestBodyLimitMiddleware replaces any response to a request
    whose Content-Length is over the limit with a plain-text "Content Too Large", and both APIs need their own
    error shape for the 413."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        path = scope.get("path", "")
        status_seen = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counting_send, path)
        finally:
            route = path if path in _ROUTES else "other"
            state.metrics.requests.labels(route, str(status_seen.get("status", 499))).inc()

    async def _handle(self, scope, receive, send, path):
        state = self.state
        if state.engine is None:
            message = state.load_error or "Loading model"
            status = 500 if state.load_error else 503
            return await error_response(path, APIError(status, message))(scope, receive, send)
        if state.api_keys and path not in PUBLIC_PATHS and scope["method"] != "OPTIONS" \
                and not self._authorised(scope):
            return await error_response(path, APIError(401, "Invalid API Key"))(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            limit = state.max_body_bytes
            length = _header(scope, b"content-length")
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    return await error_response(path, APIError(400, f"Content-Length {length!r} is not a "
                                                                    "number"))(scope, receive, send)
                if declared > limit:
                    return await error_response(path, _too_large(declared, limit))(scope, receive, send)
            chunks, size = [], 0
            while True:  # the body, counted as it arrives (a chunked body has no Content-Length)
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > limit:
                    return await error_response(path, _too_large(size, limit, more=True))(scope, receive, send)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            receive = _replay(b"".join(chunks), receive)
        await self.app(scope, receive, send)

    def _authorised(self, scope) -> bool:
        key = None
        authorization = _header(scope, b"authorization")
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer":
                key = value.strip()
        if key is None:
            key = _header(scope, b"x-api-key")
        if not key:
            return False
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in self.state.api_keys)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _too_large(size: int, limit: int, more: bool = False) -> APIError:
    return APIError(413, f"the request body is {'over ' if more else ''}{size} bytes, more than the limit of "
                         f"{limit} bytes (--max-body-bytes)")


def _replay(body: bytes, receive):
    """receive() for the app: the body read already, then whatever comes next (the disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


_ROUTES = frozenset({"/health", "/v1/health", "/metrics", "/v1/models", "/v1/chat/completions",
                     "/v1/completions", "/v1/moderations", "/chat/completions", "/completions", "/models",
                     "/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/version", "/api/ps"})


# ================================================================================================ the app
def create_app(engine: Engine | None, *, policy: GatePolicy, api_keys: Sequence[str] = (), max_queue: int = 8,
               max_body_bytes: int = 8 << 20, model_name: str | None = None,
               reasoning_field: str = "reasoning_content", gate_errors: bool = False) -> FastAPI:
    """The server app for ``engine`` (None: 503 until ``app.state.so8t.attach(engine)``).

    policy: the gate (``GatePolicy.off()`` for none; a policy with any stage on needs a GGUF with so8t.*
    heads). api_keys: accepted keys (Bearer or X-Api-Key; none: no auth); /health stays open. max_queue:
    requests that may wait while one runs. reasoning_field: "reasoning_content" (llama-server, SGLang,
    DeepSeek), "reasoning" (vLLM, Ollama's /v1) or "both". gate_errors: refuse with HTTP 400 content_filter
    instead of a 200 completion holding the refusal.
    """
    from . import ollama_api, openai_api

    state = ServerState(engine, policy=policy, api_keys=api_keys, max_queue=max_queue,
                        max_body_bytes=max_body_bytes, model_name=model_name, reasoning_field=reasoning_field,
                        gate_errors=gate_errors)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.shutdown()

    app = FastAPI(title="so8t serve", version=state.version, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.so8t = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(request.url.path, err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return error_response(request.url.path, APIError(400, validation_message(err.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        message = {404: "File Not Found", 405: "Method Not Allowed"}.get(err.status_code, str(err.detail))
        return error_response(request.url.path, APIError(err.status_code, message,
                                                         headers=dict(err.headers or {})))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, err: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return error_response(request.url.path, engine_error(err))

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return state.metrics.exposition()

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.add_middleware(Gatekeeper, state=state)
    return app


def get_state(request: Request) -> ServerState:
    return request.app.state.so8t


# ================================================================================================ serving
def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one clear OSError, not uvicorn's exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: FastAPI, verbose: bool):
    import uvicorn

    return uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                          timeout_graceful_shutdown=5, lifespan="on")


def serve_app(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8080, verbose: bool = False) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM (blocking)."""
    import uvicorn

    sock = _listen(host, port)
    try:
        uvicorn.Server(_uvicorn_config(app, verbose)).run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """``app`` served by uvicorn in a daemon thread on host:port (0: a free port), for tests and benchmarks.

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        import uvicorn

        self.app = app
        self.socket = _listen(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(_uvicorn_config(app, verbose))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_servable(gguf_path: str | Path, policy: GatePolicy) -> None:
    """What can be known without llama.cpp, checked before the port opens: the file is a GGUF whose qwen3.*
    and so8t.* metadata read back, and it has heads when the gate is on.

    The triality check is left to inspect and parity, as in the runtime: it needs torch, and importing torch
    here loads its own OpenMP runtime into the server beside llama.cpp's, which took ~11 % of decode speed
    on 2 cores (bench/README.md, serving run 4)."""
    from ..gguf_file import read_gguf_header, read_qwen3_hparams
    from ..metadata import read_optional_so8t_metadata

    path = Path(gguf_path)
    header = read_gguf_header(path)
    metadata = read_optional_so8t_metadata(header, path, read_qwen3_hparams(header, path),
                                           check_rotations=False)
    if policy.enabled and metadata is None:
        raise LlamaError(f"{path}: no so8t.* metadata, so no safety/authority heads to gate with; serve it "
                         "with the gate off (--no-gate) or export it with so8t-export")


def run_server(gguf_path: str | Path, *, host: str = "127.0.0.1", port: int = 8080, n_ctx: int | None = None,
               n_threads: int | None = None, policy: GatePolicy | None = None, api_keys: Sequence[str] = (),
               max_queue: int = 8, max_body_bytes: int = 8 << 20, reasoning_field: str = "reasoning_content",
               gate_errors: bool = False, verbose: bool = False, model_name: str | None = None,
               on_ready: Callable[[str], None] | None = None) -> None:
    """Serve a GGUF until SIGINT/SIGTERM: the port opens at once (/health answers 503 "Loading model") and
    the model loads in a background thread. Raises before listening for what the header shows (not a GGUF,
    no heads with the gate on: MetadataError/LlamaError), OSError for a port that cannot be bound, and, after
    the server stopped, the error that made loading fail. on_ready(url) is called once the model serves
    (default: a line on stderr)."""
    policy = GatePolicy() if policy is None else policy
    check_servable(gguf_path, policy)
    app = create_app(None, policy=policy, api_keys=api_keys, max_queue=max_queue, max_body_bytes=max_body_bytes,
                     model_name=model_name, reasoning_field=reasoning_field, gate_errors=gate_errors)
    state: ServerState = app.state.so8t
    sock = _listen(host, port)
    bound = sock.getsockname()
    url = f"http://{'[' + bound[0] + ']' if ':' in bound[0] else bound[0]}:{bound[1]}"
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(app, verbose))
    failure: list[BaseException] = []

    def load() -> None:
        try:
            engine = Engine(gguf_path, n_ctx=n_ctx, n_threads=n_threads, require_heads=policy.enabled,
                            verbose=verbose)
            state.attach(engine)
        except BaseException as err:  # noqa: BLE001 - reported by run_server once uvicorn has stopped
            failure.append(err)
            state.fail(f"the model failed to load: {err}")
            server.should_exit = True
            return
        (on_ready or (lambda u: print(f"so8t serve: {state.model_name} ready on {u} "
                                      f"({engine.n_ctx} tokens of context)", file=sys.stderr, flush=True)))(url)

    loader = threading.Thread(target=load, name="so8t-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        state.shutdown()
    if failure:
        raise failure[0]


def sse_json(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
