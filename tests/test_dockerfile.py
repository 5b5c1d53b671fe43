"""Structure of the Dockerfile (Docker cannot run here): pinned tag, no GGUF layer, one serve/poll/create/stop RUN."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from so8t_export.modelfile import (
    CHECKED_IN_MODELFILE,
    MODEL_NAME,
    OLLAMA_IMAGE,
    OLLAMA_VERSION,
    check_modelfile,
    expand_path,
    gguf_filename,
)

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not pending and (raw.strip() == "" or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + "\n"
            continue
        line = pending + raw
        pending = ""
        keyword, _, rest = line.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def only(kind: str) -> list[str]:
    return [args for k, args in instructions() if k == kind]


def bind_mounts(run_args: str) -> tuple[list[dict[str, str]], str]:
    """The RUN's --mount=type=bind options and the shell script after them."""
    mounts = []
    rest = run_args
    while rest.startswith("--mount="):
        opt, _, rest = rest.partition(" ")
        fields = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in opt[len("--mount=") :].split(","))
        mounts.append(fields)
        rest = rest.lstrip()
    return mounts, rest


def create_run() -> tuple[list[dict[str, str]], str]:
    runs = [args for args in only("RUN") if "ollama serve" in args]
    assert len(runs) == 1, "exactly one RUN starts `ollama serve`"
    return bind_mounts(runs[0])


def test_base_image_is_pinned_to_the_validated_version():
    froms = only("FROM")
    assert froms == [OLLAMA_IMAGE]
    assert re.fullmatch(r"\d+\.\d+\.\d+", OLLAMA_VERSION) and "latest" not in froms[0]


def test_env_sets_models_dir_and_go_template():
    env = " ".join(only("ENV"))
    models = re.search(r"\bOLLAMA_MODELS=(\S+)", env)
    assert models and PurePosixPath(models.group(1)).is_absolute()
    assert not models.group(1).startswith("/root"), (
        "keep models out of $HOME so a volume on it cannot hide them"
    )
    assert re.search(r"\bOLLAMA_GO_TEMPLATE=1\b", env)


def test_gguf_is_never_copied_into_a_layer():
    for kind, args in instructions():
        if kind in ("COPY", "ADD"):
            for src in shlex.split(args)[:-1]:
                assert not src.startswith("--"), f"{kind} flags are not expected here: {args}"
                assert (REPO / src).exists(), f"{kind} source {src} is missing from the repo"
                assert not src.endswith(".gguf") and not (REPO / src).is_dir(), (
                    f"{kind} {src} would copy the GGUF"
                )
    mounts, _ = create_run()
    assert mounts, "the GGUF must come in through a mount, not COPY"
    for m in mounts:
        assert m.get("type") == "bind" and ("readonly" in m or "ro" in m)
        assert (REPO / m["source"]).is_dir(), f"bind-mount source {m['source']} is missing"


def test_one_run_serves_polls_creates_and_stops():
    _, script = create_run()
    serve = script.index("ollama serve")
    poll = script.index("until ollama list")
    create = script.index(f"ollama create {MODEL_NAME} -f ")
    stop = script.index('kill "$serve"')
    assert serve < poll < create < stop
    assert re.search(r"ollama serve[^;\n]*&\s*serve=\$!", script), "the server runs in the background"
    assert "sleep 1" in script and re.search(r"-gt \d+", script), "readiness is polled with a bounded retry"
    assert script.rstrip().endswith('exit "$status"'), "the build fails when `ollama create` fails"
    if shutil.which("sh"):
        syntax = subprocess.run(["sh", "-n"], check=False, input=script, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr


def test_create_line_names_the_generated_modelfile():
    mounts, script = create_run()
    (modelfile_arg,) = re.findall(rf"ollama create {MODEL_NAME} -f ([^\s;]+)", script)
    target = PurePosixPath(modelfile_arg)
    (mount,) = [m for m in mounts if target.is_relative_to(m["target"])]
    host_path = REPO / mount["source"] / target.relative_to(mount["target"])
    assert host_path == REPO / CHECKED_IN_MODELFILE

    # Its FROM stays inside the mounted folder and names the GGUF `so8t-export ollama -o modelfiles` writes.
    result = check_modelfile(host_path, require_files=False)
    (from_cmd,) = [c for c in result.commands if c.name == "model"]
    gguf = Path(expand_path(from_cmd.args, host_path.parent))
    assert gguf == REPO / mount["source"] / gguf_filename()


def test_readme_section_names_the_pinned_image():
    text = (REPO / "docs" / "ollama.md").read_text(encoding="utf-8")
    assert OLLAMA_IMAGE in text and f"Ollama {OLLAMA_VERSION}" in text
    assert "docker build" in text and "docker run" in text


@pytest.mark.parametrize("kind", ["CMD", "ENTRYPOINT", "USER"])
def test_base_image_runtime_is_kept(kind):
    """The image keeps ollama/ollama's ENTRYPOINT/CMD (`ollama serve`) and user, so OLLAMA_MODELS stays valid."""
    assert only(kind) == []
