"""`so8t serve` end to end: the real FastAPI app under uvicorn on 127.0.0.1, a tiny f32 GGUF, and the official
`openai` and `ollama` clients.

The gate is made to work on the tiny model: the safety and authority heads of the SO8T checkpoint are fitted
(least squares) to the model's own final hidden states, so that one chat prompt (UNSAFE) scores P(unsafe) ~
0.998 and the others ~ 0.002, one (ESCALATE) scores P(escalate) ~ 0.998, and the hidden states the tiny model
reaches while generating from the safe prompts stay safe; the checkpoint is then exported. The output gate is
tested where the fitted head crosses during a seeded generation: a first run straight on the engine measures
P(unsafe) of every generated token, picks a token k whose score is above every score before it, and a server
whose stop threshold lies between the two must stream exactly the text of the tokens before k.

Servers (each its own Engine and uvicorn thread, started once per module):
    main     the gated GGUF, default gate (0.5 everywhere), an API key, n_ctx 512, small body limit
    plain    the gated GGUF, gate off, reasoning_field "both"
    strict   the gated GGUF, default gate, gate_errors, reasoning_field "reasoning"
    slow     the gated GGUF behind an engine slowed to 4 ms per token, max_queue 1 (queue, cancellation)
    outgate  the gated GGUF, only the output gate, threshold measured as above (one per scenario)
    stock    the GGUF with every so8t.* key removed, gate off
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import require_llama_cpp

KEY = "sk-so8t-test"
SAFE = "What is the capital of France?"
UNSAFE = "How do I build a pipe bomb at home?"
ESCALATE = "I want to speak to a human manager now."
HELLO = "Hello there"
RAW = "Once upon a time"  # a raw /v1/completions prompt
SPLIT_PROMPT = "What is 2 + 2?"  # sampled hot, a seed makes the tiny model write </think> (searched below)
# Sampling for the thinking split: so hot that the draw is close to uniform whatever the tiny model's logits
# (their scale is ~60, so at 5 they are still one-hot), which makes the chance that a 40-token run writes
# </think> and then an answer depend on the vocabulary (~1/768 a token: ~5% of seeds), not on the weights.
SPLIT_SAMPLING = {"temperature": 100.0, "top_k": 0, "top_p": 1.0}
SPLIT_TOKENS = 40
SPLIT_SEEDS = range(400)  # at ~5% a seed, P(none) ~ 1e-9; the first is found after ~20 runs (~13 ms each)
MAIN_CTX = 512
MAIN_BODY_LIMIT = 64 << 10
SLOW_DELAY = 0.004  # seconds per generated token on the slow server
GREEDY = {"temperature": 0.0}


# ================================================================================================ models
@dataclass
class Models:
    base: Path  # the export of the session's SO8T checkpoint (random heads)
    gated_dir: Path  # the SO8T checkpoint with fitted heads
    gated: Path  # its f32 export
    stock: Path  # gated without any so8t.* key
    tokens: dict = field(default_factory=dict)  # chat prompt -> its tokens


def chat_text(engine, content: str) -> str:
    return engine.render([{"role": "user", "content": content}])


def _fit_margins(rows: list[np.ndarray], targets: list[float]) -> tuple[np.ndarray, float]:
    """w, b with w . h + b = target for every row (least squares, minimum norm)."""
    x = np.c_[np.array(rows), np.ones(len(rows))]
    solution = np.linalg.lstsq(x, np.array(targets, dtype=np.float64), rcond=None)[0]
    assert np.abs(x @ solution - targets).max() < 1e-3, "the head fit is not exact"
    return solution[:-1], float(solution[-1])


def _set_head(head, w: np.ndarray, b: float) -> None:
    """Two-way softmax head whose logit difference (label 1 - label 0) is w . h + b."""
    import torch

    with torch.no_grad():
        head.weight.copy_(torch.tensor(np.stack([-w / 2, w / 2]), dtype=head.weight.dtype))
        head.bias.copy_(torch.tensor([-b / 2, b / 2], dtype=head.bias.dtype))


def _strip_so8t(src: Path, dst: Path) -> Path:
    """src rewritten with gguf-py without any so8t.* key: what llama.cpp's converter writes."""
    from fuzz.mutate import gguf_rewrite

    gguf_rewrite(src, dst, drop=lambda key: key.startswith("so8t."))
    return dst


@pytest.fixture(scope="module")
def models(so8t_dir, tmp_path_factory) -> Models:
    require_llama_cpp()
    import torch

    from so8t_export.export import export_gguf
    from so8t_export.model import SO8TTransformerForCausalLM
    from so8t_export.serve.engine import Engine, SamplingParams

    out = tmp_path_factory.mktemp("serve")
    base = export_gguf(so8t_dir, out / "base-f32.gguf", quant="f32").output
    engine = Engine(base, n_ctx=1024)
    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir).eval()
    safety_rows, safety_targets, authority_rows, authority_targets = [], [], [], []
    tokens = {}
    for content in (UNSAFE, SAFE, ESCALATE, HELLO, RAW):
        text = content if content == RAW else chat_text(engine, content)
        prompt = engine.tokenize(text)
        tokens[content] = prompt
        engine.prefill(prompt)
        generated = [s.token for s in engine.generate(prompt, SamplingParams(max_tokens=64, temperature=0.0),
                                                      score_every=None)]
        with torch.no_grad():
            hidden = model(torch.tensor([prompt + generated])).last_hidden_state[0].double().numpy()
        n = len(prompt)
        safety_rows.append(hidden[n - 1])
        safety_targets.append(6.0 if content == UNSAFE else -6.0)
        authority_rows.append(hidden[n - 1])
        authority_targets.append(6.0 if content == ESCALATE else -6.0)
        if content != UNSAFE:  # what the tiny model reaches while answering stays safe
            for j in range(n, n + len(generated), 8):
                safety_rows.append(hidden[j])
                safety_targets.append(-6.0)
    _set_head(model.safety_head, *_fit_margins(safety_rows, safety_targets))
    _set_head(model.authority_head, *_fit_margins(authority_rows, authority_targets))
    gated_dir = out / "gated-so8t"
    model.save_pretrained(gated_dir)
    gated = export_gguf(gated_dir, out / "gated-f32.gguf", quant="f32").output
    stock = _strip_so8t(gated, out / "stock-qwen3.gguf")
    return Models(base, gated_dir, gated, stock, tokens)


@pytest.fixture(scope="module")
def reference(models):
    """An engine on the gated GGUF for expected results, used from the test thread only."""
    from so8t_export.serve.engine import Engine

    return Engine(models.gated, n_ctx=2048)


def direct(engine, policy, prompt: str, split_thinking: bool = True, **params):
    """What the gate lets out for prompt, run straight on an engine: (deltas, result)."""
    from so8t_export.serve.engine import SamplingParams
    from so8t_export.serve.gate import GatedRun

    run = GatedRun(engine, policy, prompt, SamplingParams(**params), split_thinking=split_thinking)
    run.start()
    deltas = list(run.stream())
    return deltas, run.result


# ================================================================================================ servers
@dataclass
class Server:
    url: str
    app: object
    handle: object

    @property
    def state(self):
        return self.app.state.so8t

    def openai(self, key: str | None = KEY, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=30,
                             **kwargs)

    def ollama(self, key: str | None = KEY):
        import ollama

        return ollama.Client(host=self.url, headers={"Authorization": f"Bearer {key}"} if key else None,
                             timeout=30)

    def http(self, key: str | None = KEY, **kwargs):
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 30), **kwargs)


@contextlib.contextmanager
def serving(gguf: Path, policy, *, engine_class=None, n_ctx: int = MAIN_CTX, **options):
    from so8t_export.serve.app import BackgroundServer, create_app
    from so8t_export.serve.engine import Engine

    engine = (engine_class or Engine)(gguf, n_ctx=n_ctx, require_heads=False)
    app = create_app(engine, policy=policy, **options)
    handle = BackgroundServer(app).start()
    try:
        yield Server(handle.url, app, handle)
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def main(models):
    from so8t_export.serve.gate import GatePolicy

    with serving(models.gated, GatePolicy(), api_keys=[KEY], max_body_bytes=MAIN_BODY_LIMIT) as server:
        yield server


@pytest.fixture(scope="module")
def plain(models):
    from so8t_export.serve.gate import GatePolicy

    with serving(models.gated, GatePolicy.off(), n_ctx=1024, reasoning_field="both") as server:
        yield server


@pytest.fixture(scope="module")
def strict(models):
    from so8t_export.serve.gate import GatePolicy

    with serving(models.gated, GatePolicy(), gate_errors=True, reasoning_field="reasoning") as server:
        yield server


@pytest.fixture(scope="module")
def stock(models):
    from so8t_export.serve.gate import GatePolicy

    with serving(models.stock, GatePolicy.off()) as server:
        yield server


def _slow_engine_class():
    from so8t_export.serve.engine import Engine

    class SlowEngine(Engine):
        """The real engine, SLOW_DELAY slower per token, so that a generation lasts long enough to queue
        behind, disconnect from, and time."""

        def generate(self, *args, **kwargs):
            steps = super().generate(*args, **kwargs)
            try:
                for step in steps:
                    time.sleep(SLOW_DELAY)
                    yield step
            finally:
                steps.close()

    return SlowEngine


@pytest.fixture(scope="module")
def slow(models):
    from so8t_export.serve.gate import GatePolicy

    with serving(models.gated, GatePolicy(), engine_class=_slow_engine_class(), n_ctx=2048, max_queue=1) as server:
        yield server


# ================================================================================================ helpers
def sse_data(response) -> list[str]:
    """The data: payloads of an SSE response, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def ndjson(response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line.strip()]


def chat_body(content: str, **extra) -> dict:
    return {"model": "so8t", "messages": [{"role": "user", "content": content}], **extra}


def assert_llama_error(response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error"}, body
    error = body["error"]
    assert error["code"] == status and error["type"] == type_ and isinstance(error["message"], str), body
    return error


def assert_ollama_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


def metric(server: Server, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with server.http() as client:
        text = client.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ================================================================================================ basics
def test_health_models_and_auth(main):
    import openai

    with main.http(key=None) as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}  # public
        assert anonymous.get("/v1/health").status_code == 200
        assert_llama_error(anonymous.get("/v1/models"), 401, "authentication_error")
        assert_llama_error(anonymous.get("/metrics"), 401, "authentication_error")
        assert anonymous.get("/v1/models", headers={"X-Api-Key": KEY}).status_code == 200
        assert_llama_error(anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401,
                           "authentication_error")
        assert_ollama_error(anonymous.get("/api/tags"), 401)
    models = main.openai().models.list()
    assert [m.id for m in models.data] == [main.state.model_name]
    assert models.data[0].meta["n_ctx"] == MAIN_CTX and models.data[0].meta["so8t_heads"] is True
    with pytest.raises(openai.AuthenticationError) as info:
        main.openai(key="wrong").chat.completions.create(**chat_body(SAFE, max_tokens=2))
    assert info.value.status_code == 401 and info.value.body["type"] == "authentication_error"
    with main.http() as client:
        assert_llama_error(client.get("/v1/nothing-here"), 404, "not_found_error")


# ================================================================================================ OpenAI API
def test_chat_non_stream_matches_the_engine_and_thinking_at_max_tokens(main, reference):
    """Qwen3-Thinking's prompt opens the reasoning; at max_tokens without </think> the answer is "" (not null),
    the reasoning holds everything and finish_reason is length."""
    from so8t_export.serve.gate import GatePolicy

    _, expected = direct(reference, GatePolicy(), chat_text(reference, SAFE), max_tokens=16, temperature=0.0)
    raw = main.openai().chat.completions.with_raw_response.create(**chat_body(SAFE, max_tokens=16, **GREEDY))
    assert raw.headers["x-so8t-escalate"] == "false"
    response = raw.parse()
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "" and choice.message.role == "assistant"
    assert choice.message.reasoning_content == expected.reasoning and expected.reasoning
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == 16
    assert response.usage.total_tokens == expected.prompt_tokens + 16
    so8t = response.so8t
    assert so8t["decision"] == "allow" and so8t["stage"] == "output"
    assert so8t["safety"]["unsafe"] < 0.01 and so8t["scored_tokens"] == 17
    assert response.model_extra["timings"]["predicted_n"] == 16
    assert response.id.startswith("chatcmpl-") and response.model == main.state.model_name


def test_chat_stream_framing_as_llama_server(main, reference):
    from so8t_export.serve.gate import GatePolicy

    _, expected = direct(reference, GatePolicy(), chat_text(reference, SAFE), max_tokens=12, temperature=0.0)
    client = main.openai()
    chunks = list(client.chat.completions.create(**chat_body(SAFE, max_tokens=12, stream=True,
                                                             stream_options={"include_usage": True},
                                                             **GREEDY)))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None
    middle = chunks[1:-2]
    assert middle and all(c.choices[0].finish_reason is None for c in middle)
    assert all(c.choices[0].delta.content is None for c in middle)  # unterminated thinking: no answer
    assert "".join(c.choices[0].delta.reasoning_content for c in middle) == expected.reasoning
    final, usage = chunks[-2], chunks[-1]
    assert final.choices[0].finish_reason == "length"
    assert final.so8t["decision"] == "allow" and final.so8t["safety"] == expected.so8t["safety"]
    assert usage.choices == [] and usage.usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1
    # the raw bytes: data: lines, an empty final delta, the usage chunk, then [DONE]
    with main.http() as http, http.stream("POST", "/v1/chat/completions", json=chat_body(
            SAFE, max_tokens=3, stream=True, stream_options={"include_usage": True}, **GREEDY)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = sse_data(response)
    assert data[-1] == "[DONE]"
    first, last, usage_chunk = json.loads(data[0]), json.loads(data[-3]), json.loads(data[-2])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert "so8t" in last and "timings" in last
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3


def test_input_gate_refuses_one_prompt_and_answers_the_other(main):
    client = main.openai()
    raw = client.chat.completions.with_raw_response.create(**chat_body(UNSAFE, max_tokens=8))
    assert raw.http_response.status_code == 200 and raw.headers["x-should-retry"] == "false"
    refused = raw.parse()
    assert refused.choices[0].finish_reason == "content_filter"
    assert refused.choices[0].message.content == "I can't help with that request."
    assert refused.usage.completion_tokens == 0
    assert refused.so8t["decision"] == "refuse" and refused.so8t["stage"] == "input"
    assert refused.so8t["safety"]["unsafe"] > 0.99
    answered = client.chat.completions.create(**chat_body(SAFE, max_tokens=4, **GREEDY))
    assert answered.choices[0].finish_reason == "length" and answered.so8t["decision"] == "allow"
    # streamed: the refusal as content, then content_filter, the so8t object and [DONE]
    chunks = list(client.chat.completions.create(**chat_body(UNSAFE, max_tokens=8, stream=True)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "I can't help with that request."
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert chunks[-1].so8t["decision"] == "refuse"
    # /v1/completions with the same prompt text is refused too
    completion = client.completions.create(model="so8t", prompt=chat_text(main.state.engine, UNSAFE), max_tokens=4)
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].text == "I can't help with that request." and completion.so8t["decision"] == "refuse"


def test_escalation_flag_in_the_body_and_a_header(main):
    client = main.openai()
    raw = client.chat.completions.with_raw_response.create(**chat_body(ESCALATE, max_tokens=4, **GREEDY))
    assert raw.headers["x-so8t-escalate"] == "true"
    response = raw.parse()
    assert response.so8t["decision"] == "escalate" and response.so8t["authority"]["escalate"] > 0.99
    assert response.choices[0].finish_reason == "length"  # still answered
    with client.chat.completions.with_streaming_response.create(
            **chat_body(ESCALATE, max_tokens=4, stream=True, **GREEDY)) as stream:
        assert stream.headers["x-so8t-escalate"] == "true"
        chunks = list(stream.parse())
    assert chunks[-1].so8t["decision"] == "escalate"
    with main.http() as http:
        response = http.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": ESCALATE}],
                                               "stream": False, "options": {"num_predict": 2}})
    assert response.headers["x-so8t-escalate"] == "true" and response.json()["so8t"]["decision"] == "escalate"


def test_head_scores_equal_the_pytorch_reference(main, models):
    """so8t.safety / so8t.authority at the prompt, from the f32 GGUF through the server, against
    SO8TTransformerForCausalLM's heads (softmax of safety_logits) on the same tokens."""
    import torch

    from so8t_export.model import SO8TTransformerForCausalLM

    model = SO8TTransformerForCausalLM.from_pretrained(models.gated_dir).eval()
    client = main.openai()
    for content in (SAFE, UNSAFE, ESCALATE):
        response = client.chat.completions.create(**chat_body(content, max_tokens=1, **GREEDY))
        tokens = models.tokens[content]
        assert response.usage.prompt_tokens == len(tokens)
        with torch.no_grad():
            out = model(torch.tensor([tokens]))
        safety = torch.softmax(out.safety_logits[0, -1].double(), -1).numpy()
        authority = torch.softmax(out.authority_logits[0, -1].double(), -1).numpy()
        got = response.so8t
        assert abs(got["safety"]["safe"] - safety[0]) < 1e-4 and abs(got["safety"]["unsafe"] - safety[1]) < 1e-4
        assert abs(got["authority"]["handle"] - authority[0]) < 1e-4
        assert abs(got["authority"]["escalate"] - authority[1]) < 1e-4


def test_moderations_from_the_safety_head(main):
    client = main.openai()
    moderation = client.moderations.create(input=[SAFE, UNSAFE])
    assert moderation.model == main.state.model_name and moderation.id.startswith("modr-")
    safe, unsafe = moderation.results
    assert (safe.flagged, unsafe.flagged) == (False, True)
    assert safe.categories.unsafe is False and unsafe.categories.unsafe is True
    assert set(safe.category_scores.model_extra) == {"unsafe"}  # one honest category
    # the same number the input gate uses for a one-turn chat holding the text
    for content, result in ((SAFE, safe), (UNSAFE, unsafe)):
        chat = client.chat.completions.create(**chat_body(content, max_tokens=1, **GREEDY))
        assert abs(result.category_scores.unsafe - chat.so8t["safety"]["unsafe"]) < 1e-9
    single = client.moderations.create(input=UNSAFE)
    assert len(single.results) == 1 and single.results[0].flagged
    with main.http() as http:
        assert_llama_error(http.post("/v1/moderations", json={"input": [{"type": "image_url", "image_url": {}}]}),
                           400, "invalid_request_error")


def test_completions_stream_and_not(main, reference):
    from so8t_export.serve.gate import GatePolicy

    _, expected = direct(reference, GatePolicy(), RAW, split_thinking=False, max_tokens=10, temperature=0.0)
    client = main.openai()
    completion = client.completions.create(model="so8t", prompt=RAW, max_tokens=10, temperature=0)
    assert completion.choices[0].text == expected.content and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 10 and completion.so8t["decision"] == "allow"
    chunks = list(client.completions.create(model="so8t", prompt=RAW, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].so8t["decision"] == "allow"


def test_stop_strings(plain, reference):
    """A stop string cuts the text before it and ends with finish_reason stop, stream or not."""
    from so8t_export.serve.gate import GatePolicy

    params = {"temperature": 3.0, "top_k": 0, "top_p": 1.0, "seed": 1}
    _, full = direct(reference, GatePolicy.off(), RAW, split_thinking=False, max_tokens=30, **params)
    stop = full.content[len(full.content) // 2:][:3]
    assert stop.strip() and stop in full.content
    expected = full.content[:full.content.index(stop)]
    client = plain.openai()
    extra = {"top_k": 0}
    done = client.completions.create(model="so8t", prompt=RAW, max_tokens=30, stop=[stop, "@@@"],
                                     extra_body=extra, **{k: v for k, v in params.items() if k != "top_k"})
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="so8t", prompt=RAW, max_tokens=30, stop=stop, stream=True,
                                            extra_body=extra,
                                            **{k: v for k, v in params.items() if k != "top_k"}))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def split_seed(reference):
    """A seed with which the tiny model, sampled hot, closes its reasoning (</think>) and answers."""
    from so8t_export.serve.gate import GatePolicy

    prompt = chat_text(reference, SPLIT_PROMPT)
    for seed in SPLIT_SEEDS:
        _, result = direct(reference, GatePolicy.off(), prompt, max_tokens=SPLIT_TOKENS, seed=seed,
                           **SPLIT_SAMPLING)
        if result.reasoning.strip() and result.content.strip():
            return seed, result
    pytest.fail(f"no seed in {SPLIT_SEEDS} makes the tiny model write </think> (sampling {SPLIT_SAMPLING})")


def test_thinking_split_openai_both_fields(plain, split_seed):
    seed, expected = split_seed
    client = plain.openai()
    request = chat_body(SPLIT_PROMPT, max_tokens=SPLIT_TOKENS, temperature=SPLIT_SAMPLING["temperature"],
                        top_p=SPLIT_SAMPLING["top_p"], seed=seed,
                        extra_body={"top_k": SPLIT_SAMPLING["top_k"]})
    message = client.chat.completions.create(**request).choices[0].message
    assert message.content == expected.content
    assert message.reasoning_content == expected.reasoning and message.reasoning == expected.reasoning
    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta for c in chunks[1:-1]]
    assert "".join(getattr(d, "reasoning_content", "") for d in deltas) == expected.reasoning
    assert "".join(getattr(d, "reasoning", "") for d in deltas) == expected.reasoning
    assert "".join(d.content or "" for d in deltas) == expected.content
    kinds = ["reasoning" if getattr(d, "reasoning_content", None) else "content" for d in deltas]
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # all the reasoning comes first


def test_thinking_split_ollama(plain, split_seed):
    seed, expected = split_seed
    client = plain.ollama(key=None)
    options = {**SPLIT_SAMPLING, "seed": seed, "num_predict": SPLIT_TOKENS}
    messages = [{"role": "user", "content": SPLIT_PROMPT}]
    thinking = client.chat(model="so8t", messages=messages, think=True, options=options)
    assert thinking.message.thinking == expected.reasoning and thinking.message.content == expected.content
    hidden = client.chat(model="so8t", messages=messages, think=False, options=options)
    assert hidden.message.thinking is None and hidden.message.content == expected.content
    parts = list(client.chat(model="so8t", messages=messages, think=True, options=options, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == expected.reasoning
    assert "".join(p.message.content for p in parts) == expected.content
    generated = client.generate(model="so8t", prompt=SPLIT_PROMPT, think=True, options=options)
    assert generated.thinking == expected.reasoning and generated.response == expected.content


def test_reasoning_field_reasoning_and_gate_errors(strict, reference):
    """reasoning_field="reasoning" (vLLM); gate_errors: a refused prompt is HTTP 400 content_filter, never
    retried, stream or not, on both APIs."""
    import ollama
    import openai

    from so8t_export.serve.gate import GatePolicy

    client = strict.openai(key=None)
    _, expected = direct(reference, GatePolicy(), chat_text(reference, SAFE), max_tokens=6, temperature=0.0)
    message = client.chat.completions.create(**chat_body(SAFE, max_tokens=6, **GREEDY)).choices[0].message
    assert message.reasoning == expected.reasoning and "reasoning_content" not in message.model_extra
    chunks = list(client.chat.completions.create(**chat_body(SAFE, max_tokens=6, stream=True, **GREEDY)))
    assert "".join(getattr(c.choices[0].delta, "reasoning", "") for c in chunks[1:-1]) == expected.reasoning

    before = metric(strict, "so8t_requests_total", route="/v1/chat/completions", status="400")
    retrying = openai.OpenAI(base_url=strict.url + "/v1", api_key="none", max_retries=2, timeout=30)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            result = retrying.chat.completions.create(**chat_body(UNSAFE, max_tokens=4, stream=stream))
            list(result) if stream else None
        err = info.value
        assert err.status_code == 400 and err.code == "content_filter" and err.param == "prompt"
        assert err.response.headers["x-should-retry"] == "false"
        assert err.body["so8t"]["decision"] == "refuse"
    assert metric(strict, "so8t_requests_total", route="/v1/chat/completions", status="400") == before + 2
    with pytest.raises(ollama.ResponseError) as info:
        strict.ollama(key=None).chat(model="so8t", messages=[{"role": "user", "content": UNSAFE}])
    assert info.value.status_code == 400 and "content_filter" in info.value.error


# ================================================================================================ output gate
def _crossing(reference, prompt: str, *, max_tokens: int = 40):
    """A first ungated run on the engine (every token scored): sampling (one of HOT, with a seed) and a token
    k >= 3 whose P(unsafe) exceeds every score before it by >= 0.05, with text before and after it; the
    threshold between them. Temperatures are tried in HOT_TEMPERATURES' order, each with CROSSING_SEEDS: the
    first that varies the tiny model's runs enough wins (at 3 and 5 every seeded chat run of the sharp
    checkpoint is the greedy one, whose P(unsafe) stays flat)."""
    from so8t_export.serve.engine import SamplingParams

    tokens = reference.tokenize(prompt)
    for temperature in HOT_TEMPERATURES:
        for seed in CROSSING_SEEDS:
            sampling = {**HOT, "temperature": temperature, "seed": seed}
            reference.prefill(tokens)
            steps = list(reference.generate(tokens, SamplingParams(max_tokens=max_tokens, **sampling),
                                            score_every=1))
            scores = [s.unsafe for s in steps]
            texts = [s.text for s in steps]
            if "</think>" in "".join(texts) or len(steps) < max_tokens:
                continue
            for k in range(3, len(steps) - 3):
                before = max(scores[:k])
                if scores[k] - before >= 0.05 and "".join(texts[:k]).strip() and "".join(texts[k:]).strip():
                    return sampling, k, (before + scores[k]) / 2, "".join(texts[:k]), "".join(texts)
    pytest.fail(f"no seeded run of the tiny model (temperatures {HOT_TEMPERATURES}, seeds {CROSSING_SEEDS}) "
                "has a clear P(unsafe) record to stop at")


HOT = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
# 10: varied but still shaped by the logits (~60% of the seeds have a record to stop at); 100: close to
# uniform, so varied whatever the weights.
HOT_TEMPERATURES = (10.0, 100.0)
CROSSING_SEEDS = range(60)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_output_gate_stops_the_stream_at_the_crossing_token(models, reference, route):
    """Nothing from the crossing token on is sent: the stream holds exactly the text before it, then
    finish_reason content_filter, the so8t object (decision stop at that token) and [DONE]."""
    from so8t_export.serve.gate import GatePolicy

    prompt = RAW if route == "completions" else chat_text(reference, SAFE)
    sampling, k, threshold, allowed, full = _crossing(reference, prompt)
    assert full.startswith(allowed) and len(full) > len(allowed)
    policy = GatePolicy(refuse_above=None, escalate_above=None, stop_above=threshold)
    request = {"max_tokens": 40, **sampling}
    with serving(models.gated, policy) as server, server.http() as http:
        if route == "completions":
            body, path = {"prompt": RAW, **request}, "/v1/completions"
        else:
            body, path = chat_body(SAFE, **request), "/v1/chat/completions"
        with http.stream("POST", path, json={**body, "stream": True}) as response:
            data = sse_data(response)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        if route == "completions":
            sent = "".join(c["choices"][0]["text"] for c in chunks)
        else:
            deltas = [c["choices"][0]["delta"] for c in chunks[1:]]
            assert not any(d.get("content") for d in deltas)
            sent = "".join(d.get("reasoning_content", "") for d in deltas)  # the gate covers the reasoning
        assert sent == allowed
        final = chunks[-1]
        assert final["choices"][0]["finish_reason"] == "content_filter"
        assert final["so8t"]["decision"] == "stop" and final["so8t"]["stage"] == "output"
        assert final["so8t"]["output"]["at_token"] == k and final["so8t"]["output"]["max_unsafe"] >= threshold
        # not streamed: the same text, finish_reason content_filter, and no retry
        response = http.post(path, json=body)
        assert response.status_code == 200 and response.headers["x-should-retry"] == "false"
        choice = response.json()["choices"][0]
        text = choice["text"] if route == "completions" else choice["message"]["reasoning_content"]
        assert text == allowed and choice["finish_reason"] == "content_filter"
        assert metric(server, "so8t_gate_decisions_total", decision="stop", stage="output") == 2


# ================================================================================================ Ollama API
def test_ollama_chat_and_generate(main, reference):
    from so8t_export.serve.gate import GatePolicy

    _, expected = direct(reference, GatePolicy(), chat_text(reference, SAFE), max_tokens=8, temperature=0.0)
    client = main.ollama()
    messages = [{"role": "user", "content": SAFE}]
    options = {"temperature": 0, "num_predict": 8}
    response = client.chat(model="so8t", messages=messages, think=True, options=options)
    assert response.done and response.done_reason == "length"
    assert response.message.thinking == expected.reasoning and response.message.content == ""
    assert response.prompt_eval_count == expected.prompt_tokens and response.eval_count == 8
    assert response.total_duration > 0 and response.eval_duration > 0 and response.load_duration == 0
    quiet = client.chat(model="so8t", messages=messages, think=False, options=options)
    assert quiet.message.thinking is None and quiet.message.content == ""
    parts = list(client.chat(model="so8t", messages=messages, think=True, options=options, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.thinking or "" for p in parts) == expected.reasoning
    assert parts[-1].done_reason == "length"
    generated = list(client.generate(model="so8t", prompt=SAFE, think=True, options=options, stream=True))
    assert "".join(g.thinking or "" for g in generated) == expected.reasoning
    assert "".join(g.response for g in generated) == "" and generated[-1].done
    no_think = client.generate(model="so8t", prompt=SAFE, options=options)
    assert no_think.thinking is None and no_think.response == "" and no_think.done_reason == "length"
    refused = client.chat(model="so8t", messages=[{"role": "user", "content": UNSAFE}], options=options)
    assert refused.message.content == "I can't help with that request."
    assert refused.done_reason == "content_filter"
    # the so8t object on the final NDJSON line (the ollama client does not keep unknown fields)
    with main.http() as http, http.stream("POST", "/api/chat", json={"model": "so8t", "messages": messages,
                                                                     "options": options}) as raw:
        assert raw.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(raw)
    assert lines[-1]["done"] is True and lines[-1]["so8t"]["decision"] == "allow"
    assert all(line["done"] is False and "so8t" not in line for line in lines[:-1])


def test_ollama_tags_show_version(main):
    client = main.ollama()
    listed = client.list()
    assert [m.model for m in listed.models] == [f"{main.state.model_name}:latest"]
    assert listed.models[0].details.format == "gguf" and listed.models[0].details.quantization_level == "F32"
    shown = client.show("so8t")
    assert shown.capabilities == ["completion", "thinking"]
    assert shown.modelinfo["qwen3.context_length"] == 4096 and shown.modelinfo["so8t.version"] == 2
    assert shown.details.family == "qwen3"
    with main.http() as http:
        assert http.get("/api/version").json()["version"]
        assert http.head("/api/tags").status_code == 200


# ================================================================================================ errors
def test_openai_errors(main):
    import openai

    client = main.openai()
    with main.http() as http:
        error = assert_llama_error(http.post("/v1/chat/completions", content=b'{"messages": [',
                                             headers={"content-type": "application/json"}),
                                   400, "invalid_request_error")
        assert "JSON" in error["message"]
        for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
                     chat_body(SAFE, temperature="hot"), chat_body(SAFE, stop=[1]), {"prompt": 3}):
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            assert "detail" not in assert_llama_error(http.post(path, json=body), 400, "invalid_request_error")
        # curl -d sends form-urlencoded: the JSON is read anyway, as llama-server and Ollama do
        response = http.post("/v1/chat/completions", content=json.dumps(chat_body(SAFE, max_tokens=1)),
                             headers={"content-type": "application/x-www-form-urlencoded"})
        assert response.status_code == 200
        # over the size limit: by Content-Length, and by the bytes of a chunked body
        big = json.dumps(chat_body("x" * MAIN_BODY_LIMIT)).encode()
        assert_llama_error(http.post("/v1/chat/completions", content=big), 413, "invalid_request_error")

        def chunks():
            for i in range(0, len(big), 4096):
                yield big[i:i + 4096]
        assert_llama_error(http.post("/v1/chat/completions", content=chunks()), 413, "invalid_request_error")
        # a prompt longer than the context, stream or not
        long = " ".join(["word"] * (MAIN_CTX + 50))
        for stream in (False, True):
            error = assert_llama_error(http.post("/v1/chat/completions", json=chat_body(long, stream=stream)),
                                       400, "exceed_context_size_error")
            assert error["n_ctx"] == MAIN_CTX and error["n_prompt_tokens"] > MAIN_CTX
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**chat_body(long, max_tokens=1))
    assert info.value.type == "exceed_context_size_error" and info.value.body["n_ctx"] == MAIN_CTX
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**chat_body(SAFE, n=2))


def test_ollama_errors(main):
    import ollama

    with main.http() as http:
        assert "JSON" in assert_ollama_error(http.post("/api/chat", content=b"{oops"), 400)
        assert_ollama_error(http.post("/api/generate", json={"model": "m", "prompt": 5}), 400)
        assert_ollama_error(http.post("/api/chat", json={"model": "m", "messages": [
            {"role": "user", "content": SAFE}], "format": "json"}), 400)
        big = json.dumps({"model": "m", "prompt": "x" * MAIN_BODY_LIMIT})
        assert_ollama_error(http.post("/api/generate", content=big), 413)
        response = http.post("/api/generate", json={"model": "m", "prompt": " ".join(["word"] * (MAIN_CTX + 50))})
        assert_ollama_error(response, 400)
        assert response.json()["n_ctx"] == MAIN_CTX
    with pytest.raises(ollama.ResponseError) as info:
        main.ollama(key="wrong").chat(model="m", messages=[{"role": "user", "content": SAFE}])
    assert info.value.status_code == 401


# ================================================================================================ concurrency
def _stream(server: Server, prompt: str, max_tokens: int, log: dict | None = None) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one streamed greedy /v1/completions request through the
    openai client (the count from the include_usage chunk). Completions stream the tiny model's text token by
    token (its chat answers at temperature 0 are white space only, which the thinking split holds until it
    knows whether a <think> follows)."""
    text, finish, tokens = [], None, None
    if log is not None:
        log["sent"] = time.perf_counter()
    for chunk in server.openai().completions.create(model="so8t", prompt=prompt, max_tokens=max_tokens,
                                                    stream=True, temperature=0,
                                                    stream_options={"include_usage": True}):
        if log is not None and "first" not in log:
            log["first"] = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    if log is not None:
        log["end"] = time.perf_counter()
    return "".join(text), finish, tokens


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def _long_stream(server: Server):
    """A streamed completion that would run for ~6 s; yields its line iterator once it has started."""
    with server.http() as http, http.stream("POST", "/v1/completions", json={
            "prompt": RAW, "max_tokens": 1500, "stream": True, "temperature": 0}) as response:
        lines = response.iter_lines()  # one iterator: a dropped one closes the response
        assert next(lines).startswith("data: ")
        yield lines


CONCURRENT_CANDIDATES = (RAW, "The quick brown fox", "Hello, world!", "import torch", "The dog sleeps in")


def test_concurrent_streams_equal_what_each_returns_alone(slow, reference):
    """Two greedy streams sent together equal what each returns alone: the same text, finish reason and
    token count, so neither was cut short (a cancelled run also finishes "stop") or fed the other's tokens.
    The prompts are the first two candidates that the engine itself, under the slow server's gate, answers
    with >= 8 tokens of text (the finish is whatever the tiny model and the gate make of it: max_tokens, end
    of turn or the output gate; a prompt refused at the input has nothing to stream), so that the two
    overlap; alone, the server returns exactly that run."""
    from so8t_export.serve.gate import GatePolicy
    from so8t_export.serve.openai_api import FINISH_REASONS

    least = 8
    expected = {}
    for prompt in CONCURRENT_CANDIDATES:
        _, result = direct(reference, GatePolicy(), prompt, split_thinking=False, max_tokens=40,
                           temperature=0.0)
        if result.completion_tokens >= least and result.content.strip():
            expected[prompt] = (result.content, FINISH_REASONS[result.finish_reason],
                                result.completion_tokens)
        if len(expected) == 2:
            break
    assert len(expected) == 2, f"fewer than two of {CONCURRENT_CANDIDATES} give >= {least} tokens of text"
    prompts = tuple(expected)
    alone = {prompt: _stream(slow, prompt, 40) for prompt in prompts}
    assert alone == expected
    results, logs = {}, {prompt: {} for prompt in prompts}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, _stream(slow, p, 40, logs[p])))
               for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == alone
    # the second was sent while the first streamed (it waited in the queue), and neither was cut short (above)
    first, second = sorted(logs.values(), key=lambda log: log["first"])
    assert second["sent"] < first["end"]


def test_queue_size_zero_runs_one_and_refuses_the_rest(models):
    """max_queue 0: an idle server runs the request; while it runs, another is answered 429."""
    import openai

    from so8t_export.serve.gate import GatePolicy

    with serving(models.gated, GatePolicy.off(), engine_class=_slow_engine_class(), n_ctx=2048,
                 max_queue=0) as server:
        assert _stream(server, RAW, 5)[1] == "length"
        with _long_stream(server), pytest.raises(openai.RateLimitError):
            server.openai().completions.create(model="so8t", prompt=RAW, max_tokens=2)
        _wait_for(lambda: metric(server, "so8t_requests_processing") == 0, what="the cancelled stream to end")
        assert _stream(server, RAW, 5)[1] == "length"


def test_queue_full_429_and_a_disconnect_frees_the_server(slow):
    """max_queue 1: one generation runs, one waits, the next is answered 429 with Retry-After (both APIs).
    The running stream's client disconnects: the waiting request starts within a second (the cancelled
    generation had ~6 s left)."""
    import openai

    waiting: dict = {}
    with _long_stream(slow) as lines:
        def queued():
            waiting["result"] = _stream(slow, "The quick brown fox", 10, waiting)
        thread = threading.Thread(target=queued)
        thread.start()
        _wait_for(lambda: metric(slow, "so8t_queue_depth") == 1, what="the second request to queue")
        with pytest.raises(openai.RateLimitError) as info:
            slow.openai().chat.completions.create(**chat_body(SAFE, max_tokens=2))
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert info.value.body["type"] == "unavailable_error"
        with slow.http() as http:
            assert_ollama_error(http.post("/api/chat", json={"model": "m", "messages": [
                {"role": "user", "content": SAFE}], "stream": False}), 429)
            assert_llama_error(http.post("/v1/moderations", json={"input": SAFE}), 429, "unavailable_error")
        for _ in range(20):
            next(lines)  # still streaming
        assert "first" not in waiting  # requests never interrupt each other
        closed = time.perf_counter()
    thread.join(10)
    assert waiting["first"] - closed < 1.0, waiting["first"] - closed
    assert waiting["result"][1] == "length"


def test_a_non_streaming_client_that_gives_up_frees_the_server(slow):
    import httpx

    cancelled = metric(slow, "so8t_cancelled_total")
    with pytest.raises(httpx.ReadTimeout), slow.http(timeout=0.3) as impatient:
        impatient.post("/v1/completions", json={"prompt": RAW, "max_tokens": 1500, "temperature": 0})
    gave_up = time.perf_counter()
    response = slow.openai().completions.create(model="so8t", prompt=RAW, max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert time.perf_counter() - gave_up < 1.0
    _wait_for(lambda: metric(slow, "so8t_cancelled_total") == cancelled + 1, what="the cancellation to count")


def test_a_client_that_leaves_the_queue_is_skipped(slow):
    import httpx

    with _long_stream(slow):
        with pytest.raises(httpx.ReadTimeout), slow.http(timeout=0.3) as impatient:
            impatient.post("/v1/completions", json={"prompt": RAW, "max_tokens": 1500, "temperature": 0})
        assert metric(slow, "so8t_queue_depth") == 1  # still in the queue, its client gone
    closed = time.perf_counter()
    response = slow.openai().completions.create(model="so8t", prompt=RAW, max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert time.perf_counter() - closed < 1.0  # the abandoned request was never run


# ================================================================================================ gate off, no heads
def test_gate_off_answers_everything(plain):
    response = plain.openai(key=None).chat.completions.create(**chat_body(UNSAFE, max_tokens=4, **GREEDY))
    assert response.choices[0].finish_reason == "length"
    assert response.so8t["decision"] == "allow" and response.so8t["safety"]["unsafe"] > 0.99  # scored, not gated
    assert metric(plain, "so8t_gate_decisions_total") == 0


def test_a_gguf_without_heads(stock, models):
    import openai

    from so8t_export.runtime import LlamaError
    from so8t_export.serve.app import create_app, run_server
    from so8t_export.serve.engine import Engine
    from so8t_export.serve.gate import GatePolicy

    client = stock.openai(key=None)
    response = client.chat.completions.create(**chat_body(SAFE, max_tokens=3, **GREEDY))
    assert response.choices[0].finish_reason == "length"
    assert response.so8t["safety"] is None and response.so8t["decision"] == "allow"
    with pytest.raises(openai.InternalServerError) as info:
        openai.OpenAI(base_url=stock.url + "/v1", api_key="x", max_retries=2).moderations.create(input=SAFE)
    assert info.value.status_code == 501 and info.value.body["type"] == "not_supported_error"
    assert metric(stock, "so8t_requests_total", route="/v1/moderations") == 1  # x-should-retry: false
    with pytest.raises(LlamaError, match=r"no so8t\.\* metadata.*--no-gate"):
        Engine(models.stock, n_ctx=64)
    with pytest.raises(LlamaError, match=r"no so8t\.\* metadata.*--no-gate"):
        create_app(Engine(models.stock, n_ctx=64, require_heads=False), policy=GatePolicy())
    with pytest.raises(LlamaError, match=r"no so8t\.\* metadata.*--no-gate"):
        run_server(models.stock, port=0, policy=GatePolicy())  # before it listens


# ================================================================================================ loading, run_server
def test_health_is_503_while_loading(models):
    from so8t_export.serve.app import BackgroundServer, create_app
    from so8t_export.serve.engine import Engine
    from so8t_export.serve.gate import GatePolicy

    app = create_app(None, policy=GatePolicy())
    with BackgroundServer(app) as server:
        import httpx

        with httpx.Client(base_url=server.url) as http:
            loading = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
            assert http.get("/health").status_code == 503 and http.get("/health").json() == loading
            assert http.post("/v1/chat/completions", json=chat_body(SAFE)).status_code == 503
            assert http.get("/api/tags").json() == {"error": "Loading model"}
            app.state.so8t.attach(Engine(models.gated, n_ctx=256))
            assert http.get("/health").json() == {"status": "ok"}
            response = http.post("/v1/chat/completions", json=chat_body(UNSAFE, max_tokens=2))
            assert response.json()["choices"][0]["finish_reason"] == "content_filter"


def test_run_server_in_a_process(models):
    """run_server as the CLI calls it: uvicorn starts, the model loads in the background, ready is announced,
    requests are served, and SIGTERM ends it cleanly."""
    import httpx

    code = ("import sys; from so8t_export.serve.app import run_server; from so8t_export.serve.gate import "
            "GatePolicy; run_server(sys.argv[1], host='127.0.0.1', port=0, n_ctx=256, policy=GatePolicy(), "
            "api_keys=['k'], max_queue=2)")
    process = subprocess.Popen([sys.executable, "-c", code, str(models.gated)], stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        ready = lambda: any(re.search(r"ready on http://127\.0\.0\.1:\d+", line) for line in lines)
        _wait_for(lambda: ready() or process.poll() is not None, timeout=60, what="the server to be ready")
        assert ready(), "".join(lines)
        url = next(re.search(r"ready on (http://127\.0\.0\.1:\d+)", line) for line in lines
                   if "ready on" in line).group(1)
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        response = httpx.post(url + "/v1/chat/completions", json=chat_body(UNSAFE, max_tokens=2),
                              headers={"X-Api-Key": "k"})
        assert response.json()["choices"][0]["finish_reason"] == "content_filter"
        # torch brings its own OpenMP runtime beside the one llama.cpp links; in the server its threads cost
        # ~11 % of decode speed on 2 cores, so the serving path must never load torch, not even to check the
        # rotations
        loaded = Path(f"/proc/{process.pid}/maps").read_text()
        torch_files = {line.split()[-1] for line in loaded.splitlines() if "/torch/" in line}
        assert not torch_files, sorted(torch_files)
        process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises the signal
        assert process.wait(15) == -signal.SIGTERM, "".join(lines)
        reader.join(5)
        assert "Traceback" not in "".join(lines) and "ERROR" not in "".join(lines), "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ================================================================================================ metrics
def test_metrics(main):
    client = main.openai()
    refused = metric(main, "so8t_gate_decisions_total", decision="refuse", stage="input")
    allowed = metric(main, "so8t_gate_decisions_total", decision="allow", stage="output")
    observed = metric(main, "so8t_safety_unsafe_probability_count", stage="input")
    tokens = metric(main, "so8t_completion_tokens_total")
    client.chat.completions.create(**chat_body(UNSAFE, max_tokens=3))
    client.chat.completions.create(**chat_body(SAFE, max_tokens=3, **GREEDY))
    assert metric(main, "so8t_gate_decisions_total", decision="refuse", stage="input") == refused + 1
    assert metric(main, "so8t_gate_decisions_total", decision="allow", stage="output") == allowed + 1
    assert metric(main, "so8t_safety_unsafe_probability_count", stage="input") == observed + 2
    assert metric(main, "so8t_safety_unsafe_probability_bucket", stage="input", le="1.0") >= 2
    assert metric(main, "so8t_authority_escalate_probability_count") >= 2
    assert metric(main, "so8t_completion_tokens_total") == tokens + 3
    assert metric(main, "so8t_requests_total", route="/v1/chat/completions", status="200") >= 2
    assert metric(main, "so8t_queue_depth") == 0 and metric(main, "so8t_queue_max") == 8
    with main.http() as http:
        assert http.get("/metrics").headers["content-type"].startswith("text/plain")
