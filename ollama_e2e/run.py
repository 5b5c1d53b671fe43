"""`make ollama-e2e`: the demo model through a real Ollama (v0.24.0, built by the Makefile), end to end.

What a user does, then what they would see:

1. `so8t-export demo` builds the tiny model; `so8t-export ollama` exports its SO8T checkpoint to an f16 GGUF
   and writes the Modelfile (`so8t-export modelfile --param ...` writes two variants with Modelfile-level
   sampling limits, used to show that PARAMETERs take effect).
2. A private `ollama serve` (server.py); `ollama create` from each Modelfile.
3. `ollama show`, `/api/chat` (think true, unset, false), `/api/generate`, `ollama run`, each checked against
   what Ollama's code does at v0.24.0 (server/routes.go ChatHandler and GenerateHandler, cmd/cmd.go).
4. The prompt Ollama renders (`_debug_render_only`) against transformers' apply_chat_template on the
   checkpoint's tokenizer, and Ollama's greedy tokens (its own Go engine, model/models/qwen3) against
   llama.cpp's (llama-cpp-python) on the same GGUF.

One line per check and a summary; the exit status is 1 when any check fails. Nothing is skipped: a missing
binary, package or file is a failure.

    python -m ollama_e2e.run --ollama ~/.cache/so8t-export/ollama-0.24.0-.../bin/ollama [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

OLLAMA_VERSION = "0.24.0"
MODEL = "so8t-demo"  # from `so8t-export ollama` (the user's route)
README_MODEL = "so8t-demo-readme"  # from the Modelfile `so8t-export demo` writes (the README's line)
GREEDY_MODEL = "so8t-demo-greedy"  # + PARAMETER temperature 0, seed: `ollama run` takes no sampling options
SHORT_MODEL = "so8t-demo-short"  # + PARAMETER temperature 0, seed, num_predict SHORT_PREDICT
STOP_MODEL = "so8t-demo-stop"  # + PARAMETER temperature 0, stop <a word of the greedy answer>
NUM_CTX = 1024  # below the demo model's 4096 and Ollama's default, so /api/ps shows where it came from
SHORT_PREDICT = 12
SEED = 7
PROMPT = "What is a good recipe for tomato soup?"  # demo.DEMO_SAFE_PROMPT: no training file holds it
# Sampling that makes both engines deterministic: temperature 0 is argmax in Ollama's sampler
# (sample/samplers.go) and in llama.cpp's greedy below.
GREEDY = {"temperature": 0, "seed": SEED}

# Plain texts (raw prompts, no chat template) for the token comparison; the second is multi-byte text, whose
# byte-level BPE pieces are compared as bytes.
RAW_PROMPTS = {
    "raw english": "The quick brown fox jumps over the lazy dog. ",
    "raw cjk": "東京は日本の首都です。北京是中国的首都。",
}
# A greedy divergence is accepted only at a near-tie: llama.cpp's top-2 logit margin below TIE_MARGIN (the
# engines' log-probabilities differ by ~5e-3 here), after at least MIN_MATCH equal tokens.
TIE_MARGIN = 0.05
MIN_MATCH = 16

# Conversations whose prompts are compared with transformers' rendering, and whose greedy continuations
# are compared token by token between the two engines. Thinking of an earlier turn travels as Ollama's
# `thinking` and as the HF template's `reasoning_content`.
CONVERSATIONS: dict[str, list[dict]] = {
    "user": [{"role": "user", "content": PROMPT}],
    "system+user": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Is it safe to mix bleach and ammonia?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?", "thinking": "The user greets me."},
        {"role": "user", "content": "Write a haiku about rain."},
    ],
}


# --------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------


class Fatal(Exception):
    """A failure after which the remaining checks cannot run (no server, no model)."""


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def record(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append((name, ok, detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        """fn returns the detail line on success and raises AssertionError (or anything) on failure."""
        try:
            return self.record(name, True, fn())
        except Fatal:
            raise
        except AssertionError as err:
            return self.record(name, False, str(err) or "assertion failed")
        except Exception as err:  # noqa: BLE001 - every failure is one line, the run goes on
            return self.record(name, False, f"{type(err).__name__}: {err}")

    @property
    def failed(self) -> list[str]:
        return [name for name, ok, _ in self.results if not ok]


def short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def sh(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args),
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"`{' '.join(args)}` exited with {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-600:]}"
        )
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------------
# Modelfile, as we wrote it (our files only: PARAMETER lines are `PARAMETER key value`, TEMPLATE is one
# triple-quoted block; so8t-export modelfile --check validates the grammar elsewhere)
# --------------------------------------------------------------------------------------------------------


def modelfile_parameters(text: str) -> list[tuple[str, str]]:
    params = []
    for line in text.splitlines():
        m = re.fullmatch(r"PARAMETER (\S+) (.+)", line)
        if m:
            value = m.group(2)
            if value.startswith('"""') and value.endswith('"""'):
                value = value[3:-3]
            params.append((m.group(1), value))
    return params


def modelfile_template(text: str) -> str:
    m = re.search(r'^TEMPLATE """(.*?)"""$', text, re.DOTALL | re.MULTILINE)
    assert m, "the Modelfile has no TEMPLATE block"
    return m.group(1)


def show_parameters(text: str) -> list[tuple[str, str]]:
    """`ollama show --parameters` / /api/show "parameters": `key   value` lines, strings in double quotes."""
    params = []
    for line in text.strip().splitlines():
        key, value = line.split(None, 1)
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        params.append((key, value))
    return params


def same_value(a: str, b: str) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    except ValueError:
        return a == b


def same_parameters(got: list[tuple[str, str]], want: list[tuple[str, str]]) -> bool:
    if sorted(k for k, _ in got) != sorted(k for k, _ in want):
        return False
    by_key: dict[str, list[str]] = {}
    for k, v in want:
        by_key.setdefault(k, []).append(v)
    rest = {k: list(v) for k, v in by_key.items()}
    for k, v in got:
        match = next((w for w in rest[k] if same_value(v, w)), None)
        if match is None:
            return False
        rest[k].remove(match)
    return True


# --------------------------------------------------------------------------------------------------------
# Ollama calls
# --------------------------------------------------------------------------------------------------------


def _joined_stream(parts, thinking_of, text_of, text_key: str) -> dict:
    """A streamed response's thinking and text joined, its chunk counts and its final (done) chunk."""
    thinking, text, chunks, final = [], [], 0, None
    for part in parts:
        chunks += 1
        thinking.append(thinking_of(part) or "")
        text.append(text_of(part) or "")
        if part.done:
            final = part
    assert final is not None, "the stream ended without a done chunk"
    return {
        "thinking": "".join(thinking),
        text_key: "".join(text),
        "chunks": chunks,
        "text_chunks": sum(1 for t, x in zip(thinking, text) if t or x),
        "final": final,
    }


def stream_chat(client, model: str, messages: list[dict], **kw) -> dict:
    """One streamed /api/chat: thinking and content joined, chunk counts, the final chunk."""
    return _joined_stream(client.chat(model=model, messages=messages, stream=True, **kw),
                          lambda part: part.message.thinking, lambda part: part.message.content, "content")


def stream_generate(client, model: str, prompt: str, **kw) -> dict:
    """One streamed /api/generate: thinking and response joined, chunk counts, the final chunk."""
    return _joined_stream(client.generate(model=model, prompt=prompt, stream=True, **kw),
                          lambda part: part.thinking, lambda part: part.response, "response")


def generate_logprobs(url: str, model: str, prompt: str, options: dict) -> dict:
    """A raw /api/generate (the prompt as is, no thinking parser) with logprobs, over HTTP: the official
    client's Logprob type (ollama 0.6.3) drops the `bytes` field, which holds a token's raw bytes
    (server/logprob.go) where its text may be a partial UTF-8 character."""
    import httpx

    body = {
        "model": model,
        "prompt": prompt,
        "raw": True,
        "think": False,
        "logprobs": True,
        "stream": True,
        "options": options,
    }
    response, logprobs, final = [], [], None
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=300) as r:
        assert r.status_code == 200, f"/api/generate: HTTP {r.status_code}"
        for line in r.iter_lines():
            if not line.strip():
                continue
            part = json.loads(line)
            assert "error" not in part, f"/api/generate: {part['error']}"
            response.append(part.get("response", ""))
            logprobs.extend(part.get("logprobs") or [])
            if part.get("done"):
                final = part
    # llm/server.go ends a stream with no done chunk after 31 identical tokens in a row
    assert final is not None, f"the stream ended without a done chunk after {short(''.join(response))}"
    return {"response": "".join(response), "logprobs": logprobs, "final": final}


def ollama_messages(conversation: list[dict]) -> list[dict]:
    return [dict(m) for m in conversation]


def hf_messages(conversation: list[dict]) -> list[dict]:
    out = []
    for m in conversation:
        m = dict(m)
        if "thinking" in m:
            m["reasoning_content"] = m.pop("thinking")
        out.append(m)
    return out


def render_only(url: str, model: str, messages: list[dict], **kw) -> str:
    """The prompt Ollama's ChatHandler would send to the engine (`_debug_render_only`, api/types.go)."""
    import httpx

    r = httpx.post(
        f"{url}/api/chat",
        json={"model": model, "messages": messages, "stream": False, "_debug_render_only": True, **kw},
        timeout=120,
    )
    assert r.status_code == 200, f"/api/chat _debug_render_only: HTTP {r.status_code} {r.text[:200]}"
    return r.json()["_debug_info"]["rendered_template"]


# --------------------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python) greedy decoding, the reference for the token comparison
# --------------------------------------------------------------------------------------------------------


class LlamaGreedy:
    def __init__(self, gguf: Path, n_ctx: int):
        import numpy as np

        from so8t_export.runtime import SO8TRuntime

        self.np = np
        # f16 KV cache, as Ollama's default (OLLAMA_KV_CACHE_TYPE unset).
        self.rt = SO8TRuntime(gguf, n_ctx=n_ctx, f32_kv_cache=False)
        llm = self.rt.llm
        lib = self.rt._llama_cpp
        vocab = lib.llama_model_get_vocab(llm._model.model)
        # llama.cpp's end-of-generation set (<|im_end|>, <|endoftext|>): Ollama stops on the same tokens
        # (the GGUF's eos ids plus the Modelfile's stop strings).
        self.eog = {t for t in range(llm.n_vocab()) if lib.llama_vocab_is_eog(vocab, t)}

    def tokenize(self, text: str) -> list[int]:
        return self.rt.tokenize(text)

    def piece(self, token: int) -> bytes:
        return self.rt.llm.detokenize([token], special=True)

    def greedy(self, prompt: str, n: int) -> list[dict]:
        """Up to n argmax tokens after prompt (stopping before an end-of-generation token), each with its
        bytes, log-probability and the margin to the runner-up logit."""
        np, llm = self.np, self.rt.llm
        tokens = self.tokenize(prompt)
        llm.reset()
        self.rt.decode(tokens)
        out = []
        for _ in range(n):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(logits)
            top, second = int(order[-1]), int(order[-2])
            if top in self.eog:
                break
            logsumexp = logits.max() + math.log(np.exp(logits - logits.max()).sum())
            out.append(
                {
                    "id": top,
                    "bytes": self.piece(top),
                    "logprob": float(logits[top] - logsumexp),
                    "margin": float(logits[top] - logits[second]),
                }
            )
            self.rt.decode([top])
        return out


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def build_artifacts(checks: Checks, work: Path, demo_dir: Path | None) -> dict:
    art: dict = {}

    def demo() -> str:
        t0 = time.monotonic()
        nonlocal demo_dir
        given = demo_dir is not None
        if not given:
            demo_dir = work / "demo"
            sh("so8t-export", "demo", "--output-dir", str(demo_dir))
        art["demo_gguf"], art["demo_modelfile"] = demo_dir / "tiny-so8t-f16.gguf", demo_dir / "Modelfile"
        art["checkpoint"] = demo_dir / "tiny-so8t"
        for p in (art["demo_gguf"], art["demo_modelfile"], art["checkpoint"] / "config.json"):
            assert p.is_file(), f"so8t-export demo did not write {p}"
        if given:
            return f"an earlier so8t-export demo: {demo_dir} (--demo)"
        took = time.monotonic() - t0
        return f"so8t-export demo -> {art['demo_gguf'].name}, Modelfile, tiny-so8t/ in {took:.1f} s"

    def export() -> str:
        out = work / "ollama"
        sh(
            "so8t-export",
            "ollama",
            str(art["checkpoint"]),
            "--quant",
            "f16",
            "--name",
            MODEL,
            "-o",
            str(out),
            "--num-ctx",
            str(NUM_CTX),
        )
        art["gguf"], art["modelfile"] = out / f"{MODEL}-f16.gguf", out / f"{MODEL}.Modelfile"
        assert art["gguf"].is_file() and art["modelfile"].is_file(), (
            f"so8t-export ollama wrote {os.listdir(out)}"
        )
        art["sha"] = sha256(art["gguf"])
        same = art["sha"] == sha256(art["demo_gguf"])
        assert same, "the GGUF of `so8t-export ollama` differs from the one `so8t-export demo` wrote"
        for model, extra in ((GREEDY_MODEL, []), (SHORT_MODEL, ["--param", f"num_predict={SHORT_PREDICT}"])):
            art[model] = out / f"{model}.Modelfile"
            sh(
                "so8t-export",
                "modelfile",
                str(art["gguf"]),
                "-o",
                str(art[model]),
                "--num-ctx",
                str(NUM_CTX),
                "--param",
                "temperature=0",
                "--param",
                f"seed={SEED}",
                *extra,
            )
        return (
            f"so8t-export ollama --quant f16 --num-ctx {NUM_CTX} -> {art['gguf'].name} (sha256 "
            f"{art['sha'][:12]}, byte-identical to the demo's), {art['modelfile'].name}; so8t-export "
            f"modelfile --param -> {GREEDY_MODEL}, {SHORT_MODEL}"
        )

    if not checks.run("demo", demo) or not checks.run("export", export):
        raise Fatal("no model to test")
    return art


def run_checks(checks: Checks, server, art: dict, n_tokens: int) -> dict:
    import ollama

    stats: dict = {}
    client = ollama.Client(host=server.url, timeout=300)
    modelfile_text = art["modelfile"].read_text()
    want_params = modelfile_parameters(modelfile_text)

    def version() -> str:
        got = client._client.get("/api/version").json()["version"]
        assert got == OLLAMA_VERSION, f"server version {got}, expected {OLLAMA_VERSION}"
        return f"ollama serve {got} on {server.host}, models in {server.env['OLLAMA_MODELS']}"

    def create() -> str:
        t0 = time.monotonic()
        server.cli("create", MODEL, "-f", str(art["modelfile"]))
        server.cli("create", README_MODEL, "-f", str(art["demo_modelfile"]))
        server.cli("create", GREEDY_MODEL, "-f", str(art[GREEDY_MODEL]))
        server.cli("create", SHORT_MODEL, "-f", str(art[SHORT_MODEL]))
        listed = server.cli("list").stdout.decode()
        for name in (MODEL, README_MODEL, GREEDY_MODEL, SHORT_MODEL):
            assert f"{name}:latest" in listed, f"`ollama list` does not list {name}: {listed!r}"
        blob = Path(server.env["OLLAMA_MODELS"]) / "blobs" / f"sha256-{art['sha']}"
        assert blob.is_file(), f"no blob sha256-{art['sha'][:12]} in OLLAMA_MODELS: create changed the GGUF"
        return (
            f"ollama create {MODEL}, {README_MODEL}, {GREEDY_MODEL}, {SHORT_MODEL} in "
            f"{time.monotonic() - t0:.1f} s; "
            f"the GGUF stored byte for byte (blob sha256-{art['sha'][:12]})"
        )

    if not checks.run("server", version) or not checks.run("create", create):
        raise Fatal("no model in Ollama")

    def show() -> str:
        out = server.cli("show", MODEL).stdout.decode()
        caps = re.search(r"Capabilities\n((?:\s{4}\S.*\n)+)", out)
        assert caps, f"no Capabilities section in `ollama show`: {out!r}"
        listed = caps.group(1).split()
        for cap in ("completion", "thinking", "tools"):
            assert cap in listed, f"`ollama show` capabilities {listed}: no {cap}"
        api = client.show(MODEL)
        assert {"completion", "thinking", "tools"} <= set(api.capabilities or []), (
            f"/api/show {api.capabilities}"
        )
        got = show_parameters(server.cli("show", MODEL, "--parameters").stdout.decode())
        assert same_parameters(got, want_params), f"ollama show --parameters {got} != Modelfile {want_params}"
        assert same_parameters(show_parameters(api.parameters or ""), want_params), (
            "/api/show parameters differ"
        )
        template = server.cli("show", MODEL, "--template").stdout.decode()
        assert template.rstrip("\n") == modelfile_template(modelfile_text).rstrip("\n"), (
            "ollama show --template differs from the Modelfile's TEMPLATE"
        )
        return (
            f"capabilities {' '.join(listed)}; {len(got)} parameters as in the Modelfile "
            f"({', '.join(f'{k} {v}' for k, v in got)}); TEMPLATE stored verbatim"
        )

    checks.run("show", show)

    chat_opts = {**GREEDY, "num_predict": 160}
    user = CONVERSATIONS["user"]
    results: dict = {}

    def chat_think() -> str:
        r = results["think"] = stream_chat(client, MODEL, user, think=True, options=chat_opts)
        assert r["text_chunks"] >= 3, f"only {r['text_chunks']} chunks with text: not streamed"
        assert r["thinking"].strip(), "message.thinking is empty"
        assert r["content"].strip(), f"no content after the thinking ({r['final'].done_reason})"
        for tag in ("<think>", "</think>"):
            assert tag not in r["thinking"] + r["content"], f"{tag} left in the split output"
        return (
            f"{r['chunks']} chunks; thinking {short(r['thinking'], 40)}, content {short(r['content'], 40)}, "
            f"done_reason {r['final'].done_reason}"
        )

    def chat_default() -> str:
        r = results["default"] = stream_chat(client, MODEL, user, options=chat_opts)
        t = results["think"]
        # routes.go ChatHandler: a model with the thinking capability and no `think` gets think = true.
        assert (r["thinking"], r["content"]) == (t["thinking"], t["content"]), (
            f"without think: thinking {short(r['thinking'])}, content {short(r['content'])}; with think: "
            f"{short(t['thinking'])}, {short(t['content'])}"
        )
        return (
            f"{r['chunks']} chunks; same thinking/content split as think: true (Ollama's default for a "
            "thinking model)"
        )

    def chat_no_think() -> str:
        r = stream_chat(client, MODEL, user, think=False, options=chat_opts)
        t = results["think"]
        # think: false creates no thinking parser; our TEMPLATE still opens <think> (Thinking-2507 always
        # thinks), so the reasoning and the </think> arrive in content.
        assert not r["thinking"], f"think: false returned thinking {short(r['thinking'])}"
        assert "</think>" in r["content"], f"no </think> in content {short(r['content'])}"
        before, after = r["content"].split("</think>", 1)
        assert (before.strip(), after.strip()) == (t["thinking"].strip(), t["content"].strip()), (
            "think: false content is not the think: true thinking + </think> + content"
        )
        return f"{r['chunks']} chunks; no thinking field, content = thinking + '</think>' + answer"

    def generate() -> str:
        r = results["generate"] = stream_generate(client, MODEL, PROMPT, options=chat_opts)
        t = results["think"]
        assert r["text_chunks"] >= 3, f"only {r['text_chunks']} chunks with text: not streamed"
        assert (r["thinking"], r["response"]) == (t["thinking"], t["content"]), (
            f"/api/generate thinking {short(r['thinking'])} response {short(r['response'])} differ from "
            "/api/chat's"
        )
        return f"{r['chunks']} chunks; thinking and response equal /api/chat's for the same prompt"

    checks.run("chat think=true", chat_think)
    if "think" in results:
        checks.run("chat think unset", chat_default)
        checks.run("chat think=false", chat_no_think)
        checks.run("generate", generate)

    def ps() -> str:
        loaded = {m.model: m for m in client.ps().models}
        entry = loaded.get(f"{MODEL}:latest")
        assert entry is not None, f"/api/ps lists {list(loaded)}"
        got = entry.model_dump().get("context_length")
        assert got == NUM_CTX, f"/api/ps context_length {got}, Modelfile num_ctx {NUM_CTX}"
        return f"/api/ps: {MODEL} loaded with context_length {got} (Modelfile num_ctx; model trained on 4096)"

    checks.run("num_ctx", ps)

    # ------------------------------------------------------------------ prompt rendering vs transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(art["checkpoint"])
    hf_prompts = {
        name: tokenizer.apply_chat_template(hf_messages(conv), tokenize=False, add_generation_prompt=True)
        for name, conv in CONVERSATIONS.items()
    }
    stats["hf_prompts"] = hf_prompts

    def render() -> str:
        mismatched = []
        for name, conv in CONVERSATIONS.items():
            for think in (None, True, False):
                kw = {} if think is None else {"think": think}
                got = render_only(server.url, MODEL, ollama_messages(conv), **kw)
                if got != hf_prompts[name]:
                    mismatched.append(f"{name} think={think}: ollama {got!r} hf {hf_prompts[name]!r}")
        assert not mismatched, "; ".join(mismatched)[:1500]
        return (
            f"{len(CONVERSATIONS)} conversations x think unset/true/false: Ollama's rendered prompt == "
            f"transformers apply_chat_template, byte for byte"
        )

    checks.run("render", render)

    # ------------------------------------------------------------------ greedy tokens: Go engine vs llama.cpp
    llama = LlamaGreedy(art["gguf"], NUM_CTX)
    greedy_text: dict[str, str] = {}  # Ollama's greedy continuation of each prompt, request temperature 0

    def tokens() -> str:
        matched, details, problems = 0, [], []
        prompts = {**hf_prompts, **RAW_PROMPTS}
        for name, prompt in prompts.items():
            ref = llama.greedy(prompt, n_tokens)
            r = generate_logprobs(server.url, MODEL, prompt, {**GREEDY, "num_predict": n_tokens})
            got = [bytes(lp["bytes"]) if "bytes" in lp else lp["token"].encode() for lp in r["logprobs"]]
            greedy_text[name] = r["response"]
            n_prompt = len(llama.tokenize(prompt))
            if r["final"].get("prompt_eval_count") != n_prompt:
                problems.append(
                    f"{name}: {r['final'].get('prompt_eval_count')} prompt tokens in Ollama, "
                    f"{n_prompt} in llama.cpp"
                )
            if r["response"].encode() != b"".join(got):
                problems.append(f"{name}: the logprobs' tokens do not spell the response")
            same = 0
            for a, b in zip(got, (t["bytes"] for t in ref)):
                if a != b:
                    break
                same += 1
            matched += same
            diffs = [abs(lp["logprob"] - t["logprob"]) for lp, t in zip(r["logprobs"][:same], ref)]
            stats.setdefault("logprob_diffs", []).extend(diffs)
            if same == len(got) == len(ref):
                end = "end of turn" if len(ref) < n_tokens else "limit"
                details.append(f"{name} {same}/{same} ({end})")
                continue
            # Two engines (Go/ggml and llama.cpp, f16 weights and KV cache) may order a near-tie differently;
            # anything else is a real difference.
            margin = ref[same]["margin"] if same < len(ref) else math.inf
            details.append(f"{name} {same} then a tie (margin {margin:.2g})")
            if margin >= TIE_MARGIN or same < MIN_MATCH:
                problems.append(
                    f"{name}: token {same} differs: Ollama {got[same : same + 1]}, llama.cpp "
                    f"{[t['bytes'] for t in ref[same : same + 1]]} (llama.cpp's top-2 logit margin "
                    f"{margin:.3g}; {len(got)} and {len(ref)} tokens generated)"
                )
        stats["matched_tokens"] = matched
        assert not problems, "; ".join(problems)
        worst = max(stats.get("logprob_diffs") or [0.0])
        return (
            f"N = {matched} greedy tokens identical: {', '.join(details)}; same prompt token counts; "
            f"max |d logprob| {worst:.1e}"
        )

    checks.run("tokens vs llama.cpp", tokens)

    # ------------------------------------------------------------------ Modelfile parameters in effect
    def reference(name: str) -> str:
        if name not in greedy_text:
            greedy_text[name] = generate_logprobs(
                server.url, MODEL, hf_prompts[name], {**GREEDY, "num_predict": n_tokens}
            )["response"]
        return greedy_text[name]

    def greedy_params() -> str:
        # The short variant's Modelfile says temperature 0, seed, num_predict; the request sets nothing, and
        # must get the first tokens of what temperature 0 in the request gave.
        r = generate_logprobs(server.url, SHORT_MODEL, hf_prompts["user"], {})
        want = reference("user")
        assert r["final"].get("eval_count") == SHORT_PREDICT, (
            f"eval_count {r['final'].get('eval_count')}, Modelfile num_predict {SHORT_PREDICT}"
        )
        assert r["final"].get("done_reason") == "length", f"done_reason {r['final'].get('done_reason')}"
        assert want.startswith(r["response"]) and len(r["logprobs"]) == SHORT_PREDICT, (
            f"response {short(r['response'])} is not the start of the greedy text {short(want)}"
        )
        return (
            f"{SHORT_MODEL} (no request options): {SHORT_PREDICT} tokens, done_reason length, the greedy "
            f"text's start: temperature 0 and num_predict from the Modelfile"
        )

    def stop_param() -> str:
        text = reference("user")
        words = re.findall(r"[A-Za-z]{3,}", text)
        assert len(words) >= 3, f"the greedy continuation {short(text)} has too few words for a stop"
        word = words[2]
        expected = text[: text.index(word)]
        path = art["modelfile"].parent / "stop.Modelfile"
        sh(
            "so8t-export",
            "modelfile",
            str(art["gguf"]),
            "-o",
            str(path),
            "--num-ctx",
            str(NUM_CTX),
            "--param",
            "temperature=0",
            "--param",
            "stop=<|im_start|>",
            "--param",
            "stop=<|im_end|>",
            "--param",
            f"stop={word}",
        )
        server.cli("create", STOP_MODEL, "-f", str(path))
        shown = dict(show_parameters(server.cli("show", STOP_MODEL, "--parameters").stdout.decode()))
        assert "stop" in shown, f"ollama show --parameters lists no stop: {shown}"
        r = generate_logprobs(server.url, STOP_MODEL, hf_prompts["user"], {})
        assert r["final"].get("done_reason") == "stop", f"done_reason {r['final'].get('done_reason')}"
        assert r["response"] == expected, f"response {short(r['response'])}, expected {short(expected)}"
        return (
            f"{STOP_MODEL}: PARAMETER stop {word!r} ends the greedy text just before it ({short(expected)})"
        )

    def temperature() -> str:
        # so8t-demo's Modelfile keeps temperature 0.6: sampled runs with different seeds differ, and the same
        # seed repeats (Ollama seeds its sampler per request).
        outs = [
            generate_logprobs(server.url, MODEL, hf_prompts["user"], {"seed": seed, "num_predict": 48})[
                "response"
            ]
            for seed in (1, 2, 3, 1)
        ]
        assert outs[0] == outs[3], "the same seed gave two different samples"
        assert len(set(outs[:3])) > 1, (
            f"three seeds at the Modelfile's temperature gave one text {short(outs[0])}"
        )
        distinct = len(set(outs[:3]))
        return (
            f"the Modelfile's temperature 0.6 samples: {distinct} distinct texts for 3 seeds, seed 1 repeats"
        )

    checks.run("params num_predict+temperature 0", greedy_params)
    checks.run("params stop", stop_param)
    checks.run("params temperature 0.6", temperature)

    # ------------------------------------------------------------------ ollama run, non-interactively
    def run_greedy() -> str:
        # cmd/cmd.go generate(): think is on for a thinking model, and with stdout not a terminal the
        # thinking is framed by the plain "Thinking...\n" and "...done thinking.\n\n"; two newlines end the
        # answer. The greedy variant makes the run repeatable, so it must print /api/generate's result.
        r = stream_generate(client, GREEDY_MODEL, PROMPT)
        assert r["thinking"] and r["response"], (
            f"/api/generate: thinking {short(r['thinking'])} response {short(r['response'])}"
        )
        newline = "" if r["thinking"].endswith("\n") else "\n"
        want = f"Thinking...\n{r['thinking']}{newline}...done thinking.\n\n{r['response']}\n\n"
        out = server.cli("run", GREEDY_MODEL, PROMPT).stdout.decode()
        assert out == want, f"ollama run printed {out!r}, expected {want!r}"
        hidden = server.cli("run", GREEDY_MODEL, "--hidethinking", PROMPT).stdout.decode()
        assert hidden == f"{r['response']}\n\n", f"--hidethinking printed {hidden!r}"
        return (
            f"ollama run {GREEDY_MODEL} \"...\" (stdin and stdout not a terminal) printed 'Thinking...', "
            f"/api/generate's thinking, '...done thinking.' and its answer {short(r['response'], 30)}; "
            f"--hidethinking the answer alone"
        )

    def run_sampled() -> str:
        result = server.cli("run", MODEL, PROMPT)
        out = result.stdout.decode()
        assert out.startswith("Thinking...\n"), f"ollama run printed {short(out, 200)}"
        return f'ollama run {MODEL} "..." (temperature 0.6): exit 0, {len(out)} characters, Thinking... first'

    checks.run("run", run_greedy)
    checks.run("run sampled", run_sampled)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ollama", required=True, type=Path, help="the ollama binary to test")
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens compared per prompt")
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    parser.add_argument(
        "--demo",
        type=Path,
        help="an earlier `so8t-export demo` folder to use instead of "
        "running the demo (for working on this script)",
    )
    args = parser.parse_args(argv)

    from so8t_export.logs import configure_logging, quiet_llama_cpp

    configure_logging(False)
    quiet_llama_cpp(False)

    # make or CI stopping us with SIGTERM still runs the finally below, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    user_ollama = Path.home() / ".ollama"
    user_ollama_before = user_ollama.exists()
    t0 = time.monotonic()
    checks = Checks()
    if args.keep:
        args.keep.mkdir(parents=True)
        work = args.keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="so8t-ollama-e2e-"))
    stats: dict = {}
    server = None
    try:
        binary = args.ollama.expanduser()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise Fatal(f"no ollama binary at {binary} (make ollama-e2e builds it)")
        art = build_artifacts(checks, work, args.demo)
        from ollama_e2e.server import OllamaServer

        server = OllamaServer(binary, work / "ollama-server")
        with server:
            stats = run_checks(checks, server, art, args.tokens)
    except Fatal as err:
        checks.record("fatal", False, str(err) + (f"; server log: {server.log_tail()}" if server else ""))
    except Exception as err:  # noqa: BLE001
        checks.record("error", False, f"{type(err).__name__}: {err}")
    finally:
        if server is not None:
            checks.record(
                "cleanup",
                not server.group_alive(),
                f"ollama serve (process group {server.process.pid if server.process else '-'}) "
                f"{'still running' if server.group_alive() else 'and its runners stopped'}",
            )
            untouched = user_ollama.exists() == user_ollama_before
            checks.record(
                "private",
                untouched,
                f"{user_ollama} "
                + (
                    "untouched (HOME, OLLAMA_MODELS and TMPDIR were the run's own)"
                    if untouched
                    else "was created"
                ),
            )
            if checks.failed and server.log_path.exists():
                print(f"server log tail:\n{server.log_tail(3000)}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    n_ok = sum(ok for _, ok, _ in checks.results)
    tokens = f", N = {stats['matched_tokens']} greedy tokens equal" if "matched_tokens" in stats else ""
    print(
        f"ollama-e2e: {n_ok}/{len(checks.results)} checks passed{tokens}, Ollama {OLLAMA_VERSION}, "
        f"{time.monotonic() - t0:.0f} s" + (f"; FAILED: {', '.join(checks.failed)}" if checks.failed else "")
    )
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
