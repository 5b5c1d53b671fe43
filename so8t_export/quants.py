"""GGUF output-type encoders (F32, F16, BF16, Q8_0) on torch, bit-identical to gguf-py.

Identity preserved: for every float32 tensor ``x`` whose last dimension is the row,
``quantize(x, t)`` returns an array with the same dtype, shape and bytes as
``gguf.quants.quantize(x.numpy(), t)`` (gguf-py 0.19.0), which in turn is bit-exact with
ggml's reference C (``quantize_row_q8_0_ref``, ``ggml_compute_fp32_to_bf16``; F16 is numpy's
``astype(np.float16)``). The result can be handed to ``GGUFWriter.add_tensor(name, arr,
raw_dtype=t)`` or ``GGUFWriter.write_tensor_data(arr)`` unchanged.

Why not simply call gguf-py: it is single-threaded numpy (~100 M elements/s here); the bulk
work below is done by multi-threaded torch kernels over cache-sized chunks, and only tiny
per-block arrays or rare special values go through numpy, using gguf-py's own expressions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import gguf
import numpy as np
import torch
from gguf.quants import QuantError as _GgufQuantError

__all__ = ["OUTPUT_TYPES", "FILE_TYPES", "QuantError", "quantize", "quantized_nbytes", "resolve_qtype"]

_T = gguf.GGMLQuantizationType

OUTPUT_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": _T.F32,
    "f16": _T.F16,
    "bf16": _T.BF16,
    "q8_0": _T.Q8_0,
}

# general.file_type written next to tensors of that output type (convert_hf_to_gguf's --outtype map).
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

# Elements per chunk: small enough that the few temporaries of one chunk stay in L2 (the
# elementwise passes are memory bound otherwise), large enough that torch splits every op over
# all threads (its grain size is 32768) and per-op dispatch overhead stays negligible.
_CHUNK_ELEMS = 1 << 16

# Largest float32 below 0.5. trunc(v + copysign(_HALF_DOWN, v)) == roundf(v) (round half away
# from zero) for every float32 |v| < 2**22; plain 0.5 fails for v = 0.49999997, whose sum with 0.5
# rounds up to 1.0. Checked exhaustively over all float32 in [-128, 128] (tests sample it).
_HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0.0)))

# Smallest normal float32. A Q8_0 scale d below it (but non-zero) makes 1/d inexact or infinite, so
# x*id can leave [-127.5, 127.5] and the int8 cast is undefined behaviour in C; such blocks (and
# NaN/Inf blocks) are delegated to gguf-py so the bytes still match it exactly.
_FLT_MIN = float(np.finfo(np.float32).tiny)


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

    Equals ``quantize(x, qtype).nbytes`` and ggml's ``ggml_nbytes`` for the GGUF tensor.
    """
    qtype = resolve_qtype(qtype)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise QuantError(f"cannot encode a 0-d tensor as {qtype.name}; expected at least one dimension")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size != 0:
        raise QuantError(
            f"cannot encode tensor of shape {shape} as {qtype.name}: row length {shape[-1]} "
            f"is not a multiple of the block size {block_size}"
        )
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    return n_rows * (shape[-1] // block_size) * type_size


def quantize(x: torch.Tensor, qtype: gguf.GGMLQuantizationType | str) -> np.ndarray:
    """Encode ``x`` (row = last dim) as ``qtype``, bit-identical to ``gguf.quants.quantize``.

    Returns what gguf-py returns: float32 / float16 arrays of ``x``'s shape for F32 / F16, and
    uint8 byte rows of shape ``(*x.shape[:-1], row_bytes)`` for BF16 and Q8_0.
    ``x`` must be float32 (bfloat16 / float16 are accepted and widened first, which is exact,
    as convert_hf_to_gguf does before quantising).
    """
    qtype = resolve_qtype(qtype)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    if x.dtype != torch.float32:
        raise TypeError(f"quantize expects a float32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    nbytes = quantized_nbytes(x.shape, qtype)  # validates ndim and the block multiple
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    shape = tuple(x.shape)

    if qtype == _T.F32:
        # gguf-py: data.astype(np.float32, copy=False), i.e. the same values.
        return x.numpy()
    if x.numel() == 0:
        dtype = np.float16 if qtype == _T.F16 else np.uint8
        return np.empty(shape if qtype == _T.F16 else gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype)
    # Outputs are allocated by numpy: large numpy arrays get transparent huge pages (fewer page faults).
    if qtype == _T.F16:
        bits = np.empty(x.numel(), dtype=np.uint16)
        _to_f16(x.reshape(-1), bits)
        return bits.view(np.float16).reshape(shape)
    if qtype == _T.BF16:
        bits = np.empty(x.numel(), dtype=np.uint16)
        _to_bf16(x.reshape(-1), bits)
        return bits.view(np.uint8).reshape(*shape[:-1], shape[-1] * 2)
    out = np.empty(nbytes, dtype=np.uint8)
    _to_q8_0(x.reshape(-1, 32), torch.from_numpy(out).view(-1, 34))
    return out.reshape(*shape[:-1], shape[-1] // 32 * 34)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


# --------------------------------------------------------------------------------------------- F16

def _to_f16(x: torch.Tensor, out: np.ndarray) -> None:
    """numpy ``x.astype(np.float16)`` of 1-D float32 ``x``, as bits into uint16 ``out``.

    Finite values and infinities: torch's fp32->fp16 conversion is IEEE round-to-nearest-even, as is
    numpy's. NaN: numpy truncates the payload (keeping it a NaN), torch/F16C set the quiet bit instead, so
    NaN elements are redone by numpy itself.
    """
    x_np = x.numpy()
    if not _torch_f16_matches_numpy():
        out[:] = x_np.astype(np.float16).view(np.uint16)
        return
    _convert_chunks(x, torch.from_numpy(out).view(torch.float16), out, x_np,
                    lambda src: src.astype(np.float16).view(np.uint16))


def _convert_chunks(x: torch.Tensor, out_t: torch.Tensor, out: np.ndarray, x_np: np.ndarray, fix_nan) -> None:
    """out_t[:] = x (torch dtype conversion) chunk by chunk; then out[i] = fix_nan(x[i]) where x[i] is NaN.

    ``out_t`` and the uint16 array ``out`` share memory. Only a chunk whose sum is not finite can hold a
    NaN; just those chunks are scanned element-wise, while still in cache.
    """
    for a, b in _chunks(x.numel(), _CHUNK_ELEMS * 4):
        xc = x[a:b]
        out_t[a:b] = xc
        if not bool(torch.isfinite(xc.sum())):
            xs = x_np[a:b]
            nan = np.isnan(xs)
            if nan.any():
                out[a:b][nan] = fix_nan(xs[nan])


@functools.cache
def _torch_f16_matches_numpy() -> bool:
    """Probe torch's fp32->fp16 cast against numpy on every sign/exponent/high-mantissa pattern
    with the rounding-relevant low bits (ties, just above/below); guards against a platform
    whose vector path flushes subnormals or rounds differently. NaNs are excluded (handled apart)."""
    probe = _probe_bits()
    f = probe.view(np.float32)
    f = f[~np.isnan(f)]
    got = torch.from_numpy(f).to(torch.float16).view(torch.int16).numpy()
    with np.errstate(over="ignore"):  # overflow to inf is part of what is probed
        want = f.astype(np.float16)
    return bool(np.array_equal(got, want.view(np.int16)))


@functools.cache
def _probe_bits() -> np.ndarray:
    hi = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    # low 16 bits chosen to hit fp16 (13 dropped bits) and bf16 (16 dropped bits) rounding cases.
    lo = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF],
                  dtype=np.uint32)
    return (hi[:, None] | lo[None, :]).ravel()


# -------------------------------------------------------------------------------------------- BF16

def _to_bf16(x: torch.Tensor, out: np.ndarray) -> None:
    """ggml_compute_fp32_to_bf16 of 1-D float32 ``x``, as bits into uint16 ``out`` (gguf-py's BF16 bytes).

    Non-NaN: bits = (u + 0x7fff + ((u >> 16) & 1)) >> 16, which is exactly torch's round-to-nearest-even
    fp32->bf16 cast. NaN: ggml keeps sign and high payload and sets the quiet bit ((u >> 16) | 0x40); torch
    returns a canonical NaN instead, so NaN elements are rewritten with that formula.
    """
    out_t = torch.from_numpy(out)
    if not _torch_bf16_matches_ggml():
        out_i16 = out_t.view(torch.int16)
        for a, b in _chunks(x.numel(), _CHUNK_ELEMS):
            out_i16[a:b] = _bf16_bits_int(x[a:b])
        return

    def fix_nan(src: np.ndarray) -> np.ndarray:
        # For a NaN the rounding term cannot carry into the high half, so the ggml result is (u >> 16) | 0x40.
        return ((src.view(np.uint32) >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)

    _convert_chunks(x, out_t.view(torch.bfloat16), out, x.numpy(), fix_nan)


def _bf16_bits_int(x: torch.Tensor) -> torch.Tensor:
    """The ggml/gguf-py BF16 formula in int32 arithmetic (no overflow: NaNs are quieted first and
    the largest non-NaN sum is 0x7f807fff); the int16 cast keeps the low 16 bits like uint16."""
    n = x.view(torch.int32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & -65536) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.to(torch.int16)


@functools.cache
def _torch_bf16_matches_ggml() -> bool:
    """Probe torch's fp32->bf16 cast against the integer formula (see ``_torch_f16_matches_numpy``;
    e.g. AVX512-BF16's vcvtneps2bf16 treats subnormal inputs as zero, which this would catch)."""
    f = torch.from_numpy(_probe_bits().view(np.float32))
    f = f[~torch.isnan(f)]
    return bool(torch.equal(f.to(torch.bfloat16).view(torch.int16), _bf16_bits_int(f)))


# -------------------------------------------------------------------------------------------- Q8_0

def _to_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    """quantize_row_q8_0_ref over (n_blocks, 32) float32 ``blocks`` into (n_blocks, 34) uint8 ``out``.

    Per block, exactly as gguf-py (numpy float32): d = amax/127; id = 0 if d == 0 else 1/d;
    qs = roundf(x*id) as int8; stored as [fp16(d) little-endian, qs[32]].
    Pass 1 (torch): amax per block, which is exact in any order. Then numpy computes d, id and fp16(d) for
    all blocks with gguf-py's own expressions (1/32 of the data). Pass 2 (torch): |x|*id is the same IEEE
    float32 product as x*id up to sign (id >= 0), roundf is trunc(|v| + 0.49999997) with the sign copied
    back from x, and the trunc is done by the float->int8 conversion.
    """
    nb = blocks.shape[0]
    step = max(1, _CHUNK_ELEMS // 32)
    buf = torch.empty((min(step, nb), 32), dtype=torch.float32)
    amax = torch.empty(nb, dtype=torch.float32)
    for a, b in _chunks(nb, step):
        tmp = buf[: b - a]
        torch.abs(blocks[a:b], out=tmp)
        torch.amax(tmp, dim=1, out=amax[a:b])  # NaN propagates, so NaN blocks are seen below

    amax_np = amax.numpy()
    d = amax_np / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32, copy=False)
        d16 = d.astype(np.float16)  # > 65504 -> inf, as in gguf-py
    out[:, :2] = torch.from_numpy(d16.view(np.uint8).reshape(nb, 2))
    inv_t = torch.from_numpy(inv)

    out_q = out[:, 2:].view(torch.int8)
    for a, b in _chunks(nb, step):
        xb = blocks[a:b]
        v = buf[: b - a]
        torch.abs(xb, out=v)
        v.mul_(inv_t[a:b, None]).add_(_HALF_DOWN).copysign_(xb)
        out_q[a:b] = v  # float -> int8 conversion truncates toward zero; |v| < 128 for well-defined blocks

    # NaN/Inf blocks and blocks with a subnormal non-zero scale: undefined float->int8 casts in C and numpy
    # (|x*id| can be NaN, Inf or > 127.5). Reproduce gguf-py's bytes by letting gguf-py encode those blocks.
    odd = ~((d == 0) | ((d >= _FLT_MIN) & np.isfinite(d)))
    if odd.any():
        rows = np.flatnonzero(odd)
        with np.errstate(all="ignore"):
            enc = gguf.quants.quantize(blocks.numpy()[rows], _T.Q8_0)
        out.numpy()[rows] = enc
