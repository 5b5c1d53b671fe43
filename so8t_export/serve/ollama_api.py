"""Ollama's native routes: /api/chat, /api/generate (NDJSON streams by default, ``"stream": false`` for one
object), /api/tags, /api/show, /api/version, /api/ps.

``think``: Qwen3-Thinking-2507's template always opens the reasoning, so the model thinks whatever the request
says; ``think: true`` (or "low"/"medium"/"high"/"max") returns the trace in ``message.thinking`` (chat) or
``thinking`` (generate), and without it the trace is dropped and only the answer is sent. The gate scores the
reasoning either way. Each line has ``model``, ``created_at`` and ``done``; the last has ``done: true``,
``done_reason`` (stop, length or content_filter), the durations in nanoseconds, the token counts and the
``so8t`` object (which the official ollama client does not keep: read it from the raw lines).

``options``: temperature, top_p, top_k, min_p, repeat_penalty, seed, num_predict (-1 and -2: until the context
is full), stop; the load-time ones (num_ctx, num_gpu, ...) are fixed when the server starts and are ignored
here. ``format`` (JSON mode or a schema), ``suffix``, ``images``, ``template`` and ``context`` are refused
with 400 rather than ignored. Errors are ``{"error": "..."}`` with the statuses of the OpenAI routes.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .app import NO_RETRY, APIError, Generation, engine_error, get_state, parse_body, render_chat
from .engine import SamplingParams
from .gate import RunResult

__all__ = ["router"]

router = APIRouter()

OLLAMA_API_VERSION = "0.32.15"  # the Ollama release whose API these routes follow (README: the pinned image)
DONE_REASONS = {"stop": "stop", "length": "length", "context": "length", "content_filter": "content_filter",
                "cancelled": "stop"}


# ================================================================================================ requests
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Model):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0)
    seed: int | None = None
    num_predict: int | None = Field(None, ge=-2)
    stop: str | list[str] | None = None

    def sampling(self, n_ctx: int) -> SamplingParams:
        default = SamplingParams()
        return SamplingParams(
            max_tokens=n_ctx if self.num_predict is None or self.num_predict < 0 else self.num_predict,
            temperature=default.temperature if self.temperature is None else self.temperature,
            top_p=default.top_p if self.top_p is None else self.top_p,
            top_k=default.top_k if self.top_k is None else max(self.top_k, 0),
            min_p=default.min_p if self.min_p is None else self.min_p,
            repeat_penalty=default.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
            seed=None if self.seed is None else self.seed & 0xFFFFFFFF,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()))


class _Generate(_Model):
    model: str | None = None
    stream: bool = True
    think: bool | str | None = None
    options: Options | None = None
    format: Any = None
    keep_alive: Any = None

    def check_supported(self) -> None:
        if self.format not in (None, ""):
            raise APIError(400, "format (JSON mode, schemas) is not supported")
        if isinstance(self.think, str) and self.think not in ("low", "medium", "high", "max"):
            raise APIError(400, f"think = {self.think!r}; expected true, false, low, medium, high or max")

    @property
    def thinking(self) -> bool:
        return bool(self.think)  # "low", "medium", "high", "max": on (the model has one level)

    def sampling(self, n_ctx: int) -> SamplingParams:
        return (self.options or Options()).sampling(n_ctx)


class ChatMessage(_Model):
    role: str
    content: str | None = ""
    thinking: str | None = None
    images: list | None = None
    tool_calls: list[dict] | None = None
    tool_name: str | None = None

    def template_dict(self, index: int) -> dict:
        if self.role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages.{index}.role = {self.role!r}; expected system, user, assistant or tool")
        if self.images:
            raise APIError(400, f"messages.{index}.images: images are not supported (a text model)")
        message: dict = {"role": self.role, "content": self.content or ""}
        if self.thinking:
            message["reasoning_content"] = self.thinking
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_name:
            message["name"] = self.tool_name
        return message


class ChatRequest(_Generate):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict] | None = None


class GenerateRequest(_Generate):
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list | None = None
    template: str | None = None
    context: list[int] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("suffix", "images", "template", "context"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported")


class ShowRequest(_Model):
    model: str | None = None
    name: str | None = None  # deprecated spelling
    verbose: bool = False


# ================================================================================================ helpers
def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def tag(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def done_fields(gen: Generation, result: RunResult) -> dict:
    total = time.perf_counter() - gen.received
    return {"done": True, "done_reason": DONE_REASONS.get(result.finish_reason, result.finish_reason),
            "total_duration": int(total * 1e9), "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens, "prompt_eval_duration": int(result.prompt_seconds * 1e9),
            "eval_count": result.completion_tokens, "eval_duration": int(result.generation_seconds * 1e9),
            "so8t": result.so8t}


def refusal_error(gen: Generation) -> APIError:
    gen.job.cancel.set()
    so8t = gen.start.so8t
    return APIError(400, "content_filter: the prompt was refused by the safety gate", headers=gen.headers(),
                    body={"so8t": so8t})


def line(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n"


async def _respond(request: Request, body: _Generate, prompt: str, *, chat: bool):
    state = get_state(request)
    model = body.model or tag(state.model_name)
    if body.thinking and "thinking" not in _capabilities(request):
        raise APIError(400, f"{json.dumps(model)} does not support thinking")
    gen = await state.generate(request, prompt, body.sampling(state.engine.n_ctx), split_thinking=True,
                               stream=body.stream)
    if gen.refused and state.gate_errors:
        raise refusal_error(gen)
    think = body.thinking

    def piece(text: str, thinking: str | None = None) -> dict:
        if chat:
            message = {"role": "assistant", "content": text}
            if thinking is not None:
                message["thinking"] = thinking
            return {"message": message}
        out = {"response": text}
        if thinking is not None:
            out["thinking"] = thinking
        return out

    if not body.stream:
        result = await gen.result(request)
        reasoning = result.reasoning if think and result.reasoning else None
        return JSONResponse({"model": model, "created_at": now(), **piece(result.content, reasoning),
                             **done_fields(gen, result)}, headers=gen.headers(result))

    async def lines():
        try:
            async for kind, payload in gen.events():
                if kind == "delta":
                    if payload.kind == "reasoning":
                        if think:
                            yield line({"model": model, "created_at": now(), **piece("", payload.text),
                                        "done": False})
                    else:
                        yield line({"model": model, "created_at": now(), **piece(payload.text), "done": False})
                elif kind == "end":
                    yield line({"model": model, "created_at": now(), **piece(""), **done_fields(gen, payload)})
                else:  # Ollama: a mid-stream error is one more line, status 200
                    yield line({"error": engine_error(payload).message})
        finally:
            gen.abandon()

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=gen.headers())


# ================================================================================================ routes
@router.post("/api/chat")
async def chat(request: Request):
    state = get_state(request)
    body: ChatRequest = await parse_body(request, ChatRequest)
    body.check_supported()
    engine = state.engine
    if not body.messages:  # Ollama: an empty chat loads the model and answers done_reason "load"
        return {"model": body.model or tag(state.model_name), "created_at": now(),
                "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
    messages = [m.template_dict(i) for i, m in enumerate(body.messages)]
    prompt = render_chat(engine, messages, without_template="use /api/generate with raw: true",
                         tools=body.tools or None)
    return await _respond(request, body, prompt, chat=True)


@router.post("/api/generate")
async def generate(request: Request):
    state = get_state(request)
    body: GenerateRequest = await parse_body(request, GenerateRequest)
    body.check_supported()
    engine = state.engine
    if not body.prompt:  # Ollama: an empty prompt loads the model and answers done_reason "load"
        return {"model": body.model or tag(state.model_name), "created_at": now(), "response": "",
                "done": True, "done_reason": "load"}
    if body.raw or engine.chat_template is None:
        if not body.raw:
            raise APIError(501, "the GGUF has no tokenizer.chat_template: send raw: true", headers=NO_RETRY)
        prompt = body.prompt
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": body.prompt}]
        prompt = render_chat(engine, messages, without_template="send raw: true")
    return await _respond(request, body, prompt, chat=False)


def _details(request: Request) -> dict:
    import gguf

    state = get_state(request)
    fields = state.header_fields()
    file_type = fields.get("general.file_type")
    try:
        level = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        level = "unknown"
    return {"parent_model": "", "format": "gguf", "family": fields.get("general.architecture", "qwen3"),
            "families": [fields.get("general.architecture", "qwen3")],
            "parameter_size": _human(state.engine.llm._model.n_params()), "quantization_level": level}


def _human(n: int) -> str:
    """Ollama's parameter_size: 4.0B, 137M, 197K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def _modified(request: Request) -> str:
    path = get_state(request).engine.path
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat().replace("+00:00", "Z")


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request):
    state = get_state(request)
    name = tag(state.model_name)
    return {"models": [{"name": name, "model": name, "modified_at": _modified(request),
                        "size": state.engine.path.stat().st_size, "digest": "", "details": _details(request),
                        "capabilities": _capabilities(request)}]}


@router.get("/api/ps")
async def ps(request: Request):
    state = get_state(request)
    name = tag(state.model_name)
    return {"models": [{"name": name, "model": name, "size": state.engine.path.stat().st_size, "digest": "",
                        "details": _details(request), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": state.engine.n_ctx}]}


def _capabilities(request: Request) -> list[str]:
    engine = get_state(request).engine
    return ["completion", "thinking"] if engine.chat_template and "<think>" in engine.chat_template \
        else ["completion"]


@router.post("/api/show")
async def show(request: Request):
    state = get_state(request)
    await parse_body(request, ShowRequest)
    engine = state.engine
    info = {key: value for key, value in state.header_fields().items()
            if not key.startswith("tokenizer.chat_template")}
    info["general.parameter_count"] = engine.llm._model.n_params()
    default = SamplingParams()
    parameters = "\n".join([f"temperature {default.temperature}", f"top_p {default.top_p}",
                            f"top_k {default.top_k}", f"repeat_penalty {default.repeat_penalty}",
                            f"num_ctx {engine.n_ctx}", 'stop "<|im_start|>"', 'stop "<|im_end|>"'])
    return {"modelfile": f"# served by so8t serve\nFROM {engine.path}\n", "parameters": parameters,
            "template": engine.chat_template or "", "details": _details(request), "model_info": info,
            "capabilities": _capabilities(request), "modified_at": _modified(request)}


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version(request: Request):
    return {"version": OLLAMA_API_VERSION, "so8t": get_state(request).version}
