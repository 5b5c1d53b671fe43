"""Checkpoint IO: safetensors only (never pickle), single or sharded, bf16/f16/f32 or block-FP8.

CheckpointReader hands out one tensor (or one row range) at a time, dequantised to the dtype asked for,
so callers stream and never hold the checkpoint in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .io import PathError, require_regular_file

if TYPE_CHECKING:
    from .quants import BlockFP8

SCALE_SUFFIX = ".weight_scale_inv"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_SAFETENSORS_DTYPE_BYTES = {name: torch.empty(0, dtype=dtype).element_size()
                            for name, dtype in _SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file, tensor and the mismatch."""


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64", "F8_E4M3")  # what a weight may be stored as


def read_json(path: Path, what: str, error: type[ValueError] = CheckpointError):
    """A JSON input file; one line naming it (as `error`) when it is missing, special, unreadable or not JSON."""
    try:
        require_regular_file(path, what)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except PathError as err:
        raise error(str(err)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: {what} is not valid JSON ({err})") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to be read") from None


def _no_duplicate_keys(path: Path):
    def build(pairs: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            twice = sorted({key for key in keys if keys.count(key) > 1})
            raise CheckpointError(f"{path}: safetensors header has key(s) {', '.join(twice[:4])} more than once "
                                  "in one object; expected each tensor (and field) once")
        return dict(pairs)
    return build


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_safetensors_header(path: Path, size: int, head: bytes) -> tuple[dict, int]:
    """Check a safetensors header as the format defines it (the safetensors library is stricter still):
    8-byte little-endian length, a JSON object of tensor entries {dtype, shape, data_offsets} plus an
    optional __metadata__ of strings, and data offsets that tile the data section exactly, with no overlap,
    hole or byte past the end. Returns (tensor entries, data start). head holds the file's first bytes."""
    if size < 8 or len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len < 2 or header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header length {header_len}; expected 2 to {MAX_HEADER_BYTES} "
                              "bytes (is this a safetensors file?)")
    if 8 + header_len > size:
        raise CheckpointError(f"{path}: truncated safetensors file: header needs {header_len} bytes, "
                              f"file has {size - 8}")
    try:
        header = json.loads(head[8:8 + header_len].decode("utf-8"), object_pairs_hook=_no_duplicate_keys(path))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header, not UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}; expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings, found {metadata!r:.80}")
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            found = sorted(info) if isinstance(info, dict) else type(info).__name__
            raise CheckpointError(f"{where}: header entry must have exactly dtype, shape and data_offsets; "
                                  f"found {found}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(f"{where}: dtype {dtype!r}; expected one of {', '.join(_SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r}; expected [begin, end] with "
                                  "0 <= begin <= end")
        expected = math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype}; "
                                  f"expected {expected}")
        spans.append((offsets[0], offsets[1], name))
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps" if begin < position else f"leaves a hole of {begin - position} bytes after"
            raise CheckpointError(f"{path}: tensor {name} at bytes {begin}..{end} {problem} "
                                  f"{previous or 'the header'}; expected tensors to tile the data exactly")
        position, previous = end, f"tensor {name}"
    data_start = 8 + header_len
    if data_start + position > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {data_start + position} bytes, "
                              f"file has {size}")
    if data_start + position < size:
        raise CheckpointError(f"{path}: {size - data_start - position} bytes after the last tensor; expected the "
                              "file to end with its tensor data")
    return header, data_start


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of one safetensors file (see parse_safetensors_header), read without reading the data."""
    try:
        require_regular_file(path, "safetensors file")
    except PathError as err:
        raise CheckpointError(str(err)) from None
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) == 8:
            head += f.read(min(struct.unpack("<Q", head)[0], MAX_HEADER_BYTES + 1))
    return parse_safetensors_header(path, size, head)


class CheckpointReader:
    """Read-only view of a checkpoint folder: config.json plus safetensors weights. A context manager:
    `with CheckpointReader(folder) as reader:` closes its files however the block ends."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a folder (expected a checkpoint folder with config.json)")
        config_path = self.model_dir / "config.json"
        self.raw_config = read_json(config_path, "config.json")
        if not isinstance(self.raw_config, dict):
            raise CheckpointError(f"{config_path}: a JSON {type(self.raw_config).__name__}; expected an object")
        self._headers: dict[Path, tuple[dict, int]] = {}
        self._location = self._index()  # tensor name -> file
        quant = self.raw_config.get("quantization_config") or {}
        self.fp8_block: tuple[int, int] | None = None
        if not isinstance(quant, dict):
            raise CheckpointError(f"{config_path}: quantization_config = {quant!r:.80}; expected an object")
        if quant.get("quant_method") == "fp8":
            block = quant.get("weight_block_size", [128, 128])
            if not (isinstance(block, list) and len(block) == 2 and all(_is_count(b) and b > 0 for b in block)):
                raise CheckpointError(f"{config_path}: quantization_config.weight_block_size = {block!r}; "
                                      "expected [rows, cols] of positive integers")
            self.fp8_block = (block[0], block[1])
        elif quant:
            raise CheckpointError(f"{config_path}: quantization_config.quant_method = {quant.get('quant_method')!r}; "
                                  "expected 'fp8' or no quantization_config")
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()  # the exporter's encoder threads read through one reader

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _index(self) -> dict[str, Path]:
        index_path = self.model_dir / INDEX_FILE
        if index_path.exists():
            index = read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: key 'weight_map': expected an object mapping tensor names "
                                      f"to shard file names, found {type(weight_map).__name__}")
            for name, file in weight_map.items():
                if not isinstance(file, str):
                    raise CheckpointError(f"{index_path}: weight_map['{name}'] = {file!r}; expected a shard file name")
            location = {}
            for name, file in weight_map.items():
                if Path(file).name != file or file in ("", ".", ".."):
                    raise CheckpointError(f"{index_path}: weight_map['{name}'] = {file!r}; expected a file name "
                                          f"inside {self.model_dir}")
                location[name] = self.model_dir / file
            for file in sorted(set(location.values())):
                if not file.exists():
                    raise CheckpointError(f"{index_path}: shard {file.name} is listed in weight_map but missing "
                                          f"from {self.model_dir}")
                self._headers[file] = read_safetensors_header(file)
            stored = {}
            for file, (header, _) in self._headers.items():
                for name in header:
                    if name in stored:
                        raise CheckpointError(f"{self.model_dir}: tensor {name} is stored in both {stored[name].name} "
                                              f"and {file.name}; expected it once")
                    stored[name] = file
            for name, file in location.items():
                if stored.get(name) != file:
                    found = f"it is in {stored[name].name}" if name in stored else "no shard holds it"
                    raise CheckpointError(f"{index_path}: weight_map puts tensor {name} in {file.name}, but {found}")
            unindexed = sorted(set(stored) - set(location))
            if unindexed:
                raise CheckpointError(f"{index_path}: weight_map lacks tensor(s) {', '.join(unindexed[:4])} stored in "
                                      f"{stored[unindexed[0]].name}; expected every stored tensor indexed")
            return location
        single = self.model_dir / SINGLE_FILE
        if not single.exists():
            found = sorted(p.name for p in self.model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {', '.join(found)}: pickle checkpoints are never loaded)" if found else ""
            raise CheckpointError(f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self._headers[single] = read_safetensors_header(single)
        return {name: single for name in self._headers[single][0]}

    # ------------------------------------------------------------------ listing
    def names(self) -> list[str]:
        """Logical tensor names: FP8 scales and activation scales are folded into their weights."""
        return [n for n in self._location if not n.endswith(SCALE_SUFFIX) and not n.endswith(".activation_scale")]

    def scale_names(self) -> list[str]:
        """The FP8 block scales, which names() leaves out."""
        return [n for n in self._location if n.endswith(SCALE_SUFFIX)]

    def location(self, name: str) -> Path:
        """The safetensors file that stores a tensor."""
        return self._file(name)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def info(self, name: str) -> dict:
        """The safetensors header entry (dtype, shape) of a tensor, without reading it."""
        return self._headers[self._file(name)][0][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info(name)["shape"])

    def files(self) -> list[Path]:
        return sorted(self._headers)

    def _file(self, name: str) -> Path:
        try:
            return self._location[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir}: tensor {name} is missing from the checkpoint") from None

    def _fd(self, path: Path) -> int:
        with self._fds_lock:  # unlocked, two threads' first reads of a file both opened it and one fd leaked
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read_raw(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The stored tensor (or a row range) as is, read with pread into fresh memory.

        Reading instead of memory-mapping keeps the source's page cache out of this process's RSS, so a
        streaming export's peak RSS is its working set, not the size of the checkpoint.
        """
        path = self._file(name)
        header, data_start = self._headers[path]
        info = header[name]
        shape = list(info["shape"])
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]  # parse_safetensors_header vouched for it
        start, stop = info["data_offsets"]
        if rows is not None:
            first, last, _ = rows.indices(shape[0])
            row_bytes = (stop - start) // max(1, shape[0])
            start, stop, shape[0] = start + first * row_bytes, start + last * row_bytes, last - first
        buffer = np.empty(stop - start, dtype=np.uint8)
        view, offset = memoryview(buffer), data_start + start
        while view.nbytes:  # pread may return short reads on large requests
            got = os.preadv(self._fd(path), [view], offset)
            if got <= 0:
                raise CheckpointError(f"{path}: truncated safetensors file while reading tensor {name}")
            view, offset = view[got:], offset + got
        return torch.from_numpy(buffer).view(dtype).view(shape)

    # ------------------------------------------------------------------ reading
    def read(self, name: str, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """One tensor (or a row range of it), as dtype. FP8 is dequantised in float32 (e4m3 * scale rounded
        once, as llama.cpp's converter does), then cast."""
        fp8 = self.read_fp8(name, rows)
        if fp8 is not None:
            return fp8.dequantize().to(dtype)
        return self.read_raw(name, rows).to(dtype)

    def read_fp8(self, name: str, rows: slice | None = None) -> BlockFP8 | None:
        """A block-FP8 tensor (or a row range) as stored, with the scales of the tiles it touches; None when
        the tensor is not FP8."""
        path = self._file(name)
        if self.info(name)["dtype"] != "F8_E4M3":
            return None
        scale_name = name.removesuffix(".weight") + SCALE_SUFFIX
        if self.fp8_block is None or scale_name not in self._location:
            raise CheckpointError(f"{path}: tensor {name} is float8_e4m3fn but has no {scale_name} "
                                  "(expected quantization_config.quant_method = 'fp8' with block scales)")
        shape = self.shape(name)
        scale_dtype = self.info(scale_name)["dtype"]
        if len(shape) != 2 or scale_dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{self._file(scale_name)}: tensor {name} {list(shape)} with scales {scale_name} "
                                  f"{scale_dtype}; expected a 2-D float8 weight and F32, BF16 or F16 scales")
        (br, bc), scale = self.fp8_block, self.read_raw(scale_name)
        expected = (math.ceil(shape[0] / br), math.ceil(shape[1] / bc))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{self._file(scale_name)}: tensor {scale_name} has shape {tuple(scale.shape)}; "
                                  f"expected {expected} for {name} {tuple(shape)} in {br}x{bc} blocks")
        first, last, _ = (rows or slice(None)).indices(shape[0])
        weight = self.read_raw(name, rows)
        from .quants import BlockFP8  # the encoders (numba, gguf) are the exporter's; loading needs neither

        return BlockFP8.from_torch(weight, scale[first // br: math.ceil(last / br)], self.fp8_block, first % br)

    def close(self) -> None:
        with self._fds_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
