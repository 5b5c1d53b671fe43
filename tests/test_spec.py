"""The package against an independent statement of the spec (tests/spec_loops.py), on fresh SO8T weights.

A fresh SO8T checkpoint is drawn at random (not absorbed from a Qwen3, so nothing cancels), with RMSNorm gains
far from 1 (so a rotation on the wrong side of a norm changes the function). Folded by the loops into Qwen3
weights, transformers' Qwen3ForCausalLM must compute what our SO8T model computes, for every combination of
the six flags; our fold and our exported GGUF must hold the weights the loops give.
"""

import itertools
import json

import gguf
import pytest
import torch
from spec_loops import FLAGS, fold_state_dict
from transformers import Qwen3Config, Qwen3ForCausalLM

from so8t_export.config import SO8TConfig
from so8t_export.export import export_gguf
from so8t_export.fold import fold_weight
from so8t_export.model import SO8TTransformerForCausalLM

# float32 logits here reach ~40-50, where one ulp is ~4e-6; two float32 models of 3 layers that sum in another
# order differ by up to ~27 ulps of the largest logit (1.03e-4 on an Intel VM's kernels, 0 where they agree)
ULPS_OF_LARGEST = 64
COMBINATIONS = [dict(zip(FLAGS, values)) for values in itertools.product((True, False), repeat=len(FLAGS))]


def combination_id(flags: dict) -> str:
    return "".join("1" if flags[f] else "0" for f in FLAGS)


def fresh_so8t(qwen3_dir, flags: dict, seed: int = 0, dtype=torch.float32) -> SO8TTransformerForCausalLM:
    """An SO8T model whose every parameter is drawn at random: 3 layers, so all three types reach the MLP."""
    raw = json.loads((qwen3_dir / "config.json").read_text())
    config = SO8TConfig.from_dict({**raw, "num_hidden_layers": 3, "max_window_layers": 3, **flags})
    model = SO8TTransformerForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(0.5 + 1.5 * torch.rand(parameter.shape, generator=gen))
            else:
                scale = 1.0 if "embed_tokens" in name else 0.15
                parameter.copy_(scale * torch.randn(parameter.shape, generator=gen))
    model.name_or_path = str(qwen3_dir)  # save_pretrained copies the tokenizer from there
    return model.to(dtype).eval()


def qwen3_from_loops(model: SO8TTransformerForCausalLM) -> Qwen3ForCausalLM:
    config = model.config.to_dict()
    state = {name: tensor.double() for name, tensor in model.state_dict().items()}
    folded = fold_state_dict(state, config, model.model.triality_rotations.double(),
                             model.model.cross_head_rotation.double())
    hf_config = Qwen3Config(**{k: v for k, v in config.items()
                               if not k.startswith("so8t_") and k not in ("architectures", "model_type")})
    qwen3 = Qwen3ForCausalLM(hf_config).to(torch.float32).eval()
    missing, unexpected = qwen3.load_state_dict({k: v.float() for k, v in folded.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied
    return qwen3


@pytest.mark.parametrize("flags", COMBINATIONS, ids=combination_id)
def test_transformers_on_the_loop_fold_equals_our_model(qwen3_dir, flags):
    model = fresh_so8t(qwen3_dir, flags)
    qwen3 = qwen3_from_loops(model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, qwen3(tokens).logits
    largest = theirs.abs().max()
    assert largest > 1.0  # a real signal, not logits that agree by being ~0
    assert (ours - theirs).abs().max() <= ULPS_OF_LARGEST * torch.finfo(torch.float32).eps * largest


@pytest.mark.parametrize("flags", COMBINATIONS, ids=combination_id)
def test_our_fold_is_the_loop_fold(qwen3_dir, flags):
    model = fresh_so8t(qwen3_dir, flags, seed=2, dtype=torch.float64)
    state = model.state_dict()
    expected = fold_state_dict(state, model.config.to_dict(), model.model.triality_rotations.double(),
                               model.model.cross_head_rotation.double())
    plan = model.rotation_plan_float64()
    for name, weight in state.items():
        if name in expected and weight.ndim == 2:
            assert (fold_weight(name, weight, plan) - expected[name]).abs().max() < 1e-12, name


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "self_attn.o_proj": "attn_output"}


@pytest.mark.parametrize("flags", [COMBINATIONS[0], {**COMBINATIONS[0], "so8t_non_commutative_gates": False}],
                         ids=combination_id)
def test_the_exported_gguf_holds_the_loop_fold(qwen3_dir, tmp_path, flags):
    model = fresh_so8t(qwen3_dir, flags, seed=3)
    model.save_pretrained(tmp_path / "so8t")
    export_gguf(tmp_path / "so8t", tmp_path / "so8t.gguf", quant="f32")
    expected = fold_state_dict({n: t.double() for n, t in model.state_dict().items()}, model.config.to_dict(),
                               model.model.triality_rotations.double(), model.model.cross_head_rotation.double())
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(tmp_path / "so8t.gguf").tensors}
    for layer in range(model.config.num_hidden_layers):
        for ours, theirs in GGUF_NAMES.items():
            written = tensors[f"blk.{layer}.{theirs}.weight"].double()
            assert (written - expected[f"model.layers.{layer}.{ours}.weight"]).abs().max() < 1e-6, (layer, ours)
