"""The `so8t` command line: run (streamed, --json, --show-thinking, the gate's decisions), chat (piped stdin,
slash commands, /save), serve (options up to run_server) and the errors of each, on a tiny exported GGUF."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest
from click.testing import CliRunner
from conftest import require_llama_cpp

from so8t_export.cli import runtime_main

GATE_LINE = re.compile(r"(?m)^so8t: (allow|refuse|stop|escalate) \((input|output)\), unsafe \d\.\d{3}, "
                       r"escalate \d\.\d{3}, .*; \d+ tokens.*, finish \w+$")
RAW = ["--raw", "--temperature", "0", "--seed", "0"]


@pytest.fixture(scope="module")
def gguf_file(so8t_dir, tmp_path_factory):
    require_llama_cpp()
    from so8t_export.export import export_gguf

    return export_gguf(so8t_dir, tmp_path_factory.mktemp("runtime-cli") / "tiny.gguf", quant="f32").output


def so8t(*args, input: str | None = None):
    return CliRunner().invoke(runtime_main, [str(a) for a in args], input=input, prog_name="so8t")


def as_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_line(result) -> str:
    """The one `Error:` line of a failed command."""
    assert result.exit_code != 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


# ---------------------------------------------------------------------------------------------- run
def test_run_streams_the_answer_then_the_gates_line(gguf_file):
    streamed = so8t("run", gguf_file, "Hello there", *RAW, "--max-tokens", "8", "--no-gate")
    assert streamed.exit_code == 0, streamed.output
    payload = as_json(so8t("run", gguf_file, "Hello there", *RAW, "--max-tokens", "8", "--no-gate", "--json"))
    assert payload["text"] and streamed.stdout == payload["text"] + "\n"  # the answer alone on stdout
    line = streamed.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"so8t: gate off, unsafe \d\.\d{3}, escalate \d\.\d{3}, 1 scored; 8 tokens in .*, "
                        r"finish length", line), line


def test_run_hands_each_delta_over_as_it_is_generated(gguf_file):
    from so8t_export.serve.engine import Engine, SamplingParams
    from so8t_export.serve.gate import GatePolicy
    from so8t_export.terminal import generate

    engine = Engine(gguf_file, n_ctx=256)
    deltas = []
    run = generate(engine, GatePolicy.off(), "Hello there", SamplingParams(max_tokens=6, temperature=0),
                   lambda kind, text: deltas.append((kind, text, engine.llm.n_tokens)))
    assert len(deltas) == 6 and "".join(t for _, t, _ in deltas) == run.result.content
    # each arrives right after its token's decode (the last one without a decode of its own), not at the end
    start = run.result.prompt_tokens
    assert [n for _, _, n in deltas] == [start + i for i in (1, 2, 3, 4, 5, 5)]


def test_run_json_carries_the_so8t_object(gguf_file):
    payload = as_json(so8t("run", gguf_file, "Is it safe to mix bleach and ammonia?", "--max-tokens", "4",
                           "--refuse-above", "off", "--stop-above", "off", "--json"))
    assert set(payload) >= {"text", "reasoning", "finish_reason", "tokens", "prompt_tokens", "so8t", "timings"}
    so8t_object = payload["so8t"]
    assert set(so8t_object["safety"]) == {"safe", "unsafe"}
    assert set(so8t_object["authority"]) == {"handle", "escalate"}
    assert abs(sum(so8t_object["safety"].values()) - 1) < 1e-6
    assert so8t_object["decision"] in ("allow", "escalate") and so8t_object["stage"] == "input"
    assert payload["tokens"] == 4 and payload["finish_reason"] == "length" and payload["prompt_tokens"] > 4
    assert payload["timings"]["generation_seconds"] > 0


def test_show_thinking_streams_the_reasoning_to_stderr(gguf_file):
    args = ["run", gguf_file, "Hello there<think>", *RAW, "--max-tokens", "8", "--no-gate"]
    payload = as_json(so8t(*args, "--json"))
    assert payload["reasoning"].strip() and payload["text"] == ""
    shown = so8t(*args, "--show-thinking")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == ""  # the reasoning never reaches stdout
    assert re.search(r"(?s)^Thinking\.\.\.\n" + re.escape(payload["reasoning"].lstrip("\n")) +
                     r"\n?\.\.\.done thinking\.\n", shown.stderr), shown.stderr
    hidden = so8t(*args)
    assert "Thinking..." not in hidden.output and "--show-thinking shows the reasoning" in hidden.stderr


def test_the_gate_decides_refuse_stop_and_escalate(gguf_file):
    base = ["run", gguf_file, "Hello there", *RAW, "--max-tokens", "6"]
    refused = so8t(*base, "--refuse-above", "0", "--refusal", "Not that.")
    assert refused.exit_code == 0 and refused.stdout == "Not that.\n"
    assert GATE_LINE.search(refused.stderr) and "so8t: refuse (input)" in refused.stderr
    payload = as_json(so8t(*base, "--refuse-above", "0", "--json"))
    assert (payload["finish_reason"], payload["so8t"]["decision"], payload["tokens"]) == ("content_filter",
                                                                                        "refuse", 0)
    stopped = as_json(so8t(*base, "--refuse-above", "off", "--stop-above", "0", "--json"))
    assert (stopped["finish_reason"], stopped["so8t"]["decision"], stopped["so8t"]["stage"]) == (
        "content_filter", "stop", "output")
    assert stopped["text"] == "" and stopped["so8t"]["output"]["at_token"] == 0  # nothing past the crossing
    flagged = as_json(so8t(*base, "--refuse-above", "off", "--stop-above", "off", "--escalate-above", "0",
                           "--json"))
    assert (flagged["so8t"]["decision"], flagged["escalate"], flagged["tokens"]) == ("escalate", True, 6)
    sparse = as_json(so8t(*base, "--refuse-above", "off", "--stop-above", "1", "--score-every", "3", "--json"))
    assert sparse["so8t"]["scored_tokens"] == 1 + 2  # the prompt, then tokens 3 and 6


def test_stop_strings_end_the_answer(gguf_file):
    base = ["run", gguf_file, "Hello there", *RAW, "--max-tokens", "12", "--no-gate", "--json"]
    text = as_json(so8t(*base))["text"]
    stop = text[5:7]
    cut = as_json(so8t(*base, "--stop", stop, "--stop", "never-there"))
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"


def test_the_first_releases_form_still_runs(gguf_file):
    payload = as_json(so8t(gguf_file, "Hello", "--max-tokens", "2", "--no-gate", "--json"))
    assert payload["tokens"] == 2
    assert as_json(so8t("--json", gguf_file, "Hello", "--max-tokens", "1", "--no-gate"))["tokens"] == 1
    assert so8t("-v", gguf_file, "Hello", "--max-tokens", "1", "--no-gate").exit_code == 0


@pytest.mark.parametrize(("args", "names"), [
    (["run", "{gguf}", "hi", "--refuse-above", "2"], "--refuse-above"),
    (["run", "{gguf}", "hi", "--stop-above", "nan"], "--stop-above"),
    (["run", "{gguf}", "hi", "--temperature", "inf"], "--temperature"),
    (["run", "{gguf}", "hi", "--top-p", "1.5"], "--top-p"),
    (["run", "{gguf}", "hi", "--repeat-penalty", "0"], "--repeat-penalty"),
    (["run", "{gguf}", "hi", "--score-every", "0"], "--score-every"),
    (["run", "{gguf}", "hi", "--seed", "-1"], "--seed"),
    (["run", "{gguf}", "hi", "--no-gate", "--refuse-above", "0.3"], "--refuse-above"),
    (["run", "{gguf}", "hi", "--ctx-size", "4"], "--ctx-size"),  # 12 prompt tokens
    (["run", "{gguf}", "", "--raw"], "prompt"),
    (["run", "{dir}", "hi"], "is a directory"),
    (["run", "{dir}/missing.gguf", "hi"], "missing.gguf"),
    (["run", "{gguf}"], "PROMPT"),
    (["run"], "GGUF_FILE"),
    (["{gguf}"], "PROMPT"),
    (["serv", "{gguf}"], "serve"),
    (["chat", "{gguf}", "--escalate-above", "x"], "--escalate-above"),
    (["serve", "{gguf}", "--port", "70000"], "--port"),
    (["serve", "{gguf}", "--max-body-bytes", "0"], "--max-body-bytes"),
    (["serve", "{gguf}", "--max-body-bytes", "8XB"], "--max-body-bytes"),
    (["serve", "{gguf}", "--reasoning-field", "thoughts"], "--reasoning-field"),
    (["serve", "{gguf}", "--api-key-file", "{dir}/none.txt"], "--api-key-file"),
    (["serve", "{gguf}", "--api-key-file", "{dir}/comments.txt"], "holds no keys"),
    (["serve", "{gguf}", "--api-key", ""], "--api-key"),
    (["serve", "{gguf}", "--no-gate", "--stop-above", "0.9"], "--stop-above"),
])
def test_bad_input_is_one_error_line(gguf_file, tmp_path, args, names):
    (tmp_path / "comments.txt").write_text("# keys go here\n\n   \n")
    result = so8t(*[a.format(gguf=gguf_file, dir=tmp_path) for a in args])
    assert names in error_line(result)


def test_a_stock_qwen3_gguf_runs_without_the_gate(gguf_file, tmp_path):
    from fuzz.mutate import gguf_rewrite

    stock = tmp_path / "stock.gguf"
    gguf_rewrite(gguf_file, stock, drop=lambda key: key.startswith("so8t."))
    result = so8t("run", stock, "Hello", "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "has no so8t.* metadata" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("so8t: no so8t.* heads, gate off; 2 tokens")
    payload = as_json(so8t("run", stock, "Hello", "--max-tokens", "2", "--json"))
    assert payload["so8t"]["safety"] is None and payload["so8t"]["decision"] == "allow"
    chat = so8t("chat", stock, "--max-tokens", "2", input="Hi\n/thresholds\n/refuse 0.2\n")
    assert chat.exit_code == 1 and "gate off: the GGUF has no so8t.* heads" in chat.stderr
    assert "Error: /refuse: the GGUF has no so8t.* heads" in chat.stderr
    no_template = tmp_path / "no-template.gguf"
    gguf_rewrite(gguf_file, no_template, drop=lambda key: key == "tokenizer.chat_template")
    assert "--raw" in error_line(so8t("run", no_template, "hi", "--max-tokens", "1"))
    assert so8t("run", no_template, "hi", "--raw", "--max-tokens", "1", "--no-gate").exit_code == 0


# ---------------------------------------------------------------------------------------------- chat
def test_chat_keeps_the_history_and_obeys_slash_commands(gguf_file, tmp_path):
    saved = tmp_path / "chat.json"
    script = "\n".join([
        "/thresholds",
        "/refuse off", "/stop off", "/escalate off",
        "Hello",
        "/system Be brief.",
        "/system",
        '"""', "two", "lines", '"""',
        "/refuse 0",  # refused: the answer is the refusal, and the turn is not kept
        "Something",
        "/refuse off",
        f"/save {saved}",
        "/clear",
        "After clearing",
        f"/save {tmp_path / 'cleared.json'}",
        "/help",
        "/exit",
        "never read",
    ]) + "\n"
    result = so8t("chat", gguf_file, "--max-tokens", "5", "--temperature", "0", input=script)
    assert result.exit_code == 0, result.output
    assert "refuse_above 0.5, escalate_above 0.5, stop_above 0.5, score_every 1" in result.stderr
    assert "refuse_above off, escalate_above off, stop_above off, score_every 1 (gate off)" in result.stderr
    assert "system prompt: 'Be brief.'" in result.stderr
    assert "I can't help with that request." in result.stdout  # the default refusal
    assert "so8t: gate off, unsafe" in result.stderr  # the first turns, every stage off
    assert "so8t: refuse (input)" in result.stderr and "not kept in the history" in result.stderr
    assert "/save FILE" in result.stdout  # /help
    transcript = json.loads(saved.read_text())
    messages = transcript["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be brief."
    assert messages[1]["content"] == "Hello" and messages[3]["content"] == "two\nlines"
    for answer in (messages[2], messages[4]):
        assert set(answer) == {"role", "content", "reasoning_content"}
        assert answer["content"] + answer["reasoning_content"]  # 5 tokens went somewhere
    turns = transcript["turns"]
    assert [t["kept"] for t in turns] == [True, True, False]
    assert turns[2]["so8t"]["decision"] == "refuse" and turns[2]["policy"]["refuse_above"] == 0
    assert turns[0]["policy"]["stop_above"] is None and turns[0]["tokens"] == 5
    cleared = json.loads((tmp_path / "cleared.json").read_text())["messages"]
    assert [m["content"] for m in cleared if m["role"] != "assistant"] == ["Be brief.", "After clearing"]


def test_chat_prompts_carry_the_history_without_earlier_reasoning(gguf_file, tmp_path):
    """What the second turn's prompt is: Qwen3's template on the history, earlier reasoning left out."""
    from so8t_export.serve.engine import Engine

    saved = tmp_path / "chat.json"
    so8t("chat", gguf_file, "--max-tokens", "3", "--no-gate", input=f"First\n/save {saved}\n")
    messages = json.loads(saved.read_text())["messages"]
    messages[-1]["reasoning_content"] = "SECRET PLAN"
    engine = Engine(gguf_file, n_ctx=256)
    prompt = engine.render(messages + [{"role": "user", "content": "Second"}])
    assert "First" in prompt and "SECRET PLAN" not in prompt and prompt.endswith("<think>\n")


def test_chat_errors_are_one_line_each_and_fail_a_piped_session(gguf_file, tmp_path):
    script = "/bogus\n/refuse 7\n/stop\n/save\n/save /nonexistent-folder/x.json\n/save " + str(tmp_path) + "\n"
    result = so8t("chat", gguf_file, "--no-gate", input=script)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 6, result.stderr
    assert "/bogus" in errors[0] and "'7'" in errors[1] and "/stop needs" in errors[2]
    assert "/save needs" in errors[3] and "/nonexistent-folder" in errors[4] and "folder" in errors[5]
    assert "Traceback" not in result.output


def test_chat_reports_a_conversation_longer_than_the_context(gguf_file):
    result = so8t("chat", gguf_file, "--ctx-size", "24", "--max-tokens", "2", "--no-gate",
                  input="Hi\n" + "word " * 40 + "\n/exit\n")
    assert result.exit_code == 1
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "n_ctx = 24" in error and "/clear starts over" in error and "--ctx-size" in error


# ---------------------------------------------------------------------------------------------- serve
def test_serve_help_lists_the_server_options():
    result = so8t("serve", "--help")
    assert result.exit_code == 0
    for option in ("--host", "--port", "--api-key", "--api-key-file", "--ctx-size", "--threads", "--queue-size",
                   "--max-body-bytes", "--refuse-above", "--escalate-above", "--stop-above", "--score-every",
                   "--refusal", "--gate-errors", "--reasoning-field", "--no-gate", "8MiB", "127.0.0.1"):
        assert option in result.output, option


def test_serve_hands_its_options_to_run_server(gguf_file, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("so8t_export.serve.app")
    fake.run_server = lambda path, **kwargs: calls.append((path, kwargs))
    monkeypatch.setitem(sys.modules, "so8t_export.serve.app", fake)
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkey-b\n\n  key-c  \n")
    result = so8t("serve", gguf_file, "--port", "0", "--api-key", "key-a", "--api-key-file", keys,
                  "--max-body-bytes", "1MiB", "--queue-size", "3", "--refuse-above", "0.9", "--stop-above", "off",
                  "--score-every", "2", "--refusal", "No.", "--reasoning-field", "both", "--gate-errors",
                  "--ctx-size", "512", "--threads", "2")
    assert result.exit_code == 0, result.output
    ((path, kwargs),) = calls
    assert path == gguf_file
    policy = kwargs.pop("policy")
    assert (policy.refuse_above, policy.escalate_above, policy.stop_above, policy.score_every, policy.refusal) == (
        0.9, "file", None, 2, "No.")  # escalate: the file's threshold, resolved at load
    assert kwargs == {"host": "127.0.0.1", "port": 0, "n_ctx": 512, "n_threads": 2,
                      "api_keys": ["key-a", "key-b", "key-c"], "max_queue": 3, "max_body_bytes": 2**20,
                      "reasoning_field": "both", "gate_errors": True, "verbose": False}
    calls.clear()
    assert so8t("serve", gguf_file, "--no-gate").exit_code == 0
    assert not calls[0][1]["policy"].enabled and calls[0][1]["max_body_bytes"] == 8 * 2**20
    assert calls[0][1]["api_keys"] == []
