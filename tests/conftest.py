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


FP8_BLOCK = (48, 40)  # divides none of 64, 128, 256: every tensor has edge blocks


@pytest.fixture(scope="session")
def fp8_dir(qwen3_dir, tmp_path_factory):
    """The tiny model shipped the way Qwen ships FP8: e4m3 weights, bf16 weight_scale_inv per block."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from so8t_export.quants import quantize_fp8

    out = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    shutil.copytree(qwen3_dir, out)
    fp8 = {}
    for name, tensor in load_file(str(out / "model.safetensors")).items():
        if tensor.ndim == 2 and "embed" not in name:
            q, scale = quantize_fp8(tensor, FP8_BLOCK)
            fp8[name], fp8[name.removesuffix(".weight") + ".weight_scale_inv"] = q, scale.to(torch.bfloat16)
        else:
            fp8[name] = tensor.to(torch.bfloat16)
    save_file(fp8, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK)}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def fp8_dense_dir(fp8_dir, tmp_path_factory):
    """fp8_dir's weights dequantised to float32, without quantization_config."""
    import json
    import shutil

    from safetensors.torch import save_file

    from so8t_export.checkpoint import CheckpointReader

    out = tmp_path_factory.mktemp("fp8-dense") / "tiny-fp8-dense"
    shutil.copytree(fp8_dir, out)
    reader = CheckpointReader(fp8_dir)
    save_file({n: reader.read(n) for n in reader.names()}, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def require_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        skip_or_fail(f"llama-cpp-python is not importable: {err}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The bad-input suite's table (tests/test_bad_inputs.py): cases per class and what happened to them.
    FUZZ_REPORT=path.json also writes every case's record there."""
    import json
    from pathlib import Path

    try:
        from fuzz.harness import collect_records, summary_table
    except ImportError:  # tests/ is not on sys.path (another rootdir): there is no table to print
        return
    records = collect_records(terminalreporter.stats)
    if not records:
        return
    terminalreporter.write_sep("=", f"bad-input cases ({len(records)})")
    for line in summary_table(records):
        terminalreporter.write_line(line)
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(records, indent=1, ensure_ascii=False))
