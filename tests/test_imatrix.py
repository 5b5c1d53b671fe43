"""so8t-export imatrix against llama.cpp's own llama-imatrix on the same f32 GGUF and text; llama-quantize
accepts the file; bad input is one line and leaves no output."""

import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from upstream import llama_tool

from so8t_export.cli import main
from so8t_export.demo import write_tiny_qwen3
from so8t_export.export import export_gguf
from so8t_export.imatrix import (CALIBRATION_TEXT, ImatrixError, read_calibration_text, read_imatrix,
                                 write_imatrix)

CHUNK = 128  # the shipped text is 13340 demo-tokenizer tokens: 104 chunks, every weight well sampled
# Measured here (tiny SO8T model, the shipped text, f32 file and KV cache, flash attention off): at most 2.7e-5
# relative, from llama.cpp's float32 forward and its float32 running sums (ours are float64). With llama.cpp's
# CPU flash-attention kernel (on by default) attn_output and ffn_down moved by up to 3.0e-4, which is that
# kernel's rounding, not the imatrix; so the comparison runs with -fa off.
RTOL = 1e-4
def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(llama_tool(name)), *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def llama_imatrix(model: Path, text_file: Path, out: Path, *flags: str) -> Path:
    """llama-imatrix with the f32 KV cache an f32 reference needs (its default f16 cache rounds k and v) and
    plain attention (see RTOL), without perplexity, on 2 threads."""
    run_tool("llama-imatrix", "-m", str(model), "-f", str(text_file), "-o", str(out), "-c", str(CHUNK),
             "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-ppl", "-t", "2", *flags)
    return out


def max_relative_difference(ours, theirs) -> float:
    return max(float(np.max(np.abs(ours.sums[n] - theirs.sums[n]) / np.abs(theirs.sums[n]))) for n in theirs.sums)


def assert_same_imatrix(ours, theirs) -> float:
    assert sorted(ours.sums) == sorted(theirs.sums)
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size)
    for name in theirs.sums:
        assert ours.sums[name].shape == theirs.sums[name].shape, name
        np.testing.assert_array_equal(ours.counts[name], theirs.counts[name], err_msg=name)
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=RTOL, atol=0, err_msg=name)
    return max_relative_difference(ours, theirs)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    # a copy: llama-imatrix records the path it was given in imatrix.datasets
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_bytes(CALIBRATION_TEXT.read_bytes())
    return path


@pytest.fixture(scope="module")
def f32_gguf(so8t_dir, tmp_path_factory):
    return export_gguf(so8t_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", quant="f32").output


@pytest.mark.llama
@pytest.mark.parametrize("parse_special", [True, False], ids=["parse-special", "special-as-text"])
def test_equals_llama_imatrix(so8t_dir, f32_gguf, text_file, tmp_path, parse_special):
    """Every weight llama-imatrix records, the same counts and chunking, sums within RTOL: the reference's
    folded inputs are the file's inputs (gate/up see the MLP input before the SO8T rotation)."""
    flags = ("--parse-special",) if parse_special else ()
    theirs = read_imatrix(llama_imatrix(f32_gguf, text_file, tmp_path / "theirs.gguf", *flags))
    report = write_imatrix(so8t_dir, text_file.read_text(encoding="utf-8"), tmp_path / "ours.gguf",
                           chunk_size=CHUNK, parse_special=parse_special, dataset=str(text_file))
    ours = read_imatrix(report.output)
    assert len(theirs.sums) == 7 * 2 and all(n.startswith("blk.") for n in theirs.sums)
    assert ours.datasets == theirs.datasets == [str(text_file)]
    print(f"max relative difference ({'parse' if parse_special else 'no parse'}): "
          f"{assert_same_imatrix(ours, theirs):.3e}")


@pytest.mark.llama
def test_untied_output_with_process_output(tmp_path_factory, text_file, tmp_path):
    """A plain Qwen3 source with an untied LM head: --process-output adds output.weight, fed by the final
    normed hidden state, on both sides."""
    qwen3 = write_tiny_qwen3(tmp_path_factory.mktemp("untied") / "tiny-untied", seed=3, tie_word_embeddings=False)
    model = export_gguf(qwen3, tmp_path / "untied-f32.gguf", quant="f32").output
    theirs = read_imatrix(llama_imatrix(model, text_file, tmp_path / "theirs.gguf", "--parse-special",
                                        "--process-output"))
    ours = read_imatrix(write_imatrix(qwen3, text_file.read_text(encoding="utf-8"), tmp_path / "ours.gguf",
                                      chunk_size=CHUNK, process_output=True).output)
    assert "output.weight" in theirs.sums
    print(f"max relative difference (untied, output.weight): {assert_same_imatrix(ours, theirs):.3e}")


@pytest.mark.llama
def test_llama_quantize_takes_our_file(so8t_dir, f32_gguf, tmp_path):
    """llama-quantize --imatrix reads our file (its loader wants the imatrix.* keys and F32 sums and counts)
    and uses every entry."""
    ours = write_imatrix(so8t_dir, CALIBRATION_TEXT.read_text(encoding="utf-8"), tmp_path / "ours.gguf",
                         chunk_size=CHUNK).output
    result = run_tool("llama-quantize", "--imatrix", str(ours), str(f32_gguf), str(tmp_path / "q4_0.gguf"), "Q4_0", "2")
    assert "loaded 14 importance matrix entries" in result.stdout, result.stdout[-2000:]
    assert gguf.GGUFReader(tmp_path / "q4_0.gguf").get_field("quantize.imatrix.entries_count").contents() == 14


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_the_default_text_quietly(so8t_dir, tmp_path):
    out = tmp_path / "imatrix.gguf"
    result = CliRunner().invoke(main, ["imatrix", str(so8t_dir), "-o", str(out), "--chunk-size", "256"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith(f"wrote {out} (14 weights, 52 chunks of 256 tokens")
    assert "transformers" not in result.output and "Warning" not in result.output
    written = read_imatrix(out)
    assert written.datasets == [str(CALIBRATION_TEXT)] and written.chunk_count == 52
    assert all(int(c[0]) == 52 * 256 for c in written.counts.values())


def cli_error(*args: str) -> str:
    result = CliRunner().invoke(main, ["imatrix", *args])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1, result.output
    return error[0]


@pytest.mark.parametrize("content, expected", [
    (b"", "calibration text is empty"),
    (b"  \n\t\n", "calibration text is empty"),
    (b"\xff\xfe not utf-8", "calibration text is not UTF-8 (byte 0"),
    (b"far too short", "tokens long; expected at least one chunk of 512"),
])
def test_cli_bad_text(so8t_dir, tmp_path, content, expected):
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    out = tmp_path / "imatrix.gguf"
    assert expected in cli_error(str(so8t_dir), "--text", str(text), "-o", str(out))
    assert not out.exists() and list(tmp_path.iterdir()) == [text]


def test_cli_bad_paths(so8t_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_bytes(CALIBRATION_TEXT.read_bytes())
    assert cli_error(str(so8t_dir), "--text", str(tmp_path / "missing.txt")) == \
        f"Error: {tmp_path / 'missing.txt'}: calibration text is missing"
    assert "refusing to overwrite it" in cli_error(str(so8t_dir), "--text", str(text), "-o", str(text))
    config = so8t_dir / "config.json"
    before = config.read_bytes()
    assert "refusing to overwrite it" in cli_error(str(so8t_dir), "-o", str(config))
    assert config.read_bytes() == before
    assert cli_error(str(tmp_path / "nothing"), "-o", str(tmp_path / "x.gguf")) == \
        f"Error: {tmp_path / 'nothing'}: not a folder (expected a checkpoint folder with config.json)"
    assert "output folder" in cli_error(str(so8t_dir), "-o", str(tmp_path / "no" / "x.gguf"))
    assert "--chunk-size" in cli_error(str(so8t_dir), "--chunk-size", "0")
    assert sorted(tmp_path.iterdir()) == [text]


def test_read_imatrix_refuses_other_files(f32_gguf, tmp_path):
    with pytest.raises(ImatrixError, match=r"general.type = 'model'; expected 'imatrix'"):
        read_imatrix(f32_gguf)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ImatrixError, match="not a GGUF imatrix file"):
        read_imatrix(junk)
    lonely = tmp_path / "lonely.gguf"
    writer = gguf.GGUFWriter(lonely, "qwen3")
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, ["x"])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 1)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, 4)
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ImatrixError, match=r"blk.0.attn_q.weight.in_sum2 has no blk.0.attn_q.weight.counts"):
        read_imatrix(lonely)


def test_read_calibration_text_refuses_a_folder(tmp_path):
    with pytest.raises(ImatrixError, match="must be a regular file, found a folder"):
        read_calibration_text(tmp_path)
