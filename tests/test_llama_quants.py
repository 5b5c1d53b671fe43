"""llama.cpp's k- and i-quant types through llama.cpp's own quantiser (so8t_export/llama_quantize.py).

The model is the tiny Qwen3 at a width of 256 (hidden 256, MLP 512, 16 heads of 16): the k- and i-quants
pack 256 columns per block, and llama.cpp falls narrower rows back to 32-column types (q4_k -> q5_0, ...),
which the 64-wide demo model shows (test_narrow_rows_fall_back_as_llama_cpp_decides). Its weights are the
HF-default N(0, 0.02) draw, whose next-token distributions are flat: quantisation moves them a little and in
proportion to the bits lost (the sharp draw's logits are so large that even q6_k moves them by KLD > 0.3).

References: gguf-py reads every file back; llama-cpp-python loads and runs it; llama.cpp's stock
llama-quantize (cpp_patches/build.sh) makes the same file from the same bf16 GGUF; the f32 PyTorch reference
gives the logits KLD is measured against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_llama_cpp, skip_or_fail
from upstream import llama_tool

from so8t_export.cli import main
from so8t_export.config import LLAMA_QUANT_TYPE_NAMES
from so8t_export.demo import LM_CORPUS, read_jsonl, write_tiny_qwen3
from so8t_export.export import export_gguf
from so8t_export.imatrix import CALIBRATION_TEXT, read_calibration_text, write_imatrix
from so8t_export.llama_quantize import (FLOAT_STAGE, IMATRIX_REQUIRED, LLAMA_FTYPES, QuantizeError,
                                        ReferenceLogits, export_quantized, quantize_file)
from so8t_export.model import SO8TTransformerForCausalLM

pytestmark = pytest.mark.llama
WIDE = {"hidden_size": 256, "intermediate_size": 512}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """The 256-wide tiny model as an SO8T checkpoint (every flag on)."""
    require_llama_cpp()
    root = tmp_path_factory.mktemp("wide")
    qwen3 = write_tiny_qwen3(root / "tiny-qwen3-256", sharp=False, **WIDE)
    out = root / "tiny-so8t-256"
    SO8TTransformerForCausalLM.from_pretrained(qwen3).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def imatrix_file(wide_dir, tmp_path_factory):
    """The reference's imatrix over the shipped calibration text (so8t-export imatrix)."""
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    write_imatrix(wide_dir, read_calibration_text(CALIBRATION_TEXT), out)
    return out


@pytest.fixture(scope="module")
def float_file(wide_dir, tmp_path_factory):
    """The float GGUF the quantiser reads, as export_quantized writes it."""
    return export_gguf(wide_dir, tmp_path_factory.mktemp("float") / f"tiny-{FLOAT_STAGE}.gguf",
                       quant=FLOAT_STAGE).output


@pytest.fixture(scope="module")
def held_out(wide_dir):
    """Reference logits on text the imatrix never saw: the demo's LM corpus, 2 chunks of 256 tokens."""
    text = "\n".join(json.dumps(row, ensure_ascii=False) for row in read_jsonl(LM_CORPUS))
    return ReferenceLogits(wide_dir, text, chunk_size=256, max_chunks=2)


def so8t_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("so8t.")}


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ every type
@pytest.fixture(scope="module")
def every_type(wide_dir, imatrix_file, tmp_path_factory):
    """Every llama.cpp type, each exported with the imatrix (the ones that need it) or without."""
    folder = tmp_path_factory.mktemp("types")
    return {quant: export_quantized(wide_dir, folder / f"{quant}.gguf", quant=quant,
                                    imatrix=imatrix_file if quant in IMATRIX_REQUIRED else None)
            for quant in LLAMA_QUANT_TYPE_NAMES}


@pytest.mark.parametrize("quant", LLAMA_QUANT_TYPE_NAMES)
def test_every_type_loads_in_llama_cpp_with_so8t_keys(quant, every_type, float_file):
    from so8t_export.runtime import SO8TRuntime

    report = every_type[quant]
    path = report.output
    assert listing(path.parent) == sorted(f"{q}.gguf" for q in every_type)  # no float file, no candidate left
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.file_type").contents() == int(LLAMA_FTYPES[quant])
    assert so8t_fields(path) == so8t_fields(float_file)  # every so8t.* key, value for value
    types = tensor_types(path)
    assert report.tensor_types == {name: list(types.values()).count(name) for name in dict.fromkeys(types.values())}
    assert all(types[name] == "F32" for name in types if name.endswith("norm.weight"))
    # 256-column rows: no tensor fell back to a 32-column type or to F16 (narrow rows do, see below).
    assert not {"F16", "BF16"} & set(types.values())
    runtime = SO8TRuntime(path, n_ctx=64)  # llama-cpp-python loads the file and runs it
    evaluation = runtime.evaluate(runtime.tokenize("The quick brown fox jumps over the lazy dog."))
    assert np.isfinite(evaluation.logits).all()
    assert runtime.has_heads and np.isfinite(evaluation.safety).all()


@pytest.mark.parametrize("quant", ["q4_k_m", "q3_k_s", "iq4_xs", "q2_k", "q5_1"])
def test_same_file_as_stock_llama_quantize(quant, every_type, float_file, tmp_path):
    """Without an imatrix, llama.cpp's own llama-quantize on the same bf16 file writes the same bytes."""
    theirs = tmp_path / f"stock-{quant}.gguf"
    result = subprocess.run([str(llama_tool("llama-quantize")), str(float_file), str(theirs), quant.upper(), "2"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert every_type[quant].output.read_bytes() == theirs.read_bytes()


def test_with_imatrix_same_tensors_as_stock_llama_quantize(wide_dir, imatrix_file, float_file, tmp_path):
    """With our imatrix file, llama-quantize --imatrix makes the same tensors (it also records
    quantize.imatrix.* keys, which the library call does not)."""
    ours = export_quantized(wide_dir, tmp_path / "ours.gguf", quant="iq2_xs", imatrix=imatrix_file).output
    theirs = tmp_path / "stock.gguf"
    result = subprocess.run([str(llama_tool("llama-quantize")), "--imatrix", str(imatrix_file), str(float_file),
                             str(theirs), "IQ2_XS", "2"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert tensor_bytes(ours) == tensor_bytes(theirs)


def test_narrow_rows_fall_back_as_llama_cpp_decides(so8t_dir, tmp_path):
    """The 64-wide demo model: llama.cpp writes q4_k_m's 256-column types only where rows are 256 wide
    (attn_output: 16 heads x 16) and falls back elsewhere; the report names what it did."""
    report = export_quantized(so8t_dir, tmp_path / "narrow.gguf", quant="q4_k_m")
    types = tensor_types(report.output)
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # 64 columns: Q4_K -> Q5_0
    assert types["blk.0.attn_output.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert "Q5_0" in report.summary() and "Q4_K" in report.summary()


# -------------------------------------------------------------------------------------------------- quality
BY_BITS = ["q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "iq2_xxs"]  # falling bits per weight


def test_kld_orders_by_bits_per_weight(every_type, held_out):
    rows = [held_out.measure(every_type[quant].output, quant) for quant in BY_BITS]
    bits = [r.bits_per_weight for r in rows]
    klds = [r.mean_kld for r in rows]
    assert bits == sorted(bits, reverse=True), bits
    assert klds == sorted(klds), dict(zip(BY_BITS, klds))
    assert klds[0] < 1e-3 and klds[-1] < 0.2, dict(zip(BY_BITS, klds))  # measured: 5.8e-4 ... 6.3e-2


def test_imatrix_lowers_q4_k_m_kld_on_held_out_text(wide_dir, imatrix_file, held_out, tmp_path):
    plain = export_quantized(wide_dir, tmp_path / "plain.gguf", quant="q4_k_m").output
    weighted = export_quantized(wide_dir, tmp_path / "weighted.gguf", quant="q4_k_m", imatrix=imatrix_file).output
    without, with_imatrix = held_out.measure(plain, "q4_k_m"), held_out.measure(weighted, "q4_k_m")
    # measured: 4.9e-3 without, 4.4e-3 with
    assert with_imatrix.mean_kld < 0.95 * without.mean_kld, (with_imatrix, without)


def test_calibration_computes_the_imatrix_on_the_fly(wide_dir, imatrix_file, tmp_path):
    """--calibration TEXT gives the file --imatrix (so8t-export imatrix on the same text) gives."""
    from_text = export_quantized(wide_dir, tmp_path / "a.gguf", quant="iq2_xxs", calibration=CALIBRATION_TEXT)
    from_file = export_quantized(wide_dir, tmp_path / "b.gguf", quant="iq2_xxs", imatrix=imatrix_file)
    assert tensor_bytes(from_text.output) == tensor_bytes(from_file.output)
    assert "imatrix from" in from_text.summary()


def test_quant_auto_picks_the_smallest_type_under_the_bound(wide_dir, tmp_path):
    out = tmp_path / "auto.gguf"
    result = CliRunner().invoke(main, ["gguf", str(wide_dir), "--quant", "auto", "--max-kld", "0.005",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in LLAMA_FTYPES}
    chosen = [quant for quant, row in rows.items() if row[-1] == "chosen"]
    assert len(chosen) == 1, result.output
    chosen_bytes = float(rows[chosen[0]][1])
    for quant, row in rows.items():  # every measured type smaller than the choice is over the bound
        assert (float(row[3]) <= 0.005) == (float(row[1]) >= chosen_bytes), result.output
    assert gguf.GGUFReader(out).get_field("general.file_type").contents() == int(LLAMA_FTYPES[chosen[0]])
    assert listing(tmp_path) == ["auto.gguf"]


# ----------------------------------------------------------------------------------------------- reporting
def test_summary_names_the_mix_and_progress_covers_both_stages(wide_dir, tmp_path):
    calls = []
    report = export_quantized(wide_dir, tmp_path / "q.gguf", quant="q4_k_m",
                              progress=lambda done, total, tensor: calls.append((done, total, tensor)))
    types = list(tensor_types(report.output).values())
    assert report.summary().endswith(f"llama.cpp's mix: {types.count('F32')} x F32, {types.count('Q6_K')} x Q6_K, "
                                     f"{types.count('Q4_K')} x Q4_K; no imatrix")
    totals = {total for _, total, _ in calls}
    assert len(totals) == 1
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[-1] == totals.pop()
    assert any(t.startswith("q4_k_m: blk.") for _, _, t in calls)  # the quantiser's own stage
    assert any(t.startswith("blk.") for _, _, t in calls)  # the float export's


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "so8t_export.cli", *args], capture_output=True, text=True,
                          cwd=cwd, check=False)


def test_quantiser_lines_only_with_verbose(wide_dir, tmp_path):
    quiet = _cli("gguf", str(wide_dir), "--quant", "q4_0", "-o", "q.gguf", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "llama_model_quantize" not in quiet.stderr + quiet.stdout
    loud = _cli("--verbose", "gguf", str(wide_dir), "--quant", "q4_0", "-o", "q.gguf", cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert "llama_model_quantize" in loud.stderr


# ----------------------------------------------------------------------------------------------- bad input
def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in message, message
    return message


def test_unknown_type_is_refused(wide_dir, tmp_path):
    result = CliRunner().invoke(main, ["gguf", str(wide_dir), "--quant", "q4_k_x", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "q4_k_x" in result.output and "q4_k_m" in result.output
    assert listing(tmp_path) == []
    with pytest.raises(QuantizeError, match="q4_k_x"):
        export_quantized(wide_dir, tmp_path / "x.gguf", quant="q4_k_x")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("quant", sorted(IMATRIX_REQUIRED))
def test_type_that_needs_an_imatrix_is_refused_without_one(quant, wide_dir, tmp_path):
    result = CliRunner().invoke(main, ["gguf", str(wide_dir), "--quant", quant, "-o", str(tmp_path / "x.gguf")])
    _one_line_error(result, quant, "so8t-export imatrix", "--calibration")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("quant", sorted(IMATRIX_REQUIRED))
def test_llama_cpp_refuses_the_same_types_without_an_imatrix(quant, float_file, tmp_path):
    """IMATRIX_REQUIRED is llama.cpp's rule, not a guess: the quantiser itself refuses exactly these types
    (without our early check), and its refusal reads the same way."""
    with pytest.raises(QuantizeError, match="so8t-export imatrix"):
        quantize_file(float_file, tmp_path / "x.gguf", quant)
    # (every other type is made without one: the every_type fixture)


def test_quantiser_failure_leaves_no_partial_output(wide_dir, so8t_dir, tmp_path):
    """An imatrix of another model (64 columns where the file has 256): llama.cpp fails after it has opened
    its output; nothing is left, and the line carries llama.cpp's reason."""
    narrow = tmp_path / "inputs" / "narrow-imatrix.gguf"
    narrow.parent.mkdir()
    write_imatrix(so8t_dir, read_calibration_text(CALIBRATION_TEXT), narrow, chunk_size=128)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.gguf").write_bytes(b"an earlier output")
    result = CliRunner().invoke(main, ["gguf", str(wide_dir), "--quant", "q4_k_m", "--imatrix", str(narrow),
                                       "-o", str(out / "old.gguf")])
    _one_line_error(result, "imatrix size", "q4_k_m")
    assert listing(out) == ["old.gguf"] and (out / "old.gguf").read_bytes() == b"an earlier output"


def test_full_disk_during_quantisation_leaves_no_partial_output(wide_dir, tmp_path, monkeypatch):
    """The quantiser's output file is /dev/full: every write fails with ENOSPC, as on a full disk."""
    if not Path("/dev/full").exists():
        skip_or_fail("/dev/full is missing")
    import so8t_export.llama_quantize as lq

    real = lq.atomic_output

    def full_disk(destination, **kwargs):
        manager = real(destination, **kwargs)
        tmp = manager.__enter__()
        tmp.unlink()
        tmp.symlink_to("/dev/full")

        class Full:
            def __enter__(self):
                return tmp

            def __exit__(self, *exc):
                return manager.__exit__(*exc)
        return Full()

    monkeypatch.setattr(lq, "atomic_output", full_disk)
    result = CliRunner().invoke(main, ["gguf", str(wide_dir), "--quant", "q4_k_m", "-o", str(tmp_path / "q.gguf")])
    _one_line_error(result, "q4_k_m", "llama.cpp")
    assert listing(tmp_path) == []


def test_options_that_do_not_apply_are_refused(wide_dir, imatrix_file, tmp_path):
    runner = CliRunner()
    for args in (["--quant", "q8_0", "--imatrix", str(imatrix_file)], ["--quant", "auto"],
                 ["--quant", "q4_k_m", "--max-kld", "0.1"],
                 ["--quant", "q4_k_m", "--imatrix", str(imatrix_file), "--calibration", str(CALIBRATION_TEXT)]):
        result = runner.invoke(main, ["gguf", str(wide_dir), *args, "-o", str(tmp_path / "x.gguf")])
        assert result.exit_code == 2, (args, result.output)
    missing = runner.invoke(main, ["gguf", str(wide_dir), "--quant", "q4_k_m", "--imatrix",
                                   str(tmp_path / "none.gguf"), "-o", str(tmp_path / "x.gguf")])
    _one_line_error(missing, "none.gguf", "missing")
    assert listing(tmp_path) == []
