"""so8t_export.quants: bit-identical to gguf-py's quantize (and, where C defines the result, to libggml).

Documented special values:
* BF16: NaN -> (bits >> 16) | 0x0040 (sign and high payload kept, quiet bit forced), Inf stays Inf, values that
  round past the largest finite bf16 become Inf: identical in gguf-py, libggml and here.
* F16: NaN -> numpy's payload truncation (0x7c00 | sig >> 13, kept non-zero), which is what gguf-py writes;
  libggml's software conversion writes 0x7e00 | sign for every NaN instead, so NaN is excluded from the C
  comparison (both are NaN). Finite values and Inf agree everywhere.
* Q8_0: a block containing NaN/Inf, or whose scale d = amax/127 is a non-zero float32 subnormal, hits undefined
  float->int8 casts in C and numpy; the bytes then equal gguf-py's (the module delegates those blocks to it),
  and such blocks are excluded from the C comparison.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import require_llama_cpp
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from so8t_export.quants import FILE_TYPES, OUTPUT_TYPES, BlockFP8, QuantError, quantize, quantized_nbytes

T = gguf.GGMLQuantizationType
ALL = list(OUTPUT_TYPES.values())


def _same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    a, b = ours.view(np.uint8).ravel(), ref.view(np.uint8).ravel()
    if not np.array_equal(a, b):
        bad = np.flatnonzero(a != b)
        raise AssertionError(
            f"{bad.size} differing bytes, first at {bad[:8]}: ours {a[bad[:8]]} ref {b[bad[:8]]}"
        )


def _check(x: np.ndarray, qtype) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    with np.errstate(all="ignore"):
        ref = gguf_quantize(x, qtype)
    ours = quantize(torch.from_numpy(x.copy()), qtype)
    _same(ours, ref)
    return ours


# ------------------------------------------------------------------------------------------ data sets


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal() -> np.ndarray:
    return _rng(1).standard_normal((96, 256), dtype=np.float32) * 0.02


def _heavy_tailed() -> np.ndarray:
    x = _rng(2).standard_cauchy((64, 512)).astype(np.float32)  # occasional |x| ~ 1e5..1e7 outliers per block
    x[::7] *= np.float32(1e-3)
    return x


def _zero_rows() -> np.ndarray:
    x = _rng(3).standard_normal((16, 128), dtype=np.float32)
    x[::3] = 0.0
    x[1, :32] = -0.0  # a block of negative zeros
    return x


def _ties() -> np.ndarray:
    """Blocks with amax = 127 * 2**k so d = 2**k and id = 2**-k exactly: x*id hits every k + .5 tie, plus the
    largest float below 0.5 / above-and-below each tie."""
    rows = []
    half = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)  # -126.5 .. 126.5
    near = np.concatenate(
        [
            np.nextafter(half, np.float32(-np.inf)),
            np.nextafter(half, np.float32(np.inf)),
            np.float32([0.49999997, -0.49999997, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5]),
        ]
    )
    vals = np.concatenate([half, near]).astype(np.float32)
    vals = np.concatenate([vals, np.zeros((-len(vals)) % 31, np.float32)]).reshape(-1, 31)
    for k in (-20, -3, 0, 5, 30):
        s = np.float32(2.0**k)
        blocks = np.concatenate([np.full((len(vals), 1), 127, np.float32), vals], axis=1) * s
        rows.append(blocks.reshape(-1, 32))
    return np.concatenate(rows)


def _magnitudes() -> np.ndarray:
    """Huge (fp16 scale overflows to inf, near FLT_MAX), tiny, float32-subnormal and fp16-subnormal scales."""
    r = _rng(4)
    scales = np.float32(
        [
            3.4e38,
            1e38,
            65504 * 127,
            65520 * 127,
            8.4e6,
            1e5,
            1.0,
            7.8e-3,
            1e-4,
            3e-6,
            1e-7,
            3.8e-8,
            2.9e-8,
            1e-9,
            1e-20,
            1.5e-36,
            1.4e-36,
            1e-37,
            1e-38,
            1e-40,
            1e-44,
            1.4e-45,
        ]
    )
    x = r.uniform(-1, 1, (len(scales), 4, 32)).astype(np.float32) * scales[:, None, None]
    x[:, :, 0] = scales[:, None]  # make amax exactly the scale
    return x.reshape(-1, 128)


def _fp16_subnormal_scales() -> np.ndarray:
    """d = amax/127 spread over the fp16 subnormal range [2**-24, 2**-14) and the rounding edges around it."""
    amax = np.float32(127) * np.geomspace(2.0**-26, 2.0**-13, 512).astype(np.float32)
    x = _rng(5).uniform(-1, 1, (512, 32)).astype(np.float32) * amax[:, None]
    x[:, 5] = -amax
    return x.reshape(-1, 256)


def _special_values() -> np.ndarray:
    bits = np.array(
        [
            0x7FC00000,
            0xFFC00000,
            0x7F800001,
            0x7FA00000,
            0xFF812345,
            0x7FFFFFFF,
            0x7F802000,
            0x7F800000,
            0xFF800000,
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x7F7F8000,
            0x7F7F7FFF,
            0x00000001,
            0x80000001,
            0x007FFFFF,
            0x00008000,
            0x00018000,
            0x3F808000,
            0x3F818000,
            0x477FF000,
            0x477FEFFF,
            0x33000000,
            0x33000001,
            0x80000000,
            0x00000000,
        ],
        dtype=np.uint32,
    )
    x = _rng(6).standard_normal((8, 64), dtype=np.float32)
    x.ravel()[: len(bits)] = bits.view(np.float32)
    x.ravel()[200 : 200 + len(bits)] = bits.view(np.float32)[::-1]
    return x


def _random_bits() -> np.ndarray:
    """Uniformly random bit patterns: every exponent, subnormals, NaN payloads, infinities."""
    return _rng(7).integers(0, 2**32, (64, 1024), dtype=np.uint64).astype(np.uint32).view(np.float32)


DATASETS = {
    "normal": _normal,
    "heavy_tailed": _heavy_tailed,
    "zero_rows": _zero_rows,
    "ties": _ties,
    "magnitudes": _magnitudes,
    "fp16_subnormal_scales": _fp16_subnormal_scales,
    "special_values": _special_values,
    "random_bits": _random_bits,
}


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("data", list(DATASETS), ids=str)
def test_bit_identical_to_gguf_py(data, qtype):
    _check(DATASETS[data](), qtype)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(32,), (1, 64), (3, 5, 96), (0, 32), (33, 2560)])
def test_shapes_and_dtypes(qtype, shape):
    x = _rng(8).standard_normal(shape, dtype=np.float32)
    out = _check(x, qtype)
    assert out.nbytes == quantized_nbytes(shape, qtype)
    expect_dtype = {T.F32: np.float32, T.F16: np.float16}.get(qtype, np.uint8)
    assert out.dtype == expect_dtype


def test_bulk_shape_crosses_chunk_boundaries():
    """Several internal chunks, odd-sized tail, NaN blocks in the middle of a chunk."""
    x = _rng(9).standard_normal((1031, 320), dtype=np.float32)
    x[517, 33] = np.nan
    x[1000, 310] = -np.inf
    x[3, 64:96] = 1e-40
    for qtype in ALL:
        _check(x, qtype)


def test_concurrent_calls_do_not_change_bytes():
    """The kernels release the GIL and the exporter runs them on several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    x = _rng(10).standard_normal((700, 512), dtype=np.float32)
    x[650, 7] = np.nan  # a block left to gguf-py
    with ThreadPoolExecutor(3) as pool:
        for qtype in ALL:
            want = _check(x, qtype)
            for got in pool.map(lambda _, qtype=qtype: quantize(torch.from_numpy(x), qtype), range(6)):
                _same(got, want)


def test_inputs_noncontiguous_and_half_precision():
    x = torch.randn(64, 96)
    _same(quantize(x.t(), T.Q8_0), gguf_quantize(x.t().contiguous().numpy(), T.Q8_0))
    for dt in (torch.bfloat16, torch.float16):
        h = x.to(dt)
        for qtype in ALL:
            _same(quantize(h, qtype), gguf_quantize(h.float().numpy(), qtype))
    with pytest.raises(TypeError, match="float32"):
        quantize(x.double(), T.Q8_0)
    assert quantize(x, "q8_0").tobytes() == quantize(x, T.Q8_0).tobytes()


def test_quant_error_names_shape_and_block_size():
    with pytest.raises(QuantError, match=r"shape \(4, 48\).*Q8_0.*48.*block size 32"):
        quantize(torch.zeros(4, 48), T.Q8_0)
    with pytest.raises(QuantError, match=r"shape \(7, 33\).*block size 32"):
        quantized_nbytes((7, 33), "q8_0")
    # still catchable like convert_hf_to_gguf's fallback does
    with pytest.raises(gguf.quants.QuantError):
        quantized_nbytes((7, 33), T.Q8_0)
    with pytest.raises(QuantError, match="not supported"):
        quantize(torch.zeros(32), T.Q4_K)
    with pytest.raises(QuantError, match="unknown output type"):
        quantized_nbytes((32,), "q4_k_m")
    assert quantized_nbytes((7, 33), T.F16) == 7 * 33 * 2
    assert quantized_nbytes((9728, 2560), "bf16") == 9728 * 2560 * 2
    assert quantized_nbytes((9728, 2560), "q8_0") == 9728 * 80 * 34


def test_tables():
    assert OUTPUT_TYPES == {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}
    assert FILE_TYPES == {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }


def test_writer_accepts_output(tmp_path):
    """The arrays go straight into GGUFWriter (raw_dtype) and read back as the same bytes."""
    x = torch.randn(8, 64)
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "qwen3")
    outs = {}
    for name, qtype in OUTPUT_TYPES.items():
        outs[name] = quantize(x, qtype)
        w.add_tensor(name, outs[name], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    for t in r.tensors:
        assert t.tensor_type == OUTPUT_TYPES[t.name]
        assert list(t.shape) == [64, 8]
        assert np.asarray(t.data).tobytes() == outs[t.name].tobytes()


# ----------------------------------------------------------------------------------------- hypothesis

_finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_any32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4).map(lambda n: 32 * n)), elements=_any32
    )
)
def test_property_bit_identical_any_float(x):
    for qtype in ALL:
        _check(x, qtype)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(1, 8).map(lambda n: (32 * n,)), elements=_finite32),
    st.sampled_from([1.0, 1e-3, 1e-6, 1e3, 1e6]),
)
def test_property_q8_0_round_trip_error(x, scale):
    """Per block: |x - dequant(x)| <= d/2 + 127*|d - fp16(d)| (+ float32 rounding slack), where d = amax/127 is
    the float32 scale used to round and fp16(d) the stored one; when fp16(d) == d this is the plain d/2."""
    with np.errstate(over="ignore"):
        x = (x.astype(np.float64) * scale).astype(np.float32)
    x = np.where(np.isfinite(x), x, np.float32(0))
    q = quantize(torch.from_numpy(x), T.Q8_0)
    with np.errstate(invalid="ignore"):  # blocks whose fp16 scale overflowed dequantize to inf/nan
        deq = gguf_dequantize(q, T.Q8_0)
    blocks = x.reshape(-1, 32).astype(np.float64)
    d32 = (np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)).astype(np.float64)
    d16 = q.reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float64)[:, 0]
    finite = np.isfinite(d16) & (
        d32 >= np.finfo(np.float32).tiny
    )  # fp16 overflow -> inf scale; C-UB tiny blocks
    err = np.abs(blocks - deq.reshape(-1, 32).astype(np.float64)).max(axis=1)
    bound = d32 * (0.5 + 3e-5) + 127 * np.abs(d32 - d16) + 127 * d16 * 2.0**-23
    assert np.all(err[finite] <= bound[finite]), (err[finite], bound[finite])
    exact = finite & (d16 == d32)
    assert np.all(err[exact] <= d32[exact] * (0.5 + 3e-5))


# ------------------------------------------------------------------------------------- libggml (C)


def _libggml_base() -> ctypes.CDLL:
    require_llama_cpp()
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not candidates:
        pytest.fail(f"llama_cpp is installed but no libggml-base shared library in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    f = lib.ggml_quantize_chunk
    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst, int64_t start,
    #                            int64_t nrows, int64_t n_per_row, const float * imatrix)
    f.restype = ctypes.c_size_t
    f.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def _ggml_quantize(lib: ctypes.CDLL, x: np.ndarray, qtype) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n_per_row = x.reshape(-1, x.shape[-1]).shape
    dst = np.zeros(quantized_nbytes(x.shape, qtype), dtype=np.uint8)
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, None)
    assert n == dst.nbytes
    return dst


def _c_defined_q8_0_blocks(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x.reshape(-1, 32)).max(axis=1)
    with np.errstate(invalid="ignore"):
        d = amax / np.float32(127)
    return (d == 0) | (np.isfinite(d) & (d >= np.finfo(np.float32).tiny))


@pytest.mark.llama
@pytest.mark.parametrize("qtype", [T.Q8_0, T.F16, T.BF16, T.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("data", list(DATASETS), ids=str)
def test_bit_identical_to_libggml(data, qtype):
    lib = _libggml_base()
    x = np.ascontiguousarray(DATASETS[data](), dtype=np.float32)
    ours = quantize(torch.from_numpy(x.copy()), qtype).view(np.uint8).ravel()
    ref = _ggml_quantize(lib, x, qtype)
    if qtype == T.Q8_0:
        keep = _c_defined_q8_0_blocks(x)
        ours, ref = ours.reshape(-1, 34)[keep], ref.reshape(-1, 34)[keep]
        assert keep.any()
    elif qtype == T.F16:
        keep = ~np.isnan(x.ravel())
        o16, r16 = ours.view(np.uint16), ref.view(np.uint16)
        # ggml writes 0x7e00|sign for any NaN; numpy/gguf-py keep the truncated payload. Both are NaN.
        assert np.all(np.isnan(o16[~keep].view(np.float16))) and np.all(np.isnan(r16[~keep].view(np.float16)))
        ours, ref = o16[keep], r16[keep]
    _same(ours, ref)


# ------------------------------------------------------------------------------------------- block FP8
# The reference is the plain torch expression the converter uses: weight.float() * scale, per tile.


def _torch_dequant(fp8: BlockFP8) -> torch.Tensor:
    br, bc = fp8.block
    values = torch.from_numpy(fp8.weight).view(torch.float8_e4m3fn).float()
    scale = torch.from_numpy(fp8.scale_inv).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    rows, cols = values.shape
    return values * scale[fp8.first_row : fp8.first_row + rows, :cols]


def _fp8(rows, cols, block, first_row=0, seed=0, scales=None) -> BlockFP8:
    r = _rng(seed)
    weight = r.integers(0, 256, (rows, cols), dtype=np.uint8)
    weight[(weight & 0x7F) == 0x7F] ^= 1  # no NaN unless a test puts one in
    shape = (math.ceil((first_row + rows) / block[0]), math.ceil(cols / block[1]))
    scale = r.uniform(1e-4, 1e-2, shape).astype(np.float32) if scales is None else np.resize(scales, shape)
    return BlockFP8(weight, scale.astype(np.float32), block, first_row)


def _check_fp8(fp8: BlockFP8) -> None:
    reference = _torch_dequant(fp8)
    ours = fp8.dequantize()
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32)) or (
        torch.equal(torch.isnan(ours), torch.isnan(reference))
        and torch.equal(ours[~torch.isnan(ours)], reference[~torch.isnan(reference)])
    )
    assert fp8.nonfinite() == int((~torch.isfinite(reference)).sum())
    for qtype in ALL:
        _same(fp8.encode(qtype), _check(reference.numpy(), qtype))


def test_fp8_decodes_every_byte_like_torch():
    """All 256 e4m3fn bytes (NaN and subnormals included) times ordinary, negative, tiny and special scales."""
    weight = np.tile(np.arange(256, dtype=np.uint8), (2, 1))
    for scale in (1.0, -0.75, 2.0**-130, 3e38, 0.0, -0.0, np.inf, np.nan):
        fp8 = BlockFP8(weight, np.full((1, 1), scale, np.float32), (2, 256))
        ours, reference = fp8.dequantize(), _torch_dequant(fp8)
        nan = torch.isnan(reference)
        assert torch.equal(torch.isnan(ours), nan), scale
        assert torch.equal(ours[~nan].view(torch.int32), reference[~nan].view(torch.int32)), scale


@pytest.mark.parametrize(
    "rows, cols, block, first_row",
    [(256, 512, (128, 128), 0), (100, 320, (128, 128), 37), (97, 96, (48, 40), 5), (64, 160, (16, 64), 0),
     (7, 32, (128, 128), 127), (0, 64, (128, 128), 0), (0, 64, (16, 32), 5)],
    ids=["qwen-tiles", "row-range", "edge-tiles-40-wide", "64-wide", "one-partial-tile", "no-rows",
         "no-rows-inside-a-tile"],
)
def test_fp8_encode_equals_quantize_of_dequantize(rows, cols, block, first_row):
    _check_fp8(_fp8(rows, cols, block, first_row))


def test_fp8_special_values_take_the_exact_path():
    fp8 = _fp8(256, 256, (128, 128), seed=1)
    fp8.weight[3, 40] = 0x7F  # NaN byte
    fp8.weight[200, 7] = 0xFF  # negative NaN byte
    fp8.weight[130, 128:160] = 0x80  # a block of negative zeros
    _check_fp8(fp8)
    for scales in ([np.inf, 1e-3], [1e38, 1e-3], [1e-42, 1e-3], [0.0, -1e-3], [np.nan, 1e-3], [2e-37, 5e-39]):
        _check_fp8(_fp8(256, 256, (128, 128), seed=2, scales=np.float32(scales)))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.sampled_from([(128, 128), (32, 32), (8, 96), (48, 40)]),
       st.integers(0, 127), st.integers(0, 2**32 - 1))
def test_property_fp8_encode(rows, blocks, block, first_row, seed):
    _check_fp8(_fp8(rows, 32 * blocks, block, first_row % block[0], seed=seed))


def test_fp8_rejects_inconsistent_tiles():
    with pytest.raises(ValueError, match=r"scale_inv shape \(2, 2\); expected \(4, 3\)"):
        BlockFP8(np.zeros((100, 70), np.uint8), np.ones((2, 2), np.float32), (32, 32))
    with pytest.raises(ValueError, match="first_row 40"):
        BlockFP8(np.zeros((8, 32), np.uint8), np.ones((1, 1), np.float32), (32, 32), first_row=40)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        BlockFP8.from_torch(torch.zeros(4, 4), torch.ones(1, 1), (4, 4))
