"""Where SO8T's fixed rotations act and how: one definition shared by the model and the fold.

The model applies these maps to activations (q, k, v right after their projections; the MLP input right
after post_attention_layernorm). The fold applies the very same maps to weights, which is exact because
each map is linear and sits directly on a projection's output (rows) or input (columns):

    rotate_heads(x @ W.T)  == x @ rotate_heads(W.T)        -> W_folded = rotate_heads(W.T).T
    (rotate_blocks(x) @ W.T) == x @ (W @ blockdiag(R)).T   -> W_folded = rotate_blocks(W, R.T)

Convention: a rotation R acts on a column vector, x -> R x; on row tensors that is x @ R.T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SO8TConfig, triality_types

BLOCK = 8


def head_types(num_heads: int, triality_symmetry: bool) -> torch.Tensor:
    """Triality type of each head (config.triality_types), as a tensor."""
    return torch.tensor(triality_types(num_heads, triality_symmetry), dtype=torch.long)


def layer_types(num_layers: int, triality_symmetry: bool) -> torch.Tensor:
    """Triality type of each layer's MLP input rotation: layer % 3, or all 0 (vector)."""
    return head_types(num_layers, triality_symmetry)


@dataclass(frozen=True)
class RotationPlan:
    """The effective rotations of one model: which 8x8 matrix acts where."""

    q_heads: torch.Tensor  # [num_attention_heads, 8, 8]
    kv_heads: torch.Tensor  # [num_key_value_heads, 8, 8]
    mlp: torch.Tensor  # [num_hidden_layers, 8, 8]
    cross_head: torch.Tensor | None  # [8, 8], mixes heads in groups of 8; None when the flag is off
    within_head_first: bool  # so8t_non_commutative_gates: within-head rotation, then cross-head mixing

    def to(self, dtype: torch.dtype) -> RotationPlan:
        cast = (lambda t: None if t is None else t.to(dtype))
        return RotationPlan(cast(self.q_heads), cast(self.kv_heads), cast(self.mlp), cast(self.cross_head),
                            self.within_head_first)


def effective_types(config: SO8TConfig, rotations: torch.Tensor) -> torch.Tensor:
    """[3, 8, 8]: each triality type's matrix, or the identity where its representation flag is off."""
    enabled = torch.tensor([config.so8t_vector_representation, config.so8t_spinor_plus_representation,
                            config.so8t_spinor_minus_representation])
    eye = torch.eye(BLOCK, dtype=rotations.dtype, device=rotations.device).expand_as(rotations)
    return torch.where(enabled[:, None, None].to(rotations.device), rotations, eye)


def plan_rotations(config: SO8TConfig, rotations: torch.Tensor, cross_head: torch.Tensor) -> RotationPlan:
    """Resolve the config's flags into per-head and per-layer matrices (see README, "Configuration")."""
    types = effective_types(config, rotations)
    symmetric = config.so8t_triality_symmetry
    return RotationPlan(
        q_heads=types[head_types(config.num_attention_heads, symmetric)],
        kv_heads=types[head_types(config.num_key_value_heads, symmetric)],
        mlp=types[layer_types(config.num_hidden_layers, symmetric)],
        cross_head=cross_head if config.so8t_cross_head_interaction else None,
        within_head_first=config.so8t_non_commutative_gates,
    )


def rotate_within_heads(x: torch.Tensor, heads: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Rotate each head's 8-dim blocks by its own matrix: x [..., H*D] with heads [H, 8, 8]."""
    num_heads = heads.shape[0]
    blocks = x.reshape(*x.shape[:-1], num_heads, -1, BLOCK)  # [..., H, D/8, 8]
    pattern = "...hnj,hji->...hni" if transpose else "...hnj,hij->...hni"
    return torch.einsum(pattern, blocks, heads.to(x.dtype)).reshape(x.shape)


def mix_across_heads(x: torch.Tensor, num_heads: int, cross_head: torch.Tensor,
                     transpose: bool = False) -> torch.Tensor:
    """Mix heads g*8..g*8+7 coordinate by coordinate with one 8x8 rotation: x [..., H*D]."""
    groups = x.reshape(*x.shape[:-1], num_heads // BLOCK, BLOCK, -1)  # [..., H/8, 8, D]
    pattern = "...gjd,ji->...gid" if transpose else "...gjd,ij->...gid"
    return torch.einsum(pattern, groups, cross_head.to(x.dtype)).reshape(x.shape)


def rotate_heads(x: torch.Tensor, heads: torch.Tensor, cross_head: torch.Tensor | None,
                 within_head_first: bool = True) -> torch.Tensor:
    """The SO8T map on a projection output x [..., H*D]: within-head rotation and cross-head mixing."""
    if cross_head is None:
        return rotate_within_heads(x, heads)
    if within_head_first:
        return mix_across_heads(rotate_within_heads(x, heads), heads.shape[0], cross_head)
    return rotate_within_heads(mix_across_heads(x, heads.shape[0], cross_head), heads)


def unrotate_heads(x: torch.Tensor, heads: torch.Tensor, cross_head: torch.Tensor | None,
                   within_head_first: bool = True) -> torch.Tensor:
    """Inverse of rotate_heads (every factor is orthogonal, so each is undone by its transpose)."""
    if cross_head is None:
        return rotate_within_heads(x, heads, transpose=True)
    num_heads = heads.shape[0]
    if within_head_first:
        return rotate_within_heads(mix_across_heads(x, num_heads, cross_head, transpose=True), heads, True)
    return mix_across_heads(rotate_within_heads(x, heads, transpose=True), num_heads, cross_head, True)


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x -> blockdiag(R, R, ...) x over the last axis, in 8-dim blocks."""
    blocks = x.reshape(*x.shape[:-1], -1, BLOCK)
    return (blocks @ rotation.to(x.dtype).T).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- checking
# The same maps as explicit sparse matrices, placed entry by entry from the layout the README documents
# (row = output coordinate, x -> M x). The einsum functions above are fast but could transpose a rotation or
# swap the order without anything noticing: the model and the fold share them, and loading a Qwen3 absorbs
# whatever orthogonal map they apply. The export checks every fold against these instead.
def _sparse(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    indices = torch.stack([rows.reshape(-1), cols.reshape(-1)])
    return torch.sparse_coo_tensor(indices, values.reshape(-1), (size, size), check_invariants=True)


def within_heads_matrix(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[H*D, H*D]: entry (h*D + 8b + i, h*D + 8b + j) = R_h[i, j] for each head h and block b."""
    num_heads = heads.shape[0]
    h, b, i, j = torch.meshgrid(torch.arange(num_heads), torch.arange(head_dim // BLOCK), torch.arange(BLOCK),
                                torch.arange(BLOCK), indexing="ij")
    start = h * head_dim + b * BLOCK
    return _sparse(start + i, start + j, heads[h, i, j], num_heads * head_dim)


def across_heads_matrix(cross_head: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[H*D, H*D]: entry ((8g + i)*D + d, (8g + j)*D + d) = C[i, j] for each group g and coordinate d."""
    g, d, i, j = torch.meshgrid(torch.arange(num_heads // BLOCK), torch.arange(head_dim), torch.arange(BLOCK),
                                torch.arange(BLOCK), indexing="ij")
    return _sparse((g * BLOCK + i) * head_dim + d, (g * BLOCK + j) * head_dim + d, cross_head[i, j],
                   num_heads * head_dim)


def map_heads_by_matrices(x: torch.Tensor, heads: torch.Tensor, cross_head: torch.Tensor | None,
                          within_head_first: bool = True) -> torch.Tensor:
    """rotate_heads on each row of x [n, H*D], by the sparse matrices."""
    head_dim = x.shape[-1] // heads.shape[0]
    within = within_heads_matrix(heads, head_dim)
    if cross_head is None:
        return _apply(within, x)
    across = across_heads_matrix(cross_head.to(heads.dtype), heads.shape[0], head_dim)
    first, second = (within, across) if within_head_first else (across, within)
    return _apply(second, _apply(first, x))


def map_blocks_by_matrix(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """rotate_blocks on each row of x [n, dim], by the sparse matrix: entry (8b + i, 8b + j) = R[i, j]."""
    b, i, j = torch.meshgrid(torch.arange(x.shape[-1] // BLOCK), torch.arange(BLOCK), torch.arange(BLOCK),
                             indexing="ij")
    return _apply(_sparse(b * BLOCK + i, b * BLOCK + j, rotation[i, j], x.shape[-1]), x)


def _apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x -> M x on each row of x [n, dim]."""
    return torch.sparse.mm(matrix, x.T.to(matrix.dtype)).T
