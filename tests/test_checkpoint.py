"""Checkpoint IO: sharded and FP8 sources, the SO8T round trip, dtypes, and bad input."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from conftest import FP8_BLOCK, decode_e4m3fn, numpy_dequant, skip_or_fail
from safetensors.torch import load_file, save_file

from so8t_export.checkpoint import CheckpointError, CheckpointReader
from so8t_export.config import ConfigError
from so8t_export.demo import write_tiny_qwen3
from so8t_export.model import SO8TTransformerForCausalLM
from so8t_export.triality import RotationError

TOKENS = torch.arange(3, 40).view(1, -1)


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


# ------------------------------------------------------------------------------------------------- FP8
# The reference (conftest.numpy_dequant) decodes e4m3 from its bit fields; first it is checked against two
# other implementations, torch's float8_e4m3fn and llama.cpp's converter, then the reader against it.
def test_the_e4m3_decoder_agrees_with_torch_on_every_byte():
    raw = np.arange(256, dtype=np.uint8)
    ours = decode_e4m3fn(raw)
    torchs = torch.from_numpy(raw).view(torch.float8_e4m3fn).to(torch.float64).numpy()
    assert np.array_equal(ours, torchs, equal_nan=True)
    assert np.isnan(ours).sum() == 2 and not np.isinf(ours).any()  # 0x7F and 0xFF; e4m3fn has no infinities
    assert ours[0x38] == 1.0 and ours[0xB8] == -1.0 and ours[0x7E] == 448.0 and ours[0x01] == 2.0**-9
    assert ours[0x08] == 2.0**-6 and ours[0x07] == 7 / 8 * 2.0**-6  # smallest normal, largest subnormal


def test_the_independent_dequantisation_is_llama_cpps(fp8_dir, tmp_path):
    """llama.cpp's converter dequantises fp8_dir itself (--outtype f32): every FP8 weight is numpy_dequant's,
    bit for bit, edge blocks included."""
    from upstream import convert

    try:
        result = convert(fp8_dir, tmp_path / "converter-f32.gguf", "--outtype", "f32")
    except Exception as err:  # the sdist could not be fetched or unpacked
        skip_or_fail(f"llama.cpp's converter is not available: {err}")
    assert result.returncode == 0, result.stderr[-3000:]
    raw = load_file(str(fp8_dir / "model.safetensors"))
    config = json.loads((fp8_dir / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config["num_hidden_layers"])
    written = {t.name: t for t in gguf.GGUFReader(tmp_path / "converter-f32.gguf").tensors}
    fp8 = [n for n, t in raw.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 14  # 7 projections x 2 layers
    for name in fp8:
        tensor = written[names.get_name(name, try_suffixes=(".weight",))]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        scale = raw[name.removesuffix(".weight") + ".weight_scale_inv"]
        expected = numpy_dequant(raw[name], scale, FP8_BLOCK)
        assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape), expected), name


def test_fp8_loads_to_the_independent_dequantisation(fp8_dir):
    reader = CheckpointReader(fp8_dir)
    raw = load_file(str(fp8_dir / "model.safetensors"))
    names = [n for n in reader.names() if raw[n].dtype == torch.float8_e4m3fn]
    assert len(names) == 14  # 7 projections x 2 layers
    assert "model.layers.0.mlp.up_proj.weight_scale_inv" not in reader.names()
    for name in names:
        expected = numpy_dequant(raw[name], raw[name.removesuffix(".weight") + ".weight_scale_inv"], FP8_BLOCK)
        assert np.array_equal(reader.read(name).numpy(), expected), name
        # row chunks that straddle blocks give the same values
        rows = reader.shape(name)[0]
        chunks = torch.cat([reader.read(name, rows=slice(start, start + 37)) for start in range(0, rows, 37)])
        assert chunks.shape[0] == rows and np.array_equal(chunks.numpy(), expected)


def test_the_dense_copy_is_the_fp8_checkpoints_values(fp8_dir, fp8_dense_dir):
    """fp8_dense_dir (written without the reader) holds the same tensors as the reader reads from fp8_dir."""
    reader, dense = CheckpointReader(fp8_dir), load_file(str(fp8_dense_dir / "model.safetensors"))
    assert sorted(dense) == sorted(reader.names())
    for name, tensor in dense.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reader.read(name)), name
    assert "quantization_config" not in json.loads((fp8_dense_dir / "config.json").read_text())


def test_fp8_model_equals_model_from_dequantised_weights(fp8_dir, fp8_dense_dir):
    a = SO8TTransformerForCausalLM.from_pretrained(fp8_dir, torch_dtype=torch.float32)
    b = SO8TTransformerForCausalLM.from_pretrained(fp8_dense_dir, torch_dtype=torch.float32)
    assert torch.equal(logits(a).logits, logits(b).logits)


def test_a_scale_of_the_wrong_shape_names_the_tensor(fp8_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(fp8_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight_scale_inv"] = torch.ones(2, 2, dtype=torch.bfloat16)
    save_file(state, str(bad / "model.safetensors"))
    reader = CheckpointReader(bad)
    with pytest.raises(CheckpointError, match=r"up_proj.weight_scale_inv has shape \(2, 2\); expected \(\d+, \d+\) "
                                              r"for model.layers.1.mlp.up_proj.weight"):
        reader.read("model.layers.1.mlp.up_proj.weight")


def test_sharded_and_low_precision_sources(qwen3_dir, tmp_path):
    single = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    sharded = SO8TTransformerForCausalLM.from_pretrained(write_tiny_qwen3(tmp_path / "sharded", shards=3))
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) == 3
    assert torch.equal(logits(single).logits, logits(sharded).logits)
    for dtype in (torch.bfloat16, torch.float16):
        folder = write_tiny_qwen3(tmp_path / str(dtype), dtype=dtype)
        model = SO8TTransformerForCausalLM.from_pretrained(folder)  # "auto": the config's dtype
        assert model.model.embed_tokens.weight.dtype == dtype
        assert model.model.triality_rotations.dtype == torch.float32  # rotations never lose precision
        assert torch.isfinite(logits(model).logits).all()


def test_torch_dtype_works_as_in_transformers(qwen3_dir):
    model = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir, torch_dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.task_head.weight is model.model.embed_tokens.weight  # tied
    assert SO8TTransformerForCausalLM.from_pretrained(qwen3_dir, dtype="float16").task_head.weight.dtype == torch.float16
    model.float()
    assert model.model.triality_rotations.dtype == torch.float32


def test_save_then_load_round_trips_everything(qwen3_dir, so8t_dir):
    original = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    loaded = SO8TTransformerForCausalLM.from_pretrained(so8t_dir)
    a, b = logits(original), logits(loaded)
    for key in ("task_logits", "safety_logits", "authority_logits"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(original.model.triality_rotations, loaded.model.triality_rotations)
    config = json.loads((so8t_dir / "config.json").read_text())
    assert config["model_type"] == "so8t" and config["architectures"] == ["SO8TTransformerForCausalLM"]
    stored = load_file(str(so8t_dir / "model.safetensors"))
    assert {"model.triality_rotations", "model.cross_head_rotation", "safety_head.weight",
            "authority_head.bias"} <= set(stored)
    # nothing is absorbed again: the stored q_proj is what the model holds
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight"], loaded.model.layers[0].self_attn.q_proj.weight)


def test_heads_a_qwen3_checkpoint_lacks_are_deterministic(qwen3_dir):
    a = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    b = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)
    assert torch.equal(a.safety_head.weight, b.safety_head.weight)
    assert not torch.equal(a.safety_head.weight, a.authority_head.weight)
    assert a.safety_head.bias.abs().max() == 0
    assert 0.5 * a.config.initializer_range < a.safety_head.weight.std() < 2 * a.config.initializer_range


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_shard(tmp_path):
    folder = write_tiny_qwen3(tmp_path / "m", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors is listed .* but missing"):
        SO8TTransformerForCausalLM.from_pretrained(folder)


def test_wrong_tensor_shape(qwen3_dir, tmp_path):
    folder = tmp_path / "shape"
    shutil.copytree(qwen3_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = state["model.layers.1.self_attn.k_proj.weight"][:64]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.self_attn.k_proj.weight has shape \[64, 64\]; "
                                              r"expected \[128, 64\]"):
        SO8TTransformerForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("corruption, message", [
    (lambda r: r[1].__setitem__((slice(None), 0), -r[1][:, 0]), "spinor_plus rotation has det -1"),
    (lambda r: r[0].mul_(1.001), "vector rotation is not orthogonal"),
])
def test_corrupt_rotation_buffers(so8t_dir, tmp_path, corruption, message):
    folder = tmp_path / "rot"
    shutil.copytree(so8t_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    corruption(state["model.triality_rotations"])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(RotationError, match=message):
        SO8TTransformerForCausalLM.from_pretrained(folder)


def test_head_dim_not_divisible_by_8(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json: head_dim = 12; expected a multiple of 8"):
        SO8TTransformerForCausalLM.from_pretrained(write_tiny_qwen3(tmp_path / "hd", head_dim=12))


def test_truncated_safetensors_and_pickles(qwen3_dir, tmp_path):
    folder = tmp_path / "trunc"
    shutil.copytree(qwen3_dir, folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated safetensors file"):
        CheckpointReader(folder)
    path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are never loaded"):
        CheckpointReader(folder)
