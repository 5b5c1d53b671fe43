"""llama.cpp's own Python converter, from the source that llama-cpp-python 0.3.36 vendors, as a test reference.

The sdist comes from the package registry by name (pip download, never committed), once per machine: it is
cached under ~/.cache/so8t-export (SO8T_CACHE overrides), keyed by version, so CI on the same machine reuses it.
Only convert_hf_to_gguf.py, conversion/ and gguf-py/ are unpacked.

`convert` runs it once; `convert_each` runs it on many folders in one process (for the tokenizer comparison);
`converter_chktxt` reads the text its pre-tokenizer recognition hashes.

`llama_tool` finds llama.cpp's own compiled tools (llama-quantize, llama-imatrix, llama-perplexity,
llama-server, and the patched llama-server), which cpp_patches/build.sh builds from the same sdist and caches.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache" / "so8t-export"))
REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "bench" / "convert_hf_wrapper.py"
BUILD_SH = REPO / "cpp_patches" / "build.sh"


@functools.cache
def llama_tools_dir(patched: bool = False) -> Path:
    """build.sh's output folder D (D/stock/bin, and D/so8t/bin when patched). $SO8T_LLAMA_TOOLS names a D
    built already (the Makefile sets it); otherwise build.sh runs here, which is 0.6 s once its cache is warm
    and a cold build of several minutes the first time."""
    if folder := os.environ.get("SO8T_LLAMA_TOOLS"):
        return Path(folder)
    command = ["bash", str(BUILD_SH)] + ([] if patched else ["--stock-only"])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def llama_tool(name: str, patched: bool = False) -> Path:
    """One of llama.cpp's tools: stock (D/stock/bin/NAME) or, with patched, our llama-server (D/so8t/bin)."""
    tool = llama_tools_dir(patched) / ("so8t" if patched else "stock") / "bin" / name
    if not tool.is_file():
        raise RuntimeError(f"{tool} is missing (cpp_patches/build.sh builds it)")
    return tool


def fetch_converter(cache: Path = CACHE) -> Path:
    """vendor/llama.cpp from the llama-cpp-python sdist (convert_hf_to_gguf.py, conversion/, gguf-py/)."""
    dest = cache / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    sdist_dir = cache / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sorted(sdist_dir.glob(pattern)):
        # --no-binary for this package only: its build dependencies may come as wheels (pip prepares metadata).
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                        "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(sdist_dir)],
                       check=True)
    tarball = sorted(sdist_dir.glob(pattern))[0]
    tmp = cache / f"{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "requirements", "LICENSE")
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<rest>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            if parts[3].startswith(wanted) and (member.isfile() or member.isdir()):
                member.name = parts[3]
                tar.extract(member, tmp, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"{tarball}: no vendor/llama.cpp/convert_hf_to_gguf.py")
    if (dest / "convert_hf_to_gguf.py").is_file():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def convert(model_dir: Path, outfile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run llama.cpp's converter on model_dir (pre-tokenizer hash check bypassed, see the wrapper)."""
    llama_dir = fetch_converter()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter needs its own gguf-py
    return subprocess.run([sys.executable, str(WRAPPER), str(llama_dir), "--", str(model_dir), "--outfile",
                           str(outfile), *extra], capture_output=True, text=True, env=env, check=False)


# One interpreter for many folders: the converter's imports (torch, transformers) take ~3 s, one --vocab-only
# conversion of a tiny tokenizer ~30 ms. Each folder goes through the wrapper's main() exactly as `convert`
# runs it; tests/test_tokenizer_converter.py checks that a folder converted after others gives the same file
# as a run of its own.
_DRIVER = """
import importlib.util, json, sys, traceback
wrapper, llama_dir, status, *rest = sys.argv[1:]
extra, pairs = rest[:rest.index("--")], rest[rest.index("--") + 1:]
spec = importlib.util.spec_from_file_location("convert_hf_wrapper", wrapper)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
errors = {}
for model_dir, outfile in zip(pairs[::2], pairs[1::2]):
    sys.argv = [wrapper, llama_dir, "--", model_dir, "--outfile", outfile, *extra]
    try:
        module.main()
    except SystemExit as err:
        if err.code not in (None, 0):
            errors[model_dir] = f"exit status {err.code}"
    except Exception:
        errors[model_dir] = traceback.format_exc()
with open(status, "w", encoding="utf-8") as f:
    json.dump({"errors": errors, "gguf": sys.modules["gguf"].__file__}, f)
"""


def convert_each(jobs: Sequence[tuple[Path, Path]], *extra: str) -> dict[Path, str | None]:
    """Run llama.cpp's converter (through the wrapper) on each (model_dir, outfile) in one process.

    Returns model_dir -> None when its file was written, else the converter's traceback. Raises RuntimeError
    when the process itself fails, or when the converter imported another gguf-py than its own (that would be
    PyPI's, the one so8t_export writes with, and the comparison would be with ourselves).
    """
    llama_dir = fetch_converter()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter needs its own gguf-py
    status = Path(jobs[0][1]).parent / f".convert-status-{os.getpid()}.json"
    pairs = [str(p) for job in jobs for p in job]
    result = subprocess.run([sys.executable, "-c", _DRIVER, str(WRAPPER), str(llama_dir), str(status), *extra,
                             "--", *pairs], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0 or not status.is_file():
        raise RuntimeError(f"the converter driver failed (exit {result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    report = json.loads(status.read_text(encoding="utf-8"))
    status.unlink()
    own = (llama_dir / "gguf-py").resolve()
    if not Path(report["gguf"]).resolve().is_relative_to(own):
        raise RuntimeError(f"the converter imported gguf from {report['gguf']}, not its own {own}")
    log = result.stderr[-3000:]
    return {Path(model_dir): None if str(model_dir) not in report["errors"] else
            f"{report['errors'][str(model_dir)]}\n--- converter log (all folders), last lines:\n{log}"
            for model_dir, _ in jobs}


def converter_chktxt() -> str:
    """The text whose token ids the converter hashes to recognise a BPE pre-tokenizer (``chktxt`` in
    ``get_vocab_base_pre``), read from the fetched source. The wrapper bypasses that recognition (our tiny
    vocabularies have no known hash), so tests tokenise this text instead: llama.cpp with pre "qwen2" must
    split it as transformers does."""
    llama_dir = fetch_converter()
    for source in (llama_dir / "conversion" / "base.py", llama_dir / "convert_hf_to_gguf.py"):
        if not source.is_file():
            continue
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
                for stmt in node.body:
                    targets = [getattr(t, "id", None) for t in getattr(stmt, "targets", [])]
                    if isinstance(stmt, ast.Assign) and targets == ["chktxt"]:
                        return ast.literal_eval(stmt.value)
    raise RuntimeError(f"{llama_dir}: no chktxt assignment in get_vocab_base_pre")
