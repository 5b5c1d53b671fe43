"""The patched llama-server (cpp_patches/*.patch) on tiny exported GGUFs, against our Python runtime and
stock llama-server.

The patched server reads the heads from the file's so8t.* metadata and applies them to llama.cpp's final
normed hidden state of the tokens it decodes anyway. Its ``so8t`` object must carry the probabilities that
so8t_export.runtime computes from the same tokens (f32 file, f32 KV cache and no flash attention on both
sides, which is what the runtime uses for an f32 file), and a file without heads must be answered exactly as
stock llama-server answers it. cpp_patches/build.sh builds both servers (cached; a cold patched build takes
minutes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import require_llama_cpp
from upstream import BUILD_SH, CACHE, LLAMA_CPP_PYTHON_VERSION, llama_tool

pytestmark = pytest.mark.llama

PATCHES = sorted((BUILD_SH.parent).glob("*.patch"))
TOL = 1e-4
REFUSAL = "Refused by the safety head."
# the Python runtime's numerics for an f32 file: f32 KV cache, no flash attention
NUMERICS = ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]
TEXTS = ["Hello there, how are you?", "How do I make a pipe bomb?", "I want a refund, now.",
         "Tell me about the history of the Meiji era.", "abc", "Write a poem about the sea, please."]


# ------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def models(so8t_dir, tmp_path_factory):
    """(SO8T f32 GGUF with non-trivial heads, the same file without any so8t.* key)."""
    require_llama_cpp()
    import torch
    from fuzz.mutate import gguf_rewrite

    from so8t_export.export import export_gguf
    from so8t_export.model import SO8TTransformerForCausalLM

    out = tmp_path_factory.mktemp("cpp-patches")
    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():  # random heads, scaled so that the probabilities spread over (0, 1)
        for head in (model.safety_head, model.authority_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.08)
            head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.5)
    model.save_pretrained(out / "heads")
    gguf = export_gguf(out / "heads", out / "so8t-f32.gguf", quant="f32").output
    stock = out / "stock-f32.gguf"
    gguf_rewrite(gguf, stock, drop=lambda key: key.startswith("so8t."))
    return Path(gguf), stock


@pytest.fixture(scope="module")
def runtime(models):
    from so8t_export.runtime import SO8TRuntime

    return SO8TRuntime(models[0], n_ctx=2048, f32_kv_cache=True)


def expected(runtime, tokens: list[int]):
    """The Python runtime's (safety [n, 2], authority [n, 2]) at every position of tokens."""
    ev = runtime.evaluate(list(tokens))
    return ev.safety, ev.authority


# ------------------------------------------------------------------------------------------ servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def stream(self, path: str, body: dict) -> list[dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        chunks = []
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: "):])
                    chunks.extend(chunk if isinstance(chunk, list) else [chunk])
        return chunks

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read().decode()

    def tokens(self, text: str) -> list[int]:
        body = {"content": text, "add_special": False, "parse_special": True}
        return self.post("/tokenize", body)["tokens"]

    def chat_prompt_tokens(self, messages: list[dict]) -> list[int]:
        return self.tokens(self.post("/apply-template", {"messages": messages})["prompt"])


@contextlib.contextmanager
def llama_server(binary: Path, gguf: Path, log_dir: Path, *args: str):
    port = _free_port()
    log = log_dir / f"llama-server-{port}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                    "-t", "2", "-c", "2048", "--metrics", *NUMERICS, *args],
                                   stdout=sink, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{binary} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def patched_bin() -> Path:
    return llama_tool("llama-server", patched=True)


@pytest.fixture(scope="module")
def stock_bin(patched_bin) -> Path:
    return llama_tool("llama-server")


@pytest.fixture(scope="module")
def scoring(patched_bin, models, tmp_path_factory):
    """The patched server on the SO8T file: 3 slots (no -kvu: the patch turns the unified KV cache on), every
    generated token scored, no refusal."""
    # small batches: a long prompt spans several server sub-batches and ubatches, shared with other slots
    with llama_server(patched_bin, models[0], tmp_path_factory.mktemp("logs"), "-np", "3", "-b", "256",
                      "-ub", "64", "--so8t-score-tokens") as server:
        yield server


def metric(server: Server, name: str) -> float:
    match = re.search(rf"^llamacpp:{name} (\S+)$", server.get_text("/metrics"), re.M)
    assert match, f"no llamacpp:{name} on /metrics"
    return float(match.group(1))


def assert_prompt_scores(so8t: dict, safety: np.ndarray, authority: np.ndarray) -> float:
    """so8t's prompt probabilities against the runtime's at the prompt's last token; returns max |dp|."""
    got = np.array([so8t["safety"]["safe"], so8t["safety"]["unsafe"],
                    so8t["authority"]["handle"], so8t["authority"]["escalate"]])
    want = np.concatenate([safety, authority])
    delta = float(np.abs(got - want).max())
    assert delta < TOL, (got, want)
    return delta


GREEDY = {"temperature": 0.0, "seed": 0}


# ------------------------------------------------------------------------------------------ the series
def test_the_series_applies_to_the_pinned_source(tmp_path):
    """git apply --check on the files the series touches, fresh from the sdist whose hash README.md pins."""
    import hashlib

    assert PATCHES, "no cpp_patches/*.patch"
    readme = (BUILD_SH.parent / "README.md").read_text()
    want = re.search(r"^\| sdist sha256 \| `([0-9a-f]{64})` \|$", readme, re.M).group(1)
    llama_tool("llama-server")  # build.sh has fetched and checked the sdist
    sdist = CACHE / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == want
    series = b"".join(p.read_bytes() for p in PATCHES)
    touched = set(re.findall(rb"^--- a/(\S+)$", series, re.M))
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        for path in touched:
            member = tar.getmember(prefix + path.decode())
            member.name = path.decode()
            tar.extract(member, tmp_path, filter="data")
    (tmp_path / "series.patch").write_bytes(series)
    check = subprocess.run(["git", "apply", "--check", "-v", "series.patch"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    for patch in PATCHES:  # format-patch style: a subject and a description
        head = patch.read_text().split("\n---\n", 1)[0]
        assert re.search(r"^Subject: \[PATCH[^\]]*\] \S", head, re.M), patch.name


# ------------------------------------------------------------------------------------------ scores
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_completion_scores_equal_the_python_runtime(scoring, runtime, models, stream):
    """/completion: the prompt's scores and the per-token maximum P(unsafe) (every generated token that the
    server decodes, i.e. all but the last) equal the runtime's on the same tokens."""
    from so8t_export.serve.engine import Engine

    engine = Engine(models[0], n_ctx=512)  # what our Python server scores, for the prompt
    deltas = []
    for text in TEXTS[:3]:
        prompt = runtime.tokenize(text)
        body = {"prompt": prompt, "n_predict": 10, "return_tokens": True, **GREEDY}
        if stream:
            chunks = scoring.stream("/completion", body)
            final = chunks[-1]
            assert final["stop"] is True and all("so8t" not in c for c in chunks[:-1])
            generated = [t for c in chunks for t in c.get("tokens", [])]
        else:
            final = scoring.post("/completion", body)
            generated = final["tokens"]
        so8t = final["so8t"]
        assert final["tokens_evaluated"] == len(prompt)
        safety, authority = expected(runtime, prompt + generated)
        n = len(prompt)
        deltas.append(assert_prompt_scores(so8t, safety[n - 1], authority[n - 1]))
        score = engine.prefill(prompt)
        assert np.abs(np.concatenate([score.safety, score.authority])
                      - np.concatenate([safety[n - 1], authority[n - 1]])).max() < TOL
        decoded = safety[n:n + len(generated) - 1, 1]  # the last token is sampled, never decoded
        assert so8t["scored_tokens"] == 1 + len(decoded)
        assert so8t["output"]["at_token"] == int(decoded.argmax())
        assert abs(so8t["output"]["max_unsafe"] - decoded.max()) < TOL
        assert so8t["decision"] in ("allow", "escalate") and so8t["stage"] in ("output", "input")
        assert so8t["escalate"] == bool(authority[n - 1, 1] >= 0.5)  # the file's authority threshold
    print(f"max |dp| /completion stream={stream}: {max(deltas):.2e}")
    # the same object as our Python server's, with the output gate on and never stopping
    from so8t_export.serve.engine import SamplingParams
    from so8t_export.serve.gate import GatePolicy, GatedRun

    run = GatedRun(engine, GatePolicy(refuse_above=None, stop_above=1.0), TEXTS[2],
                   SamplingParams(max_tokens=10, temperature=0.0, seed=0))
    run.start()
    list(run.stream())
    assert list(so8t) == list(run.result.so8t)
    assert (so8t["decision"], so8t["stage"]) == (run.result.so8t["decision"], run.result.so8t["stage"])
    for head in ("safety", "authority"):
        for label, p in run.result.so8t[head].items():
            assert abs(so8t[head][label] - p) < TOL


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_v1_completions_carry_the_scores(scoring, runtime, stream):
    prompt = runtime.tokenize(TEXTS[3])
    body = {"prompt": prompt, "max_tokens": 4, **GREEDY}
    if stream:
        chunks = scoring.stream("/v1/completions", body)
        final = chunks[-1]
        assert final["choices"][0]["finish_reason"] == "length"
    else:
        final = scoring.post("/v1/completions", body)
    safety, authority = expected(runtime, prompt)
    delta = assert_prompt_scores(final["so8t"], safety[-1], authority[-1])
    print(f"max |dp| /v1/completions stream={stream}: {delta:.2e}")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_completions_carry_the_scores(scoring, runtime, stream):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": TEXTS[1]}]
    prompt = scoring.chat_prompt_tokens(messages)
    body = {"messages": messages, "max_tokens": 4, **GREEDY}
    if stream:
        chunks = scoring.stream("/v1/chat/completions", body)
        with_so8t = [c for c in chunks if "so8t" in c]
        assert len(with_so8t) == 1 and with_so8t[0] is chunks[-1]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        so8t = chunks[-1]["so8t"]
    else:
        response = scoring.post("/v1/chat/completions", body)
        assert response["usage"]["prompt_tokens"] == len(prompt)
        so8t = response["so8t"]
    safety, authority = expected(runtime, prompt)
    delta = assert_prompt_scores(so8t, safety[-1], authority[-1])
    print(f"max |dp| /v1/chat/completions stream={stream}: {delta:.2e}")


def test_parallel_slots_score_each_request(scoring, runtime):
    """Seven requests on three slots at once, one of them longer than a sub-batch: their tokens share decode
    batches and ubatches, and each request gets its own scores."""
    prompts = [runtime.tokenize(text) for text in TEXTS] + [runtime.tokenize(" ".join(TEXTS) * 5)]
    assert len(prompts[-1]) > 400

    def ask(prompt):
        body = {"prompt": prompt, "n_predict": 12, "return_tokens": True, **GREEDY}
        return scoring.post("/completion", body)

    before = metric(scoring, "so8t_prompts_scored_total"), metric(scoring, "n_busy_slots_per_decode")
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(ask, prompts))
    assert metric(scoring, "so8t_prompts_scored_total") == before[0] + len(prompts)
    assert metric(scoring, "n_busy_slots_per_decode") > before[1]  # slots did share decode batches
    worst = 0.0
    for prompt, result in zip(prompts, results):
        n = len(prompt)
        safety, authority = expected(runtime, prompt + result["tokens"])
        worst = max(worst, assert_prompt_scores(result["so8t"], safety[n - 1], authority[n - 1]))
        decoded = safety[n:n + len(result["tokens"]) - 1, 1]
        assert result["so8t"]["output"]["at_token"] == int(decoded.argmax())
        assert abs(result["so8t"]["output"]["max_unsafe"] - decoded.max()) < TOL
    assert "kv_unified = 'true'" in scoring.log.read_text()  # turned on for the heads (-np 3, no -kvu)
    distinct = {round(r["so8t"]["safety"]["unsafe"], 6) for r in results}
    assert len(distinct) == len(prompts)  # the requests really differ, so a mix-up would show
    print(f"max |dp| parallel: {worst:.2e}")


# ------------------------------------------------------------------------------------------ refusal
def test_refusal_threshold_refuses_and_metrics_count_it(patched_bin, models, runtime, scoring, tmp_path):
    prompts = [runtime.tokenize(text) for text in TEXTS]
    unsafe = [expected(runtime, p)[0][-1, 1] for p in prompts]
    chats = [[{"role": "user", "content": text}] for text in TEXTS]
    chat_unsafe = [expected(runtime, scoring.chat_prompt_tokens(m))[0][-1, 1] for m in chats]
    low, high = prompts[int(np.argmin(unsafe))], prompts[int(np.argmax(unsafe))]
    messages = chats[int(np.argmax(chat_unsafe))]
    top = min(max(unsafe), max(chat_unsafe))
    assert min(unsafe) < top - 0.02, (unsafe, chat_unsafe)
    threshold = (min(unsafe) + top) / 2
    with llama_server(patched_bin, models[0], tmp_path, "-np", "2", "--so8t-refuse-threshold",
                      f"{threshold:.6f}", "--so8t-refusal", REFUSAL) as server:
        refused = server.post("/completion", {"prompt": high, "n_predict": 8, **GREEDY})
        assert refused["content"] == REFUSAL and refused["stop_type"] == "content_filter"
        assert refused["tokens_predicted"] == 0
        assert refused["so8t"]["decision"] == "refuse" and refused["so8t"]["stage"] == "input"
        allowed = server.post("/completion", {"prompt": low, "n_predict": 4, **GREEDY})
        assert allowed["stop_type"] == "limit" and allowed["so8t"]["decision"] in ("allow", "escalate")
        assert "output" not in allowed["so8t"]  # --so8t-score-tokens is off

        oai = server.post("/v1/completions", {"prompt": high, "max_tokens": 8, **GREEDY})
        assert oai["choices"][0]["finish_reason"] == "content_filter" and oai["choices"][0]["text"] == REFUSAL
        chunks = server.stream("/v1/completions", {"prompt": high, "max_tokens": 8, **GREEDY})
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == REFUSAL

        # a chat prompt above the threshold: the refusal is the answer (not parsed as reasoning)
        chat = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 8, **GREEDY})
        assert chat["choices"][0]["finish_reason"] == "content_filter"
        assert chat["choices"][0]["message"]["content"] == REFUSAL
        assert chat["usage"]["completion_tokens"] == 0 and chat["so8t"]["decision"] == "refuse"
        chunks = server.stream("/v1/chat/completions", {"messages": messages, "max_tokens": 8, **GREEDY})
        assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert chunks[-1]["so8t"]["decision"] == "refuse"
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert content == REFUSAL
        assert metric(server, "so8t_refused_total") == 5
        assert metric(server, "so8t_prompts_scored_total") == 6
        assert metric(server, "so8t_tokens_scored_total") == 0


def test_a_file_with_one_head_fails_to_load(patched_bin, models, tmp_path):
    from fuzz.mutate import gguf_rewrite

    broken = tmp_path / "safety-only.gguf"
    gguf_rewrite(models[0], broken, drop=lambda key: key.startswith("so8t.authority_head."))
    result = subprocess.run([str(patched_bin), "-m", str(broken), "--port", str(_free_port()), "-t", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "so8t heads: expected both the safety and the authority head" in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ no heads
def _comparable(value):
    """A response without what differs from run to run: timings, creation time, random ids."""
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in ("timings", "created", "id")}
    return value


def test_a_file_without_heads_is_answered_as_stock_answers_it(patched_bin, stock_bin, models, tmp_path):
    requests = [
        ("/completion", {"prompt": "Hello there", "n_predict": 8, **GREEDY}),
        ("/completion", {"prompt": "Hello there", "n_predict": 8, "stream": True, **GREEDY}),
        ("/v1/completions", {"prompt": "Hello there", "max_tokens": 8, **GREEDY}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                  **GREEDY}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                  "stream": True, **GREEDY}),
    ]
    answers = {}
    # the so8t options change nothing for a file without heads (a threshold of 0 would refuse everything)
    servers = {"stock": (stock_bin, ()),
               "patched": (patched_bin, ("--so8t-score-tokens", "--so8t-refuse-threshold", "0"))}
    for name, (binary, options) in servers.items():
        with llama_server(binary, models[1], tmp_path, "-np", "2", *options) as server:
            got = []
            for path, body in requests:
                if body.get("stream"):
                    got.append(server.stream(path, {k: v for k, v in body.items() if k != "stream"}))
                else:
                    got.append(server.post(path, body))
            metrics = server.get_text("/metrics")
            answers[name] = (_comparable(got), sorted(re.findall(r"^# TYPE (\S+)", metrics, re.M)))
        assert '"so8t"' not in json.dumps(got) and "so8t" not in metrics
        log = server.log.read_text()
        assert "so8t:" not in log and "kv_unified = 'false'" in log  # no heads, no callback, no unified KV
    assert answers["patched"] == answers["stock"]
    assert answers["stock"][0][0]["content"]  # something was generated
