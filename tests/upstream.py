"""llama.cpp's own Python converter, from the source that llama-cpp-python 0.3.36 vendors, as a test reference.

The sdist comes from the package registry by name (pip download, never committed), once per machine: it is
cached under ~/.cache/so8t-export (SO8T_CACHE overrides), keyed by version, so CI on the same machine reuses it.
Only convert_hf_to_gguf.py, conversion/ and gguf-py/ are unpacked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CACHE = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache" / "so8t-export"))
WRAPPER = Path(__file__).resolve().parent.parent / "bench" / "convert_hf_wrapper.py"


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
