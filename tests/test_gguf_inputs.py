"""Bad and foreign GGUF inputs for inspect, parity, modelfile and the runtime: each ends in one clear line
naming the file and key (expected vs found), a non-zero exit, no traceback, no hang, no file left behind.

Also: a stock qwen3 GGUF (no so8t.* keys) works where the command can do without the heads, the qwen3.*
hyperparameters llama.cpp aborts on are refused before it sees them, the runtime's context is configurable
and generation stops at its end, and llama.cpp's log lines stay off the terminal unless --verbose.

Variants are written with gguf-py: every field of an exported file is copied with one key changed or removed
(``rewrite_gguf``; an unchanged copy is byte-identical to the export).
"""

import json
import math
import os
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_llama_cpp
from fuzz.mutate import gguf_rewrite

from so8t_export.cli import main, runtime_main
from so8t_export.export import export_gguf
from so8t_export.gguf_file import MetadataError, open_gguf, read_gguf_header, read_qwen3_hparams
from so8t_export.metadata import FOLD_ERROR_LIMIT, read_so8t_metadata

V = gguf.GGUFValueType
SUBPROCESS_TIMEOUT = 120  # seconds; a FIFO or a corrupted count must fail long before this


DROP = object()


# ------------------------------------------------------------------------------------------------ helpers
def rewrite_gguf(src, dst, changes=None):
    """Copy src to dst with metadata changes: key -> DROP, or (value, type[, sub_type]); new keys go last."""
    changes = dict(changes or {})
    gguf_rewrite(src, dst, drop=lambda key: changes.get(key) is DROP,
                 replace={key: (c[0], c[1], c[2] if len(c) > 2 else None) for key, c in changes.items()
                          if c is not DROP})
    return dst


def cli(command, args):
    """CliRunner call; click >= 8.2 keeps stderr apart (result.stderr) and result.output has both."""
    return CliRunner().invoke(command, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """Non-zero exit through click (no traceback), and stderr's last line is one 'Error: ...' naming all
    fragments."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.stderr
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[-1], (fragment, lines[-1])
    return lines[-1]


def run_cli(entry: str, args, timeout=SUBPROCESS_TIMEOUT):
    """The command in a fresh interpreter (a native abort or a hang cannot take the test run with it)."""
    code = f"import sys; from so8t_export.cli import {entry}; sys.argv[0] = 'so8t'; {entry}()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def assert_subprocess_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def exported(so8t_dir, tmp_path_factory):
    return export_gguf(so8t_dir, tmp_path_factory.mktemp("inputs") / "tiny-f32.gguf", quant="f32").output


@pytest.fixture(scope="module")
def fields(exported):
    return {key: field.contents() for key, field in gguf.GGUFReader(exported).fields.items()}


@pytest.fixture(scope="module")
def stock(exported, fields, tmp_path_factory):
    """The export without any so8t.* key: what llama.cpp's converter would write for the same weights."""
    out = tmp_path_factory.mktemp("stock") / "stock-qwen3.gguf"
    return rewrite_gguf(exported, out, {key: DROP for key in fields if key.startswith("so8t.")})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("Hello there, how are you?\n")
    return path


def test_an_unchanged_rewrite_is_byte_identical(exported, tmp_path):
    copy = rewrite_gguf(exported, tmp_path / "copy.gguf")
    assert copy.read_bytes() == exported.read_bytes()


# ----------------------------------------------------------------------------------- not a (whole) GGUF
def test_random_bytes(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    line = assert_one_line_error(cli(main, ["inspect", path]), path, "not a valid GGUF file", "GGUF magic")
    assert "expected" in line


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_one_line_error(cli(main, ["inspect", path]), path, "not a valid GGUF file", "empty")


def truncation_points(size: int, reader: gguf.GGUFReader) -> dict[str, int]:
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return {"magic": 2, "version": 6, "counts": 20, "first key": 40, "token strings": tokens.offset + 300,
            "tensor infos": reader.data_offset - 40, "data start": reader.data_offset,
            "inside tensor data": (reader.data_offset + size) // 2, "last byte": size - 1}


def test_truncated_files(exported, tmp_path):
    data = exported.read_bytes()
    for name, cut in truncation_points(len(data), gguf.GGUFReader(exported)).items():
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(MetadataError, match="not a valid GGUF file: truncated") as err:
            open_gguf(path)
        assert str(path) in str(err.value), name
        if name in ("token strings", "inside tensor data"):
            assert_one_line_error(cli(main, ["inspect", path]), path, "truncated")
    # the tensor-data case names the tensor whose bytes are missing
    path = tmp_path / "cut-data.gguf"
    path.write_bytes(data[:len(data) - 1])
    with pytest.raises(MetadataError, match=r"tensor \S+ .*needed, but the file has"):
        open_gguf(path)


def _patch_tensor_info(data: bytes, name: str, field: str, value: bytes) -> bytes:
    """Overwrite one field (n_dims, dims, type, offset) of a tensor info in the header."""
    at = data.index(np.array([len(name)], "<u8").tobytes() + name.encode()) + 8 + len(name)
    n_dims = int(np.frombuffer(data, "<u4", 1, at)[0])
    offsets = {"n_dims": at, "dims": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}
    return data[:offsets[field]] + value + data[offsets[field] + len(value):]


@pytest.mark.parametrize("field, value, fragments", [
    ("type", np.array([2], "<u4").tobytes(), ["blk.0.attn_q.weight (Q4_0", "expected"]),  # smaller data
    ("dims", np.array([0], "<u8").tobytes(), ["blk.0.attn_q.weight (F32, shape [0, 256])"]),
    ("dims", np.array([2**40], "<u8").tobytes(), ["blk.0.attn_q.weight (F32, shape [1099511627776, 256]) takes"]),
    ("offset", np.array([2**40], "<u8").tobytes(), ["blk.0.attn_q.weight has data offset 1099511627776"]),
    ("type", np.array([99], "<u4").tobytes(), ["blk.0.attn_q.weight has unknown ggml type 99"]),
    ("n_dims", np.array([5], "<u4").tobytes(), ["blk.0.attn_q.weight has 5 dimensions; at most 4"]),
])
def test_tensor_infos_must_match_the_data_layout(exported, tmp_path, field, value, fragments):
    """ggml lays tensors out back to back (each padded to the alignment) and refuses other offsets."""
    path = tmp_path / "patched.gguf"
    path.write_bytes(_patch_tensor_info(exported.read_bytes(), "blk.0.attn_q.weight", field, value))
    line = assert_one_line_error(cli(main, ["inspect", path]), path, "not a valid GGUF file")
    assert any(f in line for f in fragments) or all(f in line for f in fragments), line


def test_a_header_claiming_one_tensor_less_is_caught(exported, tmp_path):
    data = bytearray(exported.read_bytes())
    count = int(np.frombuffer(data, "<u8", 1, 8)[0])
    data[8:16] = np.array([count - 1], "<u8").tobytes()
    path = tmp_path / "fewer.gguf"
    path.write_bytes(bytes(data))
    assert_one_line_error(cli(main, ["inspect", path]), path, "tensor", "is missing")


def test_long_string_arrays_are_checked_not_kept(tmp_path):
    """A vocabulary longer than STRING_ARRAY_LIMIT goes through the fast length-only loop."""
    from so8t_export.gguf_file import STRING_ARRAY_LIMIT

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, arch="demo")
    writer.add_token_list([f"tok{i}" for i in range(STRING_ARRAY_LIMIT + 10)])
    writer.add_string("general.name", "after the vocabulary")
    writer.add_tensor("x", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_gguf_header(path)
    field = header.get_field("tokenizer.ggml.tokens")
    assert field.value is None and field.count == STRING_ARRAY_LIMIT + 10 and field.types == [V.ARRAY, V.STRING]
    assert header.get_field("general.name").contents() == "after the vocabulary"
    data = path.read_bytes()
    cut = data.find(b"tok3000") + 2
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(MetadataError, match=r"truncated in string 3000 of tokenizer.ggml.tokens"):
        read_gguf_header(tmp_path / "cut.gguf")
    result = cli(main, ["inspect", path])
    assert result.exit_code == 0 and "not a qwen3 model" in result.stdout


def test_a_corrupted_array_count_does_not_hang(tmp_path):
    """gguf-py's GGUFReader loops ~forever on it (each read past the end is an empty view, not an error)."""
    path = tmp_path / "count.gguf"
    header = b"GGUF" + np.array([3], "<u4").tobytes() + np.array([0, 1], "<u8").tobytes()
    path.write_bytes(header + np.array([1], "<u8").tobytes() + b"x"
                     + np.array([V.ARRAY, V.UINT8], "<u4").tobytes() + np.array([2**40], "<u8").tobytes() + b"abc")
    start = time.perf_counter()
    with pytest.raises(MetadataError, match=r"truncated in the 1099511627776 uint8 values of x"):
        open_gguf(path)
    assert time.perf_counter() - start < 5


def test_non_utf8_and_duplicate_keys(exported, tmp_path):
    data = bytearray(exported.read_bytes())
    at = data.find(b"general.name") + len(b"general.name") + 4 + 8  # key, type, string length
    data[at] = 0xFF
    path = tmp_path / "utf8.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match="general.name is not UTF-8"):
        open_gguf(path)
    data = bytearray(exported.read_bytes())
    at = data.find(b"general.type")
    data[at:at + len(b"general.type")] = b"general.name"
    path.write_bytes(bytes(data))
    with pytest.raises(MetadataError, match="general.name appears twice"):
        open_gguf(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_fails_at_once(tmp_path, so8t_dir):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="must be a regular file, found a FIFO"):
        open_gguf(fifo)  # checked before any open(): a FIFO would block it
    for entry, args in (("main", ["inspect", fifo]), ("main", ["modelfile", fifo, "-o", tmp_path / "Modelfile"]),
                        ("main", ["parity", so8t_dir, fifo]), ("runtime_main", [fifo, "hello"])):
        assert_subprocess_error(run_cli(entry, args), fifo, "FIFO")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.gguf"]


def test_modelfile_refuses_a_bad_gguf_and_writes_nothing(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"not a gguf at all")
    assert_one_line_error(cli(main, ["modelfile", path, "-o", tmp_path / "Modelfile"]), path, "GGUF magic")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.gguf"]


def test_modelfile_names_the_bad_parameter(exported, tmp_path):
    for param, name in (("temperature=abc", "temperature"), ("top_k=1.5", "top_k"), ("warp=9", "warp")):
        assert_one_line_error(cli(main, ["modelfile", exported, "-o", tmp_path / "Modelfile", "--param", param]),
                              f"--param {param}", name)
    assert not (tmp_path / "Modelfile").exists()


def test_parity_file_type_reads_through_open_gguf(tmp_path):
    from so8t_export.parity import gguf_file_type

    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 3)
    with pytest.raises(MetadataError, match="not a valid GGUF file"):
        gguf_file_type(path)


# ----------------------------------------------------------------------------------------- so8t.* checks
def _list_with(values, index, value):
    values = list(values)
    values[index] = value
    return values


# (id, changes as a function of the exported fields, fragments the error must contain)
SO8T_VARIANTS = [
    ("version-string", lambda f: {"so8t.version": ("1", V.STRING)}, ["so8t.version is string; expected uint32"]),
    ("version-3", lambda f: {"so8t.version": (3, V.UINT32)}, ["so8t.version = 3; expected 1 or 2"]),
    ("version-1-with-thresholds", lambda f: {"so8t.version": (1, V.UINT32)},
     ["so8t.authority_head.threshold is not a key of so8t.* schema version 1"]),
    ("threshold-above-1", lambda f: {"so8t.safety_head.threshold": (1.5, V.FLOAT32)},
     ["so8t.safety_head.threshold = 1.5; expected a probability in [0, 1]"]),
    ("threshold-missing", lambda f: {"so8t.authority_head.threshold": DROP},
     ["metadata key so8t.authority_head.threshold is missing"]),
    ("rotation-dim-9", lambda f: {"so8t.rotation_dim": (9, V.UINT32)}, ["so8t.rotation_dim = 9; expected 8"]),
    ("rotation-dim-string", lambda f: {"so8t.rotation_dim": ("8", V.STRING)},
     ["so8t.rotation_dim is string; expected uint32"]),
    ("flag-uint8", lambda f: {"so8t.flags.triality_symmetry": (1, V.UINT8)},
     ["so8t.flags.triality_symmetry is uint8; expected bool"]),
    ("not-folded", lambda f: {"so8t.rotations_folded": (False, V.BOOL)}, ["so8t.rotations_folded = false"]),
    ("q-types-short", lambda f: {"so8t.triality.q_head_types": (f["so8t.triality.q_head_types"][:-1], V.ARRAY, V.INT32)},
     ["so8t.triality.q_head_types has 15 values; expected 16", "qwen3.attention.head_count = 16"]),
    ("kv-types-long", lambda f: {"so8t.triality.kv_head_types": (f["so8t.triality.kv_head_types"] + [2], V.ARRAY, V.INT32)},
     ["so8t.triality.kv_head_types has 9 values; expected 8", "qwen3.attention.head_count_kv = 8"]),
    ("mlp-types-short", lambda f: {"so8t.mlp.rotation_types": ([0], V.ARRAY, V.INT32)},
     ["so8t.mlp.rotation_types has 1 values; expected 2", "qwen3.block_count = 2"]),
    ("q-type-3", lambda f: {"so8t.triality.q_head_types": (_list_with(f["so8t.triality.q_head_types"], 4, 3), V.ARRAY, V.INT32)},
     ["so8t.triality.q_head_types holds 3; expected triality types 0, 1 or 2"]),
    ("kv-type-negative", lambda f: {"so8t.triality.kv_head_types": (_list_with(f["so8t.triality.kv_head_types"], 0, -1), V.ARRAY, V.INT32)},
     ["so8t.triality.kv_head_types holds -1"]),
    ("q-types-float", lambda f: {"so8t.triality.q_head_types": ([float(x) for x in f["so8t.triality.q_head_types"]], V.ARRAY, V.FLOAT32)},
     ["so8t.triality.q_head_types is array of float32; expected an array of int32"]),
    ("q-types-not-the-rule", lambda f: {"so8t.triality.q_head_types": (_list_with(f["so8t.triality.q_head_types"], 1, 2), V.ARRAY, V.INT32)},
     ["so8t.triality.q_head_types[1] = 2; expected 1", "so8t.flags.triality_symmetry = true"]),
    ("labels-three", lambda f: {"so8t.safety_head.labels": (["safe", "unsafe", "maybe"], V.ARRAY, V.STRING)},
     ["so8t.safety_head.labels = ['safe', 'unsafe', 'maybe']; expected ['safe', 'unsafe']"]),
    ("labels-wrong", lambda f: {"so8t.authority_head.labels": (["handle", "ignore"], V.ARRAY, V.STRING)},
     ["so8t.authority_head.labels = ['handle', 'ignore']; expected ['handle', 'escalate']"]),
    ("labels-ints", lambda f: {"so8t.safety_head.labels": ([0, 1], V.ARRAY, V.INT32)},
     ["so8t.safety_head.labels is array of int32; expected an array of string"]),
    ("weight-nan", lambda f: {"so8t.safety_head.weight": (_list_with(f["so8t.safety_head.weight"], 5, math.nan), V.ARRAY, V.FLOAT32)},
     ["so8t.safety_head.weight has 1 NaN or Inf values (the first at index 5); expected finite numbers"]),
    ("bias-inf", lambda f: {"so8t.authority_head.bias": ([0.0, math.inf], V.ARRAY, V.FLOAT32)},
     ["so8t.authority_head.bias has 1 NaN or Inf"]),
    ("rotations-nan", lambda f: {"so8t.triality.rotations": (_list_with(f["so8t.triality.rotations"], 70, math.nan), V.ARRAY, V.FLOAT32)},
     ["so8t.triality.rotations has 1 NaN or Inf"]),
    ("cross-inf", lambda f: {"so8t.cross_head.rotation": (_list_with(f["so8t.cross_head.rotation"], 0, -math.inf), V.ARRAY, V.FLOAT32)},
     ["so8t.cross_head.rotation has 1 NaN or Inf"]),
    ("weight-short", lambda f: {"so8t.authority_head.weight": (f["so8t.authority_head.weight"][:-1], V.ARRAY, V.FLOAT32)},
     ["so8t.authority_head.weight has 127 values; expected 128 (2 x qwen3.embedding_length = 2 x 64)"]),
    ("weight-doubles", lambda f: {"so8t.safety_head.weight": (f["so8t.safety_head.weight"], V.ARRAY, V.FLOAT64)},
     ["so8t.safety_head.weight is array of float64; expected an array of float32"]),
    ("fold-nan", lambda f: {"so8t.fold.max_abs_error": (math.nan, V.FLOAT32)}, ["so8t.fold.max_abs_error = nan; expected"]),
    ("fold-negative", lambda f: {"so8t.fold.max_abs_error": (-1e-9, V.FLOAT32)}, ["so8t.fold.max_abs_error = -1e-09"]),
    ("fold-large", lambda f: {"so8t.fold.max_abs_error": (0.25, V.FLOAT32)},
     ["so8t.fold.max_abs_error = 0.25; expected a finite number in [0, 0.001]"]),
    ("fold-string", lambda f: {"so8t.fold.max_abs_error": ("0", V.STRING)},
     ["so8t.fold.max_abs_error is string; expected float32"]),
    ("sha-short", lambda f: {"so8t.source.sha256": ("abc123", V.STRING)},
     ["so8t.source.sha256 = 'abc123'; expected 64 hexadecimal digits"]),
    ("sha-not-hex", lambda f: {"so8t.source.sha256": ("z" * 64, V.STRING)}, ["so8t.source.sha256 = 'zzzz"]),
    ("sha-number", lambda f: {"so8t.source.sha256": (7, V.UINT32)}, ["so8t.source.sha256 is uint32; expected string"]),
    ("missing-bias", lambda f: {"so8t.safety_head.bias": DROP},
     ["metadata key so8t.safety_head.bias is missing", "not all of schema version 2"]),
    ("missing-version", lambda f: {"so8t.version": DROP}, ["metadata key so8t.version is missing"]),
    ("missing-flag", lambda f: {"so8t.flags.spinor_minus_representation": DROP},
     ["metadata key so8t.flags.spinor_minus_representation is missing"]),
    ("missing-hash", lambda f: {"so8t.source.sha256": DROP}, ["metadata key so8t.source.sha256 is missing"]),
    ("missing-cross", lambda f: {"so8t.cross_head.rotation": DROP},
     ["metadata key so8t.cross_head.rotation is missing", "so8t.flags.cross_head_interaction = true"]),
    ("cross-without-flag", lambda f: {"so8t.flags.cross_head_interaction": (False, V.BOOL)},
     ["so8t.cross_head.rotation is present, but so8t.flags.cross_head_interaction = false"]),
    ("unknown-key", lambda f: {"so8t.extra": (1, V.UINT32)}, ["so8t.extra is not a key of so8t.* schema version 2"]),
    ("rotations-not-orthogonal", lambda f: {"so8t.triality.rotations": (_list_with(f["so8t.triality.rotations"], 0, 5.0), V.ARRAY, V.FLOAT32)},
     ["so8t.triality.rotations: vector rotation is not orthogonal"]),
    ("cross-not-orthogonal", lambda f: {"so8t.cross_head.rotation": (_list_with(f["so8t.cross_head.rotation"], 0, 5.0), V.ARRAY, V.FLOAT32)},
     ["so8t.cross_head.rotation: rotation is not orthogonal"]),
]

# qwen3.* keys llama.cpp aborts on (GGML_ASSERT, or an uncaught std::out_of_range for the vocabulary) or
# that make no sense or contradict the tensors; QWEN3_ABORTS abort it natively.
QWEN3_ABORTS = ["eps-negative", "eps-nan", "blocks-0", "blocks-600", "rope-dims", "tokenizer-llama"]
QWEN3_VARIANTS = [
    ("eps-negative", {"qwen3.attention.layer_norm_rms_epsilon": (-1e-6, V.FLOAT32)},
     ["qwen3.attention.layer_norm_rms_epsilon = -1e-06; expected a finite number >= 0"]),
    ("eps-nan", {"qwen3.attention.layer_norm_rms_epsilon": (math.nan, V.FLOAT32)},
     ["qwen3.attention.layer_norm_rms_epsilon = nan; expected a finite number"]),
    ("eps-string", {"qwen3.attention.layer_norm_rms_epsilon": ("1e-6", V.STRING)},
     ["qwen3.attention.layer_norm_rms_epsilon is string; expected float32"]),
    ("eps-missing", {"qwen3.attention.layer_norm_rms_epsilon": DROP},
     ["metadata key qwen3.attention.layer_norm_rms_epsilon is missing"]),
    ("blocks-0", {"qwen3.block_count": (0, V.UINT32)}, ["qwen3.block_count = 0; expected a positive integer"]),
    ("blocks-600", {"qwen3.block_count": (600, V.UINT32)}, ["qwen3.block_count = 600; llama.cpp supports at most 512"]),
    ("rope-dims", {"qwen3.rope.dimension_count": (8, V.UINT32)},
     ["qwen3.rope.dimension_count = 8; expected qwen3.attention.key_length = 16"]),
    ("heads-0", {"qwen3.attention.head_count": (0, V.UINT32)}, ["qwen3.attention.head_count = 0; expected a positive"]),
    ("kv-heads-0", {"qwen3.attention.head_count_kv": (0, V.UINT32)}, ["qwen3.attention.head_count_kv = 0"]),
    ("kv-heads-3", {"qwen3.attention.head_count_kv": (3, V.UINT32)},
     ["qwen3.attention.head_count = 16 is not a multiple of qwen3.attention.head_count_kv = 3"]),
    ("heads-int32", {"qwen3.attention.head_count": (16, V.INT32)}, ["qwen3.attention.head_count is int32; expected uint32"]),
    ("ctx-0", {"qwen3.context_length": (0, V.UINT32)}, ["qwen3.context_length = 0"]),
    ("embd-0", {"qwen3.embedding_length": (0, V.UINT32)}, ["qwen3.embedding_length = 0"]),
    ("embd-indivisible", {"qwen3.embedding_length": (60, V.UINT32), "qwen3.attention.key_length": DROP,
                          "qwen3.attention.value_length": DROP},
     ["qwen3.embedding_length = 60 is not a multiple of qwen3.attention.head_count = 16"]),
    ("value-length", {"qwen3.attention.value_length": (8, V.UINT32)},
     ["qwen3.attention.value_length = 8; expected qwen3.attention.key_length = 16"]),
    ("key-length-odd", {"qwen3.attention.key_length": (15, V.UINT32), "qwen3.attention.value_length": (15, V.UINT32)},
     ["qwen3.attention.key_length = 15; expected an even head size"]),
    ("freq-nan", {"qwen3.rope.freq_base": (math.nan, V.FLOAT32)}, ["qwen3.rope.freq_base = nan"]),
    ("freq-negative", {"qwen3.rope.freq_base": (-5.0, V.FLOAT32)}, ["qwen3.rope.freq_base = -5; expected a positive"]),
    ("ff-missing", {"qwen3.feed_forward_length": DROP}, ["metadata key qwen3.feed_forward_length is missing"]),
    ("arch-llama", {"general.architecture": ("llama", V.STRING)},
     ["general.architecture = 'llama'; expected 'qwen3'"]),
    # against the tensors and the vocabulary (llama.cpp: a clean load error, or an abort for the vocabulary)
    ("blocks-3", {"qwen3.block_count": (3, V.UINT32)},
     ["tensor blk.2.attn_norm.weight is missing (qwen3.block_count = 3 layers need it)"]),
    ("blocks-1", {"qwen3.block_count": (1, V.UINT32)},
     ["tensor blk.1.attn_norm.weight is not one llama.cpp's qwen3 model loads (qwen3.block_count = 1"]),
    ("embd-32", {"qwen3.embedding_length": (32, V.UINT32)},
     ["tensor token_embd.weight has shape [64, 768]; expected [32, 768]",
      "= [qwen3.embedding_length, len(tokenizer.ggml.tokens)]"]),
    ("ff-100", {"qwen3.feed_forward_length": (100, V.UINT32)},
     ["has shape [128, 64]; expected [100, 64] = [qwen3.feed_forward_length, qwen3.embedding_length]"]),
    ("tokenizer-llama", {"tokenizer.ggml.model": ("llama", V.STRING)},
     ["tokenizer.ggml.model = 'llama'; expected 'gpt2'"]),
    ("eos-out-of-range", {"tokenizer.ggml.eos_token_id": (10**6, V.UINT32)},
     ["tokenizer.ggml.eos_token_id = 1000000; expected a token id below the vocabulary size 768"]),
    ("eos-int32", {"tokenizer.ggml.eos_token_id": (5, V.INT32)},
     ["tokenizer.ggml.eos_token_id is int32; expected uint32"]),
    ("token-types-short", {"tokenizer.ggml.token_type": ([1] * 767, V.ARRAY, V.INT32)},
     ["tokenizer.ggml.token_type has 767 values; expected 768"]),
    ("tokens-missing", {"tokenizer.ggml.tokens": DROP}, ["metadata key tokenizer.ggml.tokens is missing"]),
    ("merges-missing", {"tokenizer.ggml.merges": DROP}, ["metadata key tokenizer.ggml.merges is missing"]),
]


@pytest.fixture(scope="module")
def variants(exported, fields, tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants")
    out = {}
    for name, changes, _ in SO8T_VARIANTS:
        out[name] = rewrite_gguf(exported, folder / f"{name}.gguf", changes(fields))
    for name, changes, _ in QWEN3_VARIANTS:
        out[name] = rewrite_gguf(exported, folder / f"{name}.gguf", changes)
    return out


@pytest.mark.parametrize("name, fragments", [(n, f) for n, _, f in SO8T_VARIANTS + QWEN3_VARIANTS],
                         ids=[n for n, _, _ in SO8T_VARIANTS + QWEN3_VARIANTS])
def test_inconsistent_metadata_is_refused_naming_the_key(variants, name, fragments):
    path = variants[name]
    reader = open_gguf(path)  # structurally fine: only the values are wrong
    with pytest.raises(MetadataError) as err:
        read_so8t_metadata(reader, path)
    for fragment in [str(path)] + fragments:
        assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    # inspect prints what it can read, then the same one line, and exits 1
    result = cli(main, ["inspect", path])
    assert_one_line_error(result, path, *fragments)
    assert "[general]" in result.stdout


@pytest.mark.parametrize("name, fragments", [(n, f) for n, _, f in QWEN3_VARIANTS if n in QWEN3_ABORTS],
                         ids=QWEN3_ABORTS)
def test_runtime_refuses_hparams_llama_cpp_aborts_on(variants, name, fragments):
    """Without the check each of these ends the process in SIGABRT (rc -6): a GGML_ASSERT, or for the
    'llama' vocabulary an uncaught std::out_of_range (unordered_map::at)."""
    require_llama_cpp()
    assert_subprocess_error(run_cli("runtime_main", [variants[name], "hello", "--max-tokens", "2"]),
                            variants[name], *fragments)


# (rotations-not-orthogonal is not among them: the runtime serves the folded tensors and leaves the triality
# check, which needs torch, to inspect and parity)
@pytest.mark.parametrize("name", ["kv-heads-3", "arch-llama", "missing-bias", "labels-wrong"])
def test_runtime_refuses_other_bad_metadata(variants, name):
    require_llama_cpp()
    fragments = {n: f for n, _, f in SO8T_VARIANTS + QWEN3_VARIANTS}[name]
    assert_one_line_error(cli(runtime_main, [variants[name], "hello", "--max-tokens", "2"]), variants[name],
                          *fragments)


def test_parity_refuses_bad_metadata_before_loading_the_reference(variants, so8t_dir, prompts_file):
    require_llama_cpp()
    for name in ("eps-negative", "weight-nan"):
        fragments = {n: f for n, _, f in SO8T_VARIANTS + QWEN3_VARIANTS}[name]
        assert_one_line_error(cli(main, ["parity", so8t_dir, variants[name], "--prompts", prompts_file]),
                              variants[name], *fragments)


def test_what_real_exports_write_is_far_inside_the_bounds(exported, qwen3_dir, tmp_path):
    """The fold-error bound has a wide margin: ~1e-15 from an SO8T source, ~1e-7 from a Qwen3 one."""
    so8t_error = read_so8t_metadata(open_gguf(exported), exported).fold_max_abs_error
    qwen3_file = export_gguf(qwen3_dir, tmp_path / "from-qwen3.gguf", quant="f32").output
    qwen3_error = read_so8t_metadata(open_gguf(qwen3_file), qwen3_file).fold_max_abs_error
    assert so8t_error < 1e-12 and qwen3_error < 1e-6
    assert max(so8t_error, qwen3_error) * 1000 < FOLD_ERROR_LIMIT


def test_the_header_reads_every_key_like_gguf_py(exported):
    """read_gguf_header (what the commands use) agrees with GGUFReader on every key it keeps; it skips only
    the long string arrays (vocabulary, merges)."""
    header, reader = read_gguf_header(exported), gguf.GGUFReader(exported)
    assert set(header.fields) == {key for key in reader.fields if not key.startswith("GGUF.")}
    skipped = set()
    for key, field in header.fields.items():
        expected = reader.get_field(key)
        assert field.types == expected.types, key
        if field.value is None:
            skipped.add(key)
        else:
            assert field.contents() == expected.contents(), key
    assert skipped <= {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}
    assert header.tensor_types == [t.tensor_type for t in reader.tensors]
    assert read_qwen3_hparams(header, exported) == read_qwen3_hparams(reader, exported)
    assert read_so8t_metadata(header, exported).source_sha256 == read_so8t_metadata(reader, exported).source_sha256


# ----------------------------------------------------------------------------------------- stock qwen3
def test_stock_qwen3_inspect_and_modelfile(stock, tmp_path):
    result = cli(main, ["inspect", stock])
    assert result.exit_code == 0, result.output
    assert "no so8t.* metadata" in result.stdout and "qwen3.block_count = 2" in result.stdout
    modelfile = tmp_path / "Modelfile"
    result = cli(main, ["modelfile", stock, "-o", modelfile])
    assert result.exit_code == 0, result.output
    assert "has no so8t.* metadata" in result.stderr
    assert f"FROM {stock}" in modelfile.read_text() or "FROM ../" in modelfile.read_text()


def test_stock_qwen3_runtime_generates_without_scores(stock):
    require_llama_cpp()
    result = cli(runtime_main, [stock, "Is it safe?", "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    scores = payload["so8t"]
    assert scores["safety"] is None and scores["authority"] is None and payload["tokens"] == 4
    assert "has no so8t.* metadata (no SO8T heads)" in result.stderr
    text = cli(runtime_main, [stock, "Is it safe?", "--max-tokens", "2"])
    assert text.exit_code == 0 and "unsafe" not in text.output
    assert text.stderr.splitlines()[-1].startswith("so8t: no so8t.* heads, gate off; 2 tokens")


def test_stock_qwen3_parity_compares_logits_and_skips_heads(stock, so8t_dir, prompts_file):
    require_llama_cpp()
    result = cli(main, ["parity", so8t_dir, stock, "--prompts", prompts_file, "--greedy-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "n/a" in result.stdout and "head columns skipped" in result.stdout and "PASS" in result.stdout
    result = cli(main, ["parity", so8t_dir, stock, "--prompts", prompts_file, "--greedy-tokens", "4", "--json"])
    report = json.loads(result.stdout)
    assert report["passed"] and report["aggregate"]["safety_diff"] is None and report["notes"]


def test_a_broken_chat_template_is_one_line(exported, tmp_path):
    """llama-cpp-python compiles every tokenizer.chat_template* when it loads a model, raw prompts or not."""
    require_llama_cpp()
    path = rewrite_gguf(exported, tmp_path / "jinja.gguf", {"tokenizer.chat_template": ("{% if %}", V.STRING)})
    for args in ([path, "hello"], [path, "hello", "--raw"]):
        assert_one_line_error(cli(runtime_main, args), path, "tokenizer.chat_template is not a valid Jinja template")
    path = rewrite_gguf(exported, tmp_path / "number.gguf", {"tokenizer.chat_template": (5, V.UINT32)})
    assert_one_line_error(cli(runtime_main, [path, "hello"]), path, "tokenizer.chat_template is uint32; expected string")
    path = rewrite_gguf(exported, tmp_path / "none.gguf", {"tokenizer.chat_template": DROP})
    assert_one_line_error(cli(runtime_main, [path, "hello"]), path, "tokenizer.chat_template is missing", "--raw")
    assert cli(runtime_main, [path, "hello", "--raw", "--max-tokens", "2"]).exit_code == 0


def test_runtime_refuses_a_temperature_that_is_not_a_number(exported):
    result = cli(runtime_main, [exported, "hello", "--temperature", "nan"])
    assert result.exit_code == 2 and "--temperature" in result.stderr and "Traceback" not in result.output


def test_llama_cpp_load_errors_carry_llama_cpp_s_reason(exported, tmp_path):
    """A file our checks pass but llama.cpp refuses (a pre-tokenizer it does not know): its own error line,
    which llama-cpp-python's logger drops, is the reason in our one line."""
    require_llama_cpp()
    path = rewrite_gguf(exported, tmp_path / "pre.gguf", {"tokenizer.ggml.pre": ("bogus", V.STRING)})
    assert_one_line_error(cli(runtime_main, [path, "hello"]), path, "llama.cpp could not load the file",
                          "unknown pre-tokenizer type: 'bogus'")


# -------------------------------------------------------------------------------------------- context
def test_generation_stops_at_the_context_end(exported):
    require_llama_cpp()
    result = cli(runtime_main, [exported, "hello", "--ctx-size", "40", "--max-tokens", "500", "--json",
                                "--temperature", "0", "--no-gate"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    # before: a fixed n_ctx and `llama_decode returned 1` once the cache was full
    assert payload["finish_reason"] == "context", payload  # temperature 0: greedy, no end token within 40
    assert "stopped at the end of the context (40 tokens)" in result.stderr


def test_runtime_context_limits(exported):
    require_llama_cpp()
    from so8t_export.runtime import PromptTooLongError, SO8TRuntime

    runtime = SO8TRuntime(exported, n_ctx=32)
    tokens = runtime.tokenize("The quick brown fox jumps over the lazy dog. " * 3)[:30]
    completion = runtime.complete(runtime.detokenize(tokens[:20]), max_tokens=1000, temperature=0.0)
    n = completion.prompt_tokens
    assert completion.finish_reason == "context" and len(completion.tokens) == 32 - n + 1  # the last is not decoded
    assert len(runtime.greedy(tokens, 1000)) <= 32 - len(tokens) + 1
    full = runtime.tokenize("word " * 200)[:32]
    assert runtime.evaluate(full).logits.shape[0] == 32  # exactly n_ctx fits
    with pytest.raises(PromptTooLongError, match=r"the prompt has 33 tokens.*n_ctx = 32"):
        runtime.evaluate(runtime.tokenize("word " * 200)[:33])
    assert SO8TRuntime(exported).n_ctx == 4096  # min(4096, qwen3.context_length = 4096)


def test_a_prompt_longer_than_the_context_is_one_line(exported):
    require_llama_cpp()
    result = cli(runtime_main, [exported, "word " * 300, "--ctx-size", "64", "--raw"])
    assert_one_line_error(result, "the prompt has", "tokens", "n_ctx = 64", "--ctx-size")


def test_batched_evaluation_equals_one_decode(exported):
    """evaluate() decodes n_batch tokens at a time and keeps every chunk's hidden states."""
    require_llama_cpp()
    from so8t_export.runtime import SO8TRuntime

    tokens = SO8TRuntime(exported, n_ctx=256).tokenize("The quick brown fox jumps over the lazy dog. " * 4)
    whole = SO8TRuntime(exported, n_ctx=256, f32_kv_cache=True).evaluate(tokens)
    chunked = SO8TRuntime(exported, n_ctx=256, n_batch=7, f32_kv_cache=True).evaluate(tokens)
    assert len(tokens) > 14
    np.testing.assert_allclose(chunked.hidden, whole.hidden, atol=1e-4)
    np.testing.assert_allclose(chunked.logits, whole.logits, atol=1e-3)
    np.testing.assert_allclose(chunked.safety, whole.safety, atol=1e-5)


# ---------------------------------------------------------------------------------------------- quiet
def test_runtime_is_quiet_by_default_and_verbose_on_request(exported):
    require_llama_cpp()
    quiet = run_cli("runtime_main", [exported, "hello", "--max-tokens", "2"])
    assert quiet.returncode == 0, quiet.stderr
    # our gate line only, e.g. no "llama_init_from_model: model default pooling_type ..."
    assert len(quiet.stderr.splitlines()) == 1 and quiet.stderr.startswith("so8t: "), quiet.stderr
    loud = run_cli("runtime_main", [exported, "hello", "--max-tokens", "2", "--verbose"])
    assert loud.returncode == 0 and "llama_model_loader" in loud.stderr and "pooling_type" in loud.stderr


def test_parity_is_quiet_by_default(exported, so8t_dir, prompts_file):
    require_llama_cpp()
    proc = run_cli("main", ["parity", so8t_dir, exported, "--prompts", prompts_file, "--greedy-tokens", "2"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # neither llama.cpp nor transformers (logger or warnings.warn)
    assert "PASS" in proc.stdout


def test_log_callback_reads_ggml_levels_right(capsys):
    """ggml.h: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (llama-cpp-python 0.3.36 maps 3 as ERROR and 4 as DEBUG)."""
    from so8t_export import llama_log

    llama_log.set_verbose(False)
    for level, text in ((2, b"info line\n"), (3, b"warn line\n"), (1, b"debug\n"), (4, b"error line "),
                        (5, b"continued\n"), (3, b"warn again\n"), (5, b"warn continued\n")):
        llama_log._on_log(level, text, None)
    assert capsys.readouterr().err == "error line continued\n"
    with llama_log.collect_errors() as errors:
        llama_log._on_log(4, b"load: bad tensor\n", None)
    assert errors == ["load: bad tensor\n"] and capsys.readouterr().err == ""
    llama_log.set_verbose(True)
    try:
        llama_log._on_log(2, b"info line\n", None)
        assert capsys.readouterr().err == "info line\n"
    finally:
        llama_log.set_verbose(False)


# ---------------------------------------------------------------------------------------- parity inputs
def test_parity_names_a_broken_tokenizer_file_and_a_non_finite_reference(qwen3_dir, tmp_path):
    import shutil

    import torch

    from so8t_export.parity import load_tokenizer, require_finite_weights

    broken = tmp_path / "model"
    shutil.copytree(qwen3_dir, broken)
    (broken / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=r"tokenizer\.json: tokenizer\.json is not valid JSON"):
        load_tokenizer(broken)
    layer = torch.nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"model: tensor weight has 1 NaN or Inf values"):
        require_finite_weights(layer, "model")
