"""Triality maths: octonions, the partner solve, and the rotation validator."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from so8t_export import triality as t

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def random_octonions(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen, dtype=torch.float64)


def test_octonions_are_a_normed_non_associative_alternative_algebra():
    x, y, z = (random_octonions(200, s) for s in (1, 2, 3))
    norm = torch.linalg.vector_norm
    assert torch.allclose(norm(t.multiply(x, y), dim=-1), norm(x, dim=-1) * norm(y, dim=-1), atol=1e-12)
    # alternative: (xx)y = x(xy), but not associative in general
    assert torch.allclose(t.multiply(t.multiply(x, x), y), t.multiply(x, t.multiply(x, y)), atol=1e-12)
    assoc = (t.multiply(t.multiply(x, y), z) - t.multiply(x, t.multiply(y, z))).abs().max()
    assert assoc > 1e-2
    # the multiplication table reproduces the product by bilinearity
    table = t.multiplication_table()
    assert torch.allclose(torch.einsum("ni,nj,ijk->nk", x, y, table), t.multiply(x, y), atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(SEEDS)
def test_partners_satisfy_local_triality(seed):
    a = t.random_generator(seed)
    b, c = t.triality_partners(a)
    assert torch.allclose(b, -b.T, atol=1e-12) and torch.allclose(c, -c.T, atol=1e-12)
    x, y = random_octonions(64, seed + 1), random_octonions(64, seed + 2)
    lhs = t.multiply(x, y) @ a.T
    rhs = t.multiply(x @ b.T, y) + t.multiply(x, y @ c.T)
    assert (lhs - rhs).abs().max() < 1e-10
    # the Killing form is preserved: tr(A^2) = tr(B^2) = tr(C^2)
    assert torch.allclose(torch.trace(a @ a), torch.trace(b @ b)) and torch.allclose(torch.trace(a @ a), torch.trace(c @ c))


@settings(max_examples=6, deadline=None)
@given(SEEDS)
def test_rotations_are_a_triality_triple(seed):
    r = t.triality_rotations(seed)
    errors = t.validate_rotations(r)
    assert errors["triality_identity"] <= 1e-10
    assert max(v for k, v in errors.items() if k.endswith("orthogonality")) <= 1e-12
    assert torch.allclose(torch.linalg.det(r), torch.ones(3, dtype=torch.float64), atol=1e-12)
    x, y = random_octonions(100, seed + 3), random_octonions(100, seed + 4)
    r_v, r_plus, r_minus = r
    assert (t.multiply(x, y) @ r_v.T - t.multiply(x @ r_plus.T, y @ r_minus.T)).abs().max() <= 1e-10
    # the three types are genuinely different rotations
    for i, j in ((0, 1), (1, 2), (0, 2)):
        assert (r[i] - r[j]).abs().max() > 0.1
    assert (r[0] - torch.eye(8, dtype=torch.float64)).abs().max() > 0.1


def test_rotations_are_deterministic_from_the_seed():
    assert torch.equal(t.triality_rotations(5), t.triality_rotations(5))
    assert not torch.equal(t.triality_rotations(5), t.triality_rotations(6))
    assert not torch.allclose(t.cross_head_rotation(5), t.triality_rotations(5)[0])


def test_validator_rejects_reflections_non_orthogonal_and_non_triality():
    r = t.triality_rotations(0)
    flipped = r.clone()
    flipped[1, :, 0] *= -1  # det -1, still orthogonal
    with pytest.raises(t.RotationError, match=r"spinor_plus rotation has det -1"):
        t.validate_rotations(flipped)
    scaled = r.clone()
    scaled[2] *= 1.01
    with pytest.raises(t.RotationError, match=r"spinor_minus rotation is not orthogonal"):
        t.validate_rotations(scaled)
    swapped = torch.stack([r[0], r[2], r[1]])  # proper rotations, wrong roles
    with pytest.raises(t.RotationError, match=r"not a triality triple"):
        t.validate_rotations(swapped)
    with pytest.raises(t.RotationError, match=r"expected \(3, 8, 8\)"):
        t.validate_rotations(r[:2])
    bad_cross = t.cross_head_rotation(0).clone()
    bad_cross[:, 0] *= -1
    with pytest.raises(t.RotationError, match=r"cross_head rotation has det -1"):
        t.validate_rotations(r, bad_cross)
