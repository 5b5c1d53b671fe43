"""Checkpoint IO: safetensors only (never pickle), single or sharded, bf16/f16/f32 or block-FP8.

CheckpointReader hands out one tensor (or one row range) at a time, dequantised to the dtype asked for,
so callers stream and never hold the checkpoint in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

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


def _check_safetensors_file(path: Path) -> tuple[dict, int]:
    """Parse the header and check the file holds every byte it promises (catches truncated downloads)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file: header needs {header_len} bytes, "
                                  f"file has {size - 8}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + header_len + end} bytes, "
                              f"file has {size}")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        expected = math.prod(info["shape"]) * _SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
        if info["dtype"] in _SAFETENSORS_DTYPE_BYTES and stop - start != expected:
            raise CheckpointError(f"{path}: tensor {name}: {stop - start} bytes for shape {info['shape']} "
                                  f"{info['dtype']}; expected {expected}")
    return header, 8 + header_len


class CheckpointReader:
    """Read-only view of a checkpoint folder: config.json plus safetensors weights."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a folder (expected a checkpoint folder with config.json)")
        config_path = self.model_dir / "config.json"
        try:
            self.raw_config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{config_path}: missing (expected a Qwen3 or SO8T config.json)") from None
        self._location = self._index()  # tensor name -> file
        self._headers: dict[Path, tuple[dict, int]] = {
            path: _check_safetensors_file(path) for path in sorted(set(self._location.values()))}
        quant = self.raw_config.get("quantization_config") or {}
        self.fp8_block: tuple[int, int] | None = None
        if quant.get("quant_method") == "fp8":
            block = quant.get("weight_block_size") or [128, 128]
            self.fp8_block = (int(block[0]), int(block[1]))
        elif quant:
            raise CheckpointError(f"{config_path}: quantization_config.quant_method = {quant.get('quant_method')!r}; "
                                  "expected 'fp8' or no quantization_config")
        self._fds: dict[Path, int] = {}

    def _index(self) -> dict[str, Path]:
        index_path = self.model_dir / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_path}: not a safetensors index ({err!r})") from None
            location = {name: self.model_dir / file for name, file in weight_map.items()}
            for file in sorted(set(location.values())):
                if not file.exists():
                    raise CheckpointError(f"{index_path}: shard {file.name} is listed in weight_map but missing "
                                          f"from {self.model_dir}")
            return location
        single = self.model_dir / SINGLE_FILE
        if not single.exists():
            found = sorted(p.name for p in self.model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {', '.join(found)}: pickle checkpoints are never loaded)" if found else ""
            raise CheckpointError(f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        header, _ = _check_safetensors_file(single)
        return {name: single for name in header if name != "__metadata__"}

    # ------------------------------------------------------------------ listing
    def names(self) -> list[str]:
        """Logical tensor names: FP8 scales and activation scales are folded into their weights."""
        return [n for n in self._location if not n.endswith(SCALE_SUFFIX) and not n.endswith(".activation_scale")]

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
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}; expected a float type")
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
        (br, bc), scale = self.fp8_block, self.read_raw(scale_name)
        expected = (math.ceil(shape[0] / br), math.ceil(shape[1] / bc))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{self._file(scale_name)}: tensor {scale_name} has shape {tuple(scale.shape)}; "
                                  f"expected {expected} for {name} {tuple(shape)} in {br}x{bc} blocks")
        first, last, _ = (rows or slice(None)).indices(shape[0])
        weight = self.read_raw(name, rows)
        return BlockFP8.from_torch(weight, scale[first // br: math.ceil(last / br)], self.fp8_block, first % br)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
