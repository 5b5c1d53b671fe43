"""Parity through real llama.cpp (llama-cpp-python): the exported file against the PyTorch reference."""

import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_llama_cpp

from so8t_export.cli import main
from so8t_export.export import export_gguf
from so8t_export.parity import DEFAULT_PROMPTS, run_parity

# Tokenisation is checked on a varied set: ASCII, CJK, emoji, code, and ChatML with specials.
TOKENIZER_TEXTS = DEFAULT_PROMPTS + [
    "  leading spaces, trailing\t\ttabs \n\n\nand newlines  ",
    "Ünïcödé: Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "<|im_start|>user\n<think>\nplan</think>\n<tool_call>\n{\"name\": \"f\"}\n</tool_call><|im_end|>",
    "x = {'a': [1, 2, 3]}  # 12345678901234567890 ++ -- && || != ==",
]


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
    a = report.aggregate()
    assert report.kv_cache == "F32"
    assert a["tokens_equal"]
    assert a["max_abs_logit"] <= 1e-3
    assert a["top1"] == 1.0
    assert all(r.greedy_matched == r.greedy_total == 64 for r in report.rows)
    assert a["safety_diff"] <= 1e-4 and a["authority_diff"] <= 1e-4
    assert report.passed, report.failures


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
    a = report.aggregate()
    print(f"\n{report.table()}")
    assert a["tokens_equal"] and 0 < a["mean_kld"] < 1e-2 and a["top1"] >= 0.9
    assert report.passed, report.failures


def test_q8_0_on_a_peaked_model(reports):
    """The demo model's next-token distributions are not flat (mean max probability > 0.5)."""
    a = reports["q8_0"].aggregate()
    assert a["mean_kld"] <= 1e-3
    assert a["greedy"] >= 0.95


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
