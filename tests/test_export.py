"""GGUF export: metadata schema read back by gguf-py, plain-Qwen3 round trip, CLI, and bad input."""

import errno
import hashlib
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from so8t_export import export
from so8t_export.checkpoint import CheckpointReader
from so8t_export.cli import main
from so8t_export.config import SO8TConfig
from so8t_export.demo import write_tiny_qwen3
from so8t_export.export import ExportError, export_gguf
from so8t_export.metadata import read_so8t_metadata
from so8t_export.model import SO8TTransformerForCausalLM

T = gguf.GGUFValueType
EXPECTED_TYPES = {
    "general.architecture": T.STRING, "general.name": T.STRING, "general.file_type": T.UINT32,
    "general.quantization_version": T.UINT32, "qwen3.block_count": T.UINT32, "qwen3.context_length": T.UINT32,
    "qwen3.embedding_length": T.UINT32, "qwen3.feed_forward_length": T.UINT32, "qwen3.attention.head_count": T.UINT32,
    "qwen3.attention.head_count_kv": T.UINT32, "qwen3.rope.freq_base": T.FLOAT32,
    "qwen3.attention.layer_norm_rms_epsilon": T.FLOAT32, "qwen3.attention.key_length": T.UINT32,
    "qwen3.attention.value_length": T.UINT32, "tokenizer.ggml.model": T.STRING, "tokenizer.ggml.pre": T.STRING,
    "tokenizer.chat_template": T.STRING, "so8t.version": T.UINT32, "so8t.rotation_dim": T.UINT32,
    "so8t.rotations_folded": T.BOOL, "so8t.fold.max_abs_error": T.FLOAT32, "so8t.source.sha256": T.STRING,
    "so8t.safety_head.threshold": T.FLOAT32, "so8t.authority_head.threshold": T.FLOAT32,
}
EXPECTED_ARRAYS = {
    "so8t.triality.rotations": (T.FLOAT32, 192), "so8t.triality.q_head_types": (T.INT32, 16),
    "so8t.triality.kv_head_types": (T.INT32, 8), "so8t.cross_head.rotation": (T.FLOAT32, 64),
    "so8t.mlp.rotation_types": (T.INT32, 2), "so8t.safety_head.weight": (T.FLOAT32, 128),
    "so8t.safety_head.bias": (T.FLOAT32, 2), "so8t.safety_head.labels": (T.STRING, 2),
    "so8t.authority_head.weight": (T.FLOAT32, 128), "so8t.authority_head.bias": (T.FLOAT32, 2),
    "so8t.authority_head.labels": (T.STRING, 2),
}
FLAGS = ("triality_symmetry", "cross_head_interaction", "non_commutative_gates", "vector_representation",
         "spinor_plus_representation", "spinor_minus_representation")


@pytest.fixture(scope="module")
def f32_file(so8t_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    export_gguf(so8t_dir, out, quant="f32")
    return out


def test_every_key_has_the_right_type(f32_file):
    reader = gguf.GGUFReader(f32_file)
    for key, vtype in EXPECTED_TYPES.items():
        assert reader.get_field(key).types == [vtype], key
    for key, (sub_type, length) in EXPECTED_ARRAYS.items():
        field = reader.get_field(key)
        assert field.types == [T.ARRAY, sub_type], key
        assert len(field.contents()) == length, key
    for flag in FLAGS:
        assert reader.get_field(f"so8t.flags.{flag}").types == [T.BOOL]
    assert reader.get_field("general.architecture").contents() == "qwen3"
    assert reader.get_field("so8t.safety_head.labels").contents() == ["safe", "unsafe"]
    assert reader.get_field("so8t.authority_head.labels").contents() == ["handle", "escalate"]
    assert reader.get_field("so8t.fold.max_abs_error").contents() < 1e-12
    names = {t.name: t for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    assert len(names) == 2 + 2 * 11  # token_embd, output_norm, 11 per layer


def test_metadata_round_trips_heads_and_rotations(so8t_dir, f32_file):
    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir)
    meta = read_so8t_metadata(gguf.GGUFReader(f32_file), f32_file)
    assert np.array_equal(meta.rotations, model.model.triality_rotations.numpy())
    assert np.array_equal(meta.cross_head, model.model.cross_head_rotation.numpy())
    assert np.array_equal(meta.heads["safety"][0], model.safety_head.weight.detach().numpy())
    assert np.array_equal(meta.heads["authority"][1], model.authority_head.bias.detach().numpy())
    assert meta.q_head_types.tolist() == [h % 3 for h in range(16)]
    assert meta.mlp_rotation_types.tolist() == [0, 1]
    assert all(meta.flags[f] for f in FLAGS)
    files = sorted(so8t_dir.glob("*.safetensors"))
    assert meta.source_sha256 == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


class _FileObjectArray:
    """An array whose tofile writes through the file object's write(), as the exporter's streamed tensors do
    (ndarray.tofile needs an OS file)."""

    def __init__(self, array: np.ndarray):
        self.array, self.nbytes = array, array.nbytes

    def tofile(self, fout) -> None:
        fout.write(self.array.data)


@pytest.mark.parametrize("direct_io", [export.DIRECT_IO, 0], ids=["O_DIRECT", "page-cache"])
def test_tensor_data_through_direct_file_is_what_gguf_writer_writes(tmp_path, monkeypatch, direct_io):
    """DirectFile only changes how bytes reach the disk: the file equals GGUFWriter's own, byte for byte, with
    a staging buffer far smaller than the data and a header that ends inside a 4 KiB block."""
    monkeypatch.setattr(export, "DIRECT_IO", direct_io)
    monkeypatch.setattr(export, "DIRECT_STAGING", 2 * export.DIRECT_ALIGN)
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate([3, 5000, 1, 4096, 777])}
    files = {}
    for kind in ("plain", "direct"):
        path = tmp_path / f"{kind}.gguf"
        writer = gguf.GGUFWriter(path, "qwen3")
        writer.add_string("padding.key", "x" * 5000)
        for name, array in arrays.items():
            writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if kind == "direct":
            assert export.send_tensor_data_through_direct_file(writer, path) % export.DIRECT_ALIGN
        for array in arrays.values():
            writer.write_tensor_data(array if kind == "plain" else _FileObjectArray(array))
        writer.close()
        files[kind] = path.read_bytes()
    assert files["direct"] == files["plain"]


def test_another_gguf_release_is_refused(so8t_dir, tmp_path, monkeypatch):
    real_version = export.importlib.metadata.version
    monkeypatch.setattr(export.importlib.metadata, "version",
                        lambda name: "0.99.0" if name == "gguf" else real_version(name))
    with pytest.raises(ExportError, match=r"gguf 0\.99\.0 is installed; expected 0\.19\.0, .*pip install gguf==0\.19\.0"):
        export_gguf(so8t_dir, tmp_path / "out.gguf", quant="f32")
    assert not list(tmp_path.iterdir())


def test_the_pinned_gguf_is_the_one_the_exporter_checks():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert f"gguf=={export.GGUF_TESTED_VERSION}" in pyproject["project"]["dependencies"]


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EINVAL], ids=["disk-full", "einval-everywhere"])
def test_a_failing_write_leaves_nothing(qwen3_dir, tmp_path, monkeypatch, errno_):
    """The writer thread's error reaches the caller once (EINVAL: after one fall-back from O_DIRECT to ordinary
    writes, not in a loop) and the temporary file is removed."""
    monkeypatch.setattr(export, "DIRECT_STAGING", 2 * export.DIRECT_ALIGN)
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) >= 3:
            raise OSError(errno_, os.strerror(errno_))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as caught:
        export_gguf(qwen3_dir, tmp_path / "x.gguf", quant="q8_0")
    assert caught.value.errno == errno_
    assert len(calls) <= 4
    assert list(tmp_path.iterdir()) == []


def test_direct_file_accepts_empty_writes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"header")
    f = export.DirectFile(path, 6)
    assert f.write(np.zeros((0, 64), np.uint8).data) == 0
    f.write(b"data")
    f.close()
    f.close()
    assert path.read_bytes() == b"headerdata"


def test_source_hash_over_many_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "HASH_BLOCK", 4096)
    write_tiny_qwen3(tmp_path / "sharded", shards=3)
    files = sorted((tmp_path / "sharded").glob("*.safetensors")) + [tmp_path / "empty"]
    files[-1].write_bytes(b"")
    assert export.hash_files(files) == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


@pytest.mark.parametrize("quant", ["f32", "bf16"])
def test_plain_qwen3_folds_back_to_its_own_weights(qwen3_dir, tmp_path, quant):
    out = tmp_path / f"plain-{quant}.gguf"
    report = export_gguf(qwen3_dir, out, quant=quant)
    # bounded by the float32 rotation buffers (orthogonal to ~1e-7), checked on the absorbed SO8T model
    assert report.source_kind == "qwen3" and 0 < report.fold_max_abs_error < 1e-5
    meta = read_so8t_metadata(gguf.GGUFReader(out), out)  # the placeholder was patched in place
    assert meta.fold_max_abs_error == np.float32(report.fold_max_abs_error)
    source = load_file(str(qwen3_dir / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for hf, name in [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                     ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight"),
                     ("model.layers.1.mlp.gate_proj.weight", "blk.1.ffn_gate.weight")]:
        got = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).reshape(source[hf].shape)
        expected = source[hf].float().numpy()
        if quant == "f32":
            assert np.array_equal(got, expected), name
        else:  # bf16: fold(unfold(W)) = W, so the only difference is bf16 rounding, bit for bit
            rounded = gguf.quants.dequantize(gguf.quants.quantize(expected, tensors[name].tensor_type),
                                             tensors[name].tensor_type)
            assert np.array_equal(got, rounded), name


def test_cli_gguf_and_inspect(so8t_dir, tmp_path):
    out = tmp_path / "cli.gguf"
    result = CliRunner().invoke(main, ["gguf", str(so8t_dir), "-o", str(out), "--quant", "q8_0", "--name", "tiny"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "q8_0" in result.output
    assert gguf.GGUFReader(out).get_field("general.name").contents() == "tiny"
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("general.architecture = 'qwen3'", "qwen3.attention.key_length = 16", "so8t.version = 2",
                 "triality_identity", "OK: orthogonal"):
        assert text in result.output
    for command in (["--help"], ["gguf", "--help"], ["inspect", "--help"], ["parity", "--help"]):
        assert CliRunner().invoke(main, command).exit_code == 0


def test_inspect_catches_corrupt_rotations(so8t_dir, tmp_path):
    out = tmp_path / "corrupt.gguf"
    export_gguf(so8t_dir, out, quant="f32")
    reader = gguf.GGUFReader(out, "r+")
    field = reader.get_field("so8t.triality.rotations")
    field.parts[field.data[0]][0] = np.float32(5.0)
    reader.data.flush()
    del reader
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code != 0 and "not orthogonal" in result.output


# ---------------------------------------------------------------------------------------------- bad input
def no_leftovers(folder):
    return not [p for p in folder.iterdir() if p.suffix in (".gguf", ".tmp")]


def test_unsupported_quant(so8t_dir, tmp_path):
    result = CliRunner().invoke(main, ["gguf", str(so8t_dir), "-o", str(tmp_path / "x.gguf"), "--quant", "q4_k"])
    assert result.exit_code != 0 and "q4_k" in result.output and "q8_0" in result.output
    with pytest.raises(ExportError, match="--quant 'q4_k' is not supported; expected one of f32, f16, bf16, q8_0"):
        export_gguf(so8t_dir, tmp_path / "x.gguf", quant="q4_k")
    assert no_leftovers(tmp_path)


def test_output_in_missing_folder(so8t_dir, tmp_path):
    result = CliRunner().invoke(main, ["gguf", str(so8t_dir), "-o", str(tmp_path / "nope" / "x.gguf")])
    assert result.exit_code == 1 and "output folder" in result.output and "does not exist" in result.output
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("quant", ["q8_0", "bf16", "f16"])
def test_fp8_source_exports_as_its_dequantised_copy(fp8_dir, fp8_dense_dir, tmp_path, monkeypatch, quant):
    """FP8 chunks go straight from their bytes to GGUF: every tensor equals the export of the float32 copy, byte
    for byte. Small chunks make row ranges start inside the 48-row FP8 tiles."""
    monkeypatch.setattr(export, "CHUNK_ELEMENTS", 1 << 12)
    fp8 = export_gguf(fp8_dir, tmp_path / "fp8.gguf", quant=quant)
    dense = export_gguf(fp8_dense_dir, tmp_path / "dense.gguf", quant=quant)
    assert fp8.fold_max_abs_error == dense.fold_max_abs_error
    chunked = [job for job in export.plan_tensors(CheckpointReader(fp8_dir), SO8TConfig.from_dict(
        json.loads((fp8_dir / "config.json").read_text())), quant)[0] if len(export.row_chunks(job, False)) > 1]
    assert chunked, "no tensor was split into row chunks"
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "fp8.gguf").tensors}
    reference = {t.name: t for t in gguf.GGUFReader(tmp_path / "dense.gguf").tensors}
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert tensor.tensor_type == reference[name].tensor_type, name
        assert np.asarray(tensor.data).tobytes() == np.asarray(reference[name].data).tobytes(), name


def test_nan_in_an_fp8_tensor(fp8_dir, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(fp8_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    weight = state["model.layers.0.mlp.up_proj.weight"]
    weight.view(torch.uint8)[5, 9] = 0x7F  # e4m3fn NaN
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"model.layers.0.mlp.up_proj.weight has 1 NaN or Inf values"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(qwen3_dir, tmp_path, value):
    folder = tmp_path / "nan"
    shutil.copytree(qwen3_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(state, str(folder / "model.safetensors"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(main, ["gguf", str(folder), "-o", str(out_dir / "x.gguf")])
    assert result.exit_code == 1
    assert "model.layers.1.mlp.down_proj.weight has 1 NaN or Inf values" in result.output
    assert no_leftovers(out_dir)


def test_truncated_safetensors(qwen3_dir, tmp_path):
    folder = tmp_path / "trunc"
    shutil.copytree(qwen3_dir, folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(main, ["gguf", str(folder), "-o", str(out_dir / "x.gguf")])
    assert result.exit_code == 1 and "truncated safetensors file" in result.output
    assert no_leftovers(out_dir)


def test_missing_or_misshapen_tensor(qwen3_dir, tmp_path):
    folder = tmp_path / "missing"
    shutil.copytree(qwen3_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = CliRunner().invoke(main, ["gguf", str(folder), "-o", str(out_dir / "x.gguf")])
    assert result.exit_code == 1 and "tensor model.layers.1.mlp.up_proj.weight is missing" in result.output
    assert no_leftovers(out_dir)
