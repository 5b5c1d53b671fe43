"""Ollama Modelfile for SO8T: the Go chat TEMPLATE, default PARAMETERs, a renderer and a validator.

The validator is our own description of the Modelfile language that ``ollama create`` reads: the commands,
quote marks and parameter types are tables (see "The grammar, as data" below) and a small scanner reads a file
against them. It was written from reading Ollama's parser, and tests/test_modelfile_differential.py holds it
against Ollama's own ``parser`` and ``api`` packages on a few hundred Modelfiles:

* ``parse_modelfile`` accepts what ``parser.ParseFile`` accepts and yields the same commands (case rules,
  quoting, comments, byte order marks, dropped unprintable characters), with Ollama's error texts;
* ``check_grammar`` adds the request ``ollama create`` builds from them (``Modelfile.CreateRequest``):
  parameter names are the json tags of ``api.Options``, values are read with Go's ``strconv`` rules, repeated
  ``stop`` accumulates, any other repeated key keeps the last value, deprecated names only warn, REQUIRES
  must be semver;
* ``check_modelfile`` then looks at the files FROM/ADAPTER/DRAFT name, and refuses a FROM that is not there
  (Ollama would try to pull it from the registry).

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
* The Modelfile grammar of this era knows all eleven commands (``draft`` arrived in v0.23.1), so the grammar
  below is the full one.
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

import bisect
import codecs
import math
import os
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
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

    ``message`` is the text Ollama prints for the same problem where it has one, so users can search for
    it; ``ollama_error`` is the exact string the ``ollama`` client prints (for syntax errors it carries
    Ollama's own ``(line N): `` prefix, with Ollama's way of counting lines). ``line`` is ours: the 1-based
    line, as an editor counts it, on which the offending command starts. ``hint`` says how to fix it.
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
    """One parsed Modelfile command, named the way Ollama's request builder dispatches on it.

    ``name`` is ``model`` for FROM, the parameter name (case kept) for PARAMETER, and the lowercased keyword
    otherwise. MESSAGE args are ``"role: text"``. ``line`` (where the keyword starts) and ``keyword`` (the
    lowercased command word as written, e.g. ``parameter``) are not part of equality, so parsed commands
    compare equal to ones built by hand.
    """

    name: str
    args: str
    line: int = field(default=0, compare=False)
    keyword: str = field(default="", compare=False)


# --------------------------------------------------------------------------------------------------------
# The grammar, as data
# --------------------------------------------------------------------------------------------------------
#
# A Modelfile is a sequence of commands; blanks, line ends and comment lines may come between them:
#
#     command  :=  KEYWORD SEP [HEAD SEP] VALUE
#     comment  :=  "#" ... up to the end of the line (only where a command could start)
#
# KEYWORD is a word from GRAMMAR in any case, SEP is exactly one space or tab, HEAD is the word some
# keywords take before the value (PARAMETER's name, MESSAGE's role), and VALUE is the rest of the line, or
# several lines when it is quoted (QUOTES). Every CR and every LF ends a line on its own (so CRLF is a line
# end and an empty line). Characters Go's strconv.IsPrint calls unprintable are dropped wherever they
# appear, except the blanks and line ends that the rules below keep. This is the language Ollama 0.32.15's
# parser accepts, oddities included; tests/test_modelfile_differential.py holds it against that parser on
# a few hundred Modelfiles.

BLANKS = " \t"
LINE_ENDS = "\r\n"
COMMENT = "#"
LETTERS = string.ascii_letters

# Quote marks, tried in this order. There are no escape sequences and no single quotes. A quoted value ends at
# the first line end where the line, less trailing blanks, ends in the same mark, and the opening and closing
# marks do not overlap (`"""` alone on a line opens a value, it does not close one).
QUOTES = ('"""', '"')

MESSAGE_ROLES = ("system", "user", "assistant")


def _one_of(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return ", ".join(quoted[:-1]) + f", or {quoted[-1]}"


# Ollama's texts, which users see in `ollama create` and search for (ERR_INVALID_COMMAND is below GRAMMAR).
ERR_INVALID_MESSAGE_ROLE = f"message role must be one of {_one_of(MESSAGE_ROLES)}"


@dataclass(frozen=True)
class Head:
    """The word between a keyword and its value."""

    label: str  # for hints: "parameter name", "message role"
    chars: str  # the characters it is made of
    chars_in_words: str  # the same, for hints
    choices: tuple[str, ...] = ()  # when given, the only words allowed (case-sensitive)...
    not_a_choice: str = ""  # ...and Ollama's text for any other


@dataclass(frozen=True)
class Keyword:
    """What a command keyword produces: ``Command(name, args)``."""

    name: str | None  # None: the head word is the name (PARAMETER)
    head: Head | None = None
    args: str = "{value}"  # how the args string is made from the head word and the value


PARAMETER_NAME = Head("parameter name", LETTERS + string.digits + "_", "letters, digits and _")
MESSAGE_ROLE = Head("message role", LETTERS, "letters", MESSAGE_ROLES, ERR_INVALID_MESSAGE_ROLE)

# In the order Ollama lists them in its error text.
GRAMMAR: dict[str, Keyword] = {
    "from": Keyword("model"),
    "license": Keyword("license"),
    "template": Keyword("template"),
    "system": Keyword("system"),
    "adapter": Keyword("adapter"),
    "draft": Keyword("draft"),
    "renderer": Keyword("renderer"),
    "parser": Keyword("parser"),
    "parameter": Keyword(None, PARAMETER_NAME),
    "message": Keyword("message", MESSAGE_ROLE, "{head}: {value}"),
    "requires": Keyword("requires"),
}
COMMANDS = tuple(GRAMMAR)

ERR_INVALID_COMMAND = f"command must be one of {_one_of(COMMANDS)}"
ERR_MISSING_FROM = "no FROM line"
ERR_UNEXPECTED_EOF = "unexpected EOF"

# Go's unicode tables are Unicode 15.0; Python's unicodedata is older on Python 3.10 (13.0) and 3.11 (14.0).
# These are the characters Unicode 15.0 added in printable categories (computed with Go 1.26 against
# Python 3.11), so that go_is_print is exact on 3.11 and 3.12. Python 3.13+ knows newer characters, which
# Go would still drop.
_UNICODE_15_PRINTABLE = (
    (0x0CF3, 0x0CF3), (0x0ECE, 0x0ECE), (0x10EFD, 0x10EFF), (0x1123F, 0x11241), (0x11B00, 0x11B09),
    (0x11F00, 0x11F10), (0x11F12, 0x11F3A), (0x11F3E, 0x11F59), (0x1342F, 0x1342F), (0x13440, 0x13455),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1D2C0, 0x1D2D3), (0x1DF25, 0x1DF2A), (0x1E030, 0x1E06D),
    (0x1E08F, 0x1E08F), (0x1E4D0, 0x1E4F9), (0x1F6DC, 0x1F6DC), (0x1F774, 0x1F776), (0x1F77B, 0x1F77F),
    (0x1F7D9, 0x1F7D9), (0x1FA75, 0x1FA77), (0x1FA87, 0x1FA88), (0x1FAAD, 0x1FAAF), (0x1FABB, 0x1FABD),
    (0x1FABF, 0x1FABF), (0x1FACE, 0x1FACF), (0x1FADA, 0x1FADB), (0x1FAE8, 0x1FAE8), (0x1FAF7, 0x1FAF8),
    (0x2B739, 0x2B739), (0x31350, 0x323AF),
)  # fmt: skip
_NEEDS_UNICODE_15 = tuple(int(p) for p in unicodedata.unidata_version.split(".")) < (15, 0)
_U15_STARTS = [start for start, _ in _UNICODE_15_PRINTABLE]


def go_is_print(ch: str) -> bool:
    """Go's ``strconv.IsPrint``: letters, marks, numbers, punctuation, symbols and the ASCII space.

    That is Python's ``str.isprintable`` definition too; only the Unicode versions differ (see above).
    """
    if ch.isprintable():
        return True
    if _NEEDS_UNICODE_15:
        i = bisect.bisect_right(_U15_STARTS, ord(ch)) - 1
        return i >= 0 and ord(ch) <= _UNICODE_15_PRINTABLE[i][1]
    return False


def _kept(segment: str) -> str:
    """A piece of one line as the parser keeps it: unprintable characters dropped, blanks kept."""
    if segment.isprintable():
        return segment
    return "".join(ch for ch in segment if ch == "\t" or go_is_print(ch))


# --------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------
#
# Ollama reads a Modelfile as UTF-8 unless it starts with a byte order mark, which picks UTF-8, UTF-16BE or
# UTF-16LE (and is dropped). Malformed input turns into U+FFFD, which is printable and so stays in the text.
# How many U+FFFD depends on the path: plain UTF-8 goes through a decoder that replaces each maximal
# ill-formed subsequence by one U+FFFD (as Python's "replace" does); after a UTF-8 BOM the bytes are read
# rune by rune, one U+FFFD per bad byte; UTF-16 pairs surrogates where it can, and a surrogate followed by a
# low surrogate is always taken as a pair (one U+FFFD if that pair is not valid).


def _one_replacement_per_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    return "\ufffd", err.start + 1


codecs.register_error("so8t-modelfile-per-byte", _one_replacement_per_byte)

_LONE_SURROGATES = re.compile("[\ud800-\udfff][\udc00-\udfff]?")


def _decode_utf16(data: bytes, codec: str) -> str:
    tail = "\ufffd" if len(data) % 2 else ""  # an odd byte at the end
    units = data[: len(data) - len(data) % 2].decode(codec, "surrogatepass")  # valid pairs are joined here
    return _LONE_SURROGATES.sub("\ufffd", units) + tail


def decode_modelfile(data: bytes | str) -> str:
    """The text Ollama's parser reads from these bytes (a ``str`` is taken as its UTF-8 encoding)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "so8t-modelfile-per-byte")
    if data.startswith(b"\xfe\xff"):
        return _decode_utf16(data[2:], "utf-16-be")
    if data.startswith(b"\xff\xfe"):
        return _decode_utf16(data[2:], "utf-16-le")
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------

_LINE_END = re.compile("[\r\n]")
_EDITOR_LINE_END = re.compile("\r\n|\r|\n")


def _line_end(text: str, pos: int) -> int:
    m = _LINE_END.search(text, pos)
    return m.start() if m else len(text)


def read_value(text: str, pos: int = 0) -> tuple[str | None, int]:
    """Read the VALUE that starts at ``text[pos]``: ``(value, where the next command may start)``.

    The value is ``None`` when a quote is still open at the end of the text. A bare value is the rest of the
    line less surrounding blanks; the first non-blank characters decide whether it is quoted (``QUOTES``).
    """
    end = _line_end(text, pos)
    first = _kept(text[pos:end]).lstrip(BLANKS)
    whole = first.rstrip(BLANKS)
    quote = next((q for q in QUOTES if whole.startswith(q)), "")
    if not quote:
        return whole, end + 1
    if len(whole) >= 2 * len(quote) and whole.endswith(quote):
        return whole[len(quote) : -len(quote)], end + 1
    parts = [first]
    while end < len(text):
        parts.append(text[end])  # inside quotes a line end is part of the value
        pos = end + 1
        end = _line_end(text, pos)
        line = _kept(text[pos:end])
        parts.append(line)
        if line.rstrip(BLANKS).endswith(quote):
            body = "".join(parts).rstrip(BLANKS)
            return body[len(quote) : -len(quote)], end + 1
    return None, end


class _Source:
    """The decoded text plus line bookkeeping for commands and errors."""

    def __init__(self, text: str):
        self.text = text
        self._starts = [0] + [m.end() for m in _EDITOR_LINE_END.finditer(text)]

    def line(self, pos: int) -> int:
        """Our line number: as an editor counts lines (CRLF is one line end)."""
        return bisect.bisect_right(self._starts, pos)

    def ollama_line(self, pos: int) -> int:
        """Ollama's line number for an error raised by the character at ``pos``: it counts every CR and every
        LF up to and including that character (so a command cut short by its line end reports the next line,
        and CRLF counts two)."""
        return 1 + len(_LINE_END.findall(self.text, 0, pos + 1))

    def error(self, message: str, *, start: int, at: int | None = None, hint: str = "") -> ModelfileError:
        """A syntax error in the command starting at ``start``; ``at`` is where Ollama notices it (None:
        Ollama reports it without a line number)."""
        ollama = message if at is None else f"(line {self.ollama_line(at)}): {message}"
        return ModelfileError(message, line=self.line(start), ollama_error=ollama, hint=hint)


def _skip_gaps(text: str, pos: int) -> int:
    """Skip blanks, line ends and comments up to the next command (or the end)."""
    while pos < len(text):
        ch = text[pos]
        if ch in BLANKS or ch in LINE_ENDS:
            pos += 1
        elif ch == COMMENT:
            pos = _line_end(text, pos)
        else:
            break
    return pos


def _run(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _describe(ch: str) -> str:
    return "the line end" if ch in LINE_ENDS else repr(ch)


def _short(word: str, limit: int = 40) -> str:
    return repr(word) if len(word) <= limit else repr(word[:limit]) + "..."


def _command(src: _Source, start: int) -> tuple[Command, int]:
    text = src.text
    # The keyword: its first character is taken whatever it is (an unprintable one is dropped, which is why a
    # stray BOM or NUL in front of a keyword goes unnoticed); letters follow.
    stop = _run(text, start + 1, LETTERS)
    word = _kept(text[start:stop])
    if stop == len(text):
        hint = f"the file ends in the command word {_short(word)}"
        raise src.error(ERR_UNEXPECTED_EOF, start=start, hint=hint)
    keyword = GRAMMAR.get(word.lower()) if text[stop] in BLANKS else None
    if keyword is None:
        if word.lower() in GRAMMAR:
            hint = f"{word.upper()} needs a space and a value on the same line, not {_describe(text[stop])}"
        elif text[stop] in BLANKS:
            hint = f"{_short(word)} is not a Modelfile command"
        else:
            hint = f"a command word is letters followed by a space; found {_describe(text[stop])}"
        raise src.error(ERR_INVALID_COMMAND, start=start, at=stop, hint=hint)
    pos = stop + 1

    head = ""
    if keyword.head is not None:
        stop = _run(text, pos, keyword.head.chars)
        head = text[pos:stop]
        label = f"{word.upper()} {head[:40]}{'...' if len(head) > 40 else ''}".rstrip()
        if stop == len(text):
            raise src.error(ERR_UNEXPECTED_EOF, start=start, hint=f"the file ends after {label}")
        if text[stop] not in BLANKS:  # Ollama's text here is odd, but it is the one users will search for
            if text[stop] in LINE_ENDS:
                hint = f"{label} needs a value on the same line"
            else:
                found = _describe(text[stop])
                hint = f"a {keyword.head.label} has only {keyword.head.chars_in_words}; found {found}"
            raise src.error(f"{ERR_UNEXPECTED_EOF}: {head}", start=start, hint=hint)
        if keyword.head.choices and head not in keyword.head.choices:
            hint = f"got {_short(head)}" + ("; it is case-sensitive" if head.lower() in keyword.head.choices else "")
            raise src.error(keyword.head.not_a_choice, start=start, at=stop, hint=hint)
        pos = stop + 1

    value_start = pos
    value, pos = read_value(text, pos)
    if value is None:
        first_line = _kept(text[value_start : _line_end(text, value_start)]).lstrip(BLANKS)
        opener = next(q for q in QUOTES if first_line.startswith(q))
        raise src.error(
            ERR_UNEXPECTED_EOF,
            start=start,
            hint=f"the {opener} opened on this line is never closed: "
            f"a quoted value ends at a line ending in {opener}",
        )
    name = keyword.name if keyword.name is not None else head
    args = keyword.args.format(head=head, value=value)
    return Command(name, args, src.line(start), word.lower()), pos


def parse_modelfile(data: bytes | str) -> list[Command]:
    """The commands of a Modelfile, or ModelfileError where Ollama's parser (``ollama create``) refuses it.

    Accepts the bytes of a file (see ``decode_modelfile``) or text. A file without any ``model`` command
    (FROM, or a PARAMETER named ``model``) is refused after the whole file has been read.
    """
    src = _Source(decode_modelfile(data))
    commands: list[Command] = []
    pos = _skip_gaps(src.text, 0)
    while pos < len(src.text):
        command, pos = _command(src, pos)
        commands.append(command)
        pos = _skip_gaps(src.text, pos)
    if not any(c.name == "model" for c in commands):
        raise ModelfileError(ERR_MISSING_FROM, ollama_error=ERR_MISSING_FROM)
    return commands


# --------------------------------------------------------------------------------------------------------
# Parameter types (api.Options at the pinned version) and Go's number syntax
# --------------------------------------------------------------------------------------------------------

# json tags of api.Options (and its embedded api.Runner) at the pinned version, by Go kind.
PARAMETER_TYPES: dict[str, str] = {
    **dict.fromkeys(
        ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "draft_num_predict", "num_keep", "seed",
         "num_predict", "top_k", "repeat_last_n"),
        "int",
    ),
    **dict.fromkeys(
        ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
         "frequency_penalty"),
        "float",
    ),
    "use_mmap": "bool",
    "stop": "list",  # a list of strings: repeated lines add to it
}  # fmt: skip

# Names Ollama's client still accepts, prints a deprecation warning for, and drops.
DEPRECATED_PARAMETERS = (
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
    "mirostat_tau", "mirostat_eta",
)  # fmt: skip

_DECIMAL = re.compile(r"(?P<int>[0-9_]*)(?:\.(?P<frac>[0-9_]*))?(?:[eE](?P<exp>[+-]?[0-9_]+))?")
_HEXADECIMAL = re.compile(
    r"0[xX](?P<int>[0-9a-fA-F_]*)(?:\.(?P<frac>[0-9a-fA-F_]*))?[pP](?P<exp>[+-]?[0-9_]+)"
)
_FLOAT32_MANTISSA_BITS = 24
_FLOAT32_MIN_EXP = -126  # of the smallest normal number; subnormals share it


def _underscores_ok(number: str) -> bool:
    """Go's rule for ``_`` in number literals: only between two digits, or between base prefix and digit."""
    hexa = number[:2].lower() == "0x"
    previous = "digit" if hexa else "start"
    for ch in number[2:] if hexa else number:
        if ch == "_":
            if previous != "digit":
                return False
            previous = "_"
        elif ch in string.digits or (hexa and ch in string.hexdigits):
            previous = "digit"
        elif previous == "_":
            return False
        else:
            previous = "other"
    return previous != "_"


def _nearest_float32(x: Fraction) -> float:
    """The float32 nearest to ``x >= 0`` (ties to even), as a Python float; OverflowError past float32."""
    if x == 0:
        return 0.0
    exp = x.numerator.bit_length() - x.denominator.bit_length()
    if Fraction(2) ** exp > x:  # now 2**exp <= x < 2**(exp + 1)
        exp -= 1
    step = Fraction(2) ** (max(exp, _FLOAT32_MIN_EXP) - (_FLOAT32_MANTISSA_BITS - 1))
    rounded = round(x / step) * step  # round() on a Fraction rounds half to even
    if rounded >= 2**128:
        raise OverflowError("float32 overflow")
    return float(rounded)


def _exponent(text: str) -> int:
    """An exponent's value, capped: past a hundred million the outcome is the same (zero or overflow)."""
    digits = text.lstrip("+-").replace("_", "").lstrip("0")
    value = int(digits or "0") if len(digits) <= 8 else 10**8
    return -value if text.startswith("-") else value


def go_parse_float32(s: str) -> float:
    """``strconv.ParseFloat(s, 32)``: the float32 value as a Python float, or ValueError where Go reports an
    error (bad syntax, or a value that rounds to infinity). Rounding is exact, straight to float32."""
    sign = -1.0 if s.startswith("-") else 1.0
    unsigned = s[1:] if s[:1] in ("+", "-") else s
    if unsigned.lower() in ("inf", "infinity"):
        return sign * math.inf
    if s.lower() == "nan":  # NaN takes no sign
        return math.nan
    m = _HEXADECIMAL.fullmatch(unsigned) or _DECIMAL.fullmatch(unsigned)
    if m is None or not (m["int"] or m["frac"]) or ("_" in unsigned and not _underscores_ok(unsigned)):
        raise ValueError(f"invalid syntax: {s!r}")
    base = 16 if m.re is _HEXADECIMAL else 10
    whole, frac = m["int"].replace("_", ""), (m["frac"] or "").replace("_", "")
    if not (whole + frac):  # "_" alone
        raise ValueError(f"invalid syntax: {s!r}")
    digits = (whole + frac).lstrip("0")
    if not digits:
        return 0.0 * sign
    # value = int(digits, base) * 2**scale (hex) or * 10**scale (decimal); `size` bounds it from above by
    # 2**size or 10**size, so that far-out values are decided without building huge numbers.
    if base == 16:
        scale = _exponent(m["exp"]) - 4 * len(frac)
        size, too_big, too_small = scale + 4 * len(digits), 140, -160
    else:
        scale = _exponent(m["exp"] or "0") - len(frac)
        size, too_big, too_small = scale + len(digits), 45, -50
    if size > too_big:
        raise ValueError(f"value out of range: {s!r}")
    if size < too_small:
        return 0.0 * sign
    if base == 16:
        value = int(digits, 16) * Fraction(2) ** scale
    else:
        # Digits past the 200th cannot change the rounding except through whether any of them is non-zero
        # (a float32 halfway point has fewer than 120 significant digits): fold them into one sticky digit.
        if len(digits) > 200:
            sticky = "1" if digits[200:].strip("0") else "0"
            scale += len(digits) - 201
            digits = digits[:200] + sticky
        value = int(digits) * Fraction(10) ** scale
    try:
        return sign * _nearest_float32(value)
    except OverflowError:
        raise ValueError(f"value out of range: {s!r}") from None


_INTEGER = re.compile(r"[+-]?([0-9]+)")


def go_parse_int(s: str) -> int:
    """``strconv.ParseInt(s, 10, 64)``: an optional sign and ASCII digits, within int64."""
    m = _INTEGER.fullmatch(s)
    if m is None:
        raise ValueError(f"invalid syntax: {s!r}")
    if len(m[1].lstrip("0")) > 19:
        raise ValueError(f"value out of range: {s!r}")
    value = int(s)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"value out of range: {s!r}")
    return value


_BOOLS = {**dict.fromkeys(("1", "t", "T", "true", "TRUE", "True"), True),
          **dict.fromkeys(("0", "f", "F", "false", "FALSE", "False"), False)}  # fmt: skip


def go_parse_bool(s: str) -> bool:
    """``strconv.ParseBool``."""
    if s not in _BOOLS:
        raise ValueError(f"invalid syntax: {s!r}")
    return _BOOLS[s]


# Each kind: how a value is read, and whether a repeated line adds to the value (lists) or replaces it.
PARAMETER_KINDS: dict[str, tuple[Callable[[str], int | float | bool | list[str]], bool]] = {
    "int": (go_parse_int, False),
    "float": (go_parse_float32, False),
    "bool": (go_parse_bool, False),
    "list": (lambda s: [s], True),
}


def format_parameter(name: str, value: str) -> int | float | bool | list[str]:
    """The typed value Ollama sends for ``PARAMETER name value``, or ModelfileError with Ollama's text.

    Ollama formats the value as a one-element list, hence the brackets: ``invalid float value [abc]``.
    """
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        msg = f"unknown parameter '{name}'"
        hint = f"parameter names are case-sensitive: {name.lower()}" if name.lower() in PARAMETER_TYPES else ""
        raise ModelfileError(msg, ollama_error=msg, hint=hint)
    parse, _ = PARAMETER_KINDS[kind]
    try:
        return parse(value)
    except ValueError:
        msg = f"invalid {kind} value [{value}]"
        raise ModelfileError(msg, ollama_error=msg) from None


def _semver_ok(v: str) -> bool:
    """golang.org/x/mod/semver.IsValid after the "v" Ollama puts in front (v1 and v1.2 are valid shorthands,
    which take no pre-release or build suffix)."""
    num = r"(?:0|[1-9][0-9]*)"
    ident = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    pattern = (
        rf"v{num}(?:\.{num}(?:\.{num}(?:-{ident}(?:\.{ident})*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?)?)?"
    )
    return re.fullmatch(pattern, v) is not None


# --------------------------------------------------------------------------------------------------------
# Checking: what `ollama create` builds from the commands
# --------------------------------------------------------------------------------------------------------


def expand_path(path: str, relative_dir: str | os.PathLike) -> str:
    """Where Ollama looks for a FROM/ADAPTER/DRAFT path: absolute as is, ``~``/``~user`` expanded, anything
    else relative to the Modelfile's directory."""
    if os.path.isabs(path) or path.startswith(("/", "\\")):
        return os.path.abspath(path)
    if path.startswith("~"):
        return os.path.abspath(os.path.expanduser(path))
    return os.path.abspath(os.path.join(relative_dir, path))


@dataclass
class ModelfileCheck:
    """What the checks found: the commands, the request Ollama would send, and warnings.

    ``parameters`` are typed as Ollama sends them (floats are float32 values); ``messages`` are
    ``(role, content)``; ``template``/``system``/``renderer``/``parser`` are the last value given (Ollama
    keeps only that one), or None.
    """

    commands: list[Command]
    parameters: dict[str, int | float | bool | list[str]]
    warnings: list[str]
    model_files: list[str] = field(default_factory=list)  # FROM paths found on disk (empty if not checked)
    template: str | None = None
    system: str | None = None
    renderer: str | None = None
    parser: str | None = None
    requires: str | None = None
    licenses: list[str] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)


_LAST_ONE_WINS = ("template", "system", "renderer", "parser")
_KEYWORD_OF = {kw.name: word.upper() for word, kw in GRAMMAR.items() if kw.name is not None}


def _check_paths(c: Command, base_dir: str | os.PathLike, require_files: bool, result: ModelfileCheck,
                 seen: dict[str, list[str]]) -> None:
    """Ollama's file checks for FROM/ADAPTER/DRAFT, and ours: a FROM must name a file that is there."""
    path = expand_path(c.args, base_dir)
    exists = os.path.exists(path)  # literally: Ollama does not expand globs
    if c.name == "model":
        if exists:
            result.model_files.append(path)
        elif require_files:
            raise ModelfileError(
                f"FROM {c.args}: no file at {path}",
                line=c.line,
                hint=f"Ollama would take {c.args!r} for a model name and try to pull it from the registry; "
                "FROM paths are relative to the Modelfile's directory",
            )
    elif not exists:
        if require_files:
            msg = f"stat {path}: no such file or directory"
            raise ModelfileError(msg, line=c.line, ollama_error=msg)
        return
    if exists and c.name in ("model", "draft"):
        other = seen["draft" if c.name == "model" else "model"]
        if any(os.path.realpath(path) == os.path.realpath(p) for p in other):
            msg = f"DRAFT must not reference the same local path as FROM: {path}"
            raise ModelfileError(msg, line=c.line, ollama_error=msg)
        seen[c.name].append(path)


def check_commands(
    commands: Sequence[Command], *, base_dir: str | os.PathLike | None = None, require_files: bool = True
) -> ModelfileCheck:
    """The request ``ollama create`` builds from parsed commands, with its checks, plus some of ours.

    Ollama's: PARAMETER names and value types (and numbers JSON can carry), REQUIRES as semver; with ``base_dir`` (the Modelfile's folder)
    FROM/ADAPTER/DRAFT paths are resolved and ADAPTER/DRAFT must exist (and DRAFT differ from FROM). A FROM
    that names no local file is not an error for Ollama, which then pulls it from the registry as a model
    name; with ``require_files`` we refuse it, because for us it always means a GGUF that is missing or
    misnamed (and without ``require_files`` no path has to exist).
    Ours (warnings): TEMPLATE, SYSTEM, RENDERER or PARSER given twice (Ollama keeps the last); a PARAMETER
    named like a command, which Ollama reads as that command; deprecated parameters, which Ollama drops.
    Commands are checked in order and the first error is raised, as Ollama does.
    """
    result = ModelfileCheck(list(commands), {}, [])
    first_line: dict[str, int] = {}
    parameter_lines: dict[str, int] = {}  # the line that set each parameter's value last
    seen: dict[str, list[str]] = {"model": [], "draft": []}
    for c in commands:
        if c.keyword == "parameter" and c.name in _KEYWORD_OF:
            result.warnings.append(
                f"(line {c.line}): Ollama reads PARAMETER {c.name} as the command {_KEYWORD_OF[c.name]}"
            )
        if c.name in ("model", "adapter", "draft"):
            if base_dir is not None:
                _check_paths(c, base_dir, require_files, result, seen)
        elif c.name in _LAST_ONE_WINS:
            if c.name in first_line:
                result.warnings.append(
                    f"(line {c.line}): {c.name.upper()} given again (first on line {first_line[c.name]}); "
                    "Ollama keeps only the last one"
                )
            first_line.setdefault(c.name, c.line)
            setattr(result, c.name, c.args)
        elif c.name == "license":
            result.licenses.append(c.args)
        elif c.name == "message":
            role, _, content = c.args.partition(": ")
            result.messages.append((role, content))
        elif c.name == "requires":
            version = c.args if c.args.startswith("v") else "v" + c.args
            if not _semver_ok(version):
                msg = "requires must be a valid semver (e.g. 0.14.0)"
                raise ModelfileError(msg, line=c.line, ollama_error=msg)
            result.requires = version[1:]
        elif c.name in DEPRECATED_PARAMETERS:
            result.warnings.append(f"(line {c.line}): parameter {c.name} is deprecated; Ollama ignores it")
        else:
            try:
                value = format_parameter(c.name, c.args)
            except ModelfileError as e:
                e.line = c.line
                raise
            if isinstance(value, list) and isinstance(result.parameters.get(c.name), list):
                result.parameters[c.name].extend(value)  # type: ignore[union-attr]
            else:
                result.parameters[c.name] = value
            parameter_lines[c.name] = c.line
    _require_json_numbers(result.parameters, parameter_lines)
    return result


def _require_json_numbers(parameters: dict[str, int | float | bool | list[str]], lines: dict[str, int]) -> None:
    """``ollama create`` sends the request as JSON, which has no inf or nan: Go's encoder refuses the first
    such value in its key order (a map's keys sorted), with the error the client then prints."""
    for name in sorted(parameters):
        value = parameters[name]
        if isinstance(value, float) and not math.isfinite(value):
            spelled = "NaN" if math.isnan(value) else "+Inf" if value > 0 else "-Inf"
            raise ModelfileError(
                f"PARAMETER {name} is {spelled}: ollama create sends parameters as JSON, which has no "
                "infinite or NaN numbers",
                line=lines[name], ollama_error=f"json: unsupported value: {spelled}")


def check_grammar(data: bytes | str) -> ModelfileCheck:
    """The verdict of Ollama's client before it touches any file: its parser plus the request it builds
    (``parser.ParseFile`` and ``Modelfile.CreateRequest``, less the FROM/ADAPTER/DRAFT file lookups).

    This is the function tests/test_modelfile_differential.py proves against Ollama's own code.
    """
    return check_commands(parse_modelfile(data))


def check_modelfile(path: str | os.PathLike, *, require_files: bool = True) -> ModelfileCheck:
    """Check a Modelfile on disk as ``ollama create -f path`` would (``check_grammar``), then its files
    (``check_commands``).

    The TEMPLATE's Go syntax is not checked here (that needs Go's text/template; ``ollama_template/`` does
    it).
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
            hint='Ollama\'s parser has no escape sequences, so a """ that ends a line inside the value '
            'would end the value there; we refuse every """ to keep the rule simple: reword the text '
            "without three double quotes in a row",
        )
    for i, ch in enumerate(value):
        if ch not in "\t\r\n" and not go_is_print(ch):
            raise ModelfileError(
                f"the {keyword} text contains U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')}) at offset {i}, "
                "which Ollama's parser silently drops",
                hint="Ollama keeps only printable characters (Go's strconv.IsPrint) plus tab and line breaks",
            )


def _quote(keyword: str, value: str) -> str:
    """A value as Ollama reads it back: bare when that reads back as the value, else in triple quotes."""
    _check_expressible(keyword, value)
    if value and read_value(value)[0] == value:
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
