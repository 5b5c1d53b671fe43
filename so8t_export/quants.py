"""Number formats as pure functions: the block-FP8 format checkpoints ship in, and the GGUF output types.

Identities preserved (tests/test_quants.py checks each bit for bit):
- ``quantize(x, t)`` has the dtype, shape and bytes of ``gguf.quants.quantize(x.numpy(), t)`` (gguf-py 0.19.0),
  which is bit-exact with ggml's C (``quantize_row_q8_0_ref``, ``ggml_compute_fp32_to_bf16``; F16 is numpy's
  ``astype(np.float16)``). The result goes to ``GGUFWriter.add_tensor(..., raw_dtype=t)`` unchanged.
- ``BlockFP8.dequantize()`` is float32(e4m3) * float32(scale_inv) per block, as llama.cpp's converter computes it.
- ``BlockFP8.encode(t) == quantize(BlockFP8.dequantize(), t)``, without the float32 copy in between.

Why compiled loops (numba): gguf-py's numpy quantiser makes a dozen passes over float32 temporaries (~100 M
elements/s on 2 cores). The kernels here handle one row at a time, so it stays in cache from FP8 bytes to
GGUF bytes (measured ~2 G elements/s per core for FP8 -> Q8_0). They release the GIL, so the exporter's
threads run them side by side, and they use IEEE float32 arithmetic only (no fastmath), which is what makes
the bytes identical to numpy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import numba
import numpy as np
import torch
from gguf.quants import QuantError as _GgufQuantError

from .config import OUTPUT_TYPE_NAMES

__all__ = ["FILE_TYPES", "OUTPUT_TYPES", "BlockFP8", "QuantError", "nonfinite_encoded", "quantize", "quantize_fp8",
           "quantized_nbytes", "resolve_qtype"]

_T = gguf.GGMLQuantizationType

OUTPUT_TYPES: dict[str, gguf.GGMLQuantizationType] = dict(zip(OUTPUT_TYPE_NAMES, (_T.F32, _T.F16, _T.BF16,
                                                                                   _T.Q8_0), strict=True))

# general.file_type that goes with each output type (convert_hf_to_gguf's --outtype map).
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

_Q8_0_BLOCK, _Q8_0_BYTES = gguf.GGML_QUANT_SIZES[_T.Q8_0]  # 32 values -> fp16 scale + 32 int8
_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
_F32_MAX = float(np.finfo(np.float32).max)


class QuantError(_GgufQuantError, ValueError):
    """A tensor that cannot be encoded in the requested type (e.g. row not a multiple of the block).

    Subclasses gguf-py's ``QuantError`` so code written for ``convert_hf_to_gguf``'s fallback
    (catch QuantError, write F16 instead) works unchanged.
    """


def resolve_qtype(qtype: gguf.GGMLQuantizationType | str) -> gguf.GGMLQuantizationType:
    """Map an output-type name ("q8_0") or a GGMLQuantizationType to a supported GGMLQuantizationType."""
    if isinstance(qtype, str):
        try:
            return OUTPUT_TYPES[qtype.lower()]
        except KeyError:
            raise QuantError(f"unknown output type {qtype!r}; expected one of {sorted(OUTPUT_TYPES)}") from None
    qtype = _T(qtype)
    if qtype not in OUTPUT_TYPES.values():
        raise QuantError(f"output type {qtype.name} is not supported; expected one of {sorted(OUTPUT_TYPES)}")
    return qtype


def quantized_nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType | str) -> int:
    """Bytes that ``quantize`` returns for a tensor of ``shape`` (row = last dim) in ``qtype``.

    Equals ``quantize(x, qtype).nbytes`` and ggml's ``ggml_nbytes`` of the GGUF tensor.
    """
    qtype = resolve_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise QuantError(f"cannot encode a 0-d tensor as {qtype.name}; expected at least one dimension")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size != 0:
        raise QuantError(f"cannot encode tensor of shape {shape} as {qtype.name}: row length {shape[-1]} "
                         f"is not a multiple of the block size {block_size}")
    return math.prod(shape[:-1]) * (shape[-1] // block_size) * type_size


# ------------------------------------------------------------------------------------------------- kernels
# Conventions, each measured on a 9728x2560 tensor: kernels take 2-D C-contiguous arrays and work one row at a
# time, so a row stays in cache through all its passes (3x faster than whole-tensor passes). Block lengths are
# runtime arguments: with a literal 32, LLVM fully unrolls the per-block loops into scalar code instead of
# vectorising them (10x slower). Kernels return early on a block length <= 0: numba wraps negative indices,
# and only once LLVM can prove `k * block + i >= 0` does that check vanish and the loop vectorise (7x).

_HALF_DOWN = np.nextafter(np.float32(0.5), np.float32(0))  # see _q8_0_row
_F32_TINY = np.finfo(np.float32).tiny
_F32_INF = np.float32(np.inf)
_F32_0, _F32_1, _F32_127 = np.float32(0), np.float32(1), np.float32(127)
_F32_2_POW_24 = np.float32(2.0**24)
_ABS_BITS = np.uint32(0x7FFFFFFF)
# e4m3fn: magnitude byte m = eeee_mmm. Normal (e > 0): f32 bits (m << 20) + (120 << 23) rebias the exponent from 7
# to 127. Subnormal (e = 0): m * 2**-9. m = 0x7f is NaN (there is no Inf); bytes order by magnitude, sign apart.
_E4M3_REBIAS = np.uint32(120 << 23)
_E4M3_SUBNORMAL_STEP = np.float32(2.0**-9)
_E4M3_NAN_BYTE = np.uint8(0x7F)
_E4M3_NAN = torch.tensor([0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()[0]


@numba.njit(nogil=True, cache=True)
def _decode_e4m3_row(raw, scale, tile, bits, out):
    """out[c] = float32(e4m3 raw[c]) * scale[c // tile], rounded once, in float32 (the converter's).
    bits: uint32 scratch of at least `tile` elements."""
    if tile <= 0:
        return
    normal = bits.view(np.float32)
    n = raw.size
    for t in range((n + tile - 1) // tile):
        s = scale[t]
        count = min(tile, n - t * tile)
        for i in range(count):
            bits[i] = (np.uint32(raw[t * tile + i] & _E4M3_NAN_BYTE) << np.uint32(20)) + _E4M3_REBIAS
        for i in range(count):
            b = raw[t * tile + i]
            m = b & _E4M3_NAN_BYTE
            v = normal[i] if m >= 8 else np.float32(m) * _E4M3_SUBNORMAL_STEP
            v = _E4M3_NAN if m == _E4M3_NAN_BYTE else v
            out[t * tile + i] = (-v if b >= 128 else v) * s


@numba.njit(nogil=True, cache=True)
def _dequantize_e4m3(raw, scale, block_rows, block_cols, first_row, out):
    bits = np.empty(block_cols, np.uint32)
    for r in range(raw.shape[0]):
        _decode_e4m3_row(raw[r], scale[(first_row + r) // block_rows], block_cols, bits, out[r])


@numba.njit(nogil=True, cache=True)
def _count_e4m3_nan(raw):
    count = 0
    for r in range(raw.shape[0]):
        row = raw[r]
        for c in range(row.size):
            count += (row[c] & _E4M3_NAN_BYTE) == _E4M3_NAN_BYTE
    return count


@numba.njit(nogil=True, cache=True)
def _block_amax(x, block, amax):
    """amax[k] = max |x| over block k: a max over the float bits without the sign (ordered as the values for
    every non-NaN float32; a NaN gives a NaN maximum, as numpy's)."""
    if block <= 0:
        return
    xb = x.view(np.uint32)
    ab = amax.view(np.uint32)
    for k in range(x.size // block):
        m = np.uint32(0)
        for i in range(block):
            m = max(m, xb[k * block + i] & _ABS_BITS)
        ab[k] = m


@numba.njit(nogil=True, cache=True)
def _f16_bits(u, x):
    """numpy's float32 -> float16 (IEEE round to nearest even) of x, whose bits are u. A NaN keeps its sign
    and high payload, forced non-zero (numpy's npy_floatbits_to_halfbits)."""
    sign = np.uint16((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & _ABS_BITS
    if a > np.uint32(0x7F800000):
        payload = np.uint16((a & np.uint32(0x7FFFFF)) >> np.uint32(13))
        return sign | np.uint16(0x7C00) | (payload if payload else np.uint16(1))
    if a >= np.uint32(0x477FF000):  # at or past the midpoint between 65504 and 65536: Inf (ties go to even 65536)
        return sign | np.uint16(0x7C00)
    if a >= np.uint32(0x38800000):  # normal: rebias the exponent (127 -> 15), round away the low 13 bits
        return sign | np.uint16((a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))
                                 - np.uint32(0x38000000)) >> np.uint32(13))
    # subnormal (or zero): the bits are |x| / 2**-24 rounded to an integer, and that product is exact
    return sign | np.uint16(np.rint(abs(x) * _F32_2_POW_24))


@numba.njit(nogil=True, cache=True)
def _q8_0_row(x, amax, block, d, inv, out):
    """quantize_row_q8_0_ref of one row given its block maxima, as gguf-py computes it in float32:
    d = amax/127, id = 0 if d == 0 else 1/d, q = roundf(x*id), stored as [fp16(d), q as int8 x block].

    roundf (half away from zero) is copysign(trunc(|x*id| + 0.49999997), x): with plain 0.5 the sum for
    0.49999997 rounds (to even) up to 1.0. |x|*id is the same IEEE product as x*id up to sign (id >= 0).
    Returns the number of blocks with a NaN/Inf or a float32-subnormal d: their float->int8 casts are
    undefined in C and numpy alike, so they are left for gguf-py to encode.
    """
    if block <= 0:
        return 0
    blocks = x.size // block
    odd = 0
    for k in range(blocks):
        d[k] = amax[k] / _F32_127
    for k in range(blocks):
        inv[k] = _F32_1 / d[k] if d[k] != _F32_0 else _F32_0
    d_bits = d.view(np.uint32)
    for k in range(blocks):
        if not (d[k] == _F32_0 or (d[k] >= _F32_TINY and d[k] < _F32_INF)):
            odd += 1
            continue
        base = k * (block + 2)
        half = _f16_bits(d_bits[k], d[k])
        out[base], out[base + 1] = np.uint8(half & np.uint16(0xFF)), np.uint8(half >> np.uint16(8))
        scale = inv[k]
        for i in range(block):
            v = x[k * block + i]
            out[base + 2 + i] = np.uint8(np.int8(np.copysign(np.trunc(abs(v) * scale + _HALF_DOWN), v)))
    return odd


@numba.njit(nogil=True, cache=True)
def _f16_rows(x, out):
    for r in range(x.shape[0]):
        row, bits = x[r], x[r].view(np.uint32)
        for c in range(row.size):
            out[r, c] = _f16_bits(bits[c], row[c])


@numba.njit(nogil=True, cache=True)
def _bf16_row(x, out):
    """ggml_compute_fp32_to_bf16: round to nearest even on the bits; a NaN keeps its sign and high payload
    and gets the quiet bit ((u >> 16) | 0x40)."""
    xb = x.view(np.uint32)
    for c in range(x.size):
        u = xb[c]
        nan = (u & _ABS_BITS) > np.uint32(0x7F800000)
        rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        out[c] = np.uint16((u >> np.uint32(16)) | np.uint32(0x40)) if nan else np.uint16(rounded)


@numba.njit(nogil=True, cache=True)
def _q8_0_rows(x, block, out):
    blocks = x.shape[1] // max(1, block)
    amax, d, inv = np.empty(blocks, np.float32), np.empty(blocks, np.float32), np.empty(blocks, np.float32)
    odd = 0
    for r in range(x.shape[0]):
        _block_amax(x[r], block, amax)
        odd += _q8_0_row(x[r], amax, block, d, inv, out[r])
    return odd


@numba.njit(nogil=True, cache=True)
def _bf16_rows(x, out):
    for r in range(x.shape[0]):
        _bf16_row(x[r], out[r])


@numba.njit(nogil=True, cache=True)
def _e4m3_q8_0_rows(raw, scale, block_rows, block_cols, first_row, block, out):
    if block <= 0:
        return 0
    cols = raw.shape[1]
    blocks = cols // block
    x, bits = np.empty(cols, np.float32), np.empty(block_cols, np.uint32)
    amax, d, inv = np.empty(blocks, np.float32), np.empty(blocks, np.float32), np.empty(blocks, np.float32)
    top, top_bits = np.empty(blocks, np.uint8), np.empty(max(1, block_cols // block), np.uint32)
    top_scale = np.empty(scale.shape[1], np.float32)
    # When every Q8_0 block lies inside one FP8 tile (Qwen's 128-wide tiles), its largest |x| is the decoded
    # largest magnitude byte times |scale|, exactly (rounding is monotonic); a max over bytes is 4x less data.
    by_bytes = block_cols % block == 0
    odd = 0
    for r in range(raw.shape[0]):
        srow = scale[(first_row + r) // block_rows]
        _decode_e4m3_row(raw[r], srow, block_cols, bits, x)
        if by_bytes:
            row = raw[r]
            for k in range(blocks):
                m = np.uint8(0)
                for i in range(block):
                    m = max(m, row[k * block + i] & _E4M3_NAN_BYTE)
                top[k] = m
            for j in range(top_scale.size):
                top_scale[j] = abs(srow[j])
            _decode_e4m3_row(top, top_scale, block_cols // block, top_bits, amax)
        else:
            _block_amax(x, block, amax)
        odd += _q8_0_row(x, amax, block, d, inv, out[r])
    return odd


@numba.njit(nogil=True, cache=True)
def _e4m3_bf16_rows(raw, scale, block_rows, block_cols, first_row, out):
    cols = raw.shape[1]
    x, bits = np.empty(cols, np.float32), np.empty(block_cols, np.uint32)
    for r in range(raw.shape[0]):
        _decode_e4m3_row(raw[r], scale[(first_row + r) // block_rows], block_cols, bits, x)
        _bf16_row(x, out[r])


# ------------------------------------------------------------------------------------------------- encoders
def quantize(x: torch.Tensor, qtype: gguf.GGMLQuantizationType | str) -> np.ndarray:
    """Encode ``x`` (row = last dim) as ``qtype``, bit-identical to ``gguf.quants.quantize(x.numpy(), qtype)``.

    Returns what gguf-py returns: float32 / float16 arrays of ``x``'s shape for F32 / F16, and uint8 byte
    rows of shape ``(*x.shape[:-1], row_bytes)`` for BF16 and Q8_0. ``x`` must be float32; bfloat16 and
    float16 are accepted and widened first, which is exact (convert_hf_to_gguf widens them too).
    """
    qtype = resolve_qtype(qtype)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    if x.dtype != torch.float32:
        raise TypeError(f"quantize expects a float32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    nbytes = quantized_nbytes(x.shape, qtype)  # validates ndim and the block multiple
    values = x.detach().cpu().contiguous().numpy()
    shape = values.shape
    if qtype == _T.F32:
        return values  # gguf-py: data.astype(np.float32, copy=False)
    out = np.empty(nbytes, dtype=np.uint8)
    byte_shape = (*shape[:-1], quantized_nbytes(shape[-1:], qtype))  # gguf-py's: byte rows
    if values.size == 0:
        return out.view(np.float16).reshape(shape) if qtype == _T.F16 else out.reshape(byte_shape)
    rows = values.reshape(-1, shape[-1])
    if qtype == _T.F16:  # gguf-py: numpy's astype(np.float16)
        _f16_rows(rows, out.view(np.uint16).reshape(rows.shape))
        return out.view(np.float16).reshape(shape)
    if qtype == _T.BF16:
        _bf16_rows(rows, out.view(np.uint16).reshape(rows.shape))
        return out.reshape(byte_shape)
    out = out.reshape(rows.shape[0], -1)
    if _q8_0_rows(rows, _Q8_0_BLOCK, out):
        _encode_odd_q8_0_blocks(out, rows)
    return out.reshape(byte_shape)


def nonfinite_encoded(encoded: np.ndarray, qtype: gguf.GGMLQuantizationType | str) -> int:
    """How many NaN or Inf values (Q8_0: blocks with a NaN or Inf scale) an encoded tensor holds. For a finite
    input, any is an overflow of the output type."""
    qtype = resolve_qtype(qtype)
    raw = np.ascontiguousarray(encoded).reshape(-1).view(np.uint8)
    if qtype == _T.F32:
        return int(raw.size // 4 - np.isfinite(raw.view(np.float32)).sum())
    if qtype in (_T.F16, _T.BF16):
        exponent = 0x7C00 if qtype == _T.F16 else 0x7F80  # all exponent bits set: Inf or NaN
        return int(np.count_nonzero((raw.view(np.uint16) & exponent) == exponent))
    if qtype == _T.Q8_0:
        scales = raw.reshape(-1, _Q8_0_BYTES)[:, :2].copy().view(np.uint16)
        return int(np.count_nonzero((scales & 0x7C00) == 0x7C00))
    raise QuantError(f"nonfinite_encoded: no check for {qtype.name}")


def _encode_odd_q8_0_blocks(out: np.ndarray, values: np.ndarray) -> None:
    """gguf-py's bytes for the blocks the kernel leaves (NaN/Inf, or a float32-subnormal scale)."""
    flat = values.reshape(-1, _Q8_0_BLOCK)
    with np.errstate(all="ignore"):
        d = np.abs(flat).max(axis=1) / np.float32(127)
        left = np.flatnonzero(~((d == 0) | ((d >= _F32_TINY) & np.isfinite(d))))
        out.reshape(-1, _Q8_0_BYTES)[left] = gguf.quants.quantize(flat[left], _T.Q8_0)


# ------------------------------------------------------------------------------------------------- block FP8
@dataclass(frozen=True)
class BlockFP8:
    """Rows of a block-FP8 weight as Qwen3-FP8 and DeepSeek-V3 store it: e4m3 values, and one float32
    multiplier per ``block`` = (rows, cols) tile (``weight_scale_inv``: a multiplier despite its name).

    ``first_row`` is the offset of ``weight``'s first row inside the first tile row of ``scale_inv``, so a row
    range of a tensor is a BlockFP8 too. Edge tiles that don't divide the shape use their scale for the
    part they cover.
    """

    weight: np.ndarray  # uint8 bytes of float8_e4m3fn, [rows, cols]
    scale_inv: np.ndarray  # float32 [tile rows covered, ceil(cols / block cols)]
    block: tuple[int, int]
    first_row: int = 0  # < block rows

    def __post_init__(self):
        rows, cols = self.weight.shape
        br, bc = self.block
        if not 0 <= self.first_row < br:
            raise ValueError(f"first_row {self.first_row}; expected an offset in [0, {br})")
        expected = (math.ceil((self.first_row + rows) / br), math.ceil(cols / bc))
        if self.scale_inv.shape != expected:
            raise ValueError(f"scale_inv shape {self.scale_inv.shape}; expected {expected} for weight "
                             f"{(rows, cols)} in {br}x{bc} blocks")
        if self.weight.dtype != np.uint8 or self.scale_inv.dtype != np.float32:
            raise TypeError(f"BlockFP8 holds uint8 weight bytes and float32 scales, got {self.weight.dtype} "
                            f"and {self.scale_inv.dtype}")

    @classmethod
    def from_torch(cls, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   first_row: int = 0) -> BlockFP8:
        """From checkpoint tensors: float8_e4m3fn weight, scale_inv of any float dtype (bf16 in Qwen's)."""
        if weight.dtype != torch.float8_e4m3fn:
            raise TypeError(f"expected a float8_e4m3fn weight, got {weight.dtype}")
        return cls(weight.contiguous().view(torch.uint8).numpy(),
                   scale_inv.to(torch.float32).contiguous().numpy(), block, first_row)

    def corner(self, rows: int, cols: int) -> BlockFP8:
        """The top-left rows x cols of the tensor, with the scales of the tiles they touch."""
        br, bc = self.block
        scales = self.scale_inv[:math.ceil((self.first_row + rows) / br), :math.ceil(cols / bc)]
        return BlockFP8(np.ascontiguousarray(self.weight[:rows, :cols]), np.ascontiguousarray(scales), self.block,
                        self.first_row)

    def _tiles(self) -> tuple:
        return self.weight, self.scale_inv, self.block[0], self.block[1], self.first_row

    def dequantize(self) -> torch.Tensor:
        """float32 values: e4m3 * scale_inv, one float32 rounding (llama.cpp converter's dequant_simple)."""
        out = np.empty(self.weight.shape, np.float32)
        _dequantize_e4m3(*self._tiles(), out)
        return torch.from_numpy(out)

    def nonfinite(self) -> int:
        """How many values dequantise to NaN or Inf: NaN bytes, unless a scale could make more (cheap check)."""
        scales = self.scale_inv
        if np.isfinite(scales).all() and float(np.abs(scales).max(initial=0)) * _E4M3_MAX <= _F32_MAX:
            return int(_count_e4m3_nan(self.weight))
        return int((~torch.isfinite(self.dequantize())).sum())

    def encode(self, qtype: gguf.GGMLQuantizationType | str) -> np.ndarray:
        """``quantize(self.dequantize(), qtype)``, bit for bit, straight from the FP8 bytes for BF16 and Q8_0."""
        qtype = resolve_qtype(qtype)
        rows, cols = self.weight.shape
        if qtype in (_T.F32, _T.F16):
            return quantize(self.dequantize(), qtype)
        out = np.empty((rows, quantized_nbytes((cols,), qtype)), np.uint8)
        if qtype == _T.BF16:
            _e4m3_bf16_rows(*self._tiles(), out.view(np.uint16))
            return out
        if _e4m3_q8_0_rows(*self._tiles(), _Q8_0_BLOCK, out):
            _encode_odd_q8_0_blocks(out, self.dequantize().numpy())
        return out


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """The way Qwen ships FP8 (for test and benchmark checkpoints): per-block scale = amax / 448, weight / scale
    as e4m3. Returns (float8_e4m3fn weight, float32 scale_inv)."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(nr, br, nc, bc)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / _E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(nr * br, nc * bc)[:rows, :cols]
    return q.contiguous(), scale
