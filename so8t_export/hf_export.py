"""SO8T or Qwen3 checkpoint -> a stock Hugging Face Qwen3 checkpoint (bf16, or Qwen's block FP8) that vLLM,
SGLang and transformers load as it is.

The rotations are folded into q/k/v (rows) and gate/up (columns) exactly as for the GGUF export, by the same
code (export.FoldedTensors: read, check, fold in float64, check the fold), one tensor or row chunk at a time.
vLLM refuses unknown tensors in the weights, so the two classification heads go into so8t_heads.safetensors
beside them, described by an `so8t` block in config.json. The folder is written under a temporary name and
renamed at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE, CheckpointReader
from .config import HEAD_LABELS
from .export import (FOLD_ERROR_LIMIT, ROW_ALIGN, DirectFile, ExportError, FoldedTensors, Source, encoded_stream,
                     qwen3_weights, read_source)
from .io import PathError, current_umask, fsync_folder
from .loading import HEADS, TOKENIZER_FILES, resolve_dtype
from .quants import BlockFP8, quantize_fp8

HEADS_FILE = "so8t_heads.safetensors"
# transformers 4's save_pretrained default (transformers 5 raised it to 50GB); Qwen3-4B in bf16 is then two
# shards, and a single shard over it is written whole, as transformers does.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
FP8_BLOCK = (128, 128)
# The linear projections vLLM's Fp8LinearMethod quantises. Embeddings and the LM head always load unquantised
# there (VocabParallelEmbedding, ParallelLMHead), so they stay bf16, like the norms.
_FP8_PROJECTION = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.(?:[qkvo]|gate|up|down)_proj\.weight$")
# Qwen3-4B-Thinking-2507-FP8's quantization_config, as bench/make_checkpoint.py writes its FP8 twin's (no
# modules_to_not_convert list: vLLM never quantises the embedding or the LM head anyway).
QWEN_FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
# config.json keys of SO8T's own (besides so8t_*): how the reference runs attention, and the source's FP8.
_NOT_QWEN3_KEYS = ("attn_implementation", "use_flash_attention", "quantization_config")
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float8_e4m3fn: "F8_E4M3"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class HFTensor:
    """One weight of the output. FoldedTensors reads `source` and `shape`, as it does of a GGUF TensorJob."""

    source: str  # checkpoint name
    target: str  # name in the HF checkpoint
    shape: tuple[int, ...]
    dtype: torch.dtype  # float8_e4m3fn: block FP8, with a weight_scale_inv written right after it
    scale_dtype: torch.dtype | None = None  # FP8: float32, or the source's scale dtype when passed through
    passthrough_fp8: bool = False  # FP8 source, nothing to fold: its e4m3 bytes and scales go out untouched

    @property
    def scale_name(self) -> str:
        return self.target.removesuffix(".weight") + SCALE_SUFFIX

    def entries(self, block: tuple[int, int]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of the tensors this weight becomes, in file order."""
        out = [(self.target, self.dtype, self.shape)]
        if self.dtype == torch.float8_e4m3fn:
            scale_shape = tuple(-(-size // b) for size, b in zip(self.shape, block))  # ceil: edge blocks count
            out.append((self.scale_name, self.scale_dtype, scale_shape))
        return out

    def nbytes(self, block: tuple[int, int]) -> int:
        return sum(_nbytes(dtype, shape) for _, dtype, shape in self.entries(block))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()


@dataclass
class HFExportReport:
    output: Path
    fp8: bool
    source_kind: str  # "so8t" or "qwen3"
    tensors: int
    shards: int
    bytes_written: int
    seconds: float
    fold_max_abs_error: float

    def summary(self) -> str:
        layout = "block FP8" if self.fp8 else "dense"
        return (f"wrote {self.output} ({layout}, {self.tensors} tensors in {self.shards} shard(s) + {HEADS_FILE}, "
                f"{self.bytes_written / 2**20:.1f} MiB) in {self.seconds:.1f} s from a {self.source_kind} "
                f"checkpoint; fold max abs error {self.fold_max_abs_error:.2e}")


# ---------------------------------------------------------------------------------------------- planning
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """A size as transformers' max_shard_size writes it: "5GB" is 5 * 10^9 bytes, "4GiB" 4 * 2^30, "1000" bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]) if match else 0
    if size <= 0:
        raise ValueError(f"{text!r}: expected a positive size such as 5GB, 500MB or 4GiB")
    return size


def is_fp8_projection(name: str) -> bool:
    return bool(_FP8_PROJECTION.match(name))


def plan_hf_tensors(reader: CheckpointReader, source: Source, folded: FoldedTensors, fp8: bool,
                    dtype: torch.dtype) -> list[HFTensor]:
    """One output weight per tensor the qwen3 graph reads (export.qwen3_weights), SO8T's untied task head
    under Qwen3's name lm_head."""
    jobs = []
    for name in qwen3_weights(reader, source.config):
        target = "lm_head.weight" if name == "task_head.weight" else name
        shape = reader.shape(name)
        if not (fp8 and is_fp8_projection(name)):
            jobs.append(HFTensor(name, target, shape, dtype))
            continue
        probe = HFTensor(name, target, shape, torch.float8_e4m3fn)
        stored_fp8 = reader.info(name)["dtype"] == "F8_E4M3"
        if stored_fp8 and not folded.needs_fold(probe):  # the folded weight is the stored one: keep its bytes
            scale = reader.read_raw(name.removesuffix(".weight") + SCALE_SUFFIX)
            jobs.append(HFTensor(name, target, shape, torch.float8_e4m3fn, scale.dtype, passthrough_fp8=True))
        else:
            jobs.append(HFTensor(name, target, shape, torch.float8_e4m3fn, torch.float32))
    return jobs


def shard_plan(jobs: list[HFTensor], block: tuple[int, int], max_shard_bytes: int) -> list[list[HFTensor]]:
    """Greedy in order, as transformers' save_pretrained shards: a new shard when the next weight would pass
    max_shard_bytes. An FP8 weight and its scales stay in one shard."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for job in jobs:
        nbytes = job.nbytes(block)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' file names: model.safetensors alone, else model-00001-of-0000N.safetensors + an index."""
    return [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def hf_config(raw: dict, source: Source, dtype: torch.dtype, fp8_block: tuple[int, int] | None,
              fold_max_abs_error: float) -> dict:
    """A plain Qwen3 config.json: the source's keys without SO8T's, and an `so8t` block for the heads."""
    config = {k: v for k, v in raw.items() if not k.startswith("so8t_") and k not in _NOT_QWEN3_KEYS}
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], torch_dtype=_DTYPE_NAMES[dtype])
    if "dtype" in config:  # transformers 5 writes dtype; both name the same
        config["dtype"] = _DTYPE_NAMES[dtype]
    if fp8_block is not None:
        config["quantization_config"] = {**QWEN_FP8_CONFIG, "weight_block_size": list(fp8_block)}
    so8t = source.config
    config["so8t"] = {
        "heads_file": HEADS_FILE,
        # Like the LM head, both heads read the final normed hidden state (the output of model.norm).
        "heads": {head: {"weight": f"{head}_head.weight", "bias": f"{head}_head.bias",
                         "labels": list(HEAD_LABELS[head]), "threshold": so8t.head_threshold(head)}
                  for head in HEAD_LABELS},
        "flags": so8t.so8t_flags(),
        "rotation_dim": so8t.so8t_rotation_dim,
        "rotation_seed": so8t.so8t_rotation_seed,
        "folded": True,  # the rotations are in q/k/v and gate/up: the weights run as stock Qwen3
        "source": "so8t" if source.is_so8t else "qwen3",
        "fold_max_abs_error": fold_max_abs_error,
    }
    return config


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class _Piece:
    data: np.ndarray  # bytes of one row chunk of the weight
    scale: torch.Tensor | None = None  # its float32 block scales, when re-quantised to FP8


class _Encoder:
    """One row chunk of an output weight: its folded (or stored) values in the output's type."""

    def __init__(self, folded: FoldedTensors, block: tuple[int, int]):
        self.folded, self.block = folded, block

    def chunks(self, job: HFTensor) -> list[slice | None]:
        chunks = self.folded.chunks(job)
        # row_chunks cuts at multiples of ROW_ALIGN rows; re-quantised blocks must not straddle two chunks
        if job.dtype == torch.float8_e4m3fn and not job.passthrough_fp8 and ROW_ALIGN % self.block[0]:
            return [None]
        return chunks

    def encode(self, job: HFTensor, rows: slice | None) -> _Piece:
        if self.folded.needs_fold(job):
            values = self.folded.folded(job, rows)  # float64: rounded once below
        else:
            stored = self.folded.stored(job, rows)
            if isinstance(stored, BlockFP8):
                if job.passthrough_fp8:
                    return _Piece(stored.weight.reshape(-1))  # the source's e4m3 bytes, untouched
                stored = stored.dequantize()
            values = stored
        if job.dtype == torch.float8_e4m3fn:
            weight, scale = quantize_fp8(values, self.block)  # the block scales in float32, as Qwen computes them
            return _Piece(_bytes(weight), scale)
        cast = values.to(job.dtype)
        if job.dtype == torch.float16 and not torch.isfinite(cast).all():
            raise ExportError(f"{self.folded.reader.location(job.source)}: tensor {job.source}: values overflow "
                              "float16; expected values within its range (its config's torch_dtype is float16)")
        return _Piece(_bytes(cast))


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.uint8).reshape(-1).numpy()


# ---------------------------------------------------------------------------------------------- writing
class _ShardWriter:
    """One safetensors file written as a stream: the header (every tensor's dtype, shape and offsets, known
    from the plan) first, then the tensors' bytes in header order through export.DirectFile."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        self.sizes = []
        for name, dtype, shape in entries:
            size = _nbytes(dtype, shape)
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
            self.sizes.append((name, size))
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
        with path.open("wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
        self.path, self.nbytes, self.written = path, offset, 0
        self._file = DirectFile(path, 8 + len(text))

    def write(self, data) -> None:
        self.written += self._file.write(data)

    def close(self) -> None:
        """Flush and close; then every tensor's bytes must be there (an internal invariant of the plan)."""
        self._file.close()
        if self.written != self.nbytes:
            raise ExportError(f"{self.path}: wrote {self.written} bytes of tensor data; expected {self.nbytes}")


def check_output_folder(output: Path) -> None:
    """A new folder in an existing, writable one: an existing output (or one of the inputs) is never
    replaced or merged into, as mlx-lm's convert refuses an existing output."""
    if output.exists() or output.is_symlink():
        raise PathError(f"{output}: already exists; expected a new folder for the Hugging Face checkpoint "
                        "(remove it or choose another -o)")
    if not output.parent.is_dir():
        raise PathError(f"{output}: output folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise PathError(f"{output}: output folder {output.parent} is not writable")


def export_hf(model_dir: str | Path, output: str | Path, *, fp8: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              progress: Callable[[int, int, str], None] | None = None) -> HFExportReport:
    """Export model_dir (an SO8T or plain Qwen3 checkpoint) to a stock Qwen3 checkpoint folder `output`.

    Dense: every weight in the config's torch_dtype. fp8: q/k/v/o/gate/up/down as e4m3 with float32
    weight_scale_inv per block (the source's block size for an FP8 source, else 128x128), everything else
    bf16; folded in float64, quantised once. A tensor with nothing to fold goes out as stored (an FP8 source's
    bytes and scales untouched under fp8). progress(bytes_done, bytes_total, tensor_name) is called as data is
    written. The folder appears whole or not at all; an existing output is refused.
    """
    start = time.perf_counter()
    model_dir, output = Path(model_dir), Path(output)
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes = {max_shard_bytes}; expected a positive number of bytes")
    with CheckpointReader(model_dir) as reader:
        check_output_folder(output)
        source = read_source(reader)
        folded = source.folded_tensors(reader)
        dtype = torch.bfloat16 if fp8 else resolve_dtype(None, source.config)
        if dtype not in _DTYPE_NAMES:
            raise ExportError(f"{model_dir / 'config.json'}: torch_dtype = {source.config.torch_dtype!r}; "
                              "expected bfloat16, float16 or float32 for a Hugging Face checkpoint")
        block = (reader.fp8_block or FP8_BLOCK) if fp8 else FP8_BLOCK  # one block size for the whole file
        jobs = plan_hf_tensors(reader, source, folded, fp8, dtype)
        shards = shard_plan(jobs, block, max_shard_bytes)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        try:
            written = _write_shards(tmp, reader, shards, block, _Encoder(folded, block), progress)
            if folded.max_error > FOLD_ERROR_LIMIT:
                raise ExportError(f"{model_dir}: fold max abs error {folded.max_error:.2e} is above "
                                  f"{FOLD_ERROR_LIMIT:g}")
            save_file(_heads(reader, source, dtype), tmp / HEADS_FILE, metadata={"format": "pt"})
            config = hf_config(reader.raw_config, source, dtype, block if fp8 else None, folded.max_error)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for name in (*TOKENIZER_FILES, "chat_template.json"):
                if (model_dir / name).is_file():
                    shutil.copyfile(model_dir / name, tmp / name)
            for path in tmp.iterdir():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(path, 0o666 & ~current_umask())  # safetensors' save_file leaves 0600
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a checkpoint is an ordinary folder
            if output.exists() or output.is_symlink():  # appeared while we wrote: never replace it
                raise PathError(f"{output}: appeared during the export; refusing to replace it")
            os.rename(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fsync_folder(output.parent)
    return HFExportReport(output=output, fp8=fp8, source_kind="so8t" if source.is_so8t else "qwen3",
                          tensors=sum(len(job.entries(block)) for job in jobs), shards=len(shards),
                          bytes_written=written, seconds=time.perf_counter() - start,
                          fold_max_abs_error=folded.max_error)


def _heads(reader: CheckpointReader, source: Source, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The heads as the SO8T checkpoint stores them (bytes untouched); a Qwen3 source's deterministic
    initial heads in the weights' dtype, as from_pretrained makes them."""
    names = [f"{head}.{part}" for head in HEADS for part in ("weight", "bias")]
    if source.is_so8t:
        return {name: reader.read_raw(name).contiguous() for name in names}
    return {name: source.heads[name].to(dtype).contiguous() for name in names}


def _write_shards(folder: Path, reader: CheckpointReader, shards: list[list[HFTensor]], block: tuple[int, int],
                  encoder: _Encoder, progress: Callable[[int, int, str], None] | None) -> int:
    """Every shard, and the index when there are several; returns the bytes of tensor data written."""
    files = shard_names(len(shards))
    jobs = [job for shard in shards for job in shard]
    total = sum(job.nbytes(block) for job in jobs)
    done = 0
    with contextlib.closing(encoded_stream(encoder.folded, jobs, encoder.encode, encoder.chunks)) as stream:
        for file, shard in zip(files, shards):
            writer = _ShardWriter(folder / file, [entry for job in shard for entry in job.entries(block)])
            try:
                for job in shard:
                    scales = []
                    for piece in itertools.islice(stream, len(encoder.chunks(job))):
                        writer.write(piece.data.data)
                        done += piece.data.nbytes
                        if piece.scale is not None:
                            scales.append(piece.scale)
                        if progress:
                            progress(done, total, job.target)
                    if job.dtype == torch.float8_e4m3fn:
                        scale = (reader.read_raw(job.source.removesuffix(".weight") + SCALE_SUFFIX)
                                 if job.passthrough_fp8 else torch.cat(scales))
                        writer.write(_bytes(scale).data)
                        done += scale.numel() * scale.element_size()
            except BaseException:
                with contextlib.suppress(Exception):  # closing may re-raise the write error that brought us here
                    writer._file.close()
                raise
            writer.close()
    if len(files) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for job in shard
                      for name, _, _ in job.entries(block)}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total
