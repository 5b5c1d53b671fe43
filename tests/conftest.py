"""Shared test helpers, the rule that nothing is skipped in CI, and an FP8 decoder independent of ours."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

def skip_or_fail(reason: str) -> None:
    """Skip a test whose tool (Go, llama-cpp-python, llama.cpp's converter) is missing here.

    Under CI=true, where every tool is installed, the report hooks below turn the skip into a failure. Import
    it in a test module with ``from conftest import skip_or_fail``.
    """
    pytest.skip(reason)


# ------------------------------------------------------------------------------------------ CI: no skips
# Structural rather than copied into each test: whatever skips (pytest.skip, a skip or skipif mark,
# importorskip, a fixture that skips, a module skipped at collection), under CI=true the report says failed
# and names the reason. xfail is left alone: an xfailed test has run, and a strict one fails when it passes.
def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return f"{longrepr[2]} ({longrepr[0]}:{longrepr[1]})"
    return str(longrepr)


def _fail_skip_in_ci(report) -> None:
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = (f"{_skip_reason(report)}\n"
                           "CI=true: every tool is installed there, so this test must run, not be skipped")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_skip_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_skip_in_ci(report)
    return report


# ------------------------------------------------------------------------------ FP8, decoded independently
# The reference for so8t_export.checkpoint's FP8 reader. It shares nothing with so8t_export.quants: the e4m3
# and bf16 bit fields are decoded by hand (OCP 8-bit floating point spec; a bf16 is a float32's top half),
# then the blocks are scaled in a plain loop. tests/test_checkpoint.py checks the decoder against torch's
# float8_e4m3fn on all 256 bytes, and the dequantisation against the tensors llama.cpp's own converter
# writes from the same checkpoint.
def decode_e4m3fn(raw: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes -> float64: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
    subnormal (m/8 * 2^-6); S.1111.111 is NaN; there are no infinities (S.1111.110 = 448 is the largest)."""
    b = np.asarray(raw, dtype=np.uint8).astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exponent, mantissa = (b >> 3) & 0xF, b & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return np.where((exponent == 15) & (mantissa == 7), np.nan, sign * magnitude)


def decode_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: they are the upper 16 bits of a float32."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def tensor_values(tensor) -> np.ndarray:
    """A checkpoint tensor's values as float64, from its bytes: e4m3 and bf16 decoded above, f16/f32 by
    numpy."""
    import torch

    if tensor.dtype == torch.float8_e4m3fn:
        return decode_e4m3fn(tensor.view(torch.uint8).numpy())
    if tensor.dtype == torch.bfloat16:
        return decode_bf16(tensor.view(torch.int16).numpy().view(np.uint16)).astype(np.float64)
    return tensor.numpy().astype(np.float64)


def numpy_dequant(weight_fp8, scale, block: tuple[int, int]) -> np.ndarray:
    """Block FP8 -> float32: element (r, c) is e4m3(weight[r, c]) * scale[r // block[0], c // block[1]], edge
    blocks cut to the shape. A 4-bit times an 8-bit significand is exact in float64, so this is rounded once,
    to float32, as llama.cpp's converter computes it (``weight.float() * scale``)."""
    w, s = tensor_values(weight_fp8), tensor_values(scale)
    assert s.shape == (math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1])), (s.shape, w.shape)
    out = np.empty_like(w)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = w[rows, cols] * s[i, j]
    return out.astype(np.float32)


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
    """fp8_dir's weights as float32, without quantization_config: the FP8 tensors through numpy_dequant, the
    bf16 ones decoded by hand (exact), so that nothing here goes through the reader under test."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("fp8-dense") / "tiny-fp8-dense"
    shutil.copytree(fp8_dir, out)
    config = json.loads((out / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    stored = load_file(str(fp8_dir / "model.safetensors"))
    dense = {}
    for name, tensor in stored.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            values = numpy_dequant(tensor, stored[name.removesuffix(".weight") + ".weight_scale_inv"], block)
        else:
            values = tensor_values(tensor).astype(np.float32)
        dense[name] = torch.from_numpy(values)
    save_file(dense, str(out / "model.safetensors"))
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
