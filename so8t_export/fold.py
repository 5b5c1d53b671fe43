"""Folding: SO8T weights <-> stock Qwen3 weights, one tensor at a time, as pure functions.

fold_weight turns an SO8T projection into the stock Qwen3 projection that computes the same thing
(rows of q/k/v, columns of gate/up); unfold_weight is its exact inverse and is what loading a plain Qwen3
checkpoint applies, so that the SO8T model computes exactly what the base model computes. Every other
tensor passes through unchanged. Callers pass float64 (or float32) and cast once afterwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .rotation import (RotationPlan, map_blocks_by_matrix, map_heads_by_matrices, rotate_blocks, rotate_heads,
                       unrotate_heads)

_ROTATED = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$")


@dataclass(frozen=True)
class Role:
    """How a rotation touches one tensor: 'rows' of a q/k/v projection, 'columns' of gate/up, or neither."""

    side: str  # "rows" | "columns" | "none"
    layer: int = -1
    projection: str = ""


def role(name: str) -> Role:
    match = _ROTATED.match(name)
    if not match:
        return Role("none")
    layer, projection = int(match.group(1)), match.group(2)
    return Role("columns" if projection in ("gate_proj", "up_proj") else "rows", layer, projection)


def _heads(plan: RotationPlan, projection: str) -> torch.Tensor:
    return plan.q_heads if projection == "q_proj" else plan.kv_heads


def fold_weight(name: str, weight: torch.Tensor, plan: RotationPlan) -> torch.Tensor:
    """SO8T weight -> stock Qwen3 weight.

    q/k/v: W' = M W, M the head map (blockdiag(R_h), then cross-head mixing), so W' x = M (W x).
    gate/up: W' = W blockdiag(R), so W' x = W (blockdiag(R) x).
    """
    r = role(name)
    if r.side == "rows":
        return rotate_heads(weight.T, _heads(plan, r.projection), plan.cross_head, plan.within_head_first).T
    if r.side == "columns":
        return rotate_blocks(weight, plan.mlp[r.layer].T)
    return weight


def unfold_weight(name: str, weight: torch.Tensor, plan: RotationPlan) -> torch.Tensor:
    """Stock Qwen3 weight -> SO8T weight: the exact inverse of fold_weight (M^T W, W blockdiag(R)^T)."""
    r = role(name)
    if r.side == "rows":
        return unrotate_heads(weight.T, _heads(plan, r.projection), plan.cross_head, plan.within_head_first).T
    if r.side == "columns":
        return rotate_blocks(weight, plan.mlp[r.layer])
    return weight


def fold_error(name: str, so8t_weight: torch.Tensor, folded: torch.Tensor, plan: RotationPlan,
               probe: torch.Tensor) -> float:
    """max |SO8T projection - folded projection| on a probe batch [n, in_features].

    The SO8T side projects and then applies the map by the sparse matrices of rotation.py's checking section,
    not through the einsum functions the fold itself uses, so a transposed rotation or the two mixings in the
    wrong order is off by O(1) here. (The head types come from the plan both sides share; tests/test_spec.py
    checks those against the README.)
    """
    r = role(name)
    if r.side == "rows":
        reference = map_heads_by_matrices(probe @ so8t_weight.T, _heads(plan, r.projection).double(),
                                          plan.cross_head, plan.within_head_first)
    elif r.side == "columns":
        reference = map_blocks_by_matrix(probe, plan.mlp[r.layer].double()) @ so8t_weight.T
    else:
        reference = probe @ so8t_weight.T
    return (reference - probe @ folded.T).abs().max().item()


def absorbed_error(name: str, weight: torch.Tensor, plan: RotationPlan, probe: torch.Tensor) -> tuple[float, float]:
    """For a plain Qwen3 weight W: (max |SO8T projection with the absorbed weight unfold(W) - W projection|,
    max |W projection|) on a probe batch.

    fold(unfold(W)) = W exactly, so a Qwen3 source is exported as W itself; this checks that the SO8T model
    holding unfold(W) computes W's projection. The absorbed side goes through the einsum functions, as loading
    does (unfold(W) x = M^T W x for rows, W B^T (B x) for columns); the model's rotation is applied as the
    sparse matrix, so the error is the float32 buffers' orthogonality (~1e-7) when both agree and O(1) when
    the einsum form transposes a rotation. W is never copied or widened: one matmul with it.
    """
    r = role(name)
    if r.side == "columns":
        rotation = plan.mlp[r.layer].double()
        drift = rotate_blocks(map_blocks_by_matrix(probe, rotation), rotation.T) - probe
        projection, drift_projection = (torch.cat([probe, drift]).to(weight.dtype) @ weight.T).split(len(probe))
        return drift_projection.abs().max().item(), projection.abs().max().item()
    projection = (probe.to(weight.dtype) @ weight.T).double()
    if r.side == "rows":
        heads = _heads(plan, r.projection).double()
        cross_head = None if plan.cross_head is None else plan.cross_head.double()
        absorbed = unrotate_heads(projection, heads, cross_head, plan.within_head_first)
        reference = map_heads_by_matrices(absorbed, heads, cross_head, plan.within_head_first)
        return (reference - projection).abs().max().item(), projection.abs().max().item()
    return 0.0, projection.abs().max().item()
