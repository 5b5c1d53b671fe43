"""HF export: transformers' own Qwen3 runs it as the SO8T reference, FP8 within FP8 tolerance, the Qwen3 ->
SO8T -> HF round trip bit for bit, and bad input leaves nothing behind."""

import errno
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from so8t_export import export
from so8t_export.checkpoint import CheckpointError, CheckpointReader
from so8t_export.cli import main
from so8t_export.demo import write_tiny_qwen3
from so8t_export.export import ExportError
from so8t_export.fold import fold_weight
from so8t_export.hf_export import HEADS_FILE, QWEN_FP8_CONFIG, export_hf, is_fp8_projection, parse_size
from so8t_export.io import PathError, current_umask
from so8t_export.model import SO8TTransformerForCausalLM
from so8t_export.quants import quantize_fp8

TOKENS = torch.tensor([[736, 12, 400, 7, 99, 250, 31, 5, 640, 2, 77], [3, 8, 512, 700, 1, 1, 64, 128, 9, 10, 11]])
# FP8's own error on the sharp tiny model (logits up to ~100): quantising the plain Qwen3 source the same way
# gives a mean KLD of 4.78e-2 on TOKENS (bf16 weights alone: 4.7e-4); the flat model gives 1.25e-4.
FP8_KLD_LIMIT = 0.1


def stored_tensors(folder):
    """Every tensor of a checkpoint folder's weights as stored (dtype and bytes), whatever its sharding."""
    files = sorted(folder.glob("model*.safetensors"))
    return {name: tensor for file in files for name, tensor in load_file(str(file)).items()}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def kld(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, q = F.log_softmax(reference.double(), -1), F.log_softmax(other.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def reference(so8t_dir):
    config = json.loads((so8t_dir / "config.json").read_text())
    flags = [k for k, v in config.items()
             if k.startswith("so8t_") and isinstance(v, bool) and k != "so8t_folded_weights"]
    assert len(flags) == 6 and all(config[k] for k in flags)  # every so8t flag on
    model = SO8TTransformerForCausalLM.from_pretrained(so8t_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(TOKENS)


# ---------------------------------------------------------------------------------------------- dense
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_qwen3_runs_the_export_as_the_so8t_reference(so8t_dir, tmp_path, tied, reference):
    from transformers import Qwen3ForCausalLM

    source = so8t_dir
    if not tied:
        qwen3 = write_tiny_qwen3(tmp_path / "untied-qwen3", seed=3, tie_word_embeddings=False)
        source = tmp_path / "untied-so8t"
        SO8TTransformerForCausalLM.from_pretrained(qwen3).save_pretrained(source)
        with torch.no_grad():
            reference = SO8TTransformerForCausalLM.from_pretrained(source)(TOKENS)
    report = export_hf(source, tmp_path / "hf")
    assert report.source_kind == "so8t" and report.fold_max_abs_error < 1e-12
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert not [k for k in config if k.startswith("so8t_")] and "quantization_config" not in config
    assert config["so8t"]["heads_file"] == HEADS_FILE
    assert config["so8t"]["heads"]["safety"]["labels"] == ["safe", "unsafe"]
    assert all(config["so8t"]["flags"].values())
    written = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= written
    assert (tmp_path / "hf/generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    modes = {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir()}
    assert modes == {oct(0o666 & ~current_umask())}  # what open() would give, not mkstemp's 0600

    # stock transformers, no custom code: every tensor it expects, nothing else (no lm_head when tied)
    model = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert set(stored_tensors(tmp_path / "hf")) == expected
    with torch.no_grad():
        out = model(TOKENS, output_hidden_states=True)
        hidden = model.model(TOKENS).last_hidden_state  # the final normed hidden state, which the heads read
    error = (out.logits - reference.logits).abs().max().item()
    print(f"{'tied' if tied else 'untied'}: max |logit difference| {error:.3e} against the SO8T reference")
    assert error <= 1e-4, f"max |logit difference| {error:.3e} (logits up to {reference.logits.abs().max():.1f})"
    heads = load_file(str(tmp_path / "hf" / HEADS_FILE))
    for head in ("safety", "authority"):
        logits = F.linear(hidden, heads[f"{head}_head.weight"], heads[f"{head}_head.bias"])
        assert (logits - getattr(reference, f"{head}_logits")).abs().max() <= 1e-4, head


def test_sharded_with_an_index(so8t_dir, tmp_path):
    export_hf(so8t_dir, tmp_path / "hf", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 1
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    for file in files:
        with safe_open(str(tmp_path / "hf" / file), "pt") as f:
            assert all(index["weight_map"][name] == file for name in f.keys())
    assert index["metadata"]["total_size"] == sum((tmp_path / "hf" / f).stat().st_size for f in files) - sum(
        8 + int.from_bytes((tmp_path / "hf" / f).read_bytes()[:8], "little") for f in files)
    assert stored_tensors(tmp_path / "hf").keys() == index["weight_map"].keys()
    whole = export_hf(so8t_dir, tmp_path / "one")
    assert whole.shards == 1 and (tmp_path / "one/model.safetensors").is_file()
    assert all(same_bytes(a, stored_tensors(tmp_path / "one")[n]) for n, a in stored_tensors(tmp_path / "hf").items())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size("1000") == 1000
    for bad in ("", "0", "-1GB", "5 gigs"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ---------------------------------------------------------------------------------------------- FP8
def test_fp8_export_is_qwens_layout_and_reloads_within_fp8_tolerance(so8t_dir, qwen3_dir, tmp_path, reference):
    export_hf(so8t_dir, tmp_path / "fp8", fp8=True, max_shard_bytes=100_000)
    config = json.loads((tmp_path / "fp8/config.json").read_text())
    assert config["quantization_config"] == {**QWEN_FP8_CONFIG, "weight_block_size": [128, 128]}
    assert config["torch_dtype"] == "bfloat16"
    stored = stored_tensors(tmp_path / "fp8")
    with CheckpointReader(so8t_dir) as reader:
        plan = export.read_source(reader).plan
        for name, tensor in stored.items():
            if name.endswith(".weight_scale_inv"):
                continue
            if not is_fp8_projection(name):
                assert tensor.dtype == torch.bfloat16, name  # norms and the embedding, as vLLM wants them
                continue
            scale = stored[name.removesuffix(".weight") + ".weight_scale_inv"]
            assert tensor.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert scale.shape == tuple(math.ceil(s / 128) for s in tensor.shape)  # edge blocks, ceil-divided
            # folded in float64, then Qwen's quantiser (quants.quantize_fp8) once
            weight, expected_scale = quantize_fp8(fold_weight(name, reader.read(name, torch.float64), plan))
            assert same_bytes(tensor, weight) and same_bytes(scale, expected_scale), name
    # Through our loader. The yardstick is FP8's own error on this model: the plain Qwen3 source (the same
    # function: so8t_dir was loaded from it) quantised the same way.
    export_hf(qwen3_dir, tmp_path / "qwen3-fp8", fp8=True)
    with torch.no_grad():
        out = SO8TTransformerForCausalLM.from_pretrained(tmp_path / "fp8", torch_dtype=torch.float32)(TOKENS)
        base = SO8TTransformerForCausalLM.from_pretrained(tmp_path / "qwen3-fp8", torch_dtype=torch.float32)(TOKENS)
    divergence, fp8_own = kld(reference.logits, out.logits), kld(reference.logits, base.logits)
    top1 = (reference.logits.argmax(-1) == out.logits.argmax(-1)).float().mean().item()
    message = (f"FP8 export: mean KLD {divergence:.4e} against the float32 SO8T reference, top-1 {top1:.3f}; "
               f"the Qwen3 source quantised alike: {fp8_own:.4e}")
    print(message)
    assert divergence < FP8_KLD_LIMIT and abs(divergence - fp8_own) <= 0.01 * fp8_own, message
    assert top1 >= 0.9, message


def test_an_fp8_qwen3_source_keeps_its_bytes(fp8_dir, tmp_path):
    """Nothing to fold in a plain Qwen3 checkpoint: its e4m3 weights and (bf16) scales go out untouched."""
    report = export_hf(fp8_dir, tmp_path / "fp8", fp8=True)
    original = load_file(str(fp8_dir / "model.safetensors"))
    exported = stored_tensors(tmp_path / "fp8")
    assert report.source_kind == "qwen3" and original.keys() == exported.keys()
    assert all(same_bytes(original[n], exported[n]) for n in original)
    block = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]["weight_block_size"]
    assert json.loads((tmp_path / "fp8/config.json").read_text())["quantization_config"]["weight_block_size"] == block


# ---------------------------------------------------------------------------------------------- round trip
def qwen3_to_so8t(qwen3, so8t):
    """The function-preserving conversion: the Qwen3 weights are the folded SO8T weights, so a model loaded
    folded holds them exactly and save_pretrained writes them as it holds them."""
    SO8TTransformerForCausalLM.from_pretrained(qwen3, fold=True).save_pretrained(so8t)
    config = json.loads((so8t / "config.json").read_text())
    assert config["model_type"] == "so8t" and config["so8t_folded_weights"] is True
    # function-preserving: the SO8T checkpoint, loaded online (rotations applied), computes the Qwen3 model
    with torch.no_grad():
        online = SO8TTransformerForCausalLM.from_pretrained(so8t, torch_dtype=torch.float32)
        base = SO8TTransformerForCausalLM.from_pretrained(qwen3, torch_dtype=torch.float32, fold=True)
        assert not online.is_folded
        a, b = online(TOKENS), base(TOKENS)
    assert (a.logits - b.logits).abs().max() <= 1e-4 * b.logits.abs().max()
    # the same deterministic initial heads, stored in the checkpoint's dtype (bf16 rounds them)
    assert (a.safety_logits - b.safety_logits).abs().max() <= 1e-2 * b.safety_logits.abs().max()


def test_round_trip_bf16_is_bit_exact(tmp_path):
    qwen3 = write_tiny_qwen3(tmp_path / "qwen3", seed=5, dtype=torch.bfloat16, shards=2)
    qwen3_to_so8t(qwen3, tmp_path / "so8t")
    export_hf(tmp_path / "so8t", tmp_path / "hf")
    original, exported = stored_tensors(qwen3), stored_tensors(tmp_path / "hf")
    assert original.keys() == exported.keys()
    different = [n for n in original if not same_bytes(original[n], exported[n])]
    assert not different, f"{len(different)} tensors differ: {different[:4]}"
    assert json.loads((tmp_path / "hf/config.json").read_text())["torch_dtype"] == "bfloat16"


def test_round_trip_fp8_is_bit_exact(fp8_dir, tmp_path):
    qwen3_to_so8t(fp8_dir, tmp_path / "so8t")
    stored = load_file(str(tmp_path / "so8t/model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn  # kept as FP8
    export_hf(tmp_path / "so8t", tmp_path / "hf", fp8=True)
    original, exported = load_file(str(fp8_dir / "model.safetensors")), stored_tensors(tmp_path / "hf")
    assert original.keys() == exported.keys()
    different = [n for n in original if not same_bytes(original[n], exported[n])]
    assert not different, f"{len(different)} tensors differ (weights or scales): {different[:4]}"


def test_an_fp8_tensor_changed_since_loading_is_saved_as_held(fp8_dir, tmp_path):
    model = SO8TTransformerForCausalLM.from_pretrained(fp8_dir, fold=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    model.save_pretrained(tmp_path / "so8t")
    stored = load_file(str(tmp_path / "so8t/model.safetensors"))
    assert torch.equal(stored["model.layers.0.mlp.down_proj.weight"], model.model.layers[0].mlp.down_proj.weight)
    assert "model.layers.0.mlp.down_proj.weight_scale_inv" not in stored
    assert stored["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn


def test_an_unfolded_save_keeps_fp8_where_the_layout_allows(fp8_dir, tmp_path):
    """Loaded online, q/k/v/gate/up hold unfold(W) (written as held); o/down are still the source's FP8."""
    model = SO8TTransformerForCausalLM.from_pretrained(fp8_dir)
    model.save_pretrained(tmp_path / "so8t")
    stored, original = load_file(str(tmp_path / "so8t/model.safetensors")), load_file(str(fp8_dir / "model.safetensors"))
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight_scale_inv"):
        assert same_bytes(stored[name], original[name]), name
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" not in stored
    with torch.no_grad():
        assert torch.equal(SO8TTransformerForCausalLM.from_pretrained(tmp_path / "so8t")(TOKENS).logits,
                           model(TOKENS).logits)


# ---------------------------------------------------------------------------------------------- bad input
def test_a_missing_source_leaves_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        export_hf(tmp_path / "nope", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_and_kept(so8t_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/mine.txt").write_text("keep me")
    with pytest.raises(PathError, match="already exists"):
        export_hf(so8t_dir, tmp_path / "hf")
    with pytest.raises(PathError, match="already exists"):  # the source itself is an existing folder
        export_hf(so8t_dir, so8t_dir)
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("fp8", [False, True], ids=["dense", "fp8"])
def test_a_full_disk_leaves_nothing(so8t_dir, tmp_path, monkeypatch, fp8):
    monkeypatch.setattr(export, "DIRECT_STAGING", 2 * export.DIRECT_ALIGN)  # writes start mid-stream
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) >= 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as caught:
        export_hf(so8t_dir, tmp_path / "hf", fp8=fp8, max_shard_bytes=100_000)
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_nan_weight_is_named_and_leaves_nothing(qwen3_dir, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(qwen3_dir, source)
    state = load_file(str(source / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, str(source / "model.safetensors"))
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN"):
        export_hf(source, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli(so8t_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["hf", str(so8t_dir), "-o", str(tmp_path / "hf"), "--fp8"])
    assert result.exit_code == 0, result.output
    assert "block FP8" in result.output and (tmp_path / "hf/config.json").is_file()
    result = runner.invoke(main, ["hf", str(so8t_dir), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 1 and "Error: " in result.output and "already exists" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["hf", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "not a folder" in result.output and not (tmp_path / "x").exists()
    result = runner.invoke(main, ["hf", str(so8t_dir), "-o", str(tmp_path / "y"), "--max-shard-size", "lots"])
    assert result.exit_code == 2 and not (tmp_path / "y").exists()
