"""Export variants through real llama.cpp: untied embeddings, and every SO8T flag off, one at a time.

Each variant is exported to f32, read back with gguf-py's GGUFReader and our so8t.* reader, and scored by
run_parity against the PyTorch reference. The tiny model has 2 layers (MLP rotation types 0, 1), 16 query
heads and 8 KV heads (every type 0, 1, 2 occurs among the heads).
"""

import gguf
import numpy as np
import pytest
import torch
from conftest import require_llama_cpp
from safetensors.torch import load_file

from so8t_export.config import SO8TConfig
from so8t_export.demo import write_tiny_qwen3
from so8t_export.export import export_gguf
from so8t_export.metadata import CROSS_HEAD_KEY, read_so8t_metadata
from so8t_export.model import SO8TTransformerForCausalLM
from so8t_export.parity import DEFAULT_PROMPTS, THRESHOLDS, load_tokenizer, run_parity

# README "Configuration": the six boolean flags. A seventh in config.py must be added here (and to the table).
FLAGS = ("triality_symmetry", "cross_head_interaction", "non_commutative_gates", "vector_representation",
         "spinor_plus_representation", "spinor_minus_representation")

# Which MLP inputs a flag reaches on the tiny model (layer l's MLP rotation has type l % 3: layers 0 and 1).
# Symmetry off turns layer 1's type 1 into type 0; a representation flag off replaces its own type's rotation
# by the identity (no layer has type 2); cross-head mixing and its order act on attention heads only. Every
# flag reaches q, k and v of both layers (the heads hold all three types, and mixing touches every head).
MLP_LAYERS_REACHED = {"triality_symmetry": {1}, "cross_head_interaction": set(),
                      "non_commutative_gates": set(), "vector_representation": {0},
                      "spinor_plus_representation": {1}, "spinor_minus_representation": set()}
LAYERS, Q_HEADS, KV_HEADS = 2, 16, 8

# f32 exports against the f32 reference, measured 2026-12 on this 2-core machine (2 prompts, 8 greedy tokens
# for the flags; 5 prompts, 16 greedy tokens untied): max abs logit diff <= 4.5e-5, mean KLD <= 5.4e-12, head
# probability diff <= 7.3e-7. The bounds leave ~10x for other CPUs and thread counts, and are 2.5-10^4x
# tighter than THRESHOLDS["f32"] (1e-3, 1e-6, 1e-4), which report.passed checks as well.
F32_MAX_ABS_LOGIT, F32_MEAN_KLD, F32_HEAD_PROB = 4e-4, 1e-10, 1e-5
PARITY_PROMPTS = DEFAULT_PROMPTS[:2]  # ASCII and CJK: 115 prompt tokens


def gguf_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


def assert_f32_parity(report):
    print(f"\n{report.table()}")
    a = report.aggregate()
    assert report.thresholds == THRESHOLDS["f32"] and report.reference_dtype == "f32"
    assert report.kv_cache == "F32" and report.has_heads and a["tokens_equal"]
    assert a["max_abs_logit"] <= F32_MAX_ABS_LOGIT and a["mean_kld"] <= F32_MEAN_KLD
    assert a["top1"] == 1.0 and a["greedy"] == 1.0
    assert max(a["safety_diff"], a["authority_diff"]) <= F32_HEAD_PROB
    assert report.passed, report.failures


def test_flag_list_is_config_s():
    assert tuple(SO8TConfig().so8t_flags()) == FLAGS


# ---------------------------------------------------------------------------------------------- untied
@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tiny Qwen3 with its own lm_head, its SO8T checkpoint, and that checkpoint's f32 export."""
    folder = tmp_path_factory.mktemp("untied")
    qwen3 = write_tiny_qwen3(folder / "qwen3", tie_word_embeddings=False)
    so8t = folder / "so8t"
    SO8TTransformerForCausalLM.from_pretrained(qwen3).save_pretrained(so8t)
    return qwen3, so8t, export_gguf(so8t, folder / "untied-f32.gguf", quant="f32").output


def test_untied_checkpoint_has_its_own_lm_head(untied):
    qwen3, so8t, _ = untied
    weights = load_file(str(qwen3 / "model.safetensors"))
    head, embed = weights["lm_head.weight"], weights["model.embed_tokens.weight"]
    assert head.shape == embed.shape == (768, 64)
    assert (head - embed).abs().max() > 1  # drawn separately (N(0, 0.1) against the embedding's N(0, 1))
    saved = load_file(str(so8t / "model.safetensors"))
    assert torch.equal(saved["task_head.weight"], head)  # the SO8T checkpoint keeps it, untouched


def test_untied_reference_equals_transformers(untied):
    from transformers import Qwen3ForCausalLM

    qwen3, so8t, _ = untied
    hf = Qwen3ForCausalLM.from_pretrained(qwen3, dtype=torch.float32).eval()
    assert not hf.config.tie_word_embeddings
    tokenizer = load_tokenizer(qwen3)
    for source in (qwen3, so8t):  # absorbed on load, and reloaded from save_pretrained
        ours = SO8TTransformerForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
        assert ours.task_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
        assert torch.equal(ours.task_head.weight, hf.lm_head.weight)
        for prompt in DEFAULT_PROMPTS:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
            with torch.inference_mode():
                diff = (ours(ids).task_logits - hf(ids).logits).abs().max().item()
            assert diff <= 1e-4, (source, prompt, diff)  # measured <= 5.0e-6 (logits up to 5.7)


def test_untied_export_writes_output_weight(untied, so8t_dir, tmp_path):
    qwen3, _, path = untied
    reader = gguf.GGUFReader(path)
    infos = {t.name: t for t in reader.tensors}
    assert infos["output.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    output, embed = np.asarray(infos["output.weight"].data), np.asarray(infos["token_embd.weight"].data)
    head = load_file(str(qwen3 / "model.safetensors"))["lm_head.weight"].numpy()
    assert output.shape == head.shape == embed.shape
    assert np.array_equal(output.view(np.uint32), head.view(np.uint32))  # bit for bit
    assert np.abs(output - embed).max() > 1
    # a tied checkpoint's file has none: llama.cpp reuses token_embd
    tied = export_gguf(so8t_dir, tmp_path / "tied-f32.gguf", quant="f32").output
    assert "output.weight" not in gguf_tensors(tied)


def test_untied_parity(untied):
    require_llama_cpp()
    _, so8t, path = untied
    assert_f32_parity(run_parity(so8t, path, greedy_tokens=16))


# ---------------------------------------------------------------------------------------------- flags off
@pytest.fixture(scope="module", params=FLAGS)
def flag_off(request, qwen3_dir, tmp_path_factory):
    """(flag, SO8T checkpoint with so8t_<flag> = false, its f32 export)."""
    flag = request.param
    folder = tmp_path_factory.mktemp(f"no-{flag}")
    so8t = folder / "so8t"
    SO8TTransformerForCausalLM.from_pretrained(qwen3_dir, **{f"so8t_{flag}": False}).save_pretrained(so8t)
    return flag, so8t, export_gguf(so8t, folder / "f32.gguf", quant="f32").output


def test_flag_off_reaches_the_tensors_it_should(flag_off, so8t_dir):
    """Against the every-flag-on checkpoint (the same Qwen3, absorbed): exactly the tensors the flag reaches
    differ, so the flag is live in the model, not a no-op that parity would pass anyway."""
    flag, so8t, _ = flag_off
    ours = load_file(str(so8t / "model.safetensors"))
    every_flag = load_file(str(so8t_dir / "model.safetensors"))
    assert ours.keys() == every_flag.keys()
    expected = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(LAYERS) for p in "qkv"}
    expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for i in MLP_LAYERS_REACHED[flag]
                 for p in ("gate", "up")}
    differ = {name for name in ours if not torch.equal(ours[name], every_flag[name])}
    assert differ == expected  # the rotation buffers are stored, and equal, whatever the flags


def test_flag_off_metadata_reads_back(flag_off, qwen3_dir):
    flag, so8t, path = flag_off
    reader = gguf.GGUFReader(path)
    for name in FLAGS:
        assert reader.get_field(f"so8t.flags.{name}").contents() is (name != flag), name
    mixing = flag != "cross_head_interaction"
    assert (reader.get_field(CROSS_HEAD_KEY) is not None) == mixing
    assert "output.weight" not in {t.name for t in reader.tensors}  # write_tiny_qwen3 ties by default

    meta = read_so8t_metadata(reader, path)  # the schema checks (rotations, types, fold error) pass
    assert meta.flags == {name: name != flag for name in FLAGS}
    symmetric = flag != "triality_symmetry"
    for types, count in ((meta.q_head_types, Q_HEADS), (meta.kv_head_types, KV_HEADS),
                         (meta.mlp_rotation_types, LAYERS)):
        assert types.tolist() == ([i % 3 for i in range(count)] if symmetric else [0] * count)
    buffers = load_file(str(so8t / "model.safetensors"))
    # the file carries the checkpoint's rotations whatever the flags (a flag says which ones act)
    assert np.array_equal(meta.rotations, buffers["model.triality_rotations"].numpy())
    if mixing:
        assert np.array_equal(meta.cross_head, buffers["model.cross_head_rotation"].numpy())
    else:
        assert meta.cross_head is None
    assert meta.fold_max_abs_error <= 1e-14  # float64 fold from an SO8T checkpoint: measured <= 2.7e-15

    # the fold undoes exactly this flag's absorption: the tensors are the Qwen3 source's, to float32 rounding
    source = load_file(str(qwen3_dir / "model.safetensors"))
    tensors = gguf_tensors(path)
    for i in range(LAYERS):
        for gguf_name, name in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                                ("attn_v", "self_attn.v_proj"), ("ffn_gate", "mlp.gate_proj"),
                                ("ffn_up", "mlp.up_proj")):
            want = source[f"model.layers.{i}.{name}.weight"].numpy()
            diff = np.abs(tensors[f"blk.{i}.{gguf_name}.weight"] - want).max()
            assert diff <= 1e-6, (gguf_name, i, diff)  # measured <= 3.0e-8 (weights up to 0.43)


def test_flag_off_parity(flag_off):
    require_llama_cpp()
    _, so8t, path = flag_off
    assert_f32_parity(run_parity(so8t, path, prompts=PARITY_PROMPTS, greedy_tokens=8))
