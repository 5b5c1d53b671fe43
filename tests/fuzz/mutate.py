"""Byte- and structure-level mutators for the bad-input suite: safetensors files, JSON files and GGUF files."""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# ---------------------------------------------------------------------------------------------- safetensors
def st_split(path: Path) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file; the header keeps its key order."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_header_bytes(header) -> bytes:
    text = header if isinstance(header, (bytes, bytearray)) else json.dumps(header, separators=(",", ":")).encode()
    return bytes(text) + b" " * (-len(text) % 8)


def st_join(path: Path, header, data: bytes, *, header_len: int | None = None) -> None:
    """Write a safetensors file from a header (dict, or raw bytes written as they are) and data; header_len
    overrides the 8-byte length prefix."""
    body = st_header_bytes(header)
    n = len(body) if header_len is None else header_len
    Path(path).write_bytes(struct.pack("<Q", n) + body + data)


def st_edit(fn: Callable[[dict, bytes], tuple], file: str = "model.safetensors") -> Callable[[Path], None]:
    """A model-folder mutator that rewrites the header/data of one safetensors file with fn(header, data) ->
    (header or raw header bytes, data[, header_len])."""
    def mutate(model: Path) -> None:
        header, data = st_split(model / file)
        result = fn(header, data)
        st_join(model / file, result[0], result[1], header_len=result[2] if len(result) > 2 else None)
    return mutate


def st_entry(name: str, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    """Mutate one tensor's header entry in place with fn(entry) (its return value is ignored)."""
    def edit(header: dict, data: bytes):
        fn(header[name])
        return header, data
    return st_edit(edit)


def st_set_entry(name: str, value) -> Callable[[Path], None]:
    """Replace one tensor's header entry by value (any JSON value)."""
    def edit(header: dict, data: bytes):
        header[name] = value
        return header, data
    return st_edit(edit)


def st_raw(path: Path) -> bytes:
    return Path(path).read_bytes()


def st_truncate(at: Callable[[int, int, int], int], file: str = "model.safetensors") -> Callable[[Path], None]:
    """Cut a safetensors file at at(size, header_len, data_len)."""
    def mutate(model: Path) -> None:
        raw = (model / file).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        (model / file).write_bytes(raw[: at(len(raw), n, len(raw) - 8 - n)])
    return mutate


def tensors_edit(fn: Callable[[dict], None], file: str = "model.safetensors") -> Callable[[Path], None]:
    """Load every tensor of a safetensors file with safetensors.torch, let fn edit the dict, save it back."""
    def mutate(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(str(model / file))
        fn(state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(model / file), metadata={"format": "pt"})
    return mutate


# ---------------------------------------------------------------------------------------------- JSON files
def json_edit(file: str, fn: Callable[[object], object]) -> Callable[[Path], None]:
    """Mutate a JSON file of the model folder in place with fn(obj) (its return value is ignored, so that
    lambdas may call dict.pop and friends)."""
    def mutate(model: Path) -> None:
        obj = json.loads((model / file).read_text(encoding="utf-8"))
        fn(obj)
        (model / file).write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    return mutate


def json_set(file: str, **values) -> Callable[[Path], None]:
    def fn(obj):
        obj.update(values)
    return json_edit(file, fn)


def json_del(file: str, *keys: str) -> Callable[[Path], None]:
    def fn(obj):
        for key in keys:
            obj.pop(key, None)
    return json_edit(file, fn)


def write_bytes(file: str, data: bytes) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        (model / file).write_bytes(data)
    return mutate


def remove(*files: str) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        for file in files:
            (model / file).unlink()
    return mutate


def make_fifo(file: str) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        (model / file).unlink(missing_ok=True)
        os.mkfifo(model / file)
    return mutate


def make_dir(file: str) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        (model / file).unlink(missing_ok=True)
        (model / file).mkdir()
    return mutate


def chain(*mutators: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        for m in mutators:
            m(model)
    return mutate


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


class Unpickled:
    """Unpickling this creates the marker file: a pickle checkpoint that was loaded leaves evidence."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_bomb(marker: Path) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": Unpickled(marker)})


# ---------------------------------------------------------------------------------------------- GGUF
def gguf_rewrite(src: Path, dst: Path, *, drop: Callable[[str], bool] = lambda key: False,
                 replace: dict | None = None, add: dict | None = None,
                 tensor: Callable[[str, tuple], tuple | None] | None = None,
                 extra_tensors: dict | None = None) -> None:
    """Copy a GGUF with gguf-py, dropping keys, replacing values and adding keys.

    replace/add map key -> (value, GGUFValueType, sub_type or None). Tensors are copied as they are, unless
    tensor(name, numpy_shape) returns None (drop it) or another declared numpy shape (the data stays the
    same); extra_tensors maps names to arrays appended after the others.
    """
    import gguf

    replace = dict(replace or {})
    reader = gguf.GGUFReader(src)
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "qwen3"
    if "general.architecture" in replace:
        arch = replace.pop("general.architecture")[0]
    writer = gguf.GGUFWriter(dst, arch)
    if drop("general.architecture"):
        writer.kv_data[0].pop("general.architecture", None)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or drop(f.name):
            continue
        if f.name in replace:
            value, vtype, sub = replace.pop(f.name)
        else:
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = f.contents()
        writer.add_key_value(f.name, value, vtype, sub_type=sub)
    for key, (value, vtype, sub) in {**replace, **(add or {})}.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    kept = []
    for t in reader.tensors:
        shape = tuple(t.data.shape) if tensor is None else tensor(t.name, tuple(t.data.shape))
        if shape is None:
            continue
        writer.add_tensor_info(t.name, shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        kept.append(t.data)
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        kept.append(array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in kept:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()


def gguf_tensor_info(path: Path, name: str) -> dict[str, int]:
    """File offsets of a tensor info's fields: n_dims (u32), dims (u64 each), type (u32), offset (u64)."""
    import gguf

    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == name)
    at = t.field.offset + 8 + len(name.encode())
    n_dims = len(t.shape)
    return {"n_dims": at, "dims": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}


def gguf_kv_offset(raw: bytes, key: str, vtype: int) -> int:
    """Offset of the value of a key in a GGUF header (after key length, key and value type)."""
    tag = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype)
    at = raw.find(tag)
    if at < 0:
        raise KeyError(key)
    return at + len(tag)


def gguf_data_offset(path: Path) -> int:
    import gguf

    return int(gguf.GGUFReader(path).data_offset)


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
