"""Ollama Modelfile for SO8T: the Go chat TEMPLATE, default PARAMETERs, a renderer and a validator.

The validator is a port of Ollama's own client-side checks, so a Modelfile that passes here is one that
``ollama create`` accepts:

* ``parse_modelfile`` follows ``parser/parser.go: ParseFile`` rune by rune (its state machine, case rules,
  quoting, comments, BOM handling, dropped non-printable runes and the exact error texts with line numbers);
* ``check_commands`` follows ``Modelfile.CreateRequest`` and ``api.FormatParams`` (parameter names are the
  json tags of ``api.Options``, values parsed with Go's ``strconv`` rules; repeated ``stop`` accumulates,
  any other repeated key keeps the last value; deprecated names only warn; REQUIRES must be semver).

Version pin
-----------
We validate against **Ollama 0.32.15** (``OLLAMA_VERSION``, Docker image ``ollama/ollama:0.32.15``). Ollama's
behaviour for an imported qwen3 GGUF depends on its version era (see ``shared/notes/ollama.md`` §0). Our
sourced notes on Ollama's code reach v0.33.0-rc2, so 0.32 is the newest stable line they describe, and 0.32.15
is the latest 0.32 patch release we found published as a Docker tag. It belongs to the v0.30+ era, where
Ollama runs GGUFs on upstream llama-server:

* The runtime that loads our GGUF is llama.cpp's, the same loader family our CI exercises through
  llama-cpp-python. (In v0.12-v0.29 Ollama's own Go engine loaded qwen3 instead and silently read a
  mistyped GGUF key as 0, which nothing in our CI would catch.) ``ollama create`` on this era also runs every
  imported GGUF through ``llama-quantize``, so a broken file fails at build time, not at first chat.
* The Modelfile grammar of this era knows all eleven commands (``draft`` arrived in v0.23.1), so the port
  below is the full grammar.
* In this era Ollama picks between a Modelfile's Go TEMPLATE and the GGUF's own Jinja template. Our TEMPLATE
  matches the Jinja template's capabilities (tools with a tool round trip, thinking), so Ollama keeps it, and
  the Dockerfile also sets ``OLLAMA_GO_TEMPLATE=1`` so the choice does not rest on that heuristic.
* Newer tags exist (0.35, 0.40). We have not audited them, so we pin an exact tag and never ``latest``.

What the TEMPLATE does
----------------------
``TEMPLATE`` is Qwen3-4B-Thinking-2507's chat template (``chat_template.jinja``) rewritten in Go
``text/template``. It starts from the ollama.com library template for the qwen3 Thinking-2507 models and
changes what is needed so that its prompts are byte-identical to Hugging Face's for our test conversations:

* ChatML turns; the first system message, or the tool block with the system text in front of it, as the
  Jinja template lays them out; later system messages inline; tools as ``{{ json .Function }}``. (The library
  template's ``{{ .Function }}`` prints Go struct syntax since Ollama v0.14, ollama#14601.)
* Earlier assistant thinking is handled like Qwen3 handles it: it is dropped for turns before the last real
  user query and kept, inside ``<think>\\n...\\n</think>\\n\\n``, for assistant turns after it (the tool loop of the
  current turn). ``.Thinking`` sits inside ``range .Messages`` between the ``<think>``/``</think>`` text, which is
  how Ollama infers the thinking capability and its tags (``thinking/template.go: InferTags``).
* Tool calls are rendered inside ``{{ if .ToolCalls }}`` whose first text is ``<tool_call>``; Ollama's tool-call
  parser takes its start tag from exactly that spot (``tools/template.go: parseTag``). Consecutive tool
  results share one ``<|im_start|>user`` turn.
* The prompt ends in ``<|im_start|>assistant\\n<think>\\n`` (Thinking-2507 always thinks, so ``think: false``
  cannot switch it off; Ollama starts its thinking parser in the open state when the prompt ends in
  ``<think>``).

Deliberate differences from the Jinja template (all tested in ``tests/test_ollama_template.py``):

1. JSON in ``<tools>`` and in tool-call arguments is Go's ``json.Marshal`` (compact, map keys sorted, ``<``,
   ``>`` and ``&`` escaped as ``\\u003c`` etc.) where Jinja's ``tojson`` writes ``", "``/``": "`` in the caller's
   key order. The JSON values are equal. Ollama also drops JSON-schema keywords its ``ToolProperty`` lacks.
2. Go templates have no string functions, so thinking loses at most one leading and one trailing newline
   and the content after ``</think>`` at most one leading newline, where Jinja strips all of them. (Ollama's
   thinking parser already strips leading whitespace, so in practice only one trailing newline occurs.)
3. A final assistant message is an Ollama prefill: it is left open (no ``<|im_end|>``, no new generation
   prompt), which equals transformers' ``continue_final_message=True``.
4. Ollama itself, not the template, merges consecutive messages of the same role (except ``tool``) with a
   blank line (``template.go: collate``) and strips ``<think>`` blocks from earlier assistant content for the
   qwen3 family (``routes.go: filterThinkTags``); Jinja splits such content at ``</think>`` instead.
"""

from __future__ import annotations

import glob
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .io import PathError, check_output_path, require_regular_file, write_bytes_atomic

# --------------------------------------------------------------------------------------------------------
# Pins and defaults
# --------------------------------------------------------------------------------------------------------

OLLAMA_VERSION = "0.32.15"
OLLAMA_IMAGE = f"ollama/ollama:{OLLAMA_VERSION}"

MODEL_NAME = "so8t-qwen3-4b"
DEFAULT_QUANT = "q8_0"

# Thinking traces are long: Qwen recommends 32768 output tokens for most queries. Ollama's own default depends on
# the version and the GPU (2048, 4096, or 4k/32k/256k by VRAM since v0.20), so we always state it. The KV cache
# of Qwen3-4B (36 layers x 8 KV heads x 128 dims, f16) is 144 KiB per token: 4.5 GiB at 32768.
DEFAULT_NUM_CTX = 32768

# Qwen3-4B-Thinking-2507's generation_config / the ollama.com qwen3 params blob. repeat_penalty 1 = off.
DEFAULT_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("temperature", "0.6"),
    ("top_p", "0.95"),
    ("top_k", "20"),
    ("repeat_penalty", "1"),
    ("num_ctx", str(DEFAULT_NUM_CTX)),
    ("stop", "<|im_start|>"),
    ("stop", "<|im_end|>"),
)


def gguf_filename(name: str = MODEL_NAME, quant: str = DEFAULT_QUANT) -> str:
    """File name of the GGUF for a model name and quantisation, e.g. ``so8t-qwen3-4b-q8_0.gguf``."""
    return f"{name}-{quant}.gguf"


def modelfile_filename(name: str = MODEL_NAME) -> str:
    """File name of the Modelfile written next to that GGUF, e.g. ``so8t-qwen3-4b.Modelfile``."""
    return f"{name}.Modelfile"


# The checked-in Modelfile (repo-relative). It names ./gguf_filename(), which `so8t-export ollama -o modelfiles`
# writes next to it; the Dockerfile bind-mounts modelfiles/ and runs `ollama create` on this file.
CHECKED_IN_MODELFILE = Path("modelfiles") / modelfile_filename()


def ollama_create_command(modelfile_path: str | os.PathLike, name: str = MODEL_NAME) -> str:
    """The shell line that builds the Ollama model from a Modelfile."""
    return f"ollama create {name} -f {modelfile_path}"


# --------------------------------------------------------------------------------------------------------
# The Go TEMPLATE (see the module docstring for what it does and where it differs from the Jinja template)
# --------------------------------------------------------------------------------------------------------
#
# Reading notes: `{{-` trims the whitespace (newlines included) before the action, so a line that starts with
# `{{-` adds nothing to the output; every newline that reaches the prompt is one that no `{{-` eats. There is
# no arithmetic in text/template, so `len (slice $s 1)` is len($s)-1 and `eq (len (slice $.Messages $i)) 1`
# means "the last message". Conditions read thinking as `$m.Thinking` (a variable, not a field) so that the
# one `.Thinking` field Ollama's InferTags sees is the one between the <think> and </think> text. `and`/`or`
# short-circuit (Go >= 1.18; Ollama builds with a newer Go, the harness with Debian's 1.19).
TEMPLATE = r"""{{- $lastQuery := len .Messages }}
{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}
{{- $wrapped := false }}
{{- if ge (len $m.Content) 16 }}
{{- if and (eq (slice $m.Content 0 15) "<tool_response>") (eq (slice $m.Content (len (slice $m.Content 16))) "</tool_response>") }}
{{- $wrapped = true }}
{{- end }}
{{- end }}
{{- if not $wrapped }}{{ $lastQuery = $i }}{{ end }}
{{- end }}
{{- end }}
{{- if .Tools }}<|im_start|>system
{{ with .Messages }}{{ with index . 0 }}{{ if eq .Role "system" }}{{ .Content }}

{{ end }}{{ end }}{{ end }}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ json .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else }}{{ with .Messages }}{{ with index . 0 }}{{ if eq .Role "system" }}<|im_start|>system
{{ .Content }}<|im_end|>
{{ end }}{{ end }}{{ end }}{{ end }}
{{- $prev := "" }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (and (eq .Role "system") (ne $i 0)) }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}
{{- $think := and (gt $i $lastQuery) (or $last (ne $m.Thinking "")) }}
{{- $content := .Content }}
{{- if and $think $content }}{{ if eq (slice $content 0 1) "\n" }}{{ $content = slice $content 1 }}{{ end }}{{ end -}}
<|im_start|>assistant
{{ if $think }}<think>
{{ with .Thinking }}
{{- $t := . }}
{{- if eq (slice $t 0 1) "\n" }}{{ $t = slice $t 1 }}{{ end }}
{{- if $t }}{{ if eq (slice $t (len (slice $t 1))) "\n" }}{{ $t = slice $t 0 (len (slice $t 1)) }}{{ end }}{{ end }}
{{- $t }}
{{- end }}
</think>

{{ end }}{{ $content }}
{{- if and $m.ToolCalls $m.Content }}
{{ end }}
{{- if .ToolCalls }}
{{- range $j, $call := .ToolCalls }}<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- if ne (len (slice $m.ToolCalls $j)) 1 }}
{{ end }}
{{- end }}
{{- end }}
{{- if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}
{{- if ne $prev "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>
{{- if $last }}<|im_end|>
{{ else if ne (index (slice $.Messages $i) 1).Role "tool" }}<|im_end|>
{{ end }}
{{- end }}
{{- $prev = .Role }}
{{- end }}
{{- if ne $prev "assistant" }}<|im_start|>assistant
<think>
{{ end }}"""


# --------------------------------------------------------------------------------------------------------
# Errors and commands
# --------------------------------------------------------------------------------------------------------


class ModelfileError(ValueError):
    """A Modelfile Ollama would reject, or a value the Modelfile grammar cannot express.

    ``message`` is Ollama's own error text where Ollama has one (``ollama_error`` is the exact string the
    ``ollama`` client prints, which for parser errors already carries ``(line N): ``); ``line`` is the 1-based
    line it refers to, counted the way Ollama counts (see ``parse_modelfile``); ``hint`` says how to fix it.
    """

    def __init__(
        self, message: str, *, line: int | None = None, ollama_error: str | None = None, hint: str = ""
    ):
        self.message = message
        self.line = line
        self.ollama_error = ollama_error
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"(line {self.line}): {self.message}" if self.line else self.message
        return f"{text} ({self.hint})" if self.hint else text


@dataclass(frozen=True)
class Command:
    """One Modelfile command as Ollama's parser produces it.

    ``name`` is ``model`` for FROM, the lowercased command word otherwise, and the case-sensitive parameter name
    for PARAMETER. MESSAGE args are ``"role: text"``. ``line`` (where the command word starts) is not part of
    equality, so parsed commands compare equal to ones built by hand.
    """

    name: str
    args: str
    line: int = field(default=0, compare=False)


# --------------------------------------------------------------------------------------------------------
# parser.ParseFile
# --------------------------------------------------------------------------------------------------------

COMMANDS = (
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
)
MESSAGE_ROLES = ("system", "user", "assistant")

ERR_INVALID_COMMAND = 'command must be one of "from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message", or "requires"'
ERR_INVALID_MESSAGE_ROLE = 'message role must be one of "system", "user", or "assistant"'
ERR_MISSING_FROM = "no FROM line"
ERR_UNEXPECTED_EOF = "unexpected EOF"

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)
_EOF = object()  # io.ErrUnexpectedEOF from parseRuneForState


def _is_alpha(r: str) -> bool:
    return "a" <= r <= "z" or "A" <= r <= "Z"


def _is_number(r: str) -> bool:
    return "0" <= r <= "9"


def _is_space(r: str) -> bool:
    return r == " " or r == "\t"


def _is_newline(r: str) -> bool:
    return r == "\r" or r == "\n"


def go_is_print(r: str) -> bool:
    """Go's ``strconv.IsPrint``: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return r == " " or unicodedata.category(r)[0] in "LMNPS"


def _trim_space(s: str) -> str:
    # strings.TrimSpace; the parser's buffer only ever holds printable runes plus space, tab, CR and LF.
    return s.strip(" \t\r\n\v\f")


def _unquote(s: str) -> tuple[str, bool]:
    """parser.unquote: strip one level of ``\"\"\"`` or ``\"`` quoting; ``ok`` is False while a quote is open."""
    if s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if s[:1] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


def _decode(data: bytes | str) -> str:
    """unicode.BOMOverride(UTF8 decoder): a UTF-8 or UTF-16 BOM picks the encoding, else UTF-8."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "replace")
    if data.startswith(b"\xfe\xff"):
        return data[2:].decode("utf-16-be", "replace")
    if data.startswith(b"\xff\xfe"):
        return data[2:].decode("utf-16-le", "replace")
    return data.decode("utf-8", "replace")


def _next_state(r: str, state: int) -> tuple[int, str | None, object]:
    """parser.parseRuneForState: (next state, rune to keep or None, error)."""
    if state == _NIL:
        if r == "#":
            return _COMMENT, None, None
        if _is_space(r) or _is_newline(r):
            return _NIL, None, None
        return _NAME, r, None
    if state == _NAME:
        if _is_alpha(r):
            return _NAME, r, None
        if _is_space(r):
            return _VALUE, None, None
        return _NIL, None, ERR_INVALID_COMMAND
    if state == _VALUE:
        if _is_newline(r) or _is_space(r):
            return _NIL, r, None
        return _VALUE, r, None
    if state == _PARAMETER:
        if _is_alpha(r) or _is_number(r) or r == "_":
            return _PARAMETER, r, None
        if _is_space(r):
            return _VALUE, None, None
        return _NIL, None, _EOF
    if state == _MESSAGE:
        if _is_alpha(r):
            return _MESSAGE, r, None
        if _is_space(r):
            return _VALUE, None, None
        return _NIL, None, _EOF
    # _COMMENT
    if _is_newline(r):
        return _NIL, None, None
    return _COMMENT, None, None


def parse_modelfile(data: bytes | str) -> list[Command]:
    """Parse a Modelfile exactly as Ollama's ``parser.ParseFile`` does.

    Line numbers are Ollama's: the counter goes up on every CR or LF *before* that rune is processed, so an
    error raised by a line break (``FROM`` followed by a newline, say) names the next line, and CRLF counts two.
    """
    text = _decode(data)
    commands: list[Command] = []
    name = ""
    role = ""
    state = _NIL
    line = 1
    cmd_line = 1
    buf: list[str] = []

    for r in text:
        if _is_newline(r):
            line += 1
        nxt, keep, err = _next_state(r, state)
        if err is _EOF:
            got = "".join(buf)
            raise ModelfileError(
                f"{ERR_UNEXPECTED_EOF}: {got}",
                line=line,
                ollama_error=f"{ERR_UNEXPECTED_EOF}: {got}",
                hint=f"{'PARAMETER' if state == _PARAMETER else 'MESSAGE'} {got} needs a value on the same line",
            )
        if err is not None:
            raise ModelfileError(str(err), line=line, ollama_error=f"(line {line}): {err}")

        if nxt != state:
            if state == _NAME:
                word = "".join(buf)
                if word.lower() not in COMMANDS:
                    raise ModelfileError(
                        ERR_INVALID_COMMAND, line=line, ollama_error=f"(line {line}): {ERR_INVALID_COMMAND}"
                    )
                lowered = word.lower()
                if lowered == "from":
                    name = "model"
                elif lowered == "parameter":
                    nxt = _PARAMETER  # the name is set when the parameter name ends
                elif lowered == "message":
                    nxt = _MESSAGE
                    name = lowered
                else:
                    name = lowered
            elif state == _PARAMETER:
                name = "".join(buf)  # not lowercased: parameter names are case-sensitive
            elif state == _MESSAGE:
                word = "".join(buf)
                if word not in MESSAGE_ROLES:
                    raise ModelfileError(
                        ERR_INVALID_MESSAGE_ROLE,
                        line=line,
                        ollama_error=f"(line {line}): {ERR_INVALID_MESSAGE_ROLE}",
                    )
                role = word
            elif state == _VALUE:
                value, ok = _unquote(_trim_space("".join(buf)))
                if not ok or _is_space(r):
                    # Inside an open quote (or at a space) the rune is kept as is, CR/LF/tab included.
                    buf.append(r)
                    continue
                if role:
                    value = f"{role}: {value}"
                    role = ""
                commands.append(Command(name, value, cmd_line))
            if state == _NIL and nxt == _NAME:
                cmd_line = line
            buf = []
            state = nxt

        if keep is not None and go_is_print(keep):
            buf.append(keep)

    if state == _VALUE:
        value, ok = _unquote(_trim_space("".join(buf)))
        if not ok:
            opener = '"""' if "".join(buf).lstrip(" \t\r\n")[:3] == '"""' else '"'
            raise ModelfileError(
                ERR_UNEXPECTED_EOF,
                line=cmd_line,
                ollama_error=ERR_UNEXPECTED_EOF,
                hint=f"the {opener} opened in the command on this line is never closed",
            )
        if role:
            value = f"{role}: {value}"
        commands.append(Command(name, value, cmd_line))
    elif state not in (_NIL, _COMMENT):
        raise ModelfileError(
            ERR_UNEXPECTED_EOF,
            line=cmd_line,
            ollama_error=ERR_UNEXPECTED_EOF,
            hint="the file ends inside a command",
        )

    if not any(c.name == "model" for c in commands):
        raise ModelfileError(ERR_MISSING_FROM, ollama_error=ERR_MISSING_FROM)
    return commands


# --------------------------------------------------------------------------------------------------------
# CreateRequest / api.FormatParams
# --------------------------------------------------------------------------------------------------------

# json tags of api.Options (and its embedded api.Runner) at the pinned version, by Go kind.
PARAMETER_TYPES: dict[str, str] = {
    **dict.fromkeys(
        (
            "num_ctx",
            "num_batch",
            "num_gpu",
            "main_gpu",
            "num_thread",
            "draft_num_predict",
            "num_keep",
            "seed",
            "num_predict",
            "top_k",
            "repeat_last_n",
        ),
        "int",
    ),
    **dict.fromkeys(
        (
            "top_p",
            "min_p",
            "typical_p",
            "temperature",
            "repeat_penalty",
            "presence_penalty",
            "frequency_penalty",
        ),
        "float",
    ),
    "use_mmap": "bool",
    "stop": "list",
}

# parser.deprecatedParameters: accepted with a printed warning and dropped.
DEPRECATED_PARAMETERS = (
    "penalize_newline",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mlock",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)

_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103  # round-to-nearest-even sends |x| >= this to +-Inf in float32
_DEC_FLOAT = re.compile(r"[+-]?(?=\.?[0-9])[0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9_]+)?")
_HEX_FLOAT = re.compile(r"[+-]?0[xX](?=\.?[0-9a-fA-F_])[0-9a-fA-F_]*(?:\.[0-9a-fA-F_]*)?[pP][+-]?[0-9_]+")


def _underscores_ok(s: str) -> bool:
    """strconv.underscoreOK: each '_' sits between digits (a base prefix counts as a digit)."""
    body = s.lstrip("+-")
    prefix = 2 if body[:2].lower() == "0x" else 0
    prev = "0" if prefix else "^"
    for ch in body[prefix:]:
        if ch == "_":
            if prev != "0":
                return False
            prev = "_"
        elif ch in "0123456789abcdefABCDEF" and (prefix or ch.isdigit()):
            prev = "0"
        else:
            if prev == "_":
                return False
            prev = "!"
    return prev != "_"


def go_parse_float32(s: str) -> float:
    """``strconv.ParseFloat(s, 32)``; raises ValueError on what Go rejects (syntax or float32 overflow)."""
    low = s.lower()
    sign = -1.0 if low.startswith("-") else 1.0
    unsigned = low[1:] if low[:1] in "+-" else low
    if unsigned in ("inf", "infinity"):
        return sign * math.inf
    if low == "nan":  # Go accepts no sign on NaN
        return math.nan
    if _DEC_FLOAT.fullmatch(s):
        value = float(s.replace("_", "")) if ("_" not in s or _underscores_ok(s)) else None
    elif _HEX_FLOAT.fullmatch(s):
        value = float.fromhex(s.replace("_", "")) if ("_" not in s or _underscores_ok(s)) else None
    else:
        value = None
    if value is None:
        raise ValueError(f"strconv.ParseFloat: parsing {s!r}: invalid syntax")
    if abs(value) >= _FLOAT32_OVERFLOW:
        raise ValueError(f"strconv.ParseFloat: parsing {s!r}: value out of range")
    return value


def go_parse_int(s: str) -> int:
    """``strconv.ParseInt(s, 10, 64)``."""
    if not re.fullmatch(r"[+-]?[0-9]+", s):
        raise ValueError(f"strconv.ParseInt: parsing {s!r}: invalid syntax")
    value = int(s)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"strconv.ParseInt: parsing {s!r}: value out of range")
    return value


def go_parse_bool(s: str) -> bool:
    """``strconv.ParseBool``."""
    if s in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if s in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"strconv.ParseBool: parsing {s!r}: invalid syntax")


def format_parameter(name: str, value: str) -> int | float | bool | list[str]:
    """``api.FormatParams`` for one ``PARAMETER name value``: the typed value, or ModelfileError with Ollama's text.

    Go formats the value list with ``%s``, hence the brackets: ``invalid float value [abc]``.
    """
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter '{name}'", ollama_error=f"unknown parameter '{name}'")
    try:
        if kind == "int":
            return go_parse_int(value)
        if kind == "float":
            return go_parse_float32(value)
        if kind == "bool":
            return go_parse_bool(value)
        return [value]
    except ValueError:
        msg = f"invalid {kind} value [{value}]"
        raise ModelfileError(msg, ollama_error=msg) from None


def _semver_ok(v: str) -> bool:
    """golang.org/x/mod/semver.IsValid after CreateRequest's "v" prefixing (v1 and v1.2 are valid shorthands)."""
    num = r"(?:0|[1-9][0-9]*)"
    ident = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    pattern = (
        rf"v{num}(?:\.{num}(?:\.{num}(?:-{ident}(?:\.{ident})*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?)?)?"
    )
    return re.fullmatch(pattern, v) is not None


def expand_path(path: str, relative_dir: str | os.PathLike) -> str:
    """parser.expandPath: absolute as is, ``~``/``~user`` expanded, anything else relative to the Modelfile's dir."""
    if os.path.isabs(path) or path.startswith(("/", "\\")):
        return os.path.abspath(path)
    if path.startswith("~"):
        return os.path.abspath(os.path.expanduser(path))
    return os.path.abspath(os.path.join(relative_dir, path))


def _local_matches(path: str) -> list[str]:
    if glob.has_magic(path):
        return sorted(glob.glob(path))
    return [path] if os.path.exists(path) else []


@dataclass
class ModelfileCheck:
    """What ``check_commands`` found: the commands, the typed parameters as Ollama sends them, and warnings."""

    commands: list[Command]
    parameters: dict[str, int | float | bool | list[str]]
    warnings: list[str]
    model_files: list[str]  # FROM paths that resolved to local files (empty if not checked)


def check_commands(
    commands: Sequence[Command], *, base_dir: str | os.PathLike | None = None, require_files: bool = True
) -> ModelfileCheck:
    """Ollama's ``Modelfile.CreateRequest`` checks on parsed commands, plus two of ours.

    With ``base_dir`` (the Modelfile's directory) FROM/ADAPTER/DRAFT paths are resolved like Ollama does.
    ADAPTER and DRAFT must exist (Ollama fails on them too). A FROM that names no local file is *not* an error
    for Ollama, which then pulls it from the registry as a model name; with ``require_files`` we reject it,
    because for us it always means a GGUF that is missing or misnamed.
    Ours: a warning when TEMPLATE, SYSTEM, RENDERER or PARSER is given twice (Ollama silently keeps the last).
    """
    params: dict[str, int | float | bool | list[str]] = {}
    warnings: list[str] = []
    model_files: list[str] = []
    seen: dict[str, int] = {}
    for c in commands:
        if c.name in ("template", "system", "renderer", "parser"):
            if c.name in seen:
                warnings.append(
                    f"(line {c.line}): {c.name.upper()} given again (first on line {seen[c.name]}); Ollama keeps only the last one"
                )
            seen.setdefault(c.name, c.line)
        if c.name in ("model", "draft", "adapter"):
            if base_dir is None:
                continue
            path = expand_path(c.args, base_dir)
            found = _local_matches(path)
            if c.name == "model":
                if found:
                    model_files.extend(found)
                elif require_files:
                    raise ModelfileError(
                        f"FROM {c.args}: no file at {path}",
                        line=c.line,
                        hint=f"Ollama would take {c.args!r} for a model name and try to pull it from the registry; "
                        "FROM paths are relative to the Modelfile's directory",
                    )
            elif not found and require_files:
                msg = f"stat {path}: no such file or directory"
                raise ModelfileError(msg, line=c.line, ollama_error=msg)
        elif c.name == "requires":
            v = c.args if c.args.startswith("v") else "v" + c.args
            if not _semver_ok(v):
                msg = "requires must be a valid semver (e.g. 0.14.0)"
                raise ModelfileError(msg, line=c.line, ollama_error=msg)
        elif c.name in ("template", "system", "license", "renderer", "parser", "message"):
            pass
        elif c.name in DEPRECATED_PARAMETERS:
            warnings.append(f"(line {c.line}): parameter {c.name} is deprecated; Ollama ignores it")
        else:
            try:
                value = format_parameter(c.name, c.args)
            except ModelfileError as e:
                e.line = c.line
                raise
            if isinstance(value, list):
                params.setdefault(c.name, [])
                params[c.name].extend(value)  # type: ignore[union-attr]
            else:
                params[c.name] = value
    return ModelfileCheck(list(commands), params, warnings, model_files)


def check_modelfile(path: str | os.PathLike, *, require_files: bool = True) -> ModelfileCheck:
    """Parse and check a Modelfile on disk as ``ollama create -f path`` would (see ``check_commands``).

    The TEMPLATE's Go syntax is not checked here (that needs Go's text/template; ``ollama_template/`` does it).
    """
    path = Path(path)
    try:
        require_regular_file(path, "Modelfile")
    except PathError as err:
        raise ModelfileError(str(err)) from None
    commands = parse_modelfile(path.read_bytes())
    return check_commands(commands, base_dir=path.resolve().parent, require_files=require_files)


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------

_HEADER = (
    "# SO8T (Qwen3-4B-Thinking-2507 with SO(8) triality rotations folded into the weights) for Ollama.\n"
    "# Generated by so8t-export (so8t_export/modelfile.py), checked against the Modelfile grammar of Ollama\n"
    f"# {OLLAMA_VERSION} ({OLLAMA_IMAGE}). Check edits with `so8t-export modelfile --check FILE`.\n"
)


def _check_expressible(keyword: str, value: str) -> None:
    if '"""' in value:
        raise ModelfileError(
            f'the {keyword} text contains """, which a Modelfile cannot express',
            hint='Ollama\'s parser has no escape sequences, so a """ inside the value would end it early; '
            "reword the text without three double quotes in a row",
        )
    for i, ch in enumerate(value):
        if ch not in "\t\r\n" and not go_is_print(ch):
            raise ModelfileError(
                f"the {keyword} text contains U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')}) at offset {i}, "
                "which Ollama's parser silently drops",
                hint="Ollama keeps only printable characters (Go's strconv.IsPrint) plus tab and line breaks",
            )


def _quote(keyword: str, value: str) -> str:
    """A value as Ollama parses it back: bare when that is unambiguous, else in triple quotes."""
    _check_expressible(keyword, value)
    if (
        value
        and value == _trim_space(value)
        and "\n" not in value
        and "\r" not in value
        and not value.startswith('"')
    ):
        return value
    return f'"""{value}"""'


def _merge_parameters(num_ctx: int, overrides: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """DEFAULT_PARAMETERS with num_ctx set; a key in ``overrides`` replaces all its defaults, in place."""
    if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or num_ctx <= 0:
        raise ModelfileError(f"num_ctx must be a positive integer, got {num_ctx!r}")
    defaults = [(k, str(num_ctx) if k == "num_ctx" else v) for k, v in DEFAULT_PARAMETERS]
    for key, _ in overrides:
        if key == "num_ctx":
            raise ModelfileError("num_ctx is set with num_ctx= (--num-ctx), not as a parameter override")
    by_key: dict[str, list[str]] = {}
    for key, value in overrides:
        by_key.setdefault(key, []).append(value)
    merged: list[tuple[str, str]] = []
    done: set[str] = set()
    for key, value in defaults:
        if key in by_key:
            if key not in done:
                merged.extend((key, v) for v in by_key[key])
                done.add(key)
        else:
            merged.append((key, value))
    merged.extend((k, v) for k, v in overrides if k not in done)
    return merged


def _from_value(gguf_path: str | os.PathLike, modelfile_path: str | os.PathLike) -> str:
    gguf = os.path.abspath(gguf_path)
    base = os.path.dirname(os.path.abspath(modelfile_path))
    try:
        rel = os.path.relpath(gguf, base)
    except ValueError:  # another drive on Windows: only an absolute path works
        return Path(gguf).as_posix()
    rel = Path(rel).as_posix()
    return rel if rel.startswith("../") else "./" + rel


def render_modelfile(
    gguf_path: str | os.PathLike,
    modelfile_path: str | os.PathLike,
    *,
    system: str | None = None,
    num_ctx: int = DEFAULT_NUM_CTX,
    parameters: Iterable[tuple[str, str]] = (),
) -> str:
    """The Modelfile text for a GGUF, validated before it is returned.

    ``FROM`` names the GGUF relative to the directory of ``modelfile_path`` (Ollama resolves it from there);
    neither file has to exist yet. ``parameters`` are ``(name, value)`` pairs that replace the defaults of the
    same name (``stop`` may repeat). Raises ModelfileError for a value the grammar cannot express (a ``\"\"\"`` in
    the system prompt, say) or a parameter Ollama would reject.
    """
    overrides = [(str(k), str(v)) for k, v in parameters]
    wanted = [Command("model", _from_value(gguf_path, modelfile_path)), Command("template", TEMPLATE)]
    if system is not None:
        wanted.append(Command("system", system))
    wanted += [Command(k, v) for k, v in _merge_parameters(num_ctx, overrides)]

    lines = []
    for c in wanted:
        if c.name == "model":
            lines.append(f"FROM {_quote('FROM', c.args)}")
        elif c.name in ("template", "system"):
            _check_expressible(c.name.upper(), c.args)
            lines.append(f'{c.name.upper()} """{c.args}"""')
        else:
            if not re.fullmatch(r"[A-Za-z0-9_]+", c.name):
                raise ModelfileError(f"parameter name {c.name!r} may only contain letters, digits and _")
            format_parameter(c.name, c.args)
            lines.append(f"PARAMETER {c.name} {_quote(f'PARAMETER {c.name}', c.args)}")
    text = _HEADER + "\n".join(lines) + "\n"

    parsed = parse_modelfile(text)
    if (
        parsed != wanted
    ):  # the quoting rules above should make this impossible; never write a file that drifts
        raise ModelfileError(
            "internal error: the rendered Modelfile does not parse back to the intended commands"
        )
    check_commands(parsed)
    return text


def write_modelfile(
    gguf_path: str | os.PathLike,
    modelfile_path: str | os.PathLike,
    *,
    system: str | None = None,
    num_ctx: int = DEFAULT_NUM_CTX,
    parameters: Iterable[tuple[str, str]] = (),
) -> Path:
    """Render (see ``render_modelfile``) and write the Modelfile atomically: a failure leaves no file behind."""
    text = render_modelfile(gguf_path, modelfile_path, system=system, num_ctx=num_ctx, parameters=parameters)
    out = Path(modelfile_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        check_output_path(out, [Path(gguf_path)])
    except PathError as err:
        raise ModelfileError(str(err)) from None
    return write_bytes_atomic(out, text.encode("utf-8"))
