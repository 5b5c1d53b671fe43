"""The reference model against transformers' Qwen3, and what each SO8T flag does."""

import pytest
import torch
from transformers import Qwen3ForCausalLM

from so8t_export.config import ConfigError, SO8TConfig
from so8t_export.model import SO8TTransformerForCausalLM
from so8t_export.rotation import mix_across_heads, rotate_heads, rotate_within_heads
from so8t_export.triality import triality_rotations

ATOL = 1e-4  # float32, issue 2


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    return Qwen3ForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def so8t(qwen3_dir):
    return SO8TTransformerForCausalLM.from_pretrained(qwen3_dir)


def ids(length, batch=1, seed=0, vocab=700):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [1, 7, 33, 128])
def test_logits_equal_transformers_qwen3(qwen3, so8t, length):
    tokens = ids(length, batch=2, seed=length)
    with torch.no_grad():
        expected = qwen3(tokens).logits
        out = so8t(tokens)
    assert out.logits is out.task_logits
    assert (out.task_logits - expected).abs().max() <= ATOL
    assert out.safety_logits.shape == (2, length, 2) and out.authority_logits.shape == (2, length, 2)


def test_rotations_are_really_applied(qwen3, so8t):
    # the stored projections differ from the base ones: the rotations carry the difference
    base = qwen3.model.layers[0].self_attn.q_proj.weight
    assert (so8t.model.layers[0].self_attn.q_proj.weight - base).abs().max() > 0.1
    assert (so8t.model.layers[1].mlp.gate_proj.weight - qwen3.model.layers[1].mlp.gate_proj.weight).abs().max() > 0.1


def test_incremental_decoding_equals_full_forward(so8t):
    tokens = ids(24, batch=2, seed=3)
    with torch.no_grad():
        full = so8t(tokens).logits
        first = so8t(tokens[:, :10], use_cache=True)
        cache = first.past_key_values
        parts = [first.logits]
        parts.append(so8t(tokens[:, 10:17], past_key_values=cache, use_cache=True).logits)
        for i in range(17, 24):
            parts.append(so8t(tokens[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.length == 24
    assert (torch.cat(parts, dim=1) - full).abs().max() <= ATOL


def test_hidden_states_and_attentions(qwen3, so8t):
    tokens = ids(11, seed=4)
    with torch.no_grad():
        out = so8t(tokens, output_hidden_states=True, output_attentions=True)
        ref = qwen3(tokens, output_hidden_states=True)
    assert len(out.hidden_states) == so8t.config.num_hidden_layers + 1
    assert (out.hidden_states[-1] - ref.hidden_states[-1]).abs().max() <= ATOL
    assert len(out.attentions) == so8t.config.num_hidden_layers
    weights = out.attentions[0]
    assert weights.shape == (1, so8t.config.num_attention_heads, 11, 11)
    assert torch.allclose(weights.sum(-1), torch.ones(1, so8t.config.num_attention_heads, 11), atol=1e-5)
    assert weights.triu(1).abs().max() == 0  # causal
    assert out["safety_logits"] is out.safety_logits


def test_left_padded_batch_matches_unpadded(so8t):
    tokens = ids(9, seed=5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = so8t(tokens).logits
        masked = so8t(padded, attention_mask=mask).logits[:, 3:]
    assert (plain - masked).abs().max() <= ATOL


@pytest.mark.parametrize("flags", [
    {"so8t_triality_symmetry": False},
    {"so8t_cross_head_interaction": False},
    {"so8t_non_commutative_gates": False},
    {"so8t_spinor_plus_representation": False, "so8t_vector_representation": False},
    {"so8t_rotation_seed": 123},
])
def test_every_flag_combination_preserves_the_base_function(qwen3_dir, qwen3, flags):
    model = SO8TTransformerForCausalLM.from_pretrained(qwen3_dir, **flags)
    tokens = ids(16, seed=6)
    with torch.no_grad():
        assert (model(tokens).logits - qwen3(tokens).logits).abs().max() <= ATOL


def config(**flags):
    return SO8TConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=16, **flags)


def plan_of(**flags):
    return SO8TTransformerForCausalLM(config(**flags)).model.rotation_plan()


def test_triality_symmetry_assigns_types_by_head_index():
    r = triality_rotations(config().so8t_rotation_seed).float()
    plan = plan_of()
    for h in range(16):
        assert torch.equal(plan.q_heads[h], r[h % 3])
    for j in range(8):
        assert torch.equal(plan.kv_heads[j], r[j % 3])
    for layer in range(4):
        assert torch.equal(plan.mlp[layer], r[layer % 3])
    off = plan_of(so8t_triality_symmetry=False)
    assert all(torch.equal(m, r[0]) for m in (*off.q_heads, *off.kv_heads, *off.mlp))


def test_representation_flags_turn_their_type_into_the_identity():
    r = triality_rotations(config().so8t_rotation_seed).float()
    plan = plan_of(so8t_spinor_minus_representation=False)
    assert torch.equal(plan.q_heads[2], torch.eye(8)) and torch.equal(plan.q_heads[5], torch.eye(8))
    assert torch.equal(plan.q_heads[0], r[0]) and torch.equal(plan.q_heads[1], r[1])
    plan = plan_of(so8t_vector_representation=False)
    assert torch.equal(plan.kv_heads[0], torch.eye(8)) and torch.equal(plan.mlp[3], torch.eye(8))


def test_cross_head_interaction_mixes_heads_in_groups_of_eight():
    plan = plan_of()
    assert plan.cross_head is not None and plan_of(so8t_cross_head_interaction=False).cross_head is None
    x = torch.zeros(1, 16 * 16)
    x[0, 3 * 16 + 5] = 1.0  # head 3, coordinate 5
    mixed = mix_across_heads(x, 16, plan.cross_head).view(2, 8, 16)
    assert torch.allclose(mixed[0, :, 5], plan.cross_head[:, 3])  # spread over heads 0..7 of group 0
    assert mixed[1].abs().max() == 0 and mixed[0, :, :5].abs().max() == 0  # not across groups or coordinates
    with pytest.raises(ConfigError, match="num_attention_heads = 12; expected a multiple of 8"):
        SO8TConfig(num_attention_heads=12, num_key_value_heads=4, head_dim=16, hidden_size=64)
    SO8TConfig(num_attention_heads=12, num_key_value_heads=4, head_dim=16, hidden_size=64,
               so8t_cross_head_interaction=False)


def test_non_commutative_gates_fix_the_order():
    plan = plan_of()
    x = torch.randn(3, 16 * 16)
    within_first = rotate_heads(x, plan.q_heads, plan.cross_head, within_head_first=True)
    assert torch.allclose(within_first, mix_across_heads(rotate_within_heads(x, plan.q_heads), 16, plan.cross_head))
    cross_first = rotate_heads(x, plan.q_heads, plan.cross_head, within_head_first=False)
    assert (within_first - cross_first).abs().max() > 0.1  # the two orders are different maps


def test_head_dim_must_split_into_rotation_blocks():
    with pytest.raises(ConfigError, match="head_dim = 12; expected a multiple of 8"):
        SO8TConfig(head_dim=12)
