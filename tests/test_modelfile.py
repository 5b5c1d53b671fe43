"""Modelfile rendering, the checked-in Modelfile, the CLI, and the port of Ollama's Modelfile parser.

The parser fixtures are ported from ollama/ollama parser/parser_test.go (TestParseFileFile, ...TrimSpace, ...From,
...ParametersMissingValue, ...BadCommand, ...Messages, ...Quoted, ...Parameters, ...Comments, ...UTF16ParseFile,
TestParseMultiByte, TestCreateRequest); the number-parsing tables were checked against Go 1.19's strconv.
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
LLAMA3_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
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
    assert str(info.value) == "(line 5): unknown parameter 'Temperature'"


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


# ------------------------------------------------------------------------------------- ported parser tests


def test_parse_file():
    text = (
        "\nFROM model1\nADAPTER adapter1\nLICENSE MIT\nPARAMETER param1 value1\nPARAMETER param2 value2\n"
        f'TEMPLATE """{LLAMA3_TEMPLATE}"""    \n'
    )
    assert parse_modelfile(text) == [
        C("model", "model1"),
        C("adapter", "adapter1"),
        C("license", "MIT"),
        C("param1", "value1"),
        C("param2", "value2"),
        C("template", LLAMA3_TEMPLATE),
    ]


def test_parse_file_trim_space():
    text = (
        '\nFROM "     model 1"\nADAPTER      adapter3\nLICENSE "MIT       "\nPARAMETER param1        value1\n'
        f'PARAMETER param2    value2\nTEMPLATE """   {LLAMA3_TEMPLATE}   """    \n'
    )
    assert parse_modelfile(text) == [
        C("model", "     model 1"),
        C("adapter", "adapter3"),
        C("license", "MIT       "),
        C("param1", "value1"),
        C("param2", "value2"),
        C("template", f"   {LLAMA3_TEMPLATE}   "),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('FROM "FOO  BAR  "', [C("model", "FOO  BAR  ")]),
        ('FROM "FOO BAR"\nPARAMETER param1 value1', [C("model", "FOO BAR"), C("param1", "value1")]),
        ("FROM     FOOO BAR    ", [C("model", "FOOO BAR")]),
        ("FROM /what/is/the path ", [C("model", "/what/is/the path")]),
        ("FROM foo", [C("model", "foo")]),
        ("FROM /path/to/model", [C("model", "/path/to/model")]),
        ("FROM /path/to/model/fp16.bin", [C("model", "/path/to/model/fp16.bin")]),
        ("FROM llama3:latest", [C("model", "llama3:latest")]),
        ("FROM llama3:7b-instruct-q4_K_M", [C("model", "llama3:7b-instruct-q4_K_M")]),
        ("PARAMETER param1 value1\nFROM foo", [C("param1", "value1"), C("model", "foo")]),
        (
            "PARAMETER what the \nFROM lemons make lemonade ",
            [C("what", "the"), C("model", "lemons make lemonade")],
        ),
        ("from foo\nFrOm bar", [C("model", "foo"), C("model", "bar")]),
    ],
)
def test_parse_file_from(text, expected):
    assert parse_modelfile(text) == expected


@pytest.mark.parametrize("text", ["", "PARAMETER param1 value1", "# only a comment\n", "SYSTEM hi\n"])
def test_parse_file_missing_from(text):
    err = parse_error(text)
    assert err.ollama_error == "no FROM line" and err.line is None


def test_parse_file_parameter_missing_value():
    err = parse_error("\nFROM foo\nPARAMETER param1\n")
    assert err.ollama_error == "unexpected EOF: param1"
    assert err.line == 4  # Ollama counts the newline that ended the parameter name before failing on it


def test_parse_file_bad_command():
    err = parse_error("\nFROM foo\nBADCOMMAND param1 value1\n")
    assert err.ollama_error == f"(line 3): {ERR_INVALID_COMMAND}"
    assert err.line == 3 and err.message == ERR_INVALID_COMMAND


@pytest.mark.parametrize(
    "text, line",
    [
        ("FROM foo\nFROM\n", 3),  # the newline after FROM is read (and counted) before it is rejected
        ("FROM foo\nFR0M bar\n", 2),
        ("FROM foo\n  PARAMETERS x 1\n", 2),
        ("FROM foo\nSTOP x\n", 2),
        ("FROM foo\r\nBAD x\r\n", 3),  # CRLF counts as two lines
    ],
)
def test_parse_file_invalid_command_lines(text, line):
    err = parse_error(text)
    assert (err.message, err.line) == (ERR_INVALID_COMMAND, line)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\n",
            [C("model", "foo"), C("message", "system: You are a file parser. Always parse things.")],
        ),
        (
            "\nFROM foo\nMESSAGE system You are a file parser. Always parse things.",
            [C("model", "foo"), C("message", "system: You are a file parser. Always parse things.")],
        ),
        (
            (
                "\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\nMESSAGE user Hey there!\n"
                "MESSAGE assistant Hello, I want to parse all the things!\n"
            ),
            [
                C("model", "foo"),
                C("message", "system: You are a file parser. Always parse things."),
                C("message", "user: Hey there!"),
                C("message", "assistant: Hello, I want to parse all the things!"),
            ],
        ),
        (
            '\nFROM foo\nMESSAGE system """\nYou are a multiline file parser. Always parse things.\n"""\n\t\t\t',
            [
                C("model", "foo"),
                C("message", "system: \nYou are a multiline file parser. Always parse things.\n"),
            ],
        ),
    ],
)
def test_parse_file_messages(text, expected):
    assert parse_modelfile(text) == expected


def test_parse_file_message_bad_role():
    err = parse_error("\nFROM foo\nMESSAGE badguy I'm a bad guy!\n")
    assert err.ollama_error == f"(line 3): {ERR_INVALID_MESSAGE_ROLE}"
    assert (
        parse_error("FROM foo\nMESSAGE System hi\n").message == ERR_INVALID_MESSAGE_ROLE
    )  # roles are lowercase


@pytest.mark.parametrize(
    "text, ollama_error",
    [
        ("\nFROM foo\nMESSAGE system\n", "unexpected EOF: system"),
        ("\nFROM foo\nMESSAGE system", "unexpected EOF"),
    ],
)
def test_parse_file_message_missing_text(text, ollama_error):
    assert parse_error(text).ollama_error == ollama_error


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '\nFROM foo\nSYSTEM """\nThis is a\nmultiline system.\n"""\n\t\t\t',
            [C("model", "foo"), C("system", "\nThis is a\nmultiline system.\n")],
        ),
        (
            '\nFROM foo\nSYSTEM """\nThis is a\nmultiline system."""\n\t\t\t',
            [C("model", "foo"), C("system", "\nThis is a\nmultiline system.")],
        ),
        (
            '\nFROM foo\nSYSTEM """This is a\nmultiline system."""\n\t\t\t',
            [C("model", "foo"), C("system", "This is a\nmultiline system.")],
        ),
        (
            '\nFROM foo\nSYSTEM """This is a multiline system."""\n\t\t\t',
            [C("model", "foo"), C("system", "This is a multiline system.")],
        ),
        (
            '\nFROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
            [C("model", "foo"), C("system", '\nThis is a multiline system with "quotes".\n')],
        ),
        ('\nFROM foo\nSYSTEM """"""\n', [C("model", "foo"), C("system", "")]),
        ('\nFROM foo\nSYSTEM ""\n', [C("model", "foo"), C("system", "")]),
        ('\nFROM foo\nSYSTEM "\'"\n', [C("model", "foo"), C("system", "'")]),
        (
            '\nFROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n',
            [C("model", "foo"), C("system", "''\"'\"\"'\"\"'\"'''''\"\"'\"\"'")],
        ),
        (
            '\nFROM foo\nTEMPLATE """\n{{ .Prompt }}\n"""',
            [C("model", "foo"), C("template", "\n{{ .Prompt }}\n")],
        ),
    ],
)
def test_parse_file_quoted(text, expected):
    assert parse_modelfile(text) == expected


@pytest.mark.parametrize(
    "text", ['\nFROM foo\nSYSTEM """This is a multiline system.""\n\t\t\t', '\nFROM foo\nSYSTEM "\n\t\t\t']
)
def test_parse_file_unterminated_quote(text):
    err = parse_error(text)
    assert err.ollama_error == "unexpected EOF"
    assert err.line == 3  # ours: the line the unterminated value started on
    assert "never closed" in str(err)


def test_triple_quote_inside_a_value_ends_it_early():
    """Why render_modelfile refuses a \"\"\" in SYSTEM: the value would stop at the first line ending in \"\"\"."""
    text = 'FROM foo\nSYSTEM """Say\n"""hi"""\nPARAMETER top_k 1\n"""\n'  # what naive quoting would write
    err = parse_error(text)
    assert (err.message, err.line) == (ERR_INVALID_COMMAND, 5)  # the stray closing """ is read as a command
    assert parse_modelfile(text.rsplit('"""', 1)[0])[1] == C("system", 'Say\n"""hi')


PARAMETER_TABLE = {
    "numa true": ("numa", "true"),
    "num_ctx 1": ("num_ctx", "1"),
    "num_batch 1": ("num_batch", "1"),
    "num_gqa 1": ("num_gqa", "1"),
    "num_gpu 1": ("num_gpu", "1"),
    "main_gpu 1": ("main_gpu", "1"),
    "use_mmap true": ("use_mmap", "true"),
    "num_thread 1": ("num_thread", "1"),
    "num_keep 1": ("num_keep", "1"),
    "seed 1": ("seed", "1"),
    "num_predict 1": ("num_predict", "1"),
    "top_k 1": ("top_k", "1"),
    "top_p 1.0": ("top_p", "1.0"),
    "min_p 0.05": ("min_p", "0.05"),
    "typical_p 1.0": ("typical_p", "1.0"),
    "repeat_last_n 1": ("repeat_last_n", "1"),
    "temperature 1.0": ("temperature", "1.0"),
    "repeat_penalty 1.0": ("repeat_penalty", "1.0"),
    "presence_penalty 1.0": ("presence_penalty", "1.0"),
    "frequency_penalty 1.0": ("frequency_penalty", "1.0"),
    "penalize_newline true": ("penalize_newline", "true"),
    "stop ### User:": ("stop", "### User:"),
    "stop ### User: ": ("stop", "### User:"),
    'stop "### User:"': ("stop", "### User:"),
    'stop "### User: "': ("stop", "### User: "),
    'stop """### User:"""': ("stop", "### User:"),
    'stop """### User:\n"""': ("stop", "### User:\n"),
    "stop <|endoftext|>": ("stop", "<|endoftext|>"),
    "stop <|eot_id|>": ("stop", "<|eot_id|>"),
    "stop </s>": ("stop", "</s>"),
}


@pytest.mark.parametrize("line", PARAMETER_TABLE)
def test_parse_file_parameters(line):
    name, value = PARAMETER_TABLE[line]
    assert parse_modelfile(f"FROM foo\nPARAMETER {line}\n") == [C("model", "foo"), C(name, value)]


def test_parse_file_comments():
    assert parse_modelfile("\n# comment\nFROM foo\n\t") == [C("model", "foo")]
    # '#' starts a comment only where a command could start; inside a value it is text.
    assert parse_modelfile("FROM foo # not a comment\n  # a comment\n") == [C("model", "foo # not a comment")]


UTF16_DATA = "FROM bob\nPARAMETER param1 1\nPARAMETER param2 4096\nSYSTEM You are a utf16 file.\n"
UTF16_EXPECTED = [
    C("model", "bob"),
    C("param1", "1"),
    C("param2", "4096"),
    C("system", "You are a utf16 file."),
]


@pytest.mark.parametrize(
    "bom, codec", [(b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"), (b"\xef\xbb\xbf", "utf-8")]
)
def test_parse_file_bom(bom, codec):
    assert parse_modelfile(bom + UTF16_DATA.encode(codec)) == UTF16_EXPECTED


@pytest.mark.parametrize(
    "bom, codec", [(b"", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")]
)
def test_parse_multibyte(bom, codec):
    data = bom + "FROM test\n\tSYSTEM 你好👋".encode(codec)
    assert parse_modelfile(data) == [C("model", "test"), C("system", "你好👋")]


def test_parse_drops_non_printable_runes():
    assert parse_modelfile("FROM foo\nSYSTEM a\u200bb\u00a0c\x07d\n")[1] == C("system", "abcd")
    # ...except tabs and line breaks inside a quoted value, which are kept
    assert parse_modelfile('FROM foo\nSYSTEM """a\tb\r\nc"""\n')[1] == C("system", "a\tb\r\nc")


def test_create_request_typing():
    """TestCreateRequest: temperature is float32, top_k int64, licenses and messages collected."""
    text = (
        "FROM test\nPARAMETER temperature 0.5\nPARAMETER top_k 1\nSYSTEM You are a bot.\nLICENSE license1\n"
        "LICENSE license2\nMESSAGE user Hello there!\nMESSAGE assistant Hi! How are you?\n"
    )
    cmds = parse_modelfile(text)
    assert check_commands(cmds).parameters == {"temperature": 0.5, "top_k": 1}
    assert [c.args for c in cmds if c.name == "message"] == [
        "user: Hello there!",
        "assistant: Hi! How are you?",
    ]


def test_line_numbers_are_recorded():
    cmds = parse_modelfile('# c\nFROM foo\n\nSYSTEM """a\nb"""\nPARAMETER top_k 1\n')
    assert [(c.name, c.line) for c in cmds] == [("model", 2), ("system", 4), ("top_k", 6)]


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
