"""SO(8) triality, computably: octonions, the infinitesimal triality solve, and the three rotations.

For every A in so(8) there are unique B, C in so(8) with A(xy) = (Bx)y + x(Cy) for all octonions x, y
(local triality; Schafer, Thm 3.31). Exponentiating gives Cartan's form R_v(xy) = (R_+ x)(R_- y) with
R_v, R_+, R_- = exp(A), exp(B), exp(C): the vector and the two spinor images of one Spin(8) element.
Everything here is a pure function on float64 tensors; the model stores the results as fixed buffers.
"""

from __future__ import annotations

import torch

DIM = 8
TYPE_NAMES = ("vector", "spinor_plus", "spinor_minus")
# Scale of the random so(8) generator. Large enough that the three rotations are far from the identity and
# from each other, small enough that exp stays away from the Spin(8) double-cover ambiguity (angles < pi).
GENERATOR_SCALE = 0.6


class RotationError(ValueError):
    """A rotation buffer that is not a proper rotation, or not a triality triple."""


def conjugate(x: torch.Tensor) -> torch.Tensor:
    """Cayley-Dickson conjugate over the last axis: real part kept, imaginary parts negated."""
    return torch.cat([x[..., :1], -x[..., 1:]], dim=-1)


def multiply(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cayley-Dickson product over the last axis (length 1, 2, 4 or 8: reals, complex, quaternions, octonions).

    (a, b)(c, d) = (ac - conj(d) b, d a + b conj(c)), recursing on halves; broadcasts over leading axes.
    """
    n = x.shape[-1]
    if n == 1:
        return x * y
    h = n // 2
    a, b, c, d = x[..., :h], x[..., h:], y[..., :h], y[..., h:]
    return torch.cat([multiply(a, c) - multiply(conjugate(d), b),
                      multiply(d, a) + multiply(b, conjugate(c))], dim=-1)


def multiplication_table(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """T[i, j] = e_i e_j, so that xy = einsum('i,j,ijk->k', x, y, T) (the product is bilinear)."""
    basis = torch.eye(DIM, dtype=dtype)
    return multiply(basis[:, None, :], basis[None, :, :])


def so8_basis(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 28 matrices E_ab = e_a e_b^T - e_b e_a^T (a < b), a basis of so(8): shape [28, 8, 8]."""
    a, b = torch.triu_indices(DIM, DIM, offset=1)
    basis = torch.zeros(len(a), DIM, DIM, dtype=dtype)
    index = torch.arange(len(a))
    basis[index, a, b] = 1.0
    basis[index, b, a] = -1.0
    return basis


def triality_partners(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unique B, C in so(8) with A(xy) = (Bx)y + x(Cy) for all octonions x, y.

    The identity is linear in (B, C); restricted to so(8) it is a 512 x 56 system of rank 56, so the
    least-squares solution is exact (residual ~1e-14). Over gl(8) it would have the kernel (-rI, rI).
    """
    a = _check_square(a.to(torch.float64), "A")
    if (a + a.T).abs().max() > 1e-12:
        raise RotationError("triality_partners: A must be antisymmetric (an element of so(8))")
    table, basis = multiplication_table(), so8_basis()
    # Column k of the B block is vec((E_k e_i) e_j); of the C block, vec(e_i (E_k e_j)).
    b_columns = torch.einsum("kmi,mjn->ijnk", basis, table)
    c_columns = torch.einsum("kmj,imn->ijnk", basis, table)
    system = torch.cat([b_columns, c_columns], dim=-1).reshape(DIM**3, 2 * len(basis))
    target = torch.einsum("nm,ijm->ijn", a, table).reshape(DIM**3, 1)
    coefficients = torch.linalg.lstsq(system, target, driver="gelsd").solution[:, 0]
    residual = (system @ coefficients - target[:, 0]).abs().max().item()
    if residual > 1e-9:
        raise RotationError(f"triality_partners: no exact solution (residual {residual:.2e})")
    b = torch.einsum("k,kij->ij", coefficients[: len(basis)], basis)
    c = torch.einsum("k,kij->ij", coefficients[len(basis):], basis)
    return b, c


def random_generator(seed: int, stream: int = 0) -> torch.Tensor:
    """A deterministic element of so(8), from a seeded generator private to this call."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + stream)
    x = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64)
    return GENERATOR_SCALE * (x - x.T) / 2


def triality_rotations(seed: int) -> torch.Tensor:
    """[3, 8, 8] float64: R_v, R_+, R_- of one Spin(8) element, fixed by the seed.

    Generated from the Lie algebra element (not from R_v alone) because R_v fixes (R_+, R_-) only up to a
    common sign: the double cover Spin(8) -> SO(8).
    """
    a = random_generator(seed, stream=0)
    b, c = triality_partners(a)
    return torch.linalg.matrix_exp(torch.stack([a, b, c]))


def cross_head_rotation(seed: int) -> torch.Tensor:
    """[8, 8] float64: the second fixed SO(8) rotation that mixes heads in groups of 8."""
    return torch.linalg.matrix_exp(random_generator(seed, stream=1))


def triality_error(rotations: torch.Tensor) -> float:
    """max |R_v(e_i e_j) - (R_+ e_i)(R_- e_j)| over all basis pairs; by bilinearity this bounds all x, y."""
    r_v, r_plus, r_minus = rotations.to(torch.float64)
    table = multiplication_table()
    lhs = torch.einsum("nm,ijm->ijn", r_v, table)
    # (R_+ e_i)(R_- e_j) = sum_{a,b} R_+[a,i] R_-[b,j] e_a e_b
    rhs = torch.einsum("ai,bj,abn->ijn", r_plus, r_minus, table)
    return (lhs - rhs).abs().max().item()


def orthogonality_error(rotations: torch.Tensor) -> float:
    """max |R^T R - I| over a stack of matrices."""
    r = rotations.to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    return (r.transpose(-1, -2) @ r - eye).abs().max().item()


def validate_rotations(rotations: torch.Tensor, cross_head: torch.Tensor | None = None, *,
                       source: str = "rotations", tol: float | None = None) -> dict[str, float]:
    """Check that rotations is a triality triple of proper rotations (and cross_head a proper rotation).

    Raises RotationError naming the buffer and the failed property; returns the measured errors.
    The default tolerance follows the stored precision: float32 buffers carry ~1e-7 rounding.
    """
    if tol is None:
        tol = 1e-10 if rotations.dtype == torch.float64 else 1e-5
    if tuple(rotations.shape) != (3, DIM, DIM):
        raise RotationError(f"{source}: shape {tuple(rotations.shape)}; expected (3, 8, 8) = R_v, R_+, R_-")
    named = dict(zip(TYPE_NAMES, rotations))
    if cross_head is not None:
        if tuple(cross_head.shape) != (DIM, DIM):
            raise RotationError(f"{source}: cross_head shape {tuple(cross_head.shape)}; expected (8, 8)")
        named["cross_head"] = cross_head
    errors: dict[str, float] = {}
    for name, matrix in named.items():
        if not torch.isfinite(matrix).all():
            raise RotationError(f"{source}: {name} rotation has NaN or Inf entries")
        orth = orthogonality_error(matrix)
        if orth > tol:
            raise RotationError(f"{source}: {name} rotation is not orthogonal: max|R^T R - I| = {orth:.2e} "
                                f"(tolerance {tol:.0e})")
        det = torch.linalg.det(matrix.to(torch.float64)).item()
        if abs(det - 1.0) > 1e3 * tol:
            raise RotationError(f"{source}: {name} rotation has det {det:+.6f}; expected +1 (a proper rotation)")
        errors[f"{name}.orthogonality"] = orth
    identity = triality_error(rotations)
    if identity > 10 * tol:
        raise RotationError(f"{source}: not a triality triple: max|R_v(xy) - (R_+x)(R_-y)| = {identity:.2e} "
                            f"(tolerance {10 * tol:.0e})")
    errors["triality_identity"] = identity
    return errors


def _check_square(m: torch.Tensor, name: str) -> torch.Tensor:
    if tuple(m.shape) != (DIM, DIM):
        raise RotationError(f"{name}: shape {tuple(m.shape)}; expected (8, 8)")
    return m
