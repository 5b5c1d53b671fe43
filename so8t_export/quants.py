"""GGUF output-type encoders (F32, F16, BF16, Q8_0) on torch, bit-identical to gguf-py.

Identity preserved: for every float32 tensor ``x`` whose last dimension is the row,
``quantize(x, t)`` returns an array with the same dtype, shape and bytes as
``gguf.quants.quantize(x.numpy(), t)`` (gguf-py 0.19.0), which in turn is bit-exact with ggml's
reference C (``quantize_row_q8_0_ref``, ``ggml_compute_fp32_to_bf16``; F16 is numpy's
``astype(np.float16)``). The result can be handed to ``GGUFWriter.add_tensor(name, arr, raw_dtype=t)``
or ``GGUFWriter.write_tensor_data(arr)`` unchanged.

Why not simply call gguf-py: it is single-threaded numpy (~100 M elements/s for Q8_0 on 2 cores).
Here the bulk work is torch kernels on cache-sized pieces, and only per-block scales (1/32 of the data)
and rare special values go through numpy, with gguf-py's own expressions.

Threading: the pieces are spread over ``torch.get_num_threads()`` Python threads (torch releases the GIL
inside kernels). Each piece is smaller than torch's intra-op grain size, so every kernel runs
single-threaded and no OpenMP team is involved. Measured on 2 cores, this is a bit slower than letting
OpenMP split each op when the machine is idle, but 2-4x faster when other processes compete for the cores:
OpenMP's barrier after every op then waits for a descheduled worker, thousands of times per tensor.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import torch
from gguf.quants import QuantError as _GgufQuantError

__all__ = ["FILE_TYPES", "OUTPUT_TYPES", "QuantError", "quantize", "quantized_nbytes", "resolve_qtype"]

_T = gguf.GGMLQuantizationType

OUTPUT_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": _T.F32,
    "f16": _T.F16,
    "bf16": _T.BF16,
    "q8_0": _T.Q8_0,
}

# general.file_type that goes with each output type (convert_hf_to_gguf's --outtype map).
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

# Elements per piece: below ATen's GRAIN_SIZE (32768), so elementwise ops and reductions on one piece run
# inline on the calling thread (see module docstring), and a multiple of the Q8_0 block. 128 KiB of float32
# also keeps a piece and its scratch buffer in L2 between the passes over it.
_PIECE = 32768 - 32
_PIECES_PER_WORKER = 4  # more tasks than threads, so a descheduled thread does not hold up the others

# Largest float32 below 0.5. trunc(a + _HALF_DOWN) == roundf(a) (round half away from zero) for float32 a >= 0
# in Q8_0's range (|x*id| <= 127.00003 in every well-defined block); plain 0.5 fails for a = 0.49999997,
# whose sum with 0.5 rounds (to even) up to 1.0. Checked exhaustively for all float32 in [-128, 128] with the
# op sequence of pass 2 of _to_q8_0 (abs, + _HALF_DOWN, copysign, int8 cast) against gguf-py's np_roundf.
_HALF_DOWN = float(np.nextafter(np.float32(0.5), np.float32(0.0)))

# Smallest normal float32. A non-zero Q8_0 scale d below it makes 1/d inexact or infinite, so x*id can leave
# [-127.5, 127.5] and the float->int8 cast is undefined behaviour in C and numpy alike; such blocks (and
# NaN/Inf blocks) are handed to gguf-py itself so the bytes still equal what it writes.
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
            raise QuantError(
                f"unknown output type {qtype!r}; expected one of {sorted(OUTPUT_TYPES)}"
            ) from None
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
        raise QuantError(
            f"cannot encode tensor of shape {shape} as {qtype.name}: row length {shape[-1]} "
            f"is not a multiple of the block size {block_size}"
        )
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    return n_rows * (shape[-1] // block_size) * type_size


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
    x = x.detach().cpu().contiguous()
    shape = tuple(x.shape)

    if qtype == _T.F32:
        return x.numpy()  # gguf-py: data.astype(np.float32, copy=False)
    if qtype == _T.F16:
        bits = np.empty(x.numel(), dtype=np.uint16)
        _to_f16(x.reshape(-1), bits)
        return bits.view(np.float16).reshape(shape)
    # Outputs are numpy allocations: large ones get transparent huge pages (far fewer page faults than
    # a torch.empty of the same size).
    out = np.empty(nbytes, dtype=np.uint8)
    if qtype == _T.BF16:
        _to_bf16(x.reshape(-1), out.view(np.uint16))
        return out.reshape(*shape[:-1], shape[-1] * 2)
    _to_q8_0(x.reshape(-1, 32), out.reshape(-1, 34))
    return out.reshape(*shape[:-1], shape[-1] // 32 * 34)


def _run_pieces(n_pieces: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(lo, hi)`` on consecutive ranges covering pieces 0..n_pieces-1, on a small thread pool."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(torch.get_num_threads(), cores, n_pieces)
    if workers <= 1:
        work(0, n_pieces)
        return
    bounds = np.linspace(0, n_pieces, min(n_pieces, workers * _PIECES_PER_WORKER) + 1).astype(int).tolist()
    with ThreadPoolExecutor(workers, thread_name_prefix="so8t-quants") as pool:
        for f in [pool.submit(work, lo, hi) for lo, hi in itertools.pairwise(bounds)]:
            f.result()  # re-raises a worker's exception


# --------------------------------------------------------------------------------------- F16 / BF16


def _to_f16(x: torch.Tensor, out: np.ndarray) -> None:
    """numpy ``x.astype(np.float16)`` of 1-D float32 ``x``, as bits into uint16 ``out``.

    Finite values and infinities: torch's fp32->fp16 cast is IEEE round-to-nearest-even, as is numpy's.
    NaN: numpy truncates the payload (keeping it a NaN), torch/F16C set the quiet bit instead, so NaN
    elements are redone by numpy itself.
    """
    if not _torch_f16_matches_numpy():
        with np.errstate(over="ignore"):  # |x| > 65504 -> inf is the defined result
            out[:] = x.numpy().astype(np.float16).view(np.uint16)
        return
    _convert(
        x, torch.from_numpy(out).view(torch.float16), out, lambda src: src.astype(np.float16).view(np.uint16)
    )


def _to_bf16(x: torch.Tensor, out: np.ndarray) -> None:
    """ggml_compute_fp32_to_bf16 of 1-D float32 ``x``, as bits into uint16 ``out`` (gguf-py's BF16 bytes).

    Non-NaN: bits = (u + 0x7fff + ((u >> 16) & 1)) >> 16, which is exactly torch's round-to-nearest-even
    fp32->bf16 cast. NaN: ggml keeps sign and high payload and sets the quiet bit ((u >> 16) | 0x40); torch
    writes a canonical NaN instead, so NaN elements are rewritten with ggml's formula.
    """
    out_t = torch.from_numpy(out)
    if not _torch_bf16_matches_ggml():
        xs, os_ = x.split(_PIECE), out_t.view(torch.int16).split(_PIECE)

        def work_int(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                os_[i].copy_(_bf16_bits_int(xs[i]))

        _run_pieces(len(xs), work_int)
        return

    def fix_nan(src: np.ndarray) -> np.ndarray:
        # For a NaN the rounding term cannot carry into the high half, so ggml's result is (u >> 16) | 0x40.
        return ((src.view(np.uint32) >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)

    _convert(x, out_t.view(torch.bfloat16), out, fix_nan)


def _convert(
    x: torch.Tensor, out_t: torch.Tensor, out: np.ndarray, fix_nan: Callable[[np.ndarray], np.ndarray]
) -> None:
    """out_t[:] = x by torch's dtype cast, then out[i] = fix_nan(x[i]) wherever x[i] is NaN.

    ``out_t`` (float16/bfloat16) and the uint16 array ``out`` share memory. Only a piece whose sum is not
    finite can hold a NaN, so only those pieces are scanned element-wise afterwards.
    """
    xs, os_ = x.split(_PIECE), out_t.split(_PIECE)
    sums = torch.empty(len(xs), dtype=torch.float32)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            os_[i].copy_(xs[i])
            torch.sum(xs[i], dim=0, out=sums[i])

    _run_pieces(len(xs), work)
    x_np = x.numpy()
    for i in np.flatnonzero(~np.isfinite(sums.numpy())).tolist():
        a, b = i * _PIECE, min((i + 1) * _PIECE, x_np.size)
        nan = np.isnan(x_np[a:b])
        if nan.any():
            out[a:b][nan] = fix_nan(x_np[a:b][nan])


def _bf16_bits_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's BF16 formula in int32 arithmetic (no overflow: NaNs are quieted first and the largest non-NaN
    sum is 0x7f807fff); the int16 cast keeps the low 16 bits, as numpy's uint16 cast does."""
    n = x.view(torch.int32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & -65536) | (64 << 16), n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.to(torch.int16)


@functools.cache
def _probe_bits() -> np.ndarray:
    """Every sign/exponent/high-mantissa pattern with the low bits that decide fp16 (13 dropped bits) and
    bf16 (16 dropped bits) rounding: ties, one ulp either side, all-ones."""
    hi = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lo = np.array(
        [0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF],
        dtype=np.uint32,
    )
    return (hi[:, None] | lo[None, :]).ravel()


@functools.cache
def _torch_f16_matches_numpy() -> bool:
    """Probe torch's fp32->fp16 cast against numpy on ``_probe_bits`` (NaNs excluded: handled apart).
    Guards against a CPU/kernel path that flushes subnormals or rounds differently; then numpy is used."""
    f = _probe_bits().view(np.float32)
    f = f[~np.isnan(f)]
    got = torch.from_numpy(f).to(torch.float16).view(torch.int16).numpy()
    with np.errstate(over="ignore"):  # overflow to inf is part of what is probed
        want = f.astype(np.float16)
    return bool(np.array_equal(got, want.view(np.int16)))


@functools.cache
def _torch_bf16_matches_ggml() -> bool:
    """Probe torch's fp32->bf16 cast against ggml's integer formula on ``_probe_bits`` (e.g. AVX512-BF16's
    vcvtneps2bf16 treats subnormal inputs as zero, which would be caught here; then the formula is used)."""
    f = torch.from_numpy(_probe_bits().view(np.float32))
    f = f[~torch.isnan(f)]
    return bool(torch.equal(f.to(torch.bfloat16).view(torch.int16), _bf16_bits_int(f)))


# -------------------------------------------------------------------------------------------- Q8_0


def _to_q8_0(blocks: torch.Tensor, out: np.ndarray) -> None:
    """quantize_row_q8_0_ref of (n_blocks, 32) float32 ``blocks`` into (n_blocks, 34) uint8 ``out``.

    Per block, exactly as gguf-py (numpy float32): d = amax/127; id = 0 if d == 0 else 1/d;
    qs = roundf(x*id) as int8; stored as [fp16(d) little-endian, qs[32]].
    Pass 1 (torch): amax per block, exact in any order, NaN-propagating. Between the passes numpy computes
    d, id and fp16(d) for all blocks with gguf-py's own expressions. Pass 2 (torch): |x|*id is the same IEEE
    float32 product as x*id up to sign (id >= 0); roundf(v) = sign(v) * trunc(|v| + 0.49999997), with the
    sign copied from x and the trunc done by the float->int8 cast.
    """
    nb = blocks.shape[0]
    rows = _PIECE // 32
    xs = blocks.split(rows)
    amax = torch.empty(nb, dtype=torch.float32)
    amaxs = amax.split(rows)

    def pass1(lo: int, hi: int) -> None:
        scratch = torch.empty((rows, 32), dtype=torch.float32)
        for i in range(lo, hi):
            a = scratch[: len(xs[i])]
            torch.abs(xs[i], out=a)
            torch.amax(a, dim=1, out=amaxs[i])

    _run_pieces(len(xs), pass1)

    d = amax.numpy() / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32, copy=False)
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(nb, 2)  # > 65504 -> inf, as in gguf-py
    invs = torch.from_numpy(inv)[:, None].split(rows)
    qs = torch.from_numpy(out)[:, 2:].view(torch.int8).split(rows)

    def pass2(lo: int, hi: int) -> None:
        scratch = torch.empty((rows, 32), dtype=torch.float32)
        for i in range(lo, hi):
            v = scratch[: len(xs[i])]
            torch.abs(xs[i], out=v)
            v.mul_(invs[i]).add_(_HALF_DOWN).copysign_(xs[i])
            qs[i].copy_(v)  # float -> int8 truncates toward zero; |v| < 128 in every well-defined block

    _run_pieces(len(xs), pass2)

    # NaN/Inf blocks and blocks with a subnormal non-zero scale (undefined casts, see _FLT_MIN): gguf-py
    # encodes exactly those blocks, so the result still equals what it writes.
    odd = ~((d == 0) | ((d >= _FLT_MIN) & np.isfinite(d)))
    if odd.any():
        idx = np.flatnonzero(odd)
        with np.errstate(all="ignore"):
            out[idx] = gguf.quants.quantize(blocks.numpy()[idx], _T.Q8_0)
