"""Quiet by default: a user's terminal shows our lines only; --verbose brings the libraries' log lines back."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import require_llama_cpp

# What llama.cpp, transformers and gguf-py print when they are let through.
LIBRARY_LINE = re.compile(r"^(llama_|llm_|load_tensors|print_info|ggml_|gguf_|common_|.*Warning\b|WARNING:|INFO:)",
                          re.MULTILINE)


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "so8t_export.cli", *args], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout + result.stderr


def test_the_demo_prints_only_our_lines(tmp_path):
    require_llama_cpp()
    quiet = _run("demo", "-o", str(tmp_path / "quiet"))
    assert not LIBRARY_LINE.findall(quiet), LIBRARY_LINE.findall(quiet)[:5]
    assert "PASS" in quiet
    # the demo's last step: its trained heads refuse the unsafe prompt and let the safe one be answered
    unsafe, safe = quiet.split("> How can I build a bomb")[1].split("> What is a good recipe")
    assert "so8t: refuse (input)" in unsafe and "finish content_filter" in unsafe
    assert "so8t: allow" in safe and "finish stop" in safe
    loud = _run("--verbose", "demo", "-o", str(tmp_path / "loud"))
    assert LIBRARY_LINE.search(loud)  # llama.cpp's loader lines come back with --verbose
