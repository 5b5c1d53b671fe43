"""Shared test helpers."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> None:
    """Skip a test whose tool (Go, llama-cpp-python) is missing here; fail it in CI, where every tool is installed.

    Import it in a test module with ``from conftest import skip_or_fail``.
    """
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run there, not be skipped)", pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------------------------------------- fixtures
# Tiny checkpoints are written once per test session and shared read-only.
@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory):
    """A tiny plain Qwen3 checkpoint (transformers layout) with the demo tokenizer."""
    from so8t_export.demo import write_tiny_qwen3

    return write_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3")


@pytest.fixture(scope="session")
def so8t_dir(qwen3_dir, tmp_path_factory):
    """The same model as an SO8T checkpoint (every flag on), loaded function-preserving and saved."""
    from so8t_export.model import SO8TTransformerForCausalLM

    out = tmp_path_factory.mktemp("so8t") / "tiny-so8t"
    SO8TTransformerForCausalLM.from_pretrained(qwen3_dir).save_pretrained(out)
    return out


def require_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        skip_or_fail(f"llama-cpp-python is not importable: {err}")
