"""Serving benchmark: the gated runtime against plain llama-cpp-python on the full-size q8_0 export.

    python bench/serve.py                                   # bench/.cache checkpoint and GGUF (made if missing)
    python bench/serve.py --checkpoint /tmp/bench-cache/qwen3-4b-fp8 --gguf /tmp/bench-cache/so8t-q8_0.gguf

Three paths on the same GGUF, the same prompt tokens and greedy decoding, measured in one run, interleaved
(the order rotates each repeat), --repeats runs each after one short warm-up; the median decides:

- anchor: ``llama_cpp.Llama`` without embeddings (what llama-cpp-python does for anyone), its own prefill and
  ``generate``: time to first token = prefill + first sample; decode = tokens 2..N.
- engine: ``serve.engine.Engine`` + ``serve.gate.GatedRun`` in this process, every stage of the gate on and
  every generated token scored (thresholds at 1.0, so nothing is refused or stopped on random weights).
- server: ``so8t serve`` in a subprocess on 127.0.0.1 with the same policy, /v1/chat/completions streamed over
  HTTP (httpx); time to first token is from sending the request to the first delta.
- llama-server: llama.cpp's own server, stock, built by cpp_patches/build.sh from the same llama.cpp, the same
  request (with ``cache_prompt: false``, so each run prefills), ``-np 1`` and otherwise its defaults.
- llama-server+so8t: the same server with cpp_patches/'s series and ``--so8t-score-tokens``, so that it scores
  the prompt and every generated token as the gated paths do.

Decode tokens/s of a path is (N - 1) / (time of its last token - time of its first), so that the prefill is
not in it. The gate's share of a token is measured inside the engine's runs: the time spent reading the
hidden state (``llama_get_embeddings_ith``) and applying the two heads (numpy matvecs), per scored token,
against the anchor's time per decoded token. Targets: server decode >= 0.95 of the anchor's, gate <= 1% of a
token, server time to first token <= 1.05 of the anchor's; the patched llama-server's decode >= 0.99 of the
stock one's, and ours >= 0.9 of stock llama-server's (issue 15).

The checkpoint is bench/make_checkpoint.py's random-weight Qwen3-4B-Thinking-2507-FP8 layout; the GGUF is
exported from it (q8_0) when missing. On 2 cores a run takes ~5 minutes (the 4B q8_0 prefills at ~20 tokens/s
and decodes at ~6).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

# a long, ordinary request: repeated to reach the wanted prompt length
PARAGRAPH = ("Here is a description of our warehouse inventory system. Every item has a code, a shelf, a count "
             "and a date of the last check; items below their minimum count are reordered each Monday, and "
             "the report lists what arrived, what left and what is missing. ")
QUESTION = "Summarise the rules above in three short points."


def log(*args) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------- inputs
def ensure_gguf(checkpoint: Path, gguf_path: Path) -> str:
    if gguf_path.is_file():
        return f"using {gguf_path} ({gguf_path.stat().st_size / 1e9:.2f} GB)"
    from so8t_export.export import export_gguf

    if not (checkpoint / "config.json").is_file():
        import make_checkpoint

        log(f"no checkpoint at {checkpoint}: writing it with bench/make_checkpoint.py (~7 min)")
        checkpoint, _ = make_checkpoint.make(checkpoint.parent)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = export_gguf(checkpoint, gguf_path, quant="q8_0")
    return f"exported {report.output} from {checkpoint} in {time.perf_counter() - start:.1f} s"


def visible_padding_copy(src: Path) -> tuple[Path, str]:
    """A copy of src whose padding ids ([PAD{i}], llama.cpp type UNUSED) are NORMAL tokens, so that their
    text is printed. The random weights pick padding ids almost always (151191 of the 151936 rows), and
    llama.cpp prints nothing for UNUSED tokens: a stream would carry no delta to time. Tensors and every
    other key stay byte for byte; only the type of those ids changes (cached beside src)."""
    import shutil

    import gguf

    dst = src.with_name(src.stem + "-visible-padding.gguf")
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst, f"using {dst}"
    start = time.perf_counter()
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        shutil.copyfile(src, tmp)
        reader = gguf.GGUFReader(tmp, "r+")
        tokens, types = reader.get_field("tokenizer.ggml.tokens"), reader.get_field("tokenizer.ggml.token_type")
        changed = 0
        for t, y in zip(tokens.data, types.data):
            if types.parts[y][0] == gguf.TokenType.UNUSED and bytes(tokens.parts[t][:4]) == b"[PAD":
                types.parts[y][0] = gguf.TokenType.NORMAL
                changed += 1
        reader.data.flush()
        del reader
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst, f"wrote {dst}: {changed} padding ids made printable in {time.perf_counter() - start:.1f} s"


def build_messages(engine, target_tokens: int) -> tuple[list[dict], list[int]]:
    """A user message whose rendered prompt has about target_tokens tokens."""
    def render(n: int) -> list[int]:
        text = PARAGRAPH * n + QUESTION
        return engine.tokenize(engine.render([{"role": "user", "content": text}]))

    per = len(render(2)) - len(render(1))
    n = max(1, round((target_tokens - len(render(1))) / per) + 1)
    messages = [{"role": "user", "content": PARAGRAPH * n + QUESTION}]
    return messages, render(n)


# ----------------------------------------------------------------------------------------------- the paths
def run_anchor(llm, tokens: list[int], n_decode: int) -> dict:
    llm.reset()  # no prefix reuse: llama-cpp-python would skip the prefill of a cached prompt
    out, times = [], []
    start = time.perf_counter()
    stream = llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
    for token in stream:
        times.append(time.perf_counter())
        out.append(token)
        if len(out) >= n_decode or llm.token_eos() == token:
            break
    stream.close()
    return {"ttft": times[0] - start, "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
            "tokens": len(out), "deltas": len(times), "text": llm.detokenize(out, special=True).decode("utf-8", "replace")}


class GateTimer:
    """Times the engine's hidden-state read and head matvecs (instance attributes over its methods)."""

    def __init__(self, engine):
        self.engine = engine
        self.hidden_s = self.heads_s = 0.0
        self.calls = 0
        read, heads = engine._last_hidden, engine.heads

        def timed_read():
            start = time.perf_counter()
            try:
                return read()
            finally:
                self.hidden_s += time.perf_counter() - start

        def timed_heads(hidden):
            start = time.perf_counter()
            try:
                return heads(hidden)
            finally:
                self.heads_s += time.perf_counter() - start
                self.calls += 1

        engine._last_hidden, engine.heads = timed_read, timed_heads

    def reset(self) -> None:
        self.hidden_s = self.heads_s = 0.0
        self.calls = 0


def run_engine(engine, policy, messages: list[dict], n_decode: int, timer: GateTimer) -> dict:
    from so8t_export.serve.engine import SamplingParams
    from so8t_export.serve.gate import GatedRun

    params = SamplingParams(max_tokens=n_decode, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                            repeat_penalty=1.0, seed=0)
    timer.reset()
    times, text = [], []
    start = time.perf_counter()
    run = GatedRun(engine, policy, engine.render(messages), params, split_thinking=True)
    run.start()
    for delta in run.stream():
        times.append(time.perf_counter())
        text.append(delta.text)
    result = run.result
    n = result.completion_tokens
    return {"ttft": times[0] - start, "decode_tps": (n - 1) / (times[-1] - times[0]), "tokens": n,
            "deltas": len(times), "text": "".join(text), "prompt_tokens": result.prompt_tokens, "prefill_s": result.prompt_seconds,
            "scored": result.so8t.get("scored_tokens"), "decision": result.so8t.get("decision"),
            "gate_hidden_s": timer.hidden_s, "gate_heads_s": timer.heads_s, "gate_calls": timer.calls}


def _own_cpu() -> float:
    """CPU seconds of this process (all its threads): the HTTP client's share while the server generates."""
    return time.process_time()


def run_http(client, url: str, messages: list[dict], n_decode: int, **extra) -> dict:
    body = {"model": "so8t", "messages": messages, "max_tokens": n_decode, "temperature": 0.0, "top_k": 1,
            "top_p": 1.0, "min_p": 0.0, "seed": 0, "stream": True, "stream_options": {"include_usage": True},
            **extra}
    times, text, usage, so8t, timings = [], [], None, None, None
    cpu = _own_cpu()
    start = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"server answered {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server error mid-stream: {chunk['error']}")
            usage = chunk.get("usage") or usage
            so8t = chunk.get("so8t") or so8t
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                if piece:
                    times.append(time.perf_counter())
                    text.append(piece)
    n = usage["completion_tokens"] if usage else len(times)
    return {"ttft": times[0] - start, "decode_tps": (n - 1) / (times[-1] - times[0]), "tokens": n,
            "deltas": len(times), "text": "".join(text), "prompt_tokens": usage and usage.get("prompt_tokens"),
            "decision": (so8t or {}).get("decision"),
            "server_tps": (timings or {}).get("predicted_per_second"), "client_cpu_s": _own_cpu() - cpu}


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server we started (by its pid), killing it if it has not gone after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LlamaServer:
    """llama.cpp's llama-server (stock or patched) in a subprocess on 127.0.0.1; ready when /health says so."""

    def __init__(self, binary: Path, gguf_path: Path, *, n_ctx: int, n_threads: int, extra: list[str]):
        import socket

        with socket.socket() as probe:  # a free port; the server binds it a moment later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        argv = [str(binary), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx),
                "-t", str(n_threads), "-tb", str(n_threads), "-np", "1", "--no-webui", *extra]
        self.log = open(os.devnull, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(line.rstrip() for line in self.proc.stderr),
                         daemon=True).start()

    def wait(self, client, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if client.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self.url
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.proc.args[0]} did not become ready:\n" + "\n".join(self.lines[-20:]))

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class Server:
    """`so8t serve` in a subprocess on 127.0.0.1, port chosen by the OS (read from its ready line)."""

    def __init__(self, gguf_path: Path, *, n_ctx: int, n_threads: int):
        argv = [sys.executable, "-c", "from so8t_export.cli import runtime_main; runtime_main()", "serve",
                str(gguf_path), "--host", "127.0.0.1", "--port", "0", "--ctx-size", str(n_ctx), "--threads",
                str(n_threads), "--refuse-above", "1", "--escalate-above", "1", "--stop-above", "1",
                "--score-every", "1"]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("SO8T_API_KEY", None)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            match = re.search(r"ready on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                self.ready.set()
        self.ready.set()

    def wait(self, timeout: float = 300) -> str:
        self.ready.wait(timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError("so8t serve did not become ready:\n" + "\n".join(self.lines[-20:]))
        return self.url

    def stop(self) -> None:
        stop_process(self.proc)


# ----------------------------------------------------------------------------------------------- report
def _same(a: str, b: str) -> bool:
    """The same generated text, up to the thinking split (tags and the whitespace it strips)."""
    def norm(s: str) -> str:
        return re.sub(r"\s+", "", s.replace("<think>", "").replace("</think>", ""))
    return norm(a) == norm(b)


def table(runs: dict[str, list[dict]], micro_us: float, meta: dict) -> tuple[list[str], dict]:
    """The table: median and best run of each path (contention on a shared machine only ever slows a run down,
    so the best run is each path's own speed; the median is the verdict), and the ratios to the anchor."""
    stats = {}
    for path, rs in runs.items():
        stats[path] = {"ttft": statistics.median(r["ttft"] for r in rs),
                       "decode_tps": statistics.median(r["decode_tps"] for r in rs),
                       "best_ttft": min(r["ttft"] for r in rs), "best_tps": max(r["decode_tps"] for r in rs)}
    engine_runs = runs["engine"]
    scored = sum(r["gate_calls"] for r in engine_runs)
    hidden_us = 1e6 * sum(r["gate_hidden_s"] for r in engine_runs) / scored
    heads_us = 1e6 * sum(r["gate_heads_s"] for r in engine_runs) / scored
    token_ms = 1e3 / stats["anchor"]["decode_tps"]
    gate_share = (hidden_us + heads_us) / 1e3 / token_ms
    labels = {"anchor": "llama-cpp-python (anchor)", "engine": "engine + gate, in process",
              "server": "so8t serve, HTTP streaming", "llama-server": "llama-server, stock",
              "llama-server+so8t": "llama-server + so8t patch"}
    lines = [(f"serve bench: {meta['gguf']} ({meta['size_gb']:.2f} GB q8_0), {meta['prompt_tokens']}-token chat "
              f"prompt, {meta['decode']} greedy tokens, n_threads={meta['threads']}, n_ctx={meta['n_ctx']}, "
              f"{meta['repeats']} interleaved runs per path"),
             f"  all on {Path(meta['run_on']).name} (the same tensors and keys, padding ids printable)",
             (f"{'path':<28}{'TTFT s':>8}{'best':>7}{'decode tok/s':>14}{'best':>7}   "
              "runs: TTFT s / decode tok/s / other processes' cores")]
    for path, rs in runs.items():
        st = stats[path]
        each = ", ".join(f"{r['ttft']:.2f}/{r['decode_tps']:.2f}/{r['others']:.1f}" for r in rs)
        lines.append(f"{labels[path]:<28}{st['ttft']:>8.2f}{st['best_ttft']:>7.2f}{st['decode_tps']:>14.3f}"
                     f"{st['best_tps']:>7.3f}   {each}")
    ratios = {
        "server_decode": stats["server"]["decode_tps"] / stats["anchor"]["decode_tps"],
        "engine_decode": stats["engine"]["decode_tps"] / stats["anchor"]["decode_tps"],
        "server_ttft": stats["server"]["ttft"] / stats["anchor"]["ttft"],
        "engine_ttft": stats["engine"]["ttft"] / stats["anchor"]["ttft"],
        "best_server_decode": stats["server"]["best_tps"] / stats["anchor"]["best_tps"],
        "best_engine_decode": stats["engine"]["best_tps"] / stats["anchor"]["best_tps"],
        "best_server_ttft": stats["server"]["best_ttft"] / stats["anchor"]["best_ttft"],
        "best_engine_ttft": stats["engine"]["best_ttft"] / stats["anchor"]["best_ttft"],
        "gate_share": gate_share,
    }

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines += [
        "ratios against the anchor, medians (best runs in brackets); targets",
        (f"  decode   server {ratios['server_decode']:.3f} [{ratios['best_server_decode']:.3f}] (>= 0.95: "
         f"{verdict(ratios['server_decode'] >= 0.95)}), engine {ratios['engine_decode']:.3f} "
         f"[{ratios['best_engine_decode']:.3f}]"),
        (f"  TTFT     server {ratios['server_ttft']:.3f} [{ratios['best_server_ttft']:.3f}] (<= 1.05: "
         f"{verdict(ratios['server_ttft'] <= 1.05)}), engine {ratios['engine_ttft']:.3f} "
         f"[{ratios['best_engine_ttft']:.3f}]"),
        (f"  gate     {hidden_us + heads_us:.1f} us per scored token (hidden-state read {hidden_us:.1f} us + "
         f"2 head matvecs {heads_us:.1f} us; {scored} scored in the engine runs; alone in a loop "
         f"{micro_us:.1f} us) = {100 * gate_share:.4f} % of a {token_ms:.1f} ms token "
         f"(<= 1 %: {verdict(gate_share <= 0.01)})"),
        (f"  engine prefill alone (GatedRun.start: tokenise, decode, score the prompt): median "
         f"{statistics.median(r['prefill_s'] for r in engine_runs):.2f} s"),
    ]
    if "llama-server" in stats:
        stock, patched = stats["llama-server"], stats["llama-server+so8t"]
        ratios.update({
            "patch_decode": patched["decode_tps"] / stock["decode_tps"],
            "patch_ttft": patched["ttft"] / stock["ttft"],
            "server_vs_llama_server_decode": stats["server"]["decode_tps"] / stock["decode_tps"],
            "server_vs_llama_server_ttft": stats["server"]["ttft"] / stock["ttft"],
            "best_patch_decode": patched["best_tps"] / stock["best_tps"],
            "best_server_vs_llama_server_decode": stats["server"]["best_tps"] / stock["best_tps"],
        })
        lines += [
            "against stock llama-server, medians (best runs in brackets); targets",
            (f"  patched llama-server decode {ratios['patch_decode']:.3f} [{ratios['best_patch_decode']:.3f}] "
             f"(>= 0.99: {verdict(ratios['patch_decode'] >= 0.99)}), TTFT {ratios['patch_ttft']:.3f}"),
            (f"  so8t serve decode {ratios['server_vs_llama_server_decode']:.3f} "
             f"[{ratios['best_server_vs_llama_server_decode']:.3f}] (>= 0.9: "
             f"{verdict(ratios['server_vs_llama_server_decode'] >= 0.9)}), TTFT "
             f"{ratios['server_vs_llama_server_ttft']:.3f}"),
        ]
    for path in ("server", "llama-server", "llama-server+so8t"):
        server_runs = [r for r in runs.get(path, []) if r.get("server_tps")]
        if server_runs:
            own = statistics.median(r["server_tps"] for r in server_runs)
            client_ms = 1e3 * statistics.median(r["client_cpu_s"] / r["tokens"] for r in server_runs)
            ratios[f"{path}_own_decode"] = own / stats["anchor"]["decode_tps"]
            lines.append(f"  {labels[path]}: its own timings (tokens / generation time) median {own:.3f} tok/s = "
                         f"{ratios[f'{path}_own_decode']:.3f} of the anchor; the HTTP client here used "
                         f"{client_ms:.2f} ms CPU per token on the same cores")
    last = {path: rs[-1] for path, rs in runs.items()}
    same = ", ".join(f"engine == {path} {_same(last['engine']['text'], last[path]['text'])}"
                     for path in last if path != "engine")
    lines.append(f"outputs: {same}; gate decisions "
                 f"{sorted({r['decision'] or '-' for p in runs if p != 'anchor' for r in runs[p]})}; tokens "
                 f"{sorted({r['tokens'] for rs in runs.values() for r in rs})}, deltas timed "
                 f"{sorted({r['deltas'] for rs in runs.values() for r in rs})}")
    return lines, ratios


class CpuMeter:
    """CPU time of every other process during a run, in cores: the machine's busy time (/proc/stat) minus
    ours and the server's. On a shared VM it tells the runs that something else slowed down."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        busy = sum(values) - values[3] - values[4]  # all but idle and iowait
        ours = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime, stime
        return busy, ours

    def measure(self, fn):
        busy, ours = self._read()
        start = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
        busy2, ours2 = self._read()
        result["others"] = max(0.0, ((busy2 - busy) - (ours2 - ours)) / self.tick / wall)
        return result


def micro_gate(engine, n: int = 2000) -> float:
    """The hidden-state read and both heads, alone in a loop (after a decode, so the buffer is live)."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        engine.heads(engine._last_hidden()[None])
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=HERE / ".cache" / "qwen3-4b-fp8",
                    help="the benchmark checkpoint (bench/make_checkpoint.py writes it when missing)")
    ap.add_argument("--gguf", type=Path, default=HERE / ".cache" / "out" / "ours-q8_0.gguf",
                    help="its q8_0 export (exported from --checkpoint when missing)")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", type=Path, default=None, help="JSON report [default: bench/.cache/serve-*.json]")
    ap.add_argument("--no-llama-server", action="store_true",
                    help="leave out stock and patched llama-server (they are built by cpp_patches/build.sh)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    began = time.perf_counter()

    import httpx
    import llama_cpp

    from so8t_export import llama_log
    from so8t_export.serve.engine import Engine
    from so8t_export.serve.gate import GatePolicy

    log(ensure_gguf(args.checkpoint, args.gguf))
    export = args.gguf
    args.gguf, note = visible_padding_copy(args.gguf)
    log(note)
    n_ctx = 1 << (args.prompt_tokens + args.decode_tokens + 64).bit_length()
    server = Server(args.gguf, n_ctx=n_ctx, n_threads=args.threads)  # loads while we load ours
    llama_servers: dict[str, LlamaServer] = {}
    try:
        if not args.no_llama_server:
            from tests.upstream import llama_tool

            for name, patched, extra in (("llama-server", False, []),
                                         ("llama-server+so8t", True, ["--so8t-score-tokens"])):
                llama_servers[name] = LlamaServer(llama_tool("llama-server", patched=patched), args.gguf,
                                                  n_ctx=n_ctx, n_threads=args.threads, extra=extra)
        llama_log.set_verbose(False)
        engine = Engine(args.gguf, n_ctx=n_ctx, n_threads=args.threads)
        llama_log.install()
        anchor = llama_cpp.Llama(str(args.gguf), n_ctx=n_ctx, n_batch=engine.runtime.n_batch,
                                 n_ubatch=engine.runtime.n_batch, n_threads=args.threads, verbose=False)
        policy = GatePolicy(refuse_above=1.0, escalate_above=1.0, stop_above=1.0, score_every=1)
        timer = GateTimer(engine)
        messages, tokens = build_messages(engine, args.prompt_tokens)
        url = server.wait()
        client = httpx.Client(trust_env=False)
        log(f"server ready at {url}; prompt {len(tokens)} tokens; n_ctx {n_ctx}; load average "
            f"{os.getloadavg()[0]:.2f}")

        paths = {
            "anchor": lambda msgs, toks, n: run_anchor(anchor, toks, n),
            "engine": lambda msgs, toks, n: run_engine(engine, policy, msgs, n, timer),
            "server": lambda msgs, toks, n: run_http(client, url, msgs, n),
        }
        for name, at in {name: s.wait(client) for name, s in llama_servers.items()}.items():
            paths[name] = lambda msgs, toks, n, at=at: run_http(client, at, msgs, n, cache_prompt=False)
        warm_messages, warm_tokens = build_messages(engine, 48)
        for name, fn in paths.items():  # page in the weights of each context, start the server's worker
            fn(warm_messages, warm_tokens, 4)
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        order = list(paths)
        meter = CpuMeter([os.getpid(), server.proc.pid, *(s.proc.pid for s in llama_servers.values())])
        for repeat in range(args.repeats):
            for name in order[repeat % len(order):] + order[:repeat % len(order)]:
                r = meter.measure(lambda name=name: paths[name](messages, tokens, args.decode_tokens))
                runs[name].append(r)
                log(f"  run {repeat + 1} {name:<7} TTFT {r['ttft']:6.2f} s  decode {r['decode_tps']:.3f} tok/s  "
                    f"({r['tokens']} tokens; other processes {r['others']:.2f} cores)")
        micro_us = micro_gate(engine)
        if any(r.get("prompt_tokens") not in (None, len(tokens)) for p in ("engine", "server") for r in runs[p]):
            log(f"WARNING: prompt token counts differ: {[r.get('prompt_tokens') for r in runs['server']]} vs "
                f"{len(tokens)}")
        load = os.getloadavg()[0]
    finally:
        server.stop()
        for llama_server in llama_servers.values():
            llama_server.stop()
    meta = {"gguf": str(export), "run_on": str(args.gguf), "size_gb": args.gguf.stat().st_size / 1e9, "prompt_tokens": len(tokens),
            "decode": args.decode_tokens, "threads": args.threads, "n_ctx": n_ctx, "repeats": args.repeats}
    lines, ratios = table(runs, micro_us, meta)
    lines.append(f"wall {time.perf_counter() - began:.0f} s; 1-min load average at the end {load:.2f}")
    log("\n".join(lines))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    report = args.report or HERE / ".cache" / f"serve-{stamp}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "when": stamp, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                   "python": platform.python_version()},
        "meta": meta, "ratios": ratios, "micro_gate_us": micro_us, "table": lines,
        "runs": {p: [{k: v for k, v in r.items() if k != "text"} for r in rs] for p, rs in runs.items()},
        "last_text": {p: rs[-1]["text"] for p, rs in runs.items()},
    }, indent=2) + "\n")
    log(f"report: {report}")


if __name__ == "__main__":
    main()
