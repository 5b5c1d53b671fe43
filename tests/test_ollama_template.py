"""The Ollama TEMPLATE gives the prompts Hugging Face's chat template gives, and so does the GGUF's own template.

Ollama's side is ollama_template/, a Go program on Ollama's own packages (github.com/ollama/ollama at the
version its go.mod requires, the Dockerfile's tag): parser.ParseFile and CreateRequest read our Modelfile,
template.Execute renders the prompt, thinking and tools parse the output, and a little glue repeats the
unexported steps of Ollama's chat handler. It is built here with `go build` (CGO_ENABLED=0; Go's module and
build caches keep the download and the build), and its Go tests run here too. Hugging Face's side is
transformers' apply_chat_template with the real Qwen3-4B-Thinking-2507 template (via so8t_export.demo's
tokenizer). The deliberate differences listed in so8t_export/modelfile.py are each tested below.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import skip_or_fail

from so8t_export.modelfile import (
    MODEL_NAME,
    OLLAMA_VERSION,
    TEMPLATE,
    check_modelfile,
    gguf_filename,
    render_modelfile,
    write_modelfile,
)

REPO = Path(__file__).resolve().parents[1]
GO_DIR = REPO / "ollama_template"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city; returns °C & a short <summary>.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time",
        "parameters": {"type": "object", "properties": {}},
    },
}


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Conversations in Hugging Face's message format: (messages, tools). The first five are the cases.
CASES: dict[str, tuple[list[dict], list[dict] | None]] = {
    "single_turn": ([{"role": "user", "content": "What is the capital of France?"}], None),
    "system_prompt": (
        [
            {"role": "system", "content": "You are SO8T, a careful assistant."},
            {"role": "user", "content": "Say hello."},
        ],
        None,
    ),
    "multi_turn_earlier_thinking": (
        [
            {"role": "system", "content": "Be concise."},
            {"role": "user", "content": "What is 17 * 3?"},
            {"role": "assistant", "content": "51.", "reasoning_content": "17 * 3 = 51."},
            {"role": "user", "content": "And 51 / 3?"},
            {"role": "assistant", "content": "17.", "reasoning_content": "Inverse of the last step."},
            {"role": "user", "content": "Thanks! Now 2 + 2?"},
        ],
        None,
    ),
    "tool_call_and_result": (
        [
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": "How warm is it in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I need the weather tool for Paris.",
                "tool_calls": [call("get_weather", {"city": "Paris", "unit": "celsius"})],
            },
            {"role": "tool", "content": '{"temperature": 21, "summary": "sunny"}'},
        ],
        [WEATHER_TOOL],
    ),
    "non_ascii": (
        [
            {"role": "system", "content": "日本語で簡潔に答えてください。"},
            {"role": "user", "content": "こんにちは 👋 Ünïcödé, café, naïve, Ελληνικά, русский?"},
            {"role": "assistant", "content": "こんにちは！", "reasoning_content": "挨拶を返す。"},
            {"role": "user", "content": "東京の天気は？ 🌦"},
        ],
        None,
    ),
    # More of the template's branches.
    "tool_loop_two_calls_two_results": (
        [
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": "Let me check both.",
                "reasoning_content": "Two tools, one step.",
                "tool_calls": [call("get_weather", {"city": "Paris"}), call("get_time", {})],
            },
            {"role": "tool", "content": "21 C"},
            {"role": "tool", "content": "14:05"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Lyon"})]},
            {"role": "tool", "content": "19 C"},
        ],
        [WEATHER_TOOL, TIME_TOOL],
    ),
    "tools_without_system": ([{"role": "user", "content": "Time?"}], [TIME_TOOL]),
    "system_later_in_conversation": (
        [
            {"role": "system", "content": "First rules."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "system", "content": "New rules."},
            {"role": "user", "content": "Again"},
        ],
        None,
    ),
    "tool_response_sent_as_user_message": (
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Call it.",
                "tool_calls": [call("get_time", {})],
            },
            {"role": "user", "content": "<tool_response>\n14:05\n</tool_response>"},
        ],
        [TIME_TOOL],
    ),
    "earlier_content_with_think_block": (
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
        ],
        None,
    ),
    "thinking_with_one_trailing_newline": (
        # What Ollama's thinking parser returns for "reasoning\n</think>": the newline stays in .Thinking.
        [
            {"role": "user", "content": "Q"},
            {
                "role": "assistant",
                "content": "\nChecking.",
                "reasoning_content": "reasoning\n",
                "tool_calls": [call("get_time", {})],
            },
            {"role": "tool", "content": "14:05"},
        ],
        [TIME_TOOL],
    ),
}
REQUIRED = [
    "single_turn",
    "system_prompt",
    "multi_turn_earlier_thinking",
    "tool_call_and_result",
    "non_ascii",
]


def to_ollama(messages: list[dict]) -> list[dict]:
    """HF messages -> an /api/chat body's messages (api.Message: thinking, tool_calls with an index)."""
    out = []
    for m in messages:
        o = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("reasoning_content"):
            o["thinking"] = m["reasoning_content"]
        if m.get("tool_calls"):
            o["tool_calls"] = [
                {
                    "function": {
                        "index": i,
                        "name": c["function"]["name"],
                        "arguments": c["function"]["arguments"],
                    }
                }
                for i, c in enumerate(m["tool_calls"])
            ]
        out.append(o)
    return out


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def go_env(tmp_path_factory) -> dict:
    """Environment for go build/test: no cgo (Ollama's packages we use are pure Go), Go's own module and build
    caches (the first build downloads github.com/ollama/ollama through the module proxy; go.sum pins it).
    GOTOOLCHAIN is the caller's: a Go older than go.mod's fetches the toolchain go.mod names unless it is local."""
    if shutil.which("go") is None:
        skip_or_fail("the Go toolchain is not installed (go.mod's github.com/ollama/ollama needs Go >= 1.26)")
    env = {**os.environ, "CGO_ENABLED": "0"}
    if "HOME" not in env and "GOPATH" not in env:
        env["GOPATH"] = str(tmp_path_factory.mktemp("gopath"))
    if "HOME" not in env and "XDG_CACHE_HOME" not in env and "GOCACHE" not in env:
        env["GOCACHE"] = str(tmp_path_factory.mktemp("gocache"))
    return env


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory, go_env) -> Path:
    out = tmp_path_factory.mktemp("ollama_template") / "ollama_template"
    build = subprocess.run(
        ["go", "build", "-buildvcs=false", "-o", str(out), "."],
        cwd=GO_DIR,
        env=go_env,
        check=False,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"go build failed:\n{build.stderr}"
    return out


@pytest.fixture(scope="session")
def so8t_modelfile(tmp_path_factory) -> Path:
    """The Modelfile so8t_export writes (the GGUF it names need not exist)."""
    path = tmp_path_factory.mktemp("modelfile") / "Modelfile"
    path.write_text(render_modelfile(path.parent / gguf_filename(), path), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from so8t_export.demo import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def go_modelfile(binary: Path, *paths: Path) -> list[dict]:
    cmd = [str(binary), "modelfile", *map(str, paths)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, encoding="utf-8")
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


@pytest.fixture(scope="session")
def ollama_model(go_renderer, so8t_modelfile) -> dict:
    """The create request Ollama's parser makes of our Modelfile: its TEMPLATE, SYSTEM, MESSAGE lines."""
    (verdict,) = go_modelfile(go_renderer, so8t_modelfile)
    assert verdict["ok"], verdict
    assert verdict["request"]["template"] == TEMPLATE
    return verdict["request"]


def go_run(binary: Path, payload: dict) -> str:
    res = subprocess.run(
        [str(binary)],
        check=False,
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def go_render(binary: Path, model: dict, messages: list[dict], tools=None, system: str = "", **chat) -> str:
    """Ollama's prompt for an /api/chat request (HF-format messages) to the model of that create request."""
    body: dict = {"messages": to_ollama(messages), **chat}
    if tools is not None:
        body["tools"] = tools
    return go_run(binary, {"model": {**model, "system": system}, "chat": body})


def hf_render(tok, messages: list[dict], tools=None, *, continue_final: bool = False) -> str:
    return tok.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
    )


def canonical(prompt: str) -> str:
    """The prompt with every line that is a JSON object rewritten canonically (sorted keys, fixed spacing)."""
    lines = []
    for line in prompt.split("\n"):
        if line.startswith("{"):
            try:
                line = json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False)
            except json.JSONDecodeError:
                pass
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------- Go vs Hugging Face


@pytest.mark.go
@pytest.mark.parametrize("case", list(CASES))
def test_go_prompt_equals_hf_prompt(case, go_renderer, hf_tokenizer, ollama_model):
    messages, tools = CASES[case]
    go = go_render(go_renderer, ollama_model, messages, tools)
    hf = hf_render(hf_tokenizer, messages, tools)
    assert go.endswith("<|im_start|>assistant\n<think>\n")
    if tools is None:
        assert go == hf
    else:
        # Deliberate difference 1: JSON lines are Go's json.Marshal output; everything else is identical.
        assert canonical(go) == canonical(hf)
        for g, h in zip(go.split("\n"), hf.split("\n")):
            assert g == h or (g.startswith("{") and json.loads(g) == json.loads(h))


@pytest.mark.go
def test_required_cases_are_covered():
    assert set(REQUIRED) <= set(CASES)


@pytest.mark.go
def test_tool_json_is_go_json(go_renderer, ollama_model):
    """Deliberate difference 1, pinned: compact, struct-field order, sorted map keys, <>& escaped, UTF-8 kept."""
    messages, tools = CASES["tool_call_and_result"]
    go = go_render(go_renderer, ollama_model, messages, tools)
    assert (
        '\n{"type": "function", "function": {"name":"get_weather","description":"Current weather for a city; '
        'returns °C \\u0026 a short \\u003csummary\\u003e.","parameters":{"type":"object","required":["city"],'
        '"properties":{"city":{"type":"string","description":"City name, e.g. Paris"},'
        '"unit":{"type":"string","enum":["celsius","fahrenheit"]}}}}}\n'
    ) in go
    assert '\n{"name": "get_weather", "arguments": {"city":"Paris","unit":"celsius"}}\n' in go


@pytest.mark.go
def test_thinking_newline_stripping_is_bounded(go_renderer, hf_tokenizer, ollama_model):
    """Deliberate difference 2: one leading/trailing newline is stripped from thinking, Jinja strips all."""

    def render_both(reasoning: str):
        messages = [
            {"role": "user", "content": "Q"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": reasoning,
                "tool_calls": [call("get_time", {})],
            },
            {"role": "tool", "content": "x"},
        ]
        return (
            go_render(go_renderer, ollama_model, messages, [TIME_TOOL]),
            hf_render(hf_tokenizer, messages, [TIME_TOOL]),
        )

    for reasoning in ("r", "r\n", "\nr", "\nr\n"):
        go, hf = render_both(reasoning)
        assert canonical(go) == canonical(hf), reasoning
    go, hf = render_both("r\n\n")
    assert "<think>\nr\n</think>" in hf and "<think>\nr\n\n</think>" in go
    assert canonical(go) == canonical(hf).replace("<think>\nr\n</think>", "<think>\nr\n\n</think>")


@pytest.mark.go
def test_final_assistant_message_is_a_prefill(go_renderer, hf_tokenizer, ollama_model):
    """Deliberate difference 3: equals continue_final_message=True, not add_generation_prompt=True."""
    messages = [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Autumn moon"},
    ]
    go = go_render(go_renderer, ollama_model, messages)
    assert go == hf_render(hf_tokenizer, messages, continue_final=True)
    assert go.endswith("<think>\n\n</think>\n\nAutumn moon")
    assert go != hf_render(hf_tokenizer, messages)


@pytest.mark.go
def test_ollama_merges_consecutive_messages(go_renderer, hf_tokenizer, ollama_model):
    """Deliberate difference 4: Ollama's collate() merges same-role neighbours (not tool) before templating."""
    messages = [{"role": "user", "content": "Part one."}, {"role": "user", "content": "Part two."}]
    go = go_render(go_renderer, ollama_model, messages)
    assert go == hf_render(hf_tokenizer, [{"role": "user", "content": "Part one.\n\nPart two."}])
    assert go != hf_render(hf_tokenizer, messages)


@pytest.mark.go
def test_modelfile_system_is_used_only_without_a_system_message(
    go_renderer, hf_tokenizer, ollama_model
):
    user = [{"role": "user", "content": "Hi"}]
    go = go_render(go_renderer, ollama_model, user, system="From the Modelfile.")
    assert go == hf_render(hf_tokenizer, [{"role": "system", "content": "From the Modelfile."}, *user])
    own = [{"role": "system", "content": "From the request."}, *user]
    assert go_render(go_renderer, ollama_model, own, system="From the Modelfile.") == hf_render(
        hf_tokenizer, own
    )


@pytest.mark.go
def test_ollama_infers_thinking_tools_and_tool_tag(go_renderer, ollama_model):
    info = json.loads(go_run(go_renderer, {"model": ollama_model, "mode": "inspect"}))
    assert info["messages_mode"]
    assert (info["thinking_open"], info["thinking_close"]) == ("<think>", "</think>")
    # With thinking among them, `ollama run --think` is accepted and chats think by default.
    assert info["capabilities"] == ["tools", "thinking"]
    # Ollama's tool parser waits for this text before it reads a call, instead of the first "{" of the output.
    assert info["tool_parser_tag"] == "<tool_call>"
    # Same capabilities as the GGUF's Jinja template plus a tool round trip: Ollama >= 0.30 keeps this TEMPLATE.
    assert info["tool_round_trip"]


@pytest.mark.go
def test_ollama_splits_generated_thinking_from_the_answer(go_renderer, ollama_model):
    """The prompt ends inside <think>, so the model's text starts as thinking; Ollama splits at </think>."""
    payload = {
        "mode": "split",
        "model": ollama_model,
        "chat": {"messages": to_ollama(CASES["single_turn"][0])},
        "output": "Paris is the capital.\n</think>\n\nThe capital of France is Paris.",
    }
    split = json.loads(go_run(go_renderer, payload))
    assert split == {"thinking": "Paris is the capital.\n", "content": "The capital of France is Paris."}
    payload["chat"]["think"] = False  # no split: the text is all content
    assert json.loads(go_run(go_renderer, payload)) == {"thinking": "", "content": payload["output"]}


@pytest.mark.go
def test_library_function_field_prints_go_structs(go_renderer):
    """Why the TEMPLATE writes {{ json .Function }}: since Ollama v0.14 .Function has no String() (ollama#14601)."""
    template = "{{ range .Tools }}{{ .Function }}|{{ json .Function }}{{ end }}{{ range .Messages }}{{ end }}"
    chat = {"messages": [{"role": "user", "content": "Time?"}], "tools": [TIME_TOOL]}
    out = go_run(go_renderer, {"model": {"template": template}, "chat": chat})
    struct, js = out.split("|")
    assert struct.startswith("{get_time Local time {object")
    assert json.loads(js) == {
        "name": "get_time",
        "description": "Local time",
        "parameters": {"type": "object", "properties": {}},
    }


@pytest.mark.go
def test_harness_reports_template_errors(go_renderer):
    res = subprocess.run(
        [str(go_renderer)],
        input=json.dumps({"model": {"template": "{{ range .Messages }}"}, "chat": {}}),
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "template error" in res.stderr


# ------------------------------------------------------------------------- Ollama's parser on Modelfiles


@pytest.mark.go
def test_modelfile_verdicts_are_ollamas(go_renderer, so8t_modelfile, tmp_path):
    """The `modelfile` subcommand's JSON lines (the differential test's reference): one per file, in order."""
    bad_type = tmp_path / "bad_type"
    bad_type.write_text("FROM ./m.gguf\nPARAMETER num_ctx 4k\n")
    bad_command = tmp_path / "bad_command"
    bad_command.write_text("FROM ./m.gguf\nPARAMETERS num_ctx 4096\n")
    ours, typed, command = go_modelfile(go_renderer, so8t_modelfile, bad_type, bad_command)

    assert ours["file"] == str(so8t_modelfile) and ours["ok"] and "error" not in ours
    assert ours["commands"][0] == ["model", f"./{gguf_filename()}"]
    assert ["template", TEMPLATE] in ours["commands"]
    request = ours["request"]
    assert request["from"] == f"./{gguf_filename()}"  # relative FROM paths never resolve to a file here
    params = request["parameters"]  # typed by api.FormatParams; stop collects its lines in order
    assert params["stop"] == ["<|im_start|>", "<|im_end|>"]
    assert isinstance(params["num_ctx"], int) and isinstance(params["temperature"], float)

    assert typed == {
        "file": str(bad_type),
        "ok": False,
        "error": "invalid int value [4k]",
        "commands": [["model", "./m.gguf"], ["num_ctx", "4k"]],
    }
    assert not command["ok"] and command["commands"] == []
    assert command["error"].startswith('(line 2): command must be one of "from"')


# ------------------------------------------------------------------ the Go module: pin, tests, no copies


@pytest.mark.go
def test_go_module_pins_the_dockerfiles_ollama():
    """go.mod is where the Ollama version of the Go checks is pinned; it must be the Dockerfile's tag."""
    go_mod = (GO_DIR / "go.mod").read_text()
    (pin,) = re.findall(r"^\s*(?:require\s+)?github\.com/ollama/ollama v(\S+)$", go_mod, re.M)
    (tag,) = re.findall(r"^FROM ollama/ollama:(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert pin == tag == OLLAMA_VERSION
    assert "replace" not in go_mod
    assert f"github.com/ollama/ollama v{pin} h1:" in (GO_DIR / "go.sum").read_text()


@pytest.mark.go
def test_go_program_uses_ollamas_packages_not_copies():
    """The Go side is glue: it imports Ollama's packages, never text/template (it renders nothing itself)."""
    imports = set()
    for path in GO_DIR.glob("*.go"):
        if path.name.endswith("_test.go"):
            continue
        for block in re.findall(r"^import \(\n(.*?)^\)", path.read_text(), re.M | re.S):
            imports |= set(re.findall(r'"([^"]+)"', block))
    ollama = "github.com/ollama/ollama/"
    assert {ollama + p for p in ("api", "parser", "template", "thinking", "tools")} <= imports
    assert not imports & {"text/template", "text/template/parse"}


@pytest.mark.go
def test_go_tests_pass(go_env, so8t_modelfile):
    """ollama_template's Go tests: the glue, our TEMPLATE's capabilities, the thinking and tool-call splits."""
    res = subprocess.run(
        ["go", "test", "-count=1", "./..."],
        cwd=GO_DIR,
        env={**go_env, "SO8T_MODELFILE": str(so8t_modelfile)},
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------- the GGUF in llama-cpp-python


@pytest.mark.llama
def test_gguf_named_in_from_loads_in_llama_cpp(tmp_path, hf_tokenizer):
    """Export the tiny model, write its Modelfile, load the file FROM names, render its chat template."""
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        skip_or_fail("llama-cpp-python is not importable")
    from so8t_export.demo import write_tiny_qwen3
    from so8t_export.export import export_gguf

    model_dir = write_tiny_qwen3(tmp_path / "tiny-qwen3")
    out = tmp_path / "ollama"
    out.mkdir()
    export_gguf(model_dir, out / gguf_filename(), quant="q8_0", name=MODEL_NAME)
    modelfile = write_modelfile(out / gguf_filename(), out / "Modelfile")

    check = check_modelfile(modelfile)  # resolves FROM the way Ollama does, relative to the Modelfile
    assert check.model_files == [str(out / gguf_filename())]
    llm = llama_cpp.Llama(model_path=check.model_files[0], n_ctx=256, n_threads=2, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == hf_tokenizer.chat_template

    def token_text(token_id: int) -> str:
        return "" if token_id < 0 else llm.detokenize([token_id], special=True).decode("utf-8")

    formatter = Jinja2ChatFormatter(
        template=template, eos_token=token_text(llm.token_eos()), bos_token=token_text(llm.token_bos())
    )
    for case, (messages, tools) in CASES.items():
        prompt = formatter(messages=messages, tools=tools).prompt
        assert prompt == hf_render(hf_tokenizer, messages, tools), case
