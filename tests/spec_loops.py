"""The SO8T map as the README states it, written as plain loops: a second statement of the spec for the tests.

It is deliberately unlike so8t_export/rotation.py (no reshapes, no einsum, no shared helpers): it walks over
heads, 8-dim blocks and head groups by index and multiplies 8x8 matrices onto column vectors, x -> R x. The
tests fold SO8T weights with it and compare the stock Qwen3 that results with our SO8T model, so a rotation
that is transposed, misplaced, mis-typed or mixed in the wrong order in the package cannot agree with it.
"""

from __future__ import annotations

import torch

BLOCK = 8
FLAGS = ("so8t_triality_symmetry", "so8t_cross_head_interaction", "so8t_non_commutative_gates",
         "so8t_vector_representation", "so8t_spinor_plus_representation", "so8t_spinor_minus_representation")
REPRESENTATION_FLAGS = ("so8t_vector_representation", "so8t_spinor_plus_representation",
                        "so8t_spinor_minus_representation")


def rotation_of(index: int, flags: dict, rotations: torch.Tensor) -> torch.Tensor:
    """README "Configuration": head (or layer) i uses R_{i%3} under the triality symmetry, R_v without it;
    a type whose representation flag is off uses the identity."""
    kind = index % 3 if flags["so8t_triality_symmetry"] else 0
    if not flags[REPRESENTATION_FLAGS[kind]]:
        return torch.eye(BLOCK, dtype=rotations.dtype)
    return rotations[kind]


def rotate_rows_within_heads(weight: torch.Tensor, num_heads: int, flags: dict,
                             rotations: torch.Tensor) -> torch.Tensor:
    """Rows h*D + 8b .. h*D + 8b + 7 of a q/k/v projection are one 8-vector per input column: left-multiply
    each by head h's rotation."""
    head_dim = weight.shape[0] // num_heads
    out = weight.clone()
    for head in range(num_heads):
        rotation = rotation_of(head, flags, rotations)
        for block in range(head_dim // BLOCK):
            rows = slice(head * head_dim + block * BLOCK, head * head_dim + (block + 1) * BLOCK)
            out[rows] = rotation @ weight[rows]
    return out


def mix_rows_across_heads(weight: torch.Tensor, num_heads: int, cross_head: torch.Tensor) -> torch.Tensor:
    """Coordinate d of heads 8g .. 8g+7 is one 8-vector: left-multiply it by the cross-head rotation."""
    head_dim = weight.shape[0] // num_heads
    out = weight.clone()
    for group in range(num_heads // BLOCK):
        for coordinate in range(head_dim):
            rows = [(group * BLOCK + member) * head_dim + coordinate for member in range(BLOCK)]
            out[rows] = cross_head @ weight[rows]
    return out


def fold_head_projection(weight: torch.Tensor, num_heads: int, flags: dict, rotations: torch.Tensor,
                         cross_head: torch.Tensor) -> torch.Tensor:
    """The stock projection W' with W' x = map(W x): the within-head rotation and the cross-head mixing in the
    order so8t_non_commutative_gates names."""
    if not flags["so8t_cross_head_interaction"]:
        return rotate_rows_within_heads(weight, num_heads, flags, rotations)
    if flags["so8t_non_commutative_gates"]:
        return mix_rows_across_heads(rotate_rows_within_heads(weight, num_heads, flags, rotations), num_heads,
                                     cross_head)
    return rotate_rows_within_heads(mix_rows_across_heads(weight, num_heads, cross_head), num_heads, flags,
                                    rotations)


def fold_mlp_input(weight: torch.Tensor, layer: int, flags: dict, rotations: torch.Tensor) -> torch.Tensor:
    """gate/up see R x in every 8-dim block of the normed input x, so W' = W blockdiag(R): column block b of W'
    is W's column block b times R."""
    rotation = rotation_of(layer, flags, rotations)
    out = weight.clone()
    for block in range(weight.shape[1] // BLOCK):
        columns = slice(block * BLOCK, (block + 1) * BLOCK)
        out[:, columns] = weight[:, columns] @ rotation
    return out


def fold_state_dict(state: dict[str, torch.Tensor], config: dict, rotations: torch.Tensor,
                    cross_head: torch.Tensor) -> dict[str, torch.Tensor]:
    """An SO8T state dict (our parameter names) -> transformers Qwen3 state dict, every layer by the loops above."""
    qwen3 = {}
    for name, tensor in state.items():
        if name.startswith("model.triality_rotations") or name.startswith("model.cross_head_rotation"):
            continue
        if name.startswith(("safety_head.", "authority_head.")):
            continue
        qwen3["lm_head.weight" if name == "task_head.weight" else name] = tensor.clone()
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for projection, heads in (("q_proj", config["num_attention_heads"]),
                                  ("k_proj", config["num_key_value_heads"]),
                                  ("v_proj", config["num_key_value_heads"])):
            name = f"{prefix}self_attn.{projection}.weight"
            qwen3[name] = fold_head_projection(state[name], heads, config, rotations, cross_head)
        for projection in ("gate_proj", "up_proj"):
            name = f"{prefix}mlp.{projection}.weight"
            qwen3[name] = fold_mlp_input(state[name], layer, config, rotations)
    return qwen3
