"""OpenAI-compatible routes in llama-server's shapes: /v1/chat/completions, /v1/completions, /v1/models,
/v1/moderations (also without the /v1 prefix for the first three, as llama-server answers them).

Streams are framed as llama-server frames them: a first chunk with delta {"role": "assistant", "content":
null}, then reasoning and content deltas, a final chunk with an empty delta, the finish_reason, ``timings``
and the ``so8t`` object, a usage chunk (``choices: []``) when ``stream_options.include_usage``, and
``data: [DONE]``. An error after the first byte is one ``data: {"error": ...}`` event and no [DONE]. The
reasoning goes in ``reasoning_content`` (llama-server, SGLang, DeepSeek), ``reasoning`` (vLLM, Ollama's /v1)
or both, as the server was started.

Sampling fields: temperature, top_p, top_k, min_p, repeat_penalty (llama.cpp's), seed, max_tokens /
max_completion_tokens (default and -1: until the context is full), stop. frequency_penalty and
presence_penalty are accepted and ignored (the engine's sampler chain has no such stage). n > 1, logprobs and
structured output (response_format other than text) are refused with 400 rather than ignored. Tools are
rendered into the prompt by the chat template, and a tool call the model writes stays text in ``content``.

/v1/moderations answers from the safety head alone, with no generation: each input is scored as the input
gate scores a one-turn chat holding it (the GGUF's chat template around it), so ``flagged`` is exactly "the
input gate would refuse this prompt" (P(unsafe) >= the refuse threshold, 0.5 when that stage is off). The head
gives one probability, so there is one category, ``unsafe``: OpenAI's own category keys (harassment, hate,
...) are not reported, since the head does not score them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse

from .app import NO_RETRY, APIError, Generation, engine_error, get_state, parse_body, render_chat, sse_json
from .engine import SamplingParams
from .gate import RunResult

__all__ = ["router"]

router = APIRouter()

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "content_filter": "content_filter",
                  "cancelled": "stop"}
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt"})


# ================================================================================================ requests
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # llama.cpp's extras (cache_prompt, n_probs, ...) are ignored


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None  # <= 0: off, as in llama.cpp
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, ignored
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # accepted, ignored
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: Any = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n = {self.n}: one choice per request is supported")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            raise APIError(400, "logprobs are not supported")

    def sampling(self, n_ctx: int, max_tokens: int | None = None) -> SamplingParams:
        default = SamplingParams()
        limit = self.max_tokens if max_tokens is None else max_tokens
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=n_ctx if limit is None or limit < 0 else limit,
            temperature=default.temperature if self.temperature is None else self.temperature,
            top_p=default.top_p if self.top_p is None else self.top_p,
            top_k=default.top_k if self.top_k is None else max(self.top_k, 0),
            min_p=default.min_p if self.min_p is None else self.min_p,
            repeat_penalty=default.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
            seed=None if self.seed is None else self.seed & 0xFFFFFFFF,  # -1: llama.cpp's random seed
            stop=stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str | dict = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: str = "function"
    function: ToolCallFunction


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's and Ollama's name for the same thing
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def template_dict(self, index: int) -> dict:
        """The message as the chat template reads it (Qwen3: content, reasoning_content, tool_calls)."""
        message: dict = {"role": "system" if self.role == "developer" else self.role,
                         "content": text_content(self.content, f"messages.{index}.content")}
        reasoning = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if reasoning:
            message["reasoning_content"] = reasoning
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def text_content(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for number, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"{where}.{number}: content parts of type {part.type!r} are not supported "
                                "(text only)")
        texts.append(part.text)
    return "".join(texts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=-1)
    tools: list[dict] | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_format: Literal["none", "auto", "deepseek"] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {self.response_format.get('type')!r} is not supported "
                                "(text only)")


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise APIError(400, f"prompt holds {len(self.prompt)} prompts: one per request is supported")
        if self.echo:
            raise APIError(400, "echo is not supported")
        if self.suffix:
            raise APIError(400, "suffix is not supported")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ModerationPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ModerationRequest(_Model):
    input: str | list[str] | list[ModerationPart]
    model: str | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if not self.input:
            raise APIError(400, "input: at least one input is needed")
        texts = []
        for number, item in enumerate(self.input):
            if isinstance(item, str):
                texts.append(item)
            elif item.type == "text" and item.text is not None:
                texts.append(item.text)
            else:
                raise APIError(400, f"input.{number}: inputs of type {item.type!r} are not supported (text only)")
        return texts


# ================================================================================================ responses
class _Reply:
    """The fields every response and chunk of one request shares."""

    def __init__(self, request: Request, prefix: str, kind: str):
        self.state = get_state(request)
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.kind = kind
        self.base = {"id": self.id, "object": kind, "created": self.created, "model": self.state.model_name,
                     "system_fingerprint": f"so8t-{self.state.version}"}


def usage(result: RunResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0}}


def timings(result: RunResult) -> dict:
    """llama-server's timings object."""
    prompt_ms, predicted_ms = result.prompt_seconds * 1e3, result.generation_seconds * 1e3
    prompt_n, predicted_n = result.prompt_tokens, result.completion_tokens
    return {"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": prompt_n / result.prompt_seconds if result.prompt_seconds else 0.0,
            "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": predicted_n / result.generation_seconds if result.generation_seconds else 0.0}


def finish_reason(result: RunResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, result.finish_reason)


def refusal_error(gen: Generation) -> APIError:
    """gate_errors: the input gate's refusal as Azure OpenAI answers a filtered prompt (400, code
    content_filter, param prompt)."""
    gen.job.cancel.set()
    so8t = gen.start.so8t
    return APIError(400, f"the prompt was refused by the safety gate (P(unsafe) = "
                         f"{(so8t.get('safety') or {}).get('unsafe', float('nan')):.4f})",
                    code="content_filter", extra={"param": "prompt", "so8t": so8t}, headers=gen.headers(),
                    body={"so8t": so8t})


def stream_error(err: BaseException) -> str:
    err = engine_error(err)
    return sse_json({"error": {"code": err.code, "message": err.message, "type": err.type}})


def event_stream(body, headers: dict) -> EventSourceResponse:
    return EventSourceResponse(body, headers=headers, sep="\n")


# ================================================================================================ routes
@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(request: Request):
    state = get_state(request)
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest)
    body.check_supported()
    engine = state.engine
    messages = [m.template_dict(i) for i, m in enumerate(body.messages)]
    kwargs = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k not in RESERVED_TEMPLATE_KWARGS}
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    prompt = render_chat(engine, messages, without_template="use /v1/completions with a raw prompt", tools=tools,
                         **kwargs)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = body.sampling(engine.n_ctx, max_tokens)
    gen = await state.generate(request, prompt, params, split_thinking=body.reasoning_format != "none",
                               stream=body.stream)
    if gen.refused and state.gate_errors:
        raise refusal_error(gen)
    reply = _Reply(request, "chatcmpl", "chat.completion")
    if not body.stream:
        result = await gen.result(request)
        message: dict = {"role": "assistant", "content": result.content}
        if result.reasoning:
            message.update({field: result.reasoning for field in state.reasoning_fields})
        return JSONResponse({**reply.base, "choices": [{"index": 0, "message": message, "logprobs": None,
                                                        "finish_reason": finish_reason(result)}],
                             "usage": usage(result), "timings": timings(result), "so8t": result.so8t},
                            headers=gen.headers(result))
    base = {**reply.base, "object": "chat.completion.chunk"}

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        return sse_json({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}], **extra})

    async def events():
        try:
            yield chunk({"role": "assistant", "content": None})
            async for kind, payload in gen.events():
                if kind == "delta":
                    if payload.kind == "reasoning":
                        yield chunk({field: payload.text for field in state.reasoning_fields})
                    else:
                        yield chunk({"content": payload.text})
                elif kind == "end":
                    yield chunk({}, finish_reason(payload), timings=timings(payload), so8t=payload.so8t)
                    if body.include_usage:
                        yield sse_json({**base, "choices": [], "usage": usage(payload)})
                    yield "[DONE]"
                else:
                    yield stream_error(payload)
        finally:
            gen.abandon()  # a client that left stops the generation at its next token

    return event_stream(events(), gen.headers())


@router.post("/v1/completions")
@router.post("/completions")
async def completions(request: Request):
    state = get_state(request)
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    body.check_supported()
    engine = state.engine
    gen = await state.generate(request, body.text, body.sampling(engine.n_ctx), split_thinking=False,
                               stream=body.stream)
    if gen.refused and state.gate_errors:
        raise refusal_error(gen)
    reply = _Reply(request, "cmpl", "text_completion")
    if not body.stream:
        result = await gen.result(request)
        return JSONResponse({**reply.base, "choices": [{"index": 0, "text": result.content, "logprobs": None,
                                                        "finish_reason": finish_reason(result)}],
                             "usage": usage(result), "timings": timings(result), "so8t": result.so8t},
                            headers=gen.headers(result))

    def chunk(text: str, finish: str | None = None, **extra) -> str:
        return sse_json({**reply.base, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                    "finish_reason": finish}], **extra})

    async def events():
        try:
            async for kind, payload in gen.events():
                if kind == "delta":
                    yield chunk(payload.text)
                elif kind == "end":
                    yield chunk("", finish_reason(payload), timings=timings(payload), so8t=payload.so8t)
                    if body.include_usage:
                        yield sse_json({**reply.base, "choices": [], "usage": usage(payload)})
                    yield "[DONE]"
                else:
                    yield stream_error(payload)
        finally:
            gen.abandon()

    return event_stream(events(), gen.headers())


def model_card(request: Request) -> dict:
    state = get_state(request)
    engine = state.engine
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "so8t",
            "meta": {"n_ctx": engine.n_ctx, "n_ctx_train": engine.runtime.hparams.context_length,
                     "n_embd": engine.runtime.hparams.embedding_length,
                     "n_vocab": engine.runtime.hparams.vocab_size, "n_params": engine.llm._model.n_params(),
                     "size": engine.llm._model.size(), "so8t_heads": engine.has_heads,
                     "gate": {"refuse_above": state.policy.refuse_above,
                              "escalate_above": state.policy.escalate_above,
                              "stop_above": state.policy.stop_above, "score_every": state.policy.score_every}}}


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [model_card(request)]}


@router.get("/v1/models/{model_id:path}")
async def model(request: Request, model_id: str):
    card = model_card(request)
    if model_id != card["id"]:
        raise APIError(404, f"model {model_id!r} not found (this server serves {card['id']!r})")
    return card


@router.post("/v1/moderations")
async def moderations(request: Request):
    state = get_state(request)
    body: ModerationRequest = await parse_body(request, ModerationRequest)
    texts = body.texts()
    engine = state.engine
    if not engine.has_heads:
        raise APIError(501, "the GGUF has no so8t.* heads: /v1/moderations needs the safety head",
                       headers=NO_RETRY)
    # scored as the input gate scores a one-turn chat holding it
    prompts = [render_chat(engine, [{"role": "user", "content": text}], without_template="")
               if engine.chat_template else text for text in texts]
    scores = await state.score(request, prompts)
    threshold = state.policy.refuse_above if state.policy.refuse_above is not None else 0.5
    labels = engine.runtime.metadata.heads
    results = []
    for score in scores:
        unsafe = float(score.safety[1])
        flagged = unsafe >= threshold
        state.metrics.unsafe.labels("moderation").observe(unsafe)
        state.metrics.decisions.labels("flagged" if flagged else "allow", "moderation").inc()
        results.append({
            "flagged": flagged, "categories": {"unsafe": flagged}, "category_scores": {"unsafe": unsafe},
            "category_applied_input_types": {"unsafe": ["text"]},
            "so8t": {"safety": {label: float(p) for label, p in zip(labels["safety"][2], score.safety)},
                     "authority": {label: float(p) for label, p in zip(labels["authority"][2], score.authority)},
                     "threshold": threshold, "prompt_tokens": score.n_tokens}})
    return {"id": f"modr-{uuid.uuid4().hex}", "model": state.model_name, "results": results}
