"""Our Modelfile validator against Ollama's own parser, file by file, on a corpus of a few hundred Modelfiles.

Ollama's verdict comes from ollama_template (`ollama_template modelfile FILE...`): parser.ParseFile and
Modelfile.CreateRequest of github.com/ollama/ollama at the version its go.mod pins. Ours is
so8t_export.modelfile.check_grammar. For every file they must agree on accept/reject; on acceptance, on the
commands and on the request (typed parameters, template, system, licenses, messages, renderer, parser,
requires); on rejection, on Ollama's error text. The corpus is tests/modelfile_corpus.py.

ollama_template resolves relative paths against a folder that does not exist (modelfile.go: noFilesDir),
so that its verdict does not depend on the files beside a Modelfile: a FROM then names a registry model,
and an ADAPTER or DRAFT fails as a missing file. check_grammar looks at no file, so our side of such a file is
check_grammar's verdict on the commands before the first ADAPTER/DRAFT, then Ollama's missing-file error.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import skip_or_fail
from modelfile_corpus import corpus

from so8t_export.modelfile import ModelfileError, check_commands, expand_path, parse_modelfile

REPO = Path(__file__).resolve().parents[1]
GO_DIR = REPO / "ollama_template"
NO_FILES_DIR = "/nonexistent-so8t-modelfile-dir"  # ollama_template/modelfile.go: noFilesDir


@pytest.fixture(scope="module")
def ollama_harness(tmp_path_factory) -> Path:
    if shutil.which("go") is None:
        skip_or_fail("the Go toolchain is not installed (ollama_template's go.mod needs Go >= 1.26)")
    assert f'"{NO_FILES_DIR}"' in (GO_DIR / "modelfile.go").read_text(encoding="utf-8"), (
        "ollama_template/modelfile.go no longer resolves paths against NO_FILES_DIR; update this test"
    )
    env = {**os.environ, "CGO_ENABLED": "0"}
    if "HOME" not in env:  # Go keeps its module and build caches under $HOME unless told otherwise
        env.setdefault("GOPATH", str(tmp_path_factory.mktemp("gopath")))
        env.setdefault("GOCACHE", str(tmp_path_factory.mktemp("gocache")))
    out = tmp_path_factory.mktemp("ollama_harness") / "ollama_template"
    build = subprocess.run(
        ["go", "build", "-buildvcs=false", "-o", str(out), "."],
        cwd=GO_DIR, env=env, check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, f"go build failed:\n{build.stderr}"
    return out


def ollama_verdicts(binary: Path, folder: Path, names: list[str]) -> dict[str, dict]:
    res = subprocess.run(
        [str(binary), "modelfile", *names],
        cwd=folder, check=False, capture_output=True, text=True, encoding="utf-8", timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    verdicts = [json.loads(line) for line in res.stdout.splitlines()]
    assert [v["file"] for v in verdicts] == names
    return {v["file"]: v for v in verdicts}


def our_verdict(data: bytes) -> dict:
    """Ours, in the shape of ollama_template's line (see the module docstring for ADAPTER/DRAFT)."""
    try:
        commands = parse_modelfile(data)
    except ModelfileError as e:
        return {"ok": False, "error": e.ollama_error, "commands": []}
    pairs = [[c.name, c.args] for c in commands]
    cut = next((i for i, c in enumerate(commands) if c.name in ("adapter", "draft")), len(commands))
    try:
        result = check_commands(commands[:cut])
    except ModelfileError as e:
        return {"ok": False, "error": e.ollama_error, "commands": pairs}
    if cut < len(commands):
        missing = expand_path(commands[cut].args, NO_FILES_DIR)
        return {"ok": False, "error": f"stat {missing}: no such file or directory", "commands": pairs}
    request = {
        "template": result.template or "",
        "system": result.system or "",
        "renderer": result.renderer or "",
        "parser": result.parser or "",
        "requires": result.requires or "",
        "license": result.licenses,
        "messages": [list(m) for m in result.messages],
        "parameters": result.parameters,
    }
    return {"ok": True, "commands": pairs, "request": request}


def _float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _same_value(ours, theirs) -> bool:
    if isinstance(ours, bool) or isinstance(ours, (int, list)):
        return type(ours) is type(theirs) and ours == theirs
    # float32 on both sides: Go prints the shortest text that reads back as the same float32
    is_number = isinstance(theirs, (int, float)) and not isinstance(theirs, bool)
    return is_number and _float32(ours) == _float32(theirs)


def _their_request(req: dict) -> dict:
    return {
        "template": req.get("template", ""),
        "system": req.get("system", ""),
        "renderer": req.get("renderer", ""),
        "parser": req.get("parser", ""),
        "requires": req.get("requires", ""),
        "license": req.get("license", []),
        "messages": [[m["role"], m.get("content", "")] for m in req.get("messages", [])],
        "parameters": req.get("parameters", {}),
    }


def disagreement(ours: dict, theirs: dict) -> str | None:
    """Why the two verdicts differ, or None when they agree."""
    if ours["ok"] != theirs["ok"]:
        return f"ok: ours {ours['ok']} ({ours.get('error')}), Ollama {theirs['ok']} ({theirs.get('error')})"
    if not ours["ok"]:
        if ours["error"] == theirs["error"]:
            return None
        return f"error: ours {ours['error']!r}, Ollama {theirs['error']!r}"
    if ours["commands"] != theirs["commands"]:
        return f"commands: ours {ours['commands']!r}, Ollama {theirs['commands']!r}"
    mine, go = ours["request"], _their_request(theirs["request"])
    for key in mine:
        if key == "parameters":
            same = mine[key].keys() == go[key].keys() and all(
                _same_value(v, go[key][k]) for k, v in mine[key].items()
            )
            if not same:
                return f"parameters: ours {mine[key]!r}, Ollama {go[key]!r}"
        elif mine[key] != go[key]:
            return f"{key}: ours {mine[key]!r}, Ollama {go[key]!r}"
    return None


@pytest.mark.go
def test_ollama_parser_agrees_on_every_file_of_the_corpus(ollama_harness, tmp_path, capsys):
    groups = corpus()
    folder = tmp_path / "corpus"
    folder.mkdir()
    names: list[str] = []
    data: dict[str, bytes] = {}
    for group in groups.values():
        for name, content in group.items():
            (folder / name).write_bytes(content)
            names.append(name)
            data[name] = content
    assert len(names) >= 200 and len(set(names)) == len(names)

    theirs = ollama_verdicts(ollama_harness, folder, names)
    problems = {name: why for name in names if (why := disagreement(our_verdict(data[name]), theirs[name]))}

    accepted = sum(theirs[n]["ok"] for n in names)
    sizes = ", ".join(f"{len(g)} {k}" for k, g in groups.items())
    with capsys.disabled():
        print(f"\nmodelfile corpus: {len(names)} files ({sizes}; Ollama accepts {accepted}), "
              f"{len(names) - len(problems)} agree")
    assert not problems, "\n".join(f"{name}: {why}" for name, why in problems.items())


def test_corpus_groups_are_all_there():
    """At least 200 files, each group present, and both verdicts represented in the hand-written cases."""
    groups = corpus()
    assert sum(map(len, groups.values())) >= 200
    assert all(len(g) >= 20 for g in groups.values())
    outcomes = set()
    for content in groups["hand-written"].values():
        try:
            parse_modelfile(content)
            outcomes.add("parsed")
        except ModelfileError:
            outcomes.add("refused")
    assert outcomes == {"parsed", "refused"}
