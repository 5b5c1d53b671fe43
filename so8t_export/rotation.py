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


# ---------------------------------------------------------------------------------------------- fast path
# What the model's forward applies. rotate_heads costs two einsums (each a permuted copy and a small matmul)
# per projection; the map it applies acts on every 8-coordinate block of a head the same way and never mixes
# groups of 8 heads, so per group it is one matrix on (head in group, coordinate in block): 64x64 with
# cross-head mixing, 8x8 (one per head) without. head_blocks reads those matrices off rotate_heads itself,
# by pushing unit vectors through it, so the fast path is the einsum map by construction (to float rounding)
# and follows any change to it; the checking section below stays independent of both.
@dataclass(frozen=True)
class FusedRotations:
    """A plan as the forward applies it, in the dtype the rotations run in (float32, float64 for float64)."""

    qkv: torch.Tensor  # [G_q + 2 G_kv, 8a, 8a]: q's groups, then k's, then v's; a heads per group (8 or 1)
    mlp: torch.Tensor  # [num_hidden_layers, 8, 8]


def head_blocks(heads: torch.Tensor, cross_head: torch.Tensor | None, within_head_first: bool,
                group: int) -> torch.Tensor:
    """[H/group, 8*group, 8*group]: rotate_heads on one 8-coordinate block of each head, group by group.

    Block g maps the column vector x[(a, j)] = coordinate j of head g*group + a (in one block of each head) to
    the same block of the rotated heads, so rotate_heads(x) == apply_head_blocks(x, blocks) for any head_dim.
    group must hold whole mixing groups: 8 with cross-head mixing; 1 or 8 without.
    """
    num_heads, size = heads.shape[0], BLOCK * group
    # With head_dim = 8 each head is one block: row k of the images is the map of unit vector k.
    images = rotate_heads(torch.eye(num_heads * BLOCK, dtype=heads.dtype, device=heads.device), heads,
                          cross_head, within_head_first)
    full = images.T.reshape(num_heads // group, size, num_heads // group, size)  # x -> full @ x
    return full.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def fuse_rotations(plan: RotationPlan, dtype: torch.dtype) -> FusedRotations:
    """The plan's maps as FusedRotations in dtype: composed in float64 from its matrices, rounded once."""
    device = plan.q_heads.device
    # float64 wherever it exists (not on MPS); the matrices are tiny, so the CPU does it there
    work = device if device.type in ("cpu", "cuda", "meta") else torch.device("cpu")
    cross = None if plan.cross_head is None else plan.cross_head.to(work, torch.float64)
    group = BLOCK if cross is not None else 1
    q_heads, kv_heads = plan.q_heads.to(work, torch.float64), plan.kv_heads.to(work, torch.float64)
    q = head_blocks(q_heads, cross, plan.within_head_first, group)
    kv = head_blocks(kv_heads, cross, plan.within_head_first, group)
    return FusedRotations(qkv=torch.cat([q, kv, kv]).to(device, dtype), mlp=plan.mlp.to(device, dtype))


def apply_head_blocks(x: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., W] (heads of D coordinates, in groups) -> each group's blocks applied to every 8-coordinate
    block of its heads, computed in blocks' dtype and returned in dtype (x's by default).

    One batched matmul: [.., G, a heads, D/8 blocks, 8 coords] is permuted to put (head, coord) together,
    multiplied by the [G, 8a, 8a] stack and permuted back; the casts ride on the two permuting copies.
    """
    groups, size = blocks.shape[0], blocks.shape[-1]
    heads, width = size // BLOCK, x.shape[-1]
    per_head = width // (groups * size)  # D / 8
    grouped = x.reshape(-1, groups, heads, per_head, BLOCK).permute(1, 0, 3, 2, 4)  # [G, N, D/8, a, 8]
    grouped = _contiguous_as(grouped, blocks.dtype).view(groups, -1, size)
    rotated = torch.bmm(grouped, blocks.transpose(1, 2))  # row (token, block) @ M^T: M acting on columns
    rotated = rotated.view(groups, -1, per_head, heads, BLOCK).permute(1, 0, 3, 2, 4)  # [N, G, a, D/8, 8]
    return _contiguous_as(rotated, dtype or x.dtype).view(x.shape)


def _contiguous_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy in dtype, by one kernel (to() with a memory format does not copy within a dtype)."""
    return x.contiguous() if x.dtype == dtype else x.to(dtype, memory_format=torch.contiguous_format)


def apply_head_blocks_fusible(x: torch.Tensor, blocks: torch.Tensor,
                              dtype: torch.dtype | None = None) -> torch.Tensor:
    """apply_head_blocks as a broadcast product summed over (head, coord): what torch.compile runs, because
    inductor fuses it with the casts and the neighbouring q/k norms into the kernels it writes anyway, where
    a matmul stays a separate library call. Eagerly it would hold 64 products per output; do not use it so."""
    groups, size = blocks.shape[0], blocks.shape[-1]
    heads, width = size // BLOCK, x.shape[-1]
    per_head = width // (groups * size)
    grouped = x.reshape(-1, groups, 1, 1, heads, per_head, BLOCK).to(blocks.dtype)  # [N, G, 1, 1, a', D/8, j]
    matrices = blocks.view(groups, heads, BLOCK, heads, 1, BLOCK)  # [G, a, i, a', 1, j]
    rotated = (grouped * matrices).sum((4, 6))  # [N, G, a, i, D/8]
    return rotated.transpose(-1, -2).to(dtype or x.dtype).reshape(x.shape)


def rotate_blocks_fusible(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """rotate_blocks as a broadcast product summed over the input coordinate (for torch.compile, as above)."""
    blocks = x.reshape(*x.shape[:-1], -1, 1, BLOCK)  # [..., n, 1, j]
    return (blocks * rotation.to(x.dtype)).sum(-1).reshape(x.shape)  # sum_j R[i, j] x[j]


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
