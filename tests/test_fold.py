"""Folding as pure functions: exactness, inverse, the transposition trap, and the plain-Qwen3 round trip."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from so8t_export.config import SO8TConfig
from so8t_export.fold import fold_error, fold_weight, role, unfold_weight
from so8t_export.rotation import plan_rotations, rotate_blocks, rotate_heads
from so8t_export.triality import cross_head_rotation, triality_rotations

CONFIG = SO8TConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=16)
NAMES = {"model.layers.2.self_attn.q_proj.weight": (256, 64), "model.layers.1.self_attn.k_proj.weight": (128, 64),
         "model.layers.0.self_attn.v_proj.weight": (128, 64), "model.layers.2.mlp.gate_proj.weight": (96, 64),
         "model.layers.1.mlp.up_proj.weight": (96, 64), "model.layers.0.mlp.down_proj.weight": (64, 96),
         "model.layers.0.self_attn.o_proj.weight": (64, 256)}


def plan(seed=0, **flags):
    config = SO8TConfig.from_dict({**CONFIG.to_dict(), **flags, "so8t_rotation_seed": seed})
    return plan_rotations(config, triality_rotations(seed), cross_head_rotation(seed))


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 1000), st.booleans(), st.booleans())
def test_folded_projection_equals_so8t_projection(seed, cross, within_first):
    p = plan(seed, so8t_cross_head_interaction=cross, so8t_non_commutative_gates=within_first)
    gen = torch.Generator().manual_seed(seed)
    for name, shape in NAMES.items():
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        x = torch.randn(5, shape[1], generator=gen, dtype=torch.float64)
        folded = fold_weight(name, w, p)
        r = role(name)
        if r.side == "rows":
            heads = p.q_heads if r.projection == "q_proj" else p.kv_heads
            so8t = rotate_heads(x @ w.T, heads, p.cross_head, p.within_head_first)
        elif r.side == "columns":
            so8t = rotate_blocks(x, p.mlp[r.layer]) @ w.T
        else:
            so8t = x @ w.T
            assert folded is w
        assert (so8t - x @ folded.T).abs().max() < 1e-12, name
        assert fold_error(name, w, folded, p, x) < 1e-12
        assert (unfold_weight(name, folded, p) - w).abs().max() < 1e-12  # exact inverse


def test_the_transposed_fold_is_caught():
    p = plan()
    w = torch.randn(256, 64, dtype=torch.float64)
    x = torch.randn(4, 64, dtype=torch.float64)
    name = "model.layers.0.self_attn.q_proj.weight"
    wrong = unfold_weight(name, w, p)  # R^T instead of R: the classic exporter bug
    assert fold_error(name, w, wrong, p, x) > 0.1 * (x @ w.T).abs().max()


def test_role_table():
    assert role("model.layers.11.self_attn.k_proj.weight").side == "rows"
    assert role("model.layers.11.mlp.up_proj.weight").side == "columns"
    assert role("model.layers.11.mlp.up_proj.weight").layer == 11
    for name in ("model.layers.1.self_attn.q_norm.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert role(name).side == "none"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_precision(dtype):
    p = plan().to(dtype)
    w = torch.randn(256, 64, dtype=dtype)
    name = "model.layers.0.self_attn.q_proj.weight"
    back = fold_weight(name, unfold_weight(name, w, p), p)
    assert (back - w).abs().max() < (1e-13 if dtype == torch.float64 else 1e-5)


def test_plain_qwen3_loaded_into_so8t_folds_back_to_its_weights(qwen3_dir):
    """The model path: from_pretrained absorbs the inverse rotations; fold_weight undoes it."""
    from safetensors.torch import load_file

    from so8t_export.model import SO8TTransformerForCausalLM

    model = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir, torch_dtype=torch.float64)
    p = model.model.rotation_plan().to(torch.float64)
    source = load_file(str(qwen3_dir / "model.safetensors"))
    state = model.state_dict()
    for name in [n for n in source if role(n).side != "none"]:
        back = fold_weight(name, state[name], p)
        # the float32 rotation buffers are orthogonal to ~1e-7, which bounds the round trip
        assert (back - source[name].double()).abs().max() <= 1e-6 * source[name].abs().max(), name
        assert (state[name] - source[name].double()).abs().max() > 1e-2  # the absorbed weights really differ
