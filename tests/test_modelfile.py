"""Modelfile rendering, the checked-in Modelfile, the CLI, and our Modelfile grammar, rule by rule.

That Ollama's own parser agrees with the grammar file by file is tests/test_modelfile_differential.py; the
number-parsing tables below were checked against Go's strconv.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from so8t_export import modelfile as mf
from so8t_export.cli import main
from so8t_export.modelfile import (
    DEFAULT_NUM_CTX,
    DEFAULT_PARAMETERS,
    ERR_INVALID_COMMAND,
    ERR_INVALID_MESSAGE_ROLE,
    Command,
    ModelfileError,
    check_commands,
    check_modelfile,
    parse_modelfile,
    render_modelfile,
    write_modelfile,
)

REPO = Path(__file__).resolve().parents[1]
SMALL_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
)


def C(name: str, args: str) -> Command:
    return Command(name, args)


def parse_error(text: str | bytes) -> ModelfileError:
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    return info.value


# ------------------------------------------------------------------------------ the checked-in Modelfile


def test_checked_in_modelfile_matches_generator():
    """modelfiles/so8t-qwen3-4b.Modelfile is exactly what the tool writes; regenerate it if this fails."""
    path = REPO / mf.CHECKED_IN_MODELFILE
    expected = render_modelfile(path.parent / mf.gguf_filename(), path)
    assert path.read_text(encoding="utf-8") == expected, (
        "modelfiles/ drifted from the generator; regenerate with "
        "`so8t-export modelfile modelfiles/so8t-qwen3-4b-q8_0.gguf -o modelfiles/so8t-qwen3-4b.Modelfile`"
    )


def test_checked_in_modelfile_passes_validator():
    result = check_modelfile(REPO / mf.CHECKED_IN_MODELFILE, require_files=False)
    names = [c.name for c in result.commands]
    assert names[:2] == ["model", "template"]
    assert result.commands[0].args == "./so8t-qwen3-4b-q8_0.gguf"
    assert result.commands[1].args == mf.TEMPLATE
    assert result.parameters == {
        "temperature": pytest.approx(0.6),
        "top_p": pytest.approx(0.95),
        "top_k": 20,
        "repeat_penalty": 1.0,
        "num_ctx": DEFAULT_NUM_CTX,
        "stop": ["<|im_start|>", "<|im_end|>"],
    }
    assert result.warnings == []


def test_default_parameters_are_qwen3_thinking_recommendations():
    params = dict(DEFAULT_PARAMETERS)  # stop collapses; checked below
    assert params["temperature"] == "0.6" and params["top_p"] == "0.95" and params["top_k"] == "20"
    assert params["repeat_penalty"] == "1" and int(params["num_ctx"]) == DEFAULT_NUM_CTX
    assert [v for k, v in DEFAULT_PARAMETERS if k == "stop"] == ["<|im_start|>", "<|im_end|>"]


# ------------------------------------------------------------------------------------------- rendering


def test_render_from_is_relative_to_the_modelfile(tmp_path):
    gguf = tmp_path / "weights" / "m.gguf"
    assert parse_modelfile(render_modelfile(gguf, tmp_path / "Modelfile"))[0] == C(
        "model", "./weights/m.gguf"
    )
    assert parse_modelfile(render_modelfile(gguf, tmp_path / "sub" / "Modelfile"))[0] == C(
        "model", "../weights/m.gguf"
    )
    assert parse_modelfile(render_modelfile(tmp_path / "m.gguf", tmp_path / "Modelfile"))[0] == C(
        "model", "./m.gguf"
    )


def test_render_from_with_spaces_round_trips(tmp_path):
    gguf = tmp_path / "my models" / " odd name.gguf"
    text = render_modelfile(gguf, tmp_path / "Modelfile")
    cmd = parse_modelfile(text)[0]
    assert mf.expand_path(cmd.args, tmp_path) == str(gguf)


def test_render_system_and_overrides():
    system = 'You are SO8T.\nAnswer "briefly".\n  日本語も可。 👋\n'
    text = render_modelfile(
        "m.gguf",
        "Modelfile",
        system=system,
        num_ctx=8192,
        parameters=[("temperature", "0.7"), ("stop", "</s>"), ("stop", " User:"), ("min_p", "0.05")],
    )
    cmds = parse_modelfile(text)
    assert C("system", system) in cmds
    params = [(c.name, c.args) for c in cmds if c.name not in ("model", "template", "system")]
    assert params == [
        ("temperature", "0.7"),
        ("top_p", "0.95"),
        ("top_k", "20"),
        ("repeat_penalty", "1"),
        ("num_ctx", "8192"),
        ("stop", "</s>"),
        ("stop", " User:"),
        ("min_p", "0.05"),
    ]


@pytest.mark.parametrize(
    "system", ['ends with a quote"', '"starts with one', '""', "   padded   ", "", "tab\there"]
)
def test_render_system_edge_values_round_trip(system):
    assert C("system", system) in parse_modelfile(render_modelfile("m.gguf", "Modelfile", system=system))


def test_render_rejects_triple_quotes_in_system():
    with pytest.raises(ModelfileError, match='contains """'):
        render_modelfile("m.gguf", "Modelfile", system='Say """hi""" please')


def test_render_rejects_characters_ollama_would_drop():
    with pytest.raises(ModelfileError, match=r"U\+200B .*silently drops"):
        render_modelfile("m.gguf", "Modelfile", system="zero\u200bwidth")


@pytest.mark.parametrize(
    "params, message",
    [
        ([("Temperature", "0.6")], "unknown parameter 'Temperature'"),
        ([("temperature", "hot")], "invalid float value [hot]"),
        ([("top_k", "2.5")], "invalid int value [2.5]"),
        ([("use_mmap", "yes")], "invalid bool value [yes]"),
        ([("num_ctx", "4096")], "num_ctx is set with num_ctx="),
        ([("bad-name", "1")], "may only contain"),
        ([("temperature", "inf")], "PARAMETER temperature is +Inf: ollama create sends parameters as JSON"),
        ([("top_p", "nan"), ("min_p", "-inf")], "PARAMETER min_p is -Inf"),  # Go encodes map keys sorted
    ],
)
def test_render_rejects_bad_parameters(params, message):
    with pytest.raises(ModelfileError) as info:
        render_modelfile("m.gguf", "Modelfile", parameters=params)
    assert message in str(info.value)


@pytest.mark.parametrize("num_ctx", [0, -1, True, 1.5])
def test_render_rejects_bad_num_ctx(num_ctx):
    with pytest.raises(ModelfileError, match="num_ctx must be a positive integer"):
        render_modelfile("m.gguf", "Modelfile", num_ctx=num_ctx)


def test_render_stop_with_newline_round_trips():
    cmds = parse_modelfile(render_modelfile("m.gguf", "Modelfile", parameters=[("stop", "\n\n")]))
    assert [c.args for c in cmds if c.name == "stop"] == ["\n\n"]


def test_write_modelfile_is_atomic(tmp_path):
    out = tmp_path / "Modelfile"
    out.write_text("old contents\n")
    with pytest.raises(ModelfileError):
        write_modelfile(tmp_path / "m.gguf", out, system='bad """ text')
    assert out.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile"]

    written = write_modelfile(tmp_path / "m.gguf", out, system="hi")
    assert written == out and C("system", "hi") in parse_modelfile(out.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_write_modelfile_gets_an_ordinary_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        out = write_modelfile(tmp_path / "m.gguf", tmp_path / "Modelfile")
        assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        out.chmod(0o640)
        write_modelfile(tmp_path / "m.gguf", out, system="x")
        assert out.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
    finally:
        os.umask(umask)


def test_write_modelfile_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_modelfile(tmp_path / "m.gguf", tmp_path / "Modelfile")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- checking


def test_check_requires_the_from_file(tmp_path):
    write_modelfile(tmp_path / "m.gguf", tmp_path / "Modelfile")
    with pytest.raises(ModelfileError) as info:
        check_modelfile(tmp_path / "Modelfile")
    assert info.value.line == 4  # three comment lines, then FROM
    assert "pull it from the registry" in str(info.value)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert check_modelfile(tmp_path / "Modelfile").model_files == [str(tmp_path / "m.gguf")]


def test_check_paths_are_taken_literally(tmp_path):
    """Ollama stats a FROM/ADAPTER/DRAFT path as written: no glob, so ./*.gguf names no file."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "Modelfile").write_text("FROM ./*.gguf\n")
    with pytest.raises(ModelfileError, match="no file at"):
        check_modelfile(tmp_path / "Modelfile")
    assert check_modelfile(tmp_path / "Modelfile", require_files=False).model_files == []


def test_check_draft_must_differ_from_from(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "Modelfile").write_text("FROM ./m.gguf\nDRAFT m.gguf\n")
    with pytest.raises(ModelfileError) as info:
        check_modelfile(tmp_path / "Modelfile")
    expected = f"DRAFT must not reference the same local path as FROM: {tmp_path / 'm.gguf'}"
    assert info.value.ollama_error == expected
    assert info.value.line == 2


def test_check_adapter_must_exist(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "Modelfile").write_text("FROM ./m.gguf\nADAPTER ./lora.gguf\n")
    with pytest.raises(ModelfileError) as info:
        check_modelfile(tmp_path / "Modelfile")
    assert info.value.ollama_error == f"stat {tmp_path / 'lora.gguf'}: no such file or directory"
    assert info.value.line == 2


def test_check_parameter_errors_name_their_line():
    text = "FROM foo\n# comment\nPARAMETER temperature 0.6\n\nPARAMETER Temperature 0.6\n"
    with pytest.raises(ModelfileError) as info:
        check_commands(parse_modelfile(text))
    assert info.value.ollama_error == "unknown parameter 'Temperature'"
    assert info.value.line == 5
    assert str(info.value) == (
        "(line 5): unknown parameter 'Temperature' (parameter names are case-sensitive: temperature)"
    )


def test_check_parameter_semantics():
    text = (
        "FROM foo\nPARAMETER stop a\nPARAMETER temperature 0.1\nPARAMETER stop b\nPARAMETER temperature 0.2\n"
        "PARAMETER use_mmap T\nPARAMETER seed -1\nPARAMETER mirostat 2\nSYSTEM one\nSYSTEM two\n"
    )
    result = check_commands(parse_modelfile(text))
    assert result.parameters == {
        "stop": ["a", "b"],
        "temperature": pytest.approx(0.2),
        "use_mmap": True,
        "seed": -1,
    }
    assert result.warnings == [
        "(line 8): parameter mirostat is deprecated; Ollama ignores it",
        "(line 10): SYSTEM given again (first on line 9); Ollama keeps only the last one",
    ]


@pytest.mark.parametrize("name", ["numa", "num_gqa", "tfs_z", "Top_k"])
def test_check_parameters_gone_from_options(name):
    """Parsed fine by ParseFile (parser_test's table lists numa/num_gqa) but FormatParams rejects them."""
    with pytest.raises(ModelfileError, match=f"unknown parameter '{name}'"):
        check_commands(parse_modelfile(f"FROM foo\nPARAMETER {name} 1\n"))


@pytest.mark.parametrize(
    "value, ok",
    [
        ("0.14.0", True),
        ("v0.14.0", True),
        ("1", True),
        ("1.2", True),
        ("1.2.3-rc1+build.5", True),
        ("1.02.3", False),
        ("latest", False),
        ("1.2.3.4", False),
        ("", False),
    ],
)
def test_check_requires_semver(value, ok):
    cmds = [C("model", "foo"), C("requires", value)]
    if ok:
        check_commands(cmds)
    else:
        with pytest.raises(ModelfileError, match=r"requires must be a valid semver \(e\.g\. 0\.14\.0\)"):
            check_commands(cmds)


# Outcomes recorded from Go 1.19: strconv.ParseFloat(s, 32), ParseInt(s, 10, 64), ParseBool(s).
GO_FLOATS = {
    "1_000": True,
    "1_0.5": True,
    "0x1p-2": True,
    "0x_1p0": True,
    "inf": True,
    "+Inf": True,
    "-infinity": True,
    "nan": True,
    "NaN": True,
    "+nan": False,
    "infin": False,
    "1e39": False,
    "3.5e38": False,
    "3.4028235e38": True,
    "1e-50": True,
    ".5": True,
    "5.": True,
    ".": False,
    "1e": False,
    "e5": False,
    " 1": False,
    "1 ": False,
    "0.6": True,
    "+1": True,
    "-0": True,
    "1__0": False,
    "_1": False,
    "0x10": False,
    "1.0f": False,
    "\u0661": False,
}
GO_INTS = {
    "1_000": False,
    "+1": True,
    "-1": True,
    "9223372036854775807": True,
    "9223372036854775808": False,
    "0x10": False,
    "010": True,
    "": False,
    " 1": False,
    "1.0": False,
    "\u0663": False,
}
GO_BOOLS = {
    "1": True,
    "t": True,
    "T": True,
    "TRUE": True,
    "true": True,
    "True": True,
    "tRue": False,
    "yes": False,
    "0": True,
    "f": True,
    "F": True,
    "FALSE": True,
    "false": True,
    "False": True,
    "on": False,
}


@pytest.mark.parametrize(
    "table, parse",
    [(GO_FLOATS, mf.go_parse_float32), (GO_INTS, mf.go_parse_int), (GO_BOOLS, mf.go_parse_bool)],
)
def test_value_parsing_matches_go_strconv(table, parse):
    for text, accepted in table.items():
        if accepted:
            parse(text)
        else:
            with pytest.raises(ValueError):
                parse(text)
    assert mf.go_parse_float32("0x1p-2") == 0.25 and math.isinf(mf.go_parse_float32("-Inf"))


# --------------------------------------------------------------------------------------------- the grammar
#
# One test per rule of the grammar in so8t_export/modelfile.py, on our own examples. That Ollama reads each of
# these the same way is shown by tests/test_modelfile_differential.py, whose corpus holds them and more.


def test_grammar_tables_spell_ollamas_error_texts():
    assert mf.COMMANDS == (
        "from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
        "message", "requires",
    )  # fmt: skip
    assert ERR_INVALID_COMMAND == (
        'command must be one of "from", "license", "template", "system", "adapter", "draft", "renderer", '
        '"parser", "parameter", "message", or "requires"'
    )
    assert ERR_INVALID_MESSAGE_ROLE == 'message role must be one of "system", "user", or "assistant"'


def test_parse_every_command():
    text = (
        "\nFROM base\nADAPTER lora.gguf\nLICENSE Apache-2.0\nPARAMETER top_k 7\nPARAMETER stop END\n"
        f'TEMPLATE """{SMALL_TEMPLATE}"""    \nSYSTEM be brief\nRENDERER qwen3-coder\nPARSER qwen3-thinking\n'
        "DRAFT small.gguf\nMESSAGE user hi\nREQUIRES 0.14.0\n"
    )
    assert parse_modelfile(text) == [
        C("model", "base"),
        C("adapter", "lora.gguf"),
        C("license", "Apache-2.0"),
        C("top_k", "7"),
        C("stop", "END"),
        C("template", SMALL_TEMPLATE),
        C("system", "be brief"),
        C("renderer", "qwen3-coder"),
        C("parser", "qwen3-thinking"),
        C("draft", "small.gguf"),
        C("message", "user: hi"),
        C("requires", "0.14.0"),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("FROM base", [C("model", "base")]),
        ('FROM "  spaced name  "', [C("model", "  spaced name  ")]),
        ("FROM    two  words   \n", [C("model", "two  words")]),  # blanks around a bare value go
        ("FROM /models/my model.gguf \n", [C("model", "/models/my model.gguf")]),
        ("FROM qwen3:4b-thinking-2507-q8_0", [C("model", "qwen3:4b-thinking-2507-q8_0")]),
        ("PARAMETER top_k 3\nFROM base", [C("top_k", "3"), C("model", "base")]),  # FROM may come last
        ("from a\nFrOm b\n", [C("model", "a"), C("model", "b")]),  # any case, any number
        ("FROM\tbase\n", [C("model", "base")]),  # a tab separates too
        ("FROM \n", [C("model", "")]),  # an empty value is a value
        ("FROM base # not a comment\n", [C("model", "base # not a comment")]),
        ("PARAMETER model base\n", [C("model", "base")]),  # a PARAMETER named model counts as FROM
    ],
)
def test_parse_from(text, expected):
    assert parse_modelfile(text) == expected


@pytest.mark.parametrize("text", ["", "PARAMETER top_k 3", "# a comment\n", "#FROM base\n", "SYSTEM hi\n"])
def test_parse_missing_from(text):
    err = parse_error(text)
    assert err.ollama_error == "no FROM line" and err.line is None


@pytest.mark.parametrize(
    "text, ollama_error, line",
    [
        ("\nFROM base\nPARAMETER top_k\n", "unexpected EOF: top_k", 3),
        ("FROM base\nPARAMETER top-k 3\n", "unexpected EOF: top", 2),
        ("FROM base\nPARAMETER top_k", "unexpected EOF", 2),
        ("FROM base\nMESSAGE user\n", "unexpected EOF: user", 2),
        ("FROM base\nMESSAGE user", "unexpected EOF", 2),
        ("FROM base\nSYSTEM", "unexpected EOF", 2),
    ],
)
def test_parse_head_word_without_value(text, ollama_error, line):
    err = parse_error(text)
    assert (err.ollama_error, err.line) == (ollama_error, line)


@pytest.mark.parametrize(
    "text, line, ollama_line",
    [
        ("\nFROM base\nNOPE x\n", 3, 3),
        ("FROM base\nSYSTEM\n", 2, 3),  # Ollama counts the line end that cut the command short
        ("FROM base\nFR0M other\n", 2, 2),
        ("FROM base\n  PARAMETERS x 1\n", 2, 2),
        ("FROM base\n_SYSTEM x\n", 2, 2),
        ("FROM base\nSYS\x00TEM x\n", 2, 2),
        ("FROM base\r\nNOPE x\r\n", 2, 3),  # Ollama counts CR and LF apart
        ("FROM\u00a0base\n", 1, 1),  # a no-break space is no separator
    ],
)
def test_parse_invalid_command(text, line, ollama_line):
    err = parse_error(text)
    assert (err.message, err.line) == (ERR_INVALID_COMMAND, line)
    assert err.ollama_error == f"(line {ollama_line}): {ERR_INVALID_COMMAND}"


def test_parse_keyword_first_character_may_be_unprintable():
    """The keyword's first character is taken as it is, and an unprintable one is then dropped: Ollama reads a
    stray BOM, NUL or no-break space in front of a keyword as nothing."""
    for junk in ("\ufeff", "\x00", "\u200b", "\u00a0", "\f"):
        assert parse_modelfile(f"{junk}FROM base\nSYSTEM x\n{junk}PARAMETER top_k 1\n") == [
            C("model", "base"), C("system", "x"), C("top_k", "1"),
        ]  # fmt: skip


@pytest.mark.parametrize(
    "text, expected",
    [
        ("FROM base\nMESSAGE system Answer in one line.\n", C("message", "system: Answer in one line.")),
        ("FROM base\nMESSAGE user Hello", C("message", "user: Hello")),
        ("FROM base\nMESSAGE assistant a: b\n", C("message", "assistant: a: b")),
        ("FROM base\nMESSAGE user \n", C("message", "user: ")),
        ('FROM base\nMESSAGE system """\nTwo\nlines\n"""\n\t', C("message", "system: \nTwo\nlines\n")),
    ],
)
def test_parse_messages(text, expected):
    assert parse_modelfile(text)[1] == expected


@pytest.mark.parametrize("role", ["System", "USER", "tool", ""])
def test_parse_message_role_is_one_of_three_lowercase_words(role):
    err = parse_error(f"FROM base\nMESSAGE {role} hi\n")
    assert (err.message, err.line) == (ERR_INVALID_MESSAGE_ROLE, 2)
    assert err.ollama_error == f"(line 2): {ERR_INVALID_MESSAGE_ROLE}"


@pytest.mark.parametrize(
    "value, expected",
    [
        ('"""\nline one\nline two\n"""\n\t', "\nline one\nline two\n"),
        ('"""line one\nline two"""', "line one\nline two"),
        ('"""one line"""   ', "one line"),
        ('"""say "hi" twice"""', 'say "hi" twice'),
        ('"""say """hi""" now"""', 'say """hi""" now'),  # a """ inside a line does not close
        ('""""""', ""),
        ('""', ""),
        ("\"'\"", "'"),
        ('"""""""', '"'),  # the closing """ may not overlap the opening one
        ('"a" b\nmore"', 'a" b\nmore'),  # text after a closing quote keeps the value open
        ('"a"\t \n', "a"),
        ("'single quotes are text'", "'single quotes are text'"),
        ('x "not a quote"', 'x "not a quote"'),
        ('"""a\rb\r\nc"""', "a\rb\r\nc"),  # inside quotes every line end is kept
        ("   \n", ""),
    ],
)
def test_read_value(value, expected):
    assert parse_modelfile(f"FROM base\nSYSTEM {value}")[1] == C("system", expected)
    assert mf.read_value(value)[0] == expected


@pytest.mark.parametrize(
    "text", ['FROM base\nSYSTEM """not closed.""\n\t', 'FROM base\nSYSTEM "\n\t', 'FROM base\nSYSTEM """"\n']
)
def test_parse_unterminated_quote(text):
    err = parse_error(text)
    assert err.ollama_error == "unexpected EOF"
    assert err.line == 2  # ours: the line the value started on
    assert "never closed" in str(err)


def test_triple_quote_ending_a_line_ends_the_value():
    """Why render_modelfile refuses a \"\"\" in SYSTEM: the value stops at the first line ending in \"\"\"."""
    text = 'FROM base\nSYSTEM """Say\n"""hi"""\nPARAMETER top_k 1\n"""\n'  # what naive quoting would write
    err = parse_error(text)
    assert (err.message, err.line) == (ERR_INVALID_COMMAND, 5)  # the stray closing """ is read as a command
    assert parse_modelfile(text.rsplit('"""', 1)[0])[1] == C("system", 'Say\n"""hi')


@pytest.mark.parametrize(
    "line, name, value",
    [
        ("num_ctx 8192", "num_ctx", "8192"),
        ("stop <|im_end|>", "stop", "<|im_end|>"),
        ("stop ### User: ", "stop", "### User:"),
        ('stop "### User: "', "stop", "### User: "),
        ('stop """### User:\n"""', "stop", "### User:\n"),
        (" stop x", "", "stop x"),  # two blanks after PARAMETER: an empty name (refused by the request)
        ("Temperature 0.6", "Temperature", "0.6"),  # names keep their case
        ("numa true", "numa", "true"),  # any name parses; the request builder checks it
    ],
)
def test_parse_parameters(line, name, value):
    assert parse_modelfile(f"FROM base\nPARAMETER {line}\n") == [C("model", "base"), C(name, value)]


def test_parse_comments():
    assert parse_modelfile("\n# comment\nFROM base\n\t") == [C("model", "base")]
    assert parse_modelfile("  # indented\nFROM base\n# last, without a line end") == [C("model", "base")]
    # '#' starts a comment only where a command could start; inside a value it is text.
    assert parse_modelfile("FROM base # text\n  # a comment\n") == [C("model", "base # text")]
    assert parse_modelfile('FROM base\nSYSTEM """a\n# text\nb"""\n')[1] == C("system", "a\n# text\nb")


BOM_TEXT = "FROM base\nPARAMETER top_k 1\nSYSTEM Written with a byte order mark.\n"


@pytest.mark.parametrize(
    "bom, codec", [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"), (b"\xef\xbb\xbf", "utf-8")]
)
def test_parse_bom(bom, codec):
    assert parse_modelfile(bom + BOM_TEXT.encode(codec)) == [
        C("model", "base"), C("top_k", "1"), C("system", "Written with a byte order mark."),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bom, codec", [(b"", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")]
)
def test_parse_multibyte(bom, codec):
    data = bom + "FROM base\n\tSYSTEM 日本語 👋".encode(codec)
    assert parse_modelfile(data) == [C("model", "base"), C("system", "日本語 👋")]


@pytest.mark.parametrize(
    "data, text",
    [
        (b"a\xe2\x82b", "a\ufffdb"),  # plain UTF-8: one U+FFFD per ill-formed sequence
        (b"\xef\xbb\xbfa\xe2\x82b", "a\ufffd\ufffdb"),  # after a UTF-8 BOM: one per bad byte
        (b"a\xed\xa0\x80b", "a\ufffd\ufffd\ufffdb"),
        (b"\xff\xfea\x00\x00\xdc\x00\xdcb\x00", "a\ufffdb"),  # UTF-16: low + low is taken as one bad pair
        (b"\xff\xfea\x00\x00\xd8x", "a\ufffd\ufffd"),  # a lone high surrogate, then an odd byte
        (b"\xff\xfe=\xd8\x00\xde", "\U0001f600"),
        ("FROM x".encode("utf-16-le"), "F\x00R\x00O\x00M\x00 \x00x\x00"),  # no BOM: read as UTF-8
    ],
)
def test_decode_modelfile(data, text):
    assert mf.decode_modelfile(data) == text


def test_parse_drops_unprintable_characters():
    assert parse_modelfile("FROM base\nSYSTEM a\u200bb\u00a0c\x07d\ue000e\n")[1] == C("system", "abcde")
    # ...except tabs and line ends inside a quoted value, which are kept
    assert parse_modelfile('FROM base\nSYSTEM """a\tb\r\nc"""\n')[1] == C("system", "a\tb\r\nc")


def test_go_is_print_knows_unicode_15():
    """Go's tables are Unicode 15.0; Python 3.11's unicodedata is 14.0 (see _UNICODE_15_PRINTABLE)."""
    for ch in ("\U0001fae8", "\U00011f00", "\U00031350", "\u0cf3", "a", " ", "日"):
        assert mf.go_is_print(ch), repr(ch)
    for ch in ("\t", "\n", "\u00a0", "\u200b", "\ufeff", "\ue000", "\u0378", "\U0001fae9"):
        assert not mf.go_is_print(ch), repr(ch)


def test_check_grammar_builds_the_request():
    text = (
        "FROM base\nPARAMETER temperature 0.5\nPARAMETER top_k 1\nSYSTEM one\nSYSTEM two\nLICENSE first\n"
        "LICENSE second\nMESSAGE user Hello!\nMESSAGE assistant Hi: there\nREQUIRES v0.14.0\nTEMPLATE t\n"
        "RENDERER r\nPARSER p\nPARAMETER stop a\nPARAMETER stop b\n"
    )
    result = mf.check_grammar(text)
    assert result.parameters == {"temperature": 0.5, "top_k": 1, "stop": ["a", "b"]}
    assert (result.template, result.system, result.renderer, result.parser) == ("t", "two", "r", "p")
    assert result.licenses == ["first", "second"]
    assert result.messages == [("user", "Hello!"), ("assistant", "Hi: there")]
    assert result.requires == "0.14.0"


def test_check_grammar_reads_parameters_named_like_commands_as_those_commands():
    result = mf.check_grammar("PARAMETER model base\nPARAMETER system be brief\nPARAMETER message hello\n")
    assert result.system == "be brief" and result.messages == [("hello", "")]
    assert result.warnings == [
        "(line 1): Ollama reads PARAMETER model as the command FROM",
        "(line 2): Ollama reads PARAMETER system as the command SYSTEM",
        "(line 3): Ollama reads PARAMETER message as the command MESSAGE",
    ]
    with pytest.raises(ModelfileError, match="requires must be a valid semver"):
        mf.check_grammar("FROM base\nPARAMETER requires banana\n")


def test_float_parameters_are_float32_rounded_exactly():
    """Go rounds the decimal straight to float32; going through float64 first would round this one down."""
    assert mf.go_parse_float32("1.0000000596046447753906250001") == 1 + 2**-23
    assert mf.go_parse_float32("1.000000059604644775390625") == 1.0  # a tie: to even
    assert mf.go_parse_float32("0.6") == 0.6000000238418579
    assert mf.go_parse_float32("0x1.000001fffffffffffffffp0") == 1 + 2**-23
    assert mf.go_parse_float32("1e-46") == 0.0 and mf.go_parse_float32("1e-45") == 2**-149
    assert mf.go_parse_float32("0." + "3" * 5000) == mf.go_parse_float32("0.333333333")
    assert mf.go_parse_float32("0e99999999999") == 0.0
    for bad in ("1e99999999999", "3.4028236e38", "0x1p128"):
        with pytest.raises(ValueError):
            mf.go_parse_float32(bad)


def test_line_numbers_are_recorded():
    cmds = parse_modelfile('# c\nFROM base\n\nSYSTEM """a\nb"""\nPARAMETER top_k 1\n')
    assert [(c.name, c.line, c.keyword) for c in cmds] == [
        ("model", 2, "from"), ("system", 4, "system"), ("top_k", 6, "parameter"),
    ]  # fmt: skip
    # CRLF is one line end for our line numbers (Ollama's error texts count two)
    assert [c.line for c in parse_modelfile("FROM base\r\n\r\nSYSTEM x\r\n")] == [1, 3]


# ----------------------------------------------------------------------------------------------------- CLI


def test_cli_writes_and_checks(tmp_path, so8t_dir):
    from so8t_export.export import export_gguf

    gguf = tmp_path / "so8t-qwen3-4b-q8_0.gguf"
    export_gguf(so8t_dir, gguf, quant="q8_0")  # modelfile refuses a file that is not a loadable GGUF
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "modelfile",
            str(gguf),
            "--system",
            "You are SO8T.",
            "--num-ctx",
            "4096",
            "--param",
            "temperature=0.7",
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"ollama create so8t-qwen3-4b -f {tmp_path / 'Modelfile'}" in res.output
    result = check_modelfile(tmp_path / "Modelfile")
    assert result.parameters["num_ctx"] == 4096 and result.parameters["temperature"] == pytest.approx(0.7)

    res = runner.invoke(main, ["modelfile", "--check", str(tmp_path / "Modelfile")])
    assert res.exit_code == 0 and "OK for Ollama 0.32.15" in res.output


def test_cli_check_reports_ollama_errors(tmp_path):
    bad = tmp_path / "Modelfile"
    bad.write_text("FROM ./m.gguf\nPARAMETER temperature warm\n")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    res = CliRunner().invoke(main, ["modelfile", "--check", str(bad)])
    assert res.exit_code != 0
    assert "(line 2): invalid float value [warm]" in res.output

    bad.write_text("FROM ./m.gguf\nPARAMETER temperature inf\nPARAMETER top_k 40\n")
    res = CliRunner().invoke(main, ["modelfile", "--check", str(bad)])
    assert res.exit_code != 0 and "(line 2): PARAMETER temperature is +Inf" in res.output

    bad.write_text("FROM ./missing.gguf\n")
    res = CliRunner().invoke(main, ["modelfile", "--check", str(bad)])
    assert res.exit_code != 0 and "pull it from the registry" in res.output
    res = CliRunner().invoke(main, ["modelfile", "--check", str(bad), "--grammar-only"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["m.gguf", "--system", 'x """ y'], 'contains """'),
        (["m.gguf", "--param", "temperature"], "is not KEY=VALUE"),
        (["m.gguf", "--param", "Temperature=1"], "unknown parameter 'Temperature'"),
        ([], "missing FILE.gguf"),
        (["m.gguf", "--grammar-only"], "--grammar-only only applies to --check"),
    ],
)
def test_cli_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["modelfile", *args])
    assert res.exit_code != 0
    assert message in res.output
    assert list(tmp_path.iterdir()) == []


def test_cli_check_refuses_write_options(tmp_path):
    f = tmp_path / "Modelfile"
    f.write_text("FROM foo\n")
    res = CliRunner().invoke(main, ["modelfile", "x.gguf", "--check", str(f)])
    assert res.exit_code != 0 and "--check FILE takes no" in res.output
