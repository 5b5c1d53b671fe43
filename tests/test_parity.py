"""Parity through real llama.cpp (llama-cpp-python): the exported file against the PyTorch reference."""

import json
import shutil
from dataclasses import asdict

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_llama_cpp

from so8t_export.cli import main
from so8t_export.export import export_gguf
from so8t_export.parity import (DEFAULT_PROMPTS, REFERENCE_DTYPES, THRESHOLDS, reference_thresholds,
                                run_parity)

# Tokenisation is checked on a varied set: ASCII, CJK, emoji, code, and ChatML with specials.
TOKENIZER_TEXTS = DEFAULT_PROMPTS + [
    "  leading spaces, trailing\t\ttabs \n\n\nand newlines  ",
    "Ünïcödé: Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "<|im_start|>user\n<think>\nplan</think>\n<tool_call>\n{\"name\": \"f\"}\n</tool_call><|im_end|>",
    "x = {'a': [1, 2, 3]}  # 12345678901234567890 ++ -- && || != ==",
]


# What the reports fixture measured (tiny SO8T checkpoint, every flag on, random norm gains; the 5 default
# prompts, 251 tokens, 64 greedy tokens each; f32 reference; 2026-12, this 2-core machine). The tests' bounds
# are 10x the measured value for what should be small, and the measured fraction less 2% of positions (top-1)
# or 5% of tokens (greedy) for what should be large, room for other CPUs and thread counts, and never looser
# than parity.THRESHOLDS (bound() takes the tighter of the two).
MEASURED = {
    "f32": {"max_abs_logit": 5.0e-5, "mean_kld": 2.2e-13, "top1": 1.0, "greedy": 1.0, "head_prob": 4.8e-7},
    "f16": {"max_abs_logit": 9.1e-2, "mean_kld": 5.4e-7, "top1": 1.0, "greedy": 1.0, "head_prob": 9.4e-4},
    "bf16": {"max_abs_logit": 5.1e-1, "mean_kld": 2.8e-5, "top1": 1.0, "greedy": 1.0, "head_prob": 6.9e-3},
    "q8_0": {"max_abs_logit": 1.8, "mean_kld": 1.4e-4, "top1": 1.0, "greedy": 1.0, "head_prob": 1.3e-2},
}
# q8_0's head probabilities move by 1.3e-2 on this toy, above the 1e-2 the tool asks of a file: llama.cpp rounds
# the activations feeding the heads to 8 bits, and the heads here are untrained N(0, 0.1) on a 64-wide hidden
# state. The tool must say so: test_q8_0_heads_fail_where_they_move_too_much.
HEADS_FAIL = {"q8_0"}
SLACK = {"top1": 0.02, "greedy": 0.05}


def bound(quant: str, measure: str) -> float:
    """The test's bound on one aggregate measure: the measured value with its margin, or the tool's threshold
    where that is tighter."""
    measured, threshold = MEASURED[quant][measure], getattr(THRESHOLDS[quant], measure)
    if measure in SLACK:  # a fraction that agrees: at least
        return max(measured - SLACK[measure], threshold)
    return min(10 * measured, threshold if threshold is not None else float("inf"))


def assert_within_bounds(report, quant: str) -> None:
    a = report.aggregate()
    assert report.thresholds == THRESHOLDS[quant] and report.reference_dtype == "f32"
    assert a["tokens_equal"]
    assert a["max_abs_logit"] <= bound(quant, "max_abs_logit"), a
    assert 0 < a["mean_kld"] <= bound(quant, "mean_kld"), a
    assert a["top1"] >= bound(quant, "top1"), a
    assert a["greedy"] >= bound(quant, "greedy"), a
    if quant in HEADS_FAIL:
        return
    assert max(a["safety_diff"], a["authority_diff"]) <= bound(quant, "head_prob"), a
    assert report.passed, report.failures


@pytest.fixture(scope="module")
def exports(so8t_dir, tmp_path_factory):
    require_llama_cpp()
    folder = tmp_path_factory.mktemp("parity")
    return {quant: export_gguf(so8t_dir, folder / f"tiny-{quant}.gguf", quant=quant).output
            for quant in ("f32", "f16", "bf16", "q8_0")}


@pytest.fixture(scope="module")
def reports(so8t_dir, exports):
    return {quant: run_parity(so8t_dir, path, greedy_tokens=64) for quant, path in exports.items()}


def test_f32_matches_the_reference(reports):
    report = reports["f32"]
    assert report.kv_cache == "F32"
    assert_within_bounds(report, "f32")
    assert report.aggregate()["top1"] == 1.0
    assert all(r.greedy_matched == r.greedy_total == 64 for r in report.rows)


def test_tokenisation_is_identical(so8t_dir, exports):
    from transformers import AutoTokenizer

    from so8t_export.runtime import SO8TRuntime

    tokenizer = AutoTokenizer.from_pretrained(so8t_dir)
    runtime = SO8TRuntime(exports["f32"], n_ctx=256)
    for text in TOKENIZER_TEXTS:
        assert runtime.tokenize(text) == tokenizer(text, add_special_tokens=False).input_ids, text


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_quantised_types_report_kld_and_top1(reports, quant):
    report = reports[quant]
    print(f"\n{report.table()}")
    assert report.kv_cache == "F16"
    assert_within_bounds(report, quant)


def test_q8_0_heads_fail_where_they_move_too_much(reports):
    report = reports["q8_0"]
    a = report.aggregate()
    assert THRESHOLDS["q8_0"].head_prob < max(a["safety_diff"], a["authority_diff"]) <= 10 * MEASURED["q8_0"]["head_prob"]
    assert not report.passed and report.failures and all("head" in failure for failure in report.failures)


def test_bounds_are_never_looser_than_the_thresholds():
    for quant, t in THRESHOLDS.items():
        assert bound(quant, "mean_kld") <= t.mean_kld and bound(quant, "head_prob") <= t.head_prob
        assert quant in HEADS_FAIL or MEASURED[quant]["head_prob"] <= t.head_prob
        assert bound(quant, "top1") >= t.top1 and bound(quant, "greedy") >= t.greedy
        assert t.max_abs_logit is None or bound(quant, "max_abs_logit") <= t.max_abs_logit


def test_parity_cli_table_json_and_exit_code(so8t_dir, exports, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there, how are you?\n<|im_start|>user\\nHi<|im_end|>\n")
    result = CliRunner().invoke(main, ["parity", str(so8t_dir), str(exports["f32"]), "--prompts", str(prompts),
                                       "--greedy-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "max|dlogit|" in result.output and "PASS" in result.output
    result = CliRunner().invoke(main, ["parity", str(so8t_dir), str(exports["f32"]), "--prompts", str(prompts),
                                       "--greedy-tokens", "8", "--json"])
    assert result.exit_code == 0 and '"passed": true' in result.output
    # a file whose safety head differs from the reference's fails the head check: exit code 1
    tampered = tmp_path / "tampered.gguf"
    shutil.copy(exports["f32"], tampered)
    reader = gguf.GGUFReader(tampered, "r+")
    field = reader.get_field("so8t.safety_head.bias")
    field.parts[field.data[0]][0] = np.float32(3.0)
    reader.data.flush()
    del reader
    result = CliRunner().invoke(main, ["parity", str(so8t_dir), str(tampered), "--prompts", str(prompts),
                                       "--greedy-tokens", "4"])
    assert result.exit_code == 1 and "FAIL: head probability diff" in result.output


def test_parity_cli_bf16_reference(so8t_dir, exports):
    """--dtype bf16 loads the reference in bf16 and records it; the f32 file is held to bf16's thresholds."""
    args = ["parity", str(so8t_dir), str(exports["f32"]), "--greedy-tokens", "8"]
    result = CliRunner().invoke(main, args + ["--dtype", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["reference_dtype"] == "bf16" and payload["passed"]
    assert payload["thresholds"] == asdict(reference_thresholds("f32", "bf16"))
    assert payload["thresholds"] == {**asdict(THRESHOLDS["bf16"]), "max_abs_logit": None}
    assert any("bf16 reference" in note for note in payload["notes"])
    a = payload["aggregate"]
    print(f"\nbf16 reference, f32 file: {a}")
    # The reference really ran in bf16: it misses what an f32 reference reaches on this file (MEASURED["f32"])
    # by orders of magnitude. Measured: max abs logit 0.81, mean KLD 1.3e-3, top-1 99.4%, greedy 100%, heads
    # 1.5e-2; the bounds are bf16's thresholds (the reference's rounding changes with how it rotates).
    assert a["max_abs_logit"] > 100 * bound("f32", "max_abs_logit")
    assert 1e3 * bound("f32", "mean_kld") < a["mean_kld"] <= THRESHOLDS["bf16"].mean_kld
    assert a["tokens_equal"] and a["top1"] >= THRESHOLDS["bf16"].top1
    assert a["greedy"] >= THRESHOLDS["bf16"].greedy
    assert max(a["safety_diff"], a["authority_diff"]) <= THRESHOLDS["bf16"].head_prob

    result = CliRunner().invoke(main, args + ["--dtype", "bf16"])
    assert result.exit_code == 0 and "parity: f32 GGUF, F32 KV cache, bf16 reference" in result.output
    result = CliRunner().invoke(main, args + ["--json"])  # the default stays f32, with f32's thresholds
    assert json.loads(result.stdout)["reference_dtype"] == "f32"
    assert json.loads(result.stdout)["thresholds"] == asdict(THRESHOLDS["f32"])
    result = CliRunner().invoke(main, args + ["--dtype", "f16"])
    assert result.exit_code == 2
    error = "Error: Invalid value for '--dtype': 'f16' is not one of 'f32', 'bf16'."
    assert result.output.splitlines()[-1] == error


def test_bf16_reference_still_fails_a_wrong_fold(so8t_dir, exports, tmp_path):
    """A file whose layer 0 was left unfolded (the SO8T checkpoint's rotated-basis weights written as they
    are) fails against the bf16 reference by far more than bf16's rounding."""
    from safetensors.torch import load_file

    unfolded = load_file(str(so8t_dir / "model.safetensors"))
    wrong = tmp_path / "layer0-unfolded.gguf"
    shutil.copy(exports["f32"], wrong)
    reader = gguf.GGUFReader(wrong, "r+")
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, name in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                            ("attn_v", "self_attn.v_proj"), ("ffn_gate", "mlp.gate_proj"),
                            ("ffn_up", "mlp.up_proj")):
        tensors[f"blk.0.{gguf_name}.weight"].data[...] = unfolded[f"model.layers.0.{name}.weight"].numpy()
    reader.data.flush()
    del reader, tensors
    report = run_parity(so8t_dir, wrong, prompts=DEFAULT_PROMPTS[:2], greedy_tokens=8, dtype="bf16")
    a = report.aggregate()
    print(f"\nlayer 0 unfolded, bf16 reference: {a}")
    assert not report.passed and a["mean_kld"] > 100 * THRESHOLDS["bf16"].mean_kld  # measured 7.2
    assert any(f.startswith("mean KLD") for f in report.failures)


def test_reference_thresholds():
    for file_type, own in THRESHOLDS.items():
        assert reference_thresholds(file_type) == reference_thresholds(file_type, "f32") == own
        bf16 = reference_thresholds(file_type, "bf16")
        assert bf16.max_abs_logit is None
        assert bf16.mean_kld >= own.mean_kld and bf16.head_prob >= own.head_prob
        assert bf16.top1 <= own.top1 and bf16.greedy <= own.greedy
    assert reference_thresholds("bf16", "bf16") == THRESHOLDS["bf16"]
    option = next(p for p in main.commands["parity"].params if p.name == "dtype")
    assert tuple(option.type.choices) == tuple(REFERENCE_DTYPES) and option.default == "f32"
    with pytest.raises(ValueError, match="reference dtype 'f16'; expected one of f32, bf16"):
        reference_thresholds("f32", "f16")


def test_run_parity_refuses_an_unknown_dtype_before_reading(so8t_dir, tmp_path):
    with pytest.raises(ValueError, match="reference dtype 'float32'; expected one of f32, bf16"):
        run_parity(so8t_dir, tmp_path / "missing.gguf", dtype="float32")


def test_runtime_cli_chats_and_scores(exports):
    import json

    from so8t_export.cli import runtime_main

    result = CliRunner().invoke(runtime_main, ["run", str(exports["f32"]), "Is it safe to mix bleach and ammonia?",
                                               "--max-tokens", "8", "--refuse-above", "off", "--stop-above", "off",
                                               "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # llama.cpp logs to stderr
    scores = payload["so8t"]
    assert set(scores["safety"]) == {"safe", "unsafe"} and set(scores["authority"]) == {"handle", "escalate"}
    assert abs(sum(scores["safety"].values()) - 1) < 1e-3 and payload["tokens"] == 8


def test_ollama_command_writes_gguf_modelfile_and_create_line(so8t_dir, tmp_path):
    from so8t_export.modelfile import check_modelfile

    out = tmp_path / "ollama"
    result = CliRunner().invoke(main, ["ollama", str(so8t_dir), "--quant", "q8_0", "--name", "so8t-tiny",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    gguf_file, modelfile = out / "so8t-tiny-q8_0.gguf", out / "so8t-tiny.Modelfile"
    assert gguf_file.exists() and modelfile.exists()
    assert "FROM ./so8t-tiny-q8_0.gguf" in modelfile.read_text()
    check_modelfile(modelfile)
    assert f"ollama create so8t-tiny -f {modelfile}" in result.output
