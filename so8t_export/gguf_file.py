"""Reading a GGUF safely: one place that opens a file, checks its structure and reads typed keys.

Every command that reads a GGUF (inspect, parity, modelfile, the runtime) goes through ``read_gguf_header``
(metadata only) or ``open_gguf`` (a gguf-py ``GGUFReader``, after the same checks), so a bad file ends in one
``MetadataError`` naming the file and what is wrong, never in a traceback, a hang or a native abort inside
llama.cpp:

* ``io.require_regular_file`` first: opening a FIFO would block forever, a folder or device is no GGUF.
* a structural pass over the header with ``struct``/``np.frombuffer`` checks every length against the bytes
  that are left, the value types, UTF-8, duplicate keys, the tensor infos and that every tensor's data lies
  inside the file. gguf-py's ``GGUFReader`` checks none of that: a truncated file fails in numpy or with an
  ``IndexError`` somewhere, and an array whose element count was corrupted to 2**40 makes it loop for
  ever (each read past the end returns an empty view, not an error).
* the same pass keeps the values (``GGUFHeader``; only string arrays longer than STRING_ARRAY_LIMIT, i.e.
  the vocabulary and the merges, are skipped), in ~0.04 s where GGUFReader takes 4-7 s for Qwen3's
  151936-token vocabulary. The runtime, parity and inspect need nothing else: llama.cpp reads the tensors.

``Qwen3Hparams``/``read_qwen3_hparams`` check the ``qwen3.*`` hyperparameters that llama.cpp asserts on
(``GGML_ASSERT`` aborts the whole process, so a hand-edited or foreign file must be refused before it is
handed to llama.cpp); see the function for the list and where each assertion lives.

This module needs only gguf-py and numpy (no torch).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .config import LLAMA_MAX_LAYERS
from .io import require_regular_file

__all__ = ["GGUFHeader", "HeaderField", "MetadataError", "Qwen3Hparams", "array_value", "finite", "has_key",
           "open_gguf", "read_gguf_header", "read_qwen3_hparams", "scalar_value", "type_name"]

_V = gguf.GGUFValueType
GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf-py 0.19's GGUFReader reads (v1 is gone from llama.cpp too)
GGML_MAX_DIMS = 4  # ggml's limit on tensor dimensions (gguf.cpp refuses more)
GGML_MAX_NAME = 64  # ggml's tensor-name buffer, terminating NUL included

# Bytes per scalar of each GGUF value type (string and array are variable).
_SCALAR_FORMATS = {_V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I", _V.INT32: "i",
                   _V.FLOAT32: "f", _V.BOOL: "?", _V.UINT64: "Q", _V.INT64: "q", _V.FLOAT64: "d"}
_TYPE_NAMES = {_V.UINT8: "uint8", _V.INT8: "int8", _V.UINT16: "uint16", _V.INT16: "int16",
               _V.UINT32: "uint32", _V.INT32: "int32", _V.FLOAT32: "float32", _V.BOOL: "bool",
               _V.STRING: "string", _V.ARRAY: "array", _V.UINT64: "uint64", _V.INT64: "int64",
               _V.FLOAT64: "float64"}


class MetadataError(ValueError):
    """A GGUF that cannot be read, or whose metadata is missing, mistyped or inconsistent; names the file
    and the key."""


def type_name(types: list | tuple) -> str:
    """'uint32', 'array of float32', ...: a ReaderField's types as a reader would say them."""
    if not types:
        return "nothing"
    if types[0] == _V.ARRAY:
        return f"array of {_TYPE_NAMES.get(types[-1], str(types[-1]))}" if len(types) > 1 else "empty array"
    return _TYPE_NAMES.get(types[0], str(types[0]))


# ------------------------------------------------------------------------------------------- structure
STRING_ARRAY_LIMIT = 4096  # string arrays up to this length are kept (labels); longer ones (the vocabulary,
# the merges: 151936 strings in Qwen3) are checked but not decoded, their contents() is None


@dataclass(frozen=True)
class HeaderField:
    """One key as read_gguf_header found it: its types as GGUFReader lists them (``[type]`` or
    ``[ARRAY, element type]``), its value (a list for arrays; None for long string arrays and nested
    arrays) and, for arrays, the element count."""

    types: list
    value: object
    count: int | None = None
    span: tuple[int, int] | None = None  # the pair's bytes in the file, key name to end of value

    def contents(self):
        return self.value


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor info: name, ggml type and shape in ggml order (ne0 first), like GGUFReader's ReaderTensor."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data_offset: int  # absolute, in the file
    n_bytes: int


@dataclass
class GGUFHeader:
    """A GGUF's metadata without GGUFReader: ``get_field``/``fields`` work like GGUFReader's for every key
    whose value is kept (read_qwen3_hparams and metadata.read_so8t_metadata take either), plus the tensor
    infos. Reading it costs ~0.04 s where GGUFReader parses a Qwen3 vocabulary in 4-7 s."""

    path: Path
    version: int
    fields: dict
    tensors: list  # HeaderTensor, in file order
    # Where things lie, for rewriting the metadata without touching the tensors (heads.set_heads).
    byte_order: str = "<"  # struct's prefix: "<" or ">"
    tensor_info_span: tuple[int, int] = (0, 0)
    data_start: int = 0  # tensor data offsets are relative to this, a multiple of alignment
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT

    @property
    def tensor_types(self) -> list:
        return [t.tensor_type for t in self.tensors]

    def get_field(self, key: str) -> HeaderField | None:
        return self.fields.get(key)


class _Scanner:
    """Walks a GGUF header with struct.unpack_from on an mmap, checking each length before it is used."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.offset = path, buf, size, 0
        self.order = "<"

    def fail(self, what: str) -> MetadataError:
        return MetadataError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.offset + n > self.size:
            raise self.fail(f"truncated in {what}: {n} bytes needed at offset {self.offset}, but the file "
                            f"has {self.size} bytes")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(self.order + fmt)
        self.need(n, what)
        values = struct.unpack_from(self.order + fmt, self.buf, self.offset)
        self.offset += n
        return values if len(values) > 1 else values[0]

    def string(self, what: str) -> str:
        length = self.unpack("Q", f"the length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        data = bytes(self.buf[self.offset:self.offset + length])
        self.offset += length
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not UTF-8 ({err.reason} at byte {err.start})") from None

    def field(self, vtype: int, key: str) -> HeaderField:
        """The value of key, of type vtype."""
        try:
            vtype = _V(vtype)
        except ValueError:
            raise self.fail(f"metadata key {key} has unknown value type {vtype}") from None
        if vtype in _SCALAR_FORMATS:
            return HeaderField([vtype], self.unpack(_SCALAR_FORMATS[vtype], f"the value of {key}"))
        if vtype == _V.STRING:
            return HeaderField([vtype], self.string(f"the string value of {key}"))
        item_type, count = self.unpack("IQ", f"the array header of {key}")
        try:
            item_type = _V(item_type)
        except ValueError:
            raise self.fail(f"metadata key {key} is an array of unknown value type {item_type}") from None
        return HeaderField([vtype, item_type], self.array(item_type, count, key), count)

    def array(self, item_type, count: int, key: str, depth: int = 0):
        if item_type in _SCALAR_FORMATS:
            dtype = np.dtype(self.order + _SCALAR_FORMATS[item_type])
            self.need(count * dtype.itemsize, f"the {count} {_TYPE_NAMES[item_type]} values of {key}")
            values = np.frombuffer(self.buf, dtype, count, self.offset).tolist()
            self.offset += count * dtype.itemsize
            return values
        if item_type == _V.STRING:
            self.need(count * 8, f"the {count} strings of {key}")  # each at least its 8-byte length
            if count <= STRING_ARRAY_LIMIT:
                return [self.string(f"string {i} of {key}") for i in range(count)]
            unpack_from, buf, size, offset = struct.unpack_from, self.buf, self.size, self.offset
            fmt = self.order + "Q"
            for i in range(count):  # the hot loop of a real vocabulary: lengths only
                if offset + 8 > size:
                    self.offset = offset
                    self.need(8, f"the length of string {i} of {key}")
                offset += 8 + unpack_from(fmt, buf, offset)[0]
                if offset > size:
                    self.offset = offset - 8  # (approximately) where that string starts
                    raise self.fail(f"truncated in string {i} of {key}: it runs past the end of the file "
                                    f"({size} bytes)")
            self.offset = offset
            return None
        # arrays of arrays (no Qwen3 key has them): checked, not kept
        if depth >= 4:
            raise self.fail(f"metadata key {key} nests arrays more than 4 deep")
        self.need(count * 12, f"the {count} nested arrays of {key}")  # each at least its 12-byte header
        for _ in range(count):
            inner_type, inner_count = self.unpack("IQ", f"a nested array header of {key}")
            try:
                inner_type = _V(inner_type)
            except ValueError:
                raise self.fail(f"metadata key {key} nests an array of unknown value type "
                                f"{inner_type}") from None
            self.array(inner_type, inner_count, key, depth + 1)
        return None


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Check a GGUF's structure and read its metadata, without GGUFReader: the header, every key-value
    pair, every tensor info, and that each tensor's data lies within the file.

    Raises MetadataError naming the file (PathError, also a ValueError, for a missing file or one that is not
    a regular file, checked before it is opened: a FIFO would block the open).
    """
    path = Path(path)
    require_regular_file(path, "GGUF file")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise MetadataError(f"{path}: not a valid GGUF file: the file is empty (0 bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _scan(_Scanner(path, buf, size))
    except OSError as err:
        raise MetadataError(f"{path}: cannot read the GGUF file: {err.strerror or err}") from None


def _scan(s: _Scanner) -> GGUFHeader:
    s.need(4, "the GGUF magic")
    magic = bytes(s.buf[0:4])
    if magic != GGUF_MAGIC:
        raise s.fail(f"the first 4 bytes are {magic!r}, expected the GGUF magic b'GGUF'")
    s.offset = 4
    version = s.unpack("I", "the GGUF version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order (gguf-py reads those too)
        s.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        raise s.fail(f"GGUF version {version}; expected one of {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors, n_kv = s.unpack("QQ", "the tensor and key-value counts")
    # Each key-value pair takes at least 8 + 1 + 4 + 1 bytes and each tensor info 8 + 1 + 4 + 4 + 8.
    if n_kv * 14 > s.size or n_tensors * 25 > s.size:
        raise s.fail(f"truncated or corrupt: the header claims {n_tensors} tensors and {n_kv} key-value "
                     f"pairs, more than a {s.size}-byte file can hold")
    fields: dict[str, HeaderField] = {}
    for i in range(n_kv):
        start = s.offset
        key = s.string(f"the name of key-value pair {i}")
        if not key:
            raise s.fail(f"key-value pair {i} has an empty name")
        if key in fields:
            raise s.fail(f"metadata key {key} appears twice")
        field = s.field(s.unpack("I", f"the value type of {key}"), key)
        fields[key] = dataclasses.replace(field, span=(start, s.offset))
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        field = fields["general.alignment"]
        if field.types != [_V.UINT32]:
            raise s.fail(f"general.alignment is {type_name(field.types)}; expected uint32")
        if field.value == 0 or field.value & (field.value - 1):
            raise s.fail(f"general.alignment = {field.value}; expected a power of two")
        alignment = field.value
    tensors = []
    tensor_info_start = s.offset
    names: set[str] = set()
    expected_offset, previous, previous_desc = 0, None, ""
    for i in range(n_tensors):
        name = s.string(f"the name of tensor {i}")
        if len(name.encode()) >= GGML_MAX_NAME:
            raise s.fail(f"tensor name {name[:80]!r} is {len(name.encode())} bytes; "
                         f"at most {GGML_MAX_NAME - 1}")
        if name in names:
            raise s.fail(f"tensor {name} appears twice")
        names.add(name)
        n_dims = s.unpack("I", f"the dimension count of tensor {name}")
        if n_dims > GGML_MAX_DIMS:
            raise s.fail(f"tensor {name} has {n_dims} dimensions; at most {GGML_MAX_DIMS}")
        dims = s.unpack("Q" * n_dims, f"the shape of tensor {name}") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        raw_type = s.unpack("I", f"the type of tensor {name}")
        try:
            ttype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise s.fail(f"tensor {name} has unknown ggml type {raw_type}") from None
        if dims and dims[0] % block:
            raise s.fail(f"tensor {name} of type {ttype.name} has {dims[0]} elements per row, not a multiple "
                         f"of its block size {block}")
        n_elements = math.prod(dims)
        if n_elements > 2**62:
            raise s.fail(f"tensor {name} has shape {list(dims)}, too large for any file")
        offset = s.unpack("Q", f"the data offset of tensor {name}")
        if offset % alignment:
            raise s.fail(f"tensor {name} has data offset {offset}, not a multiple of the alignment "
                         f"{alignment}")
        n_bytes = n_elements * type_size // block
        if n_bytes > s.size:
            raise s.fail(f"truncated or corrupt: tensor {name} ({ttype.name}, shape {list(dims)}) takes "
                         f"{n_bytes} bytes, more than the whole file ({s.size} bytes)")
        # ggml (gguf.cpp) lays tensors out back to back in info order, each padded to the alignment, and
        # refuses any other offset: a changed type or shape shows up at the next tensor.
        if offset != expected_offset:
            after = f" after {previous} ({previous_desc})" if previous else ""
            raise s.fail(f"tensor {name} has data offset {offset}; expected {expected_offset}{after}: a "
                         "type or shape does not match the tensor data")
        expected_offset += -(-n_bytes // alignment) * alignment
        previous, previous_desc = name, f"{ttype.name}, shape {list(dims)}"
        tensors.append((name, ttype, dims, offset, n_bytes))
    data_start = -(-s.offset // alignment) * alignment
    for name, _, _, offset, n_bytes in tensors:
        end = data_start + offset + n_bytes
        if end > s.size:
            raise s.fail(f"truncated in the data of tensor {name}: bytes {data_start + offset}..{end} "
                         f"needed, but the file has {s.size} bytes")
    return GGUFHeader(s.path, version, fields,
                      [HeaderTensor(name, ttype, dims, data_start + offset, n_bytes)
                       for name, ttype, dims, offset, n_bytes in tensors],
                      byte_order=s.order, tensor_info_span=(tensor_info_start, s.offset), data_start=data_start,
                      alignment=alignment)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A gguf-py GGUFReader for path (for callers that need the tensors or every string), after
    read_gguf_header's checks; anything GGUFReader still raises becomes MetadataError naming the file.
    Metadata-only readers use read_gguf_header itself: the same checks, without GGUFReader's parse."""
    path = Path(path)
    read_gguf_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - whatever gguf-py or numpy raise on a file the scan let through
        what = str(err) or type(err).__name__
        raise MetadataError(f"{path}: not a valid GGUF file: {what}") from None


# ------------------------------------------------------------------------------------------- typed keys
def has_key(reader: gguf.GGUFReader, key: str) -> bool:
    return reader.get_field(key) is not None


def _field(reader: gguf.GGUFReader, key: str, path):
    field = reader.get_field(key)
    if field is None:
        raise MetadataError(f"{path}: metadata key {key} is missing")
    return field


def _expected(types) -> str:
    names = [_TYPE_NAMES[t] for t in types]
    return names[0] if len(names) == 1 else " or ".join(names)


def scalar_value(reader: gguf.GGUFReader, key: str, path, types: tuple, *, required: bool = True,
                 default=None):
    """The value of a scalar key whose GGUF type is one of types; MetadataError names the key, the
    expected and the found type."""
    field = reader.get_field(key)
    if field is None:
        if required:
            raise MetadataError(f"{path}: metadata key {key} is missing")
        return default
    if len(field.types) != 1 or field.types[0] not in types:
        raise MetadataError(f"{path}: {key} is {type_name(field.types)}; expected {_expected(types)}")
    return field.contents()


def array_value(reader: gguf.GGUFReader, key: str, path, types: tuple, *, length: int | None = None,
                length_of: str = "") -> list:
    """The values of an array key whose elements have one of types (an empty array passes any types)."""
    field = _field(reader, key, path)
    if not field.types or field.types[0] != _V.ARRAY:
        raise MetadataError(f"{path}: {key} is {type_name(field.types)}; "
                            f"expected an array of {_expected(types)}")
    try:
        values = field.contents()
    except UnicodeDecodeError as err:
        raise MetadataError(f"{path}: {key} holds a string that is not UTF-8 ({err.reason})") from None
    if values and (len(field.types) != 2 or field.types[-1] not in types):
        raise MetadataError(f"{path}: {key} is {type_name(field.types)}; "
                            f"expected an array of {_expected(types)}")
    if length is not None and len(values) != length:
        raise MetadataError(f"{path}: {key} has {len(values)} values; expected {length}"
                            + (f" ({length_of})" if length_of else ""))
    return values


# ------------------------------------------------------------------------------------------ hparams
@dataclass(frozen=True)
class Qwen3Hparams:
    """The qwen3.* hyperparameters llama.cpp reads, checked against what it asserts on."""

    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    rms_epsilon: float
    rope_freq_base: float
    vocab_size: int = 0  # len(tokenizer.ggml.tokens)


_U32 = (_V.UINT32,)
_F32 = (_V.FLOAT32,)


def read_qwen3_hparams(reader: GGUFHeader | gguf.GGUFReader, path) -> Qwen3Hparams:
    """Check general.architecture, the qwen3.* keys, the vocabulary and the tensors before llama.cpp sees
    the file.

    llama.cpp (0.3.36's vendored copy) reads these with exact types (a u32 key stored as i32 or f32 is a
    load error, which we name here instead) and aborts the process (GGML_ASSERT) on:

    * block_count 0 or > LLAMA_MAX_LAYERS (512): ``llama_model_base::load_hparams``;
    * layer_norm_rms_epsilon negative or NaN: ``GGML_ASSERT(eps >= 0.0f)`` in ggml-cpu's rms_norm, at the
      first decode (context creation reserves the graph and runs it);
    * key_length != value_length, or a rope.dimension_count other than key_length: the qwen3 graph asserts
      ``n_embd_head_v == n_embd_head_k == n_rot`` (``src/models/qwen3.cpp``); an odd head size fails
      NEOX RoPE's ``n_dims % 2 == 0``;
    * head_count not a multiple of head_count_kv: grouped-query attention broadcasts K/V over query heads
      (ggml_mul_mat asserts ``ne02 % ne12 == 0``).

    Zero head counts, context or feed-forward lengths, an embedding_length that head_count does not
    divide (when key_length is absent, llama.cpp takes embedding_length / head_count) and a non-finite or
    non-positive rope.freq_base make no sense for a Qwen3 file either and are refused the same way.

    Then the vocabulary (``_check_vocab``: a 'llama' tokenizer model on this vocabulary aborts llama.cpp too)
    and the tensors against these numbers (``_check_tensors``), so that a file that passes is one llama.cpp's
    qwen3 loader accepts. reader: a GGUFHeader (read_gguf_header) or a gguf-py GGUFReader.
    """
    arch = scalar_value(reader, "general.architecture", path, (_V.STRING,))
    if arch != "qwen3":
        raise MetadataError(f"{path}: general.architecture = {arch!r}; expected 'qwen3' "
                            "(so8t runs Qwen3 GGUFs)")

    def count(key: str, *, required: bool = True, default=None) -> int:
        value = scalar_value(reader, key, path, _U32, required=required, default=default)
        if value is not None and value <= 0:
            raise MetadataError(f"{path}: {key} = {value}; expected a positive integer")
        return value

    def real(key: str, *, required: bool = True, default=None) -> float:
        value = scalar_value(reader, key, path, _F32, required=required, default=default)
        if not math.isfinite(value):
            raise MetadataError(f"{path}: {key} = {value:.7g}; expected a finite number")
        return float(value)

    context_length = count("qwen3.context_length")
    hidden = count("qwen3.embedding_length")
    layers = count("qwen3.block_count")
    if layers > LLAMA_MAX_LAYERS:
        raise MetadataError(f"{path}: qwen3.block_count = {layers}; llama.cpp supports at most "
                            f"{LLAMA_MAX_LAYERS}")
    ff = count("qwen3.feed_forward_length")
    heads = count("qwen3.attention.head_count")
    kv_heads = count("qwen3.attention.head_count_kv", required=False, default=heads)
    if heads % kv_heads:
        raise MetadataError(f"{path}: qwen3.attention.head_count = {heads} is not a multiple of "
                            f"qwen3.attention.head_count_kv = {kv_heads}; expected whole query groups per "
                            "KV head")
    if not has_key(reader, "qwen3.attention.key_length") and hidden % heads:
        raise MetadataError(f"{path}: qwen3.embedding_length = {hidden} is not a multiple of "
                            f"qwen3.attention.head_count = {heads}, and qwen3.attention.key_length is "
                            "missing")
    key_length = count("qwen3.attention.key_length", required=False, default=hidden // heads)
    value_length = count("qwen3.attention.value_length", required=False, default=hidden // heads)
    if value_length != key_length:
        raise MetadataError(f"{path}: qwen3.attention.value_length = {value_length}; expected "
                            f"qwen3.attention.key_length = {key_length} (llama.cpp's qwen3 needs equal "
                            "head sizes)")
    if key_length % 2:
        raise MetadataError(f"{path}: qwen3.attention.key_length = {key_length}; expected an even head "
                            "size (RoPE)")
    rope_dims = count("qwen3.rope.dimension_count", required=False, default=key_length)
    if rope_dims != key_length:
        raise MetadataError(f"{path}: qwen3.rope.dimension_count = {rope_dims}; expected "
                            f"qwen3.attention.key_length = {key_length} (Qwen3 rotates the whole head)")
    eps = real("qwen3.attention.layer_norm_rms_epsilon")
    if eps < 0:
        raise MetadataError(f"{path}: qwen3.attention.layer_norm_rms_epsilon = {eps:.7g}; expected a "
                            "finite number >= 0")
    freq_base = real("qwen3.rope.freq_base", required=False, default=10000.0)
    if freq_base <= 0:
        raise MetadataError(f"{path}: qwen3.rope.freq_base = {freq_base:.7g}; expected a positive number")
    hparams = Qwen3Hparams(context_length=context_length, embedding_length=hidden, block_count=layers,
                           feed_forward_length=ff, head_count=heads, head_count_kv=kv_heads,
                           key_length=key_length, value_length=value_length, rms_epsilon=eps,
                           rope_freq_base=freq_base, vocab_size=_check_vocab(reader, path))
    _check_tensors(reader, path, hparams)
    return hparams


def _array_length(field) -> int:
    if isinstance(field, HeaderField):
        return field.count
    return len(field.data)  # a GGUFReader field has one data index per element


_TOKEN_ID = re.compile(r"tokenizer\.ggml\.[a-z_]+_token_id")


def _check_vocab(reader, path) -> int:
    """The vocabulary size, after what llama.cpp needs of a Qwen3 (byte-level BPE) vocabulary: model 'gpt2'
    (read as 'llama', SentencePiece, llama.cpp throws std::out_of_range from a lookup and aborts), tokens,
    token types of the same length, merges, and special-token ids inside the vocabulary."""
    model = scalar_value(reader, "tokenizer.ggml.model", path, (_V.STRING,))
    if model != "gpt2":
        raise MetadataError(f"{path}: tokenizer.ggml.model = {model!r}; expected 'gpt2' (Qwen3's byte-level "
                            "BPE vocabulary)")
    for key, item in (("tokenizer.ggml.tokens", _V.STRING), ("tokenizer.ggml.merges", _V.STRING),
                      ("tokenizer.ggml.token_type", _V.INT32)):
        field = reader.get_field(key)
        if field is None:
            if key == "tokenizer.ggml.token_type":
                continue
            raise MetadataError(f"{path}: metadata key {key} is missing (llama.cpp needs it for a 'gpt2' "
                                "vocabulary)")
        if field.types[0] != _V.ARRAY or (_array_length(field) and field.types[-1] != item):
            raise MetadataError(f"{path}: {key} is {type_name(field.types)}; expected an array of "
                                f"{_TYPE_NAMES[item]}")
    n_vocab = _array_length(reader.get_field("tokenizer.ggml.tokens"))
    if n_vocab == 0:
        raise MetadataError(f"{path}: tokenizer.ggml.tokens is empty; expected the vocabulary")
    types = reader.get_field("tokenizer.ggml.token_type")
    if types is not None and _array_length(types) != n_vocab:
        raise MetadataError(f"{path}: tokenizer.ggml.token_type has {_array_length(types)} values; expected "
                            f"{n_vocab} (one per token of tokenizer.ggml.tokens)")
    for key in reader.fields:
        if _TOKEN_ID.fullmatch(key):
            value = scalar_value(reader, key, path, (_V.UINT32,))
            if value >= n_vocab:
                raise MetadataError(f"{path}: {key} = {value}; expected a token id below the vocabulary size "
                                    f"{n_vocab} (len(tokenizer.ggml.tokens))")
    return n_vocab


def _check_tensors(reader, path, h: Qwen3Hparams) -> None:
    """The tensors llama.cpp's qwen3 loader creates (src/models/qwen3.cpp), with their shapes in ggml order:
    a missing, misshapen or unknown tensor is a clean load error there, and here it is one before Ollama or
    llama.cpp see the file, naming the qwen3.* keys the shape comes from. Q/K/V may be one fused attn_qkv;
    biases and output.weight are optional."""
    E = (h.embedding_length, "qwen3.embedding_length")
    V = (h.vocab_size, "len(tokenizer.ggml.tokens)")
    F = (h.feed_forward_length, "qwen3.feed_forward_length")
    K = (h.key_length, "qwen3.attention.key_length")
    Q = (h.key_length * h.head_count, "qwen3.attention.key_length x head_count")
    KV = (h.key_length * h.head_count_kv, "qwen3.attention.key_length x head_count_kv")
    QKV = (Q[0] + 2 * KV[0], "q + k + v widths")
    required = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    optional = {"output.weight": (E, V), "cls_out.weight": None, "cls_out.bias": None}
    found = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    for i in range(h.block_count):
        b = f"blk.{i}."
        required.update({
            b + "attn_norm.weight": (E,), b + "attn_output.weight": (Q, E), b + "attn_q_norm.weight": (K,),
            b + "attn_k_norm.weight": (K,), b + "ffn_norm.weight": (E,), b + "ffn_gate.weight": (E, F),
            b + "ffn_up.weight": (E, F), b + "ffn_down.weight": (F, E),
        })
        optional.update({b + "attn_qkv.weight": (E, QKV), b + "attn_qkv.bias": (QKV,), b + "attn_q.bias": (Q,),
                         b + "attn_k.bias": (KV,), b + "attn_v.bias": (KV,)})
        separate = {b + "attn_q.weight": (E, Q), b + "attn_k.weight": (E, KV), b + "attn_v.weight": (E, KV)}
        (optional if b + "attn_qkv.weight" in found else required).update(separate)
    for name, shape in found.items():
        expected = required.get(name, optional.get(name, ()))
        if expected == ():
            layer = re.match(r"blk\.(\d+)\.", name)
            why = (f"qwen3.block_count = {h.block_count}, so layers 0..{h.block_count - 1}"
                   if layer and int(layer.group(1)) >= h.block_count else "not a Qwen3 tensor")
            raise MetadataError(f"{path}: tensor {name} is not one llama.cpp's qwen3 model loads ({why})")
        if expected is not None and _padded(shape) != _padded(tuple(v for v, _ in expected)):
            raise MetadataError(f"{path}: tensor {name} has shape {list(shape)}; expected "
                                f"{[v for v, _ in expected]} = [{', '.join(k for _, k in expected)}] (ggml order)")
    for name in required:
        if name not in found:
            layer = name.startswith("blk.")
            raise MetadataError(f"{path}: tensor {name} is missing" + (
                f" (qwen3.block_count = {h.block_count} layers need it)" if layer else
                " (llama.cpp's qwen3 model needs it)"))


def _padded(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape) + (1,) * (GGML_MAX_DIMS - len(shape))


def finite(values, key: str, path) -> np.ndarray:
    """values as float32, or MetadataError when any is NaN or infinite."""
    array = np.asarray(values, dtype=np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise MetadataError(f"{path}: {key} has {int(bad.sum())} NaN or Inf values (the first at index "
                            f"{first}); expected finite numbers")
    return array
