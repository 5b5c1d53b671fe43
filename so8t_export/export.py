"""SO8T or Qwen3 checkpoint -> GGUF that stock llama.cpp and Ollama run as a plain qwen3 model.

One streaming pass: each tensor (or row chunk of a large one) goes read -> dequantise -> fold -> check ->
quantise -> write, so memory holds one chunk at a time. Rotations are folded into the weights (exact, see
fold.py); the triality data and the two classification heads travel as so8t.* metadata (metadata.py).
The file is written under a temporary name and renamed at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from .checkpoint import CheckpointReader
from .config import MODEL_TYPE, SO8TConfig
from .fold import fold_error, fold_weight, role, unfold_weight
from .gguf_tokenizer import add_tokenizer
from .loading import rotations_and_heads
from .metadata import FOLD_ERROR_KEY, SOURCE_HASH_KEY, add_so8t_metadata, so8t_entries
from .quants import FILE_TYPES, OUTPUT_TYPES, QuantError, quantize, quantized_nbytes
from .rotation import RotationPlan, plan_rotations

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3]
CHUNK_ELEMENTS = 1 << 24  # rows per chunk keep a float32 chunk near 64 MiB
FOLD_TOLERANCE = 1e-9  # relative to the projection's magnitude; a real fold error is 1e-16 in float64
PROBE_ROWS = 4
_HASH_PLACEHOLDER = "0" * 64


class ExportError(ValueError):
    """The export cannot go on; the message names the file or tensor and what was expected and found."""


@dataclass
class TensorJob:
    source: str  # checkpoint name
    target: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch (row-major) shape
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return quantized_nbytes(self.shape, self.qtype)


@dataclass
class ExportReport:
    output: Path
    quant: str
    source_kind: str  # "so8t" or "qwen3"
    tensors: int
    bytes_written: int
    seconds: float
    fold_max_abs_error: float
    source_sha256: str
    fallbacks: list[str] = field(default_factory=list)  # tensors written as F16 because rows don't fit blocks

    def summary(self) -> str:
        mib = self.bytes_written / 2**20
        return (f"wrote {self.output} ({self.quant}, {self.tensors} tensors, {mib:.1f} MiB) in {self.seconds:.1f} s "
                f"from a {self.source_kind} checkpoint; fold max abs error {self.fold_max_abs_error:.2e}")


# ---------------------------------------------------------------------------------------------- planning
def gguf_name(name: str, num_layers: int) -> str:
    """Standard llama.cpp tensor name of a checkpoint tensor (gguf-py's Qwen3 table)."""
    name = "lm_head.weight" if name == "task_head.weight" else name
    mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, num_layers).get_name(name, try_suffixes=(".weight",))
    if mapped is None:
        raise ExportError(f"tensor {name} has no qwen3 GGUF name; SO8T/Qwen3 checkpoints have no such tensor")
    return mapped


def output_type(name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    """Norms and other 1-D tensors stay F32, as llama.cpp's converter keeps them."""
    if len(shape) == 1 or name.endswith("_norm.weight") or name.endswith("norm.weight"):
        return gguf.GGMLQuantizationType.F32
    return OUTPUT_TYPES[quant]


def plan_tensors(reader: CheckpointReader, config: SO8TConfig, quant: str) -> tuple[list[TensorJob], list[str]]:
    """One job per weight the qwen3 graph reads. Heads and rotation buffers are metadata, not tensors."""
    metadata_only = {"model.triality_rotations", "model.cross_head_rotation", "safety_head.weight",
                     "safety_head.bias", "authority_head.weight", "authority_head.bias"}
    jobs, fallbacks = [], []
    for name in reader.names():
        if name in metadata_only:
            continue
        if config.tie_word_embeddings and name in ("lm_head.weight", "task_head.weight"):
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        shape = reader.shape(name)
        qtype = output_type(name, shape, quant)
        try:
            quantized_nbytes(shape, qtype)
        except QuantError:
            qtype = gguf.GGMLQuantizationType.F16  # the converter's fallback for rows that don't fit blocks
            fallbacks.append(name)
        jobs.append(TensorJob(name, gguf_name(name, config.num_hidden_layers), shape, qtype))
    return jobs, fallbacks


# ---------------------------------------------------------------------------------------------- folding
class FoldedTensors:
    """Stock Qwen3 weights from an SO8T or Qwen3 checkpoint, a chunk at a time, each fold checked."""

    def __init__(self, reader: CheckpointReader, plan: RotationPlan, is_so8t: bool):
        self.reader, self.plan, self.is_so8t = reader, plan, is_so8t
        self.max_error = 0.0
        self._probe_gen = torch.Generator().manual_seed(0)

    def chunks(self, job: TensorJob) -> Iterator[torch.Tensor]:
        r = role(job.source)
        if r.side == "rows":  # q/k/v mixes rows across heads: fold the tensor whole (at most ~40 MiB)
            yield self._fold(job, self.reader.read(job.source, torch.float64)).float()
            return
        rows = max(1, CHUNK_ELEMENTS // max(1, job.shape[-1])) if len(job.shape) == 2 else None
        if rows is None or rows >= job.shape[0]:
            weight = self.reader.read(job.source, torch.float64 if r.side == "columns" else torch.float32)
            yield self._fold(job, weight).float()
            return
        dtype = torch.float64 if r.side == "columns" else torch.float32
        for chunk in self.reader.iter_rows(job.source, rows, dtype):
            yield self._fold(job, chunk).float()

    def _fold(self, job: TensorJob, weight: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise ExportError(f"{self.reader.model_dir}: tensor {job.source} has {bad} NaN or Inf values; "
                              "expected finite weights")
        if role(job.source).side == "none":
            return weight
        # A Qwen3 source is loaded the way from_pretrained loads it (absorb the inverse rotations into SO8T
        # weights), then folded back: the result is the source to float64 rounding.
        so8t_weight = weight if self.is_so8t else unfold_weight(job.source, weight, self.plan)
        folded = fold_weight(job.source, so8t_weight, self.plan)
        probe = torch.randn(PROBE_ROWS, weight.shape[-1], generator=self._probe_gen, dtype=torch.float64)
        error = fold_error(job.source, so8t_weight, folded, self.plan, probe)
        scale = (probe @ folded.T).abs().max().item()
        if error > FOLD_TOLERANCE * max(1.0, scale):
            raise ExportError(f"fold check failed for {job.source}: max abs error {error:.3e} against the SO8T "
                              f"projection (tolerance {FOLD_TOLERANCE * max(1.0, scale):.1e})")
        self.max_error = max(self.max_error, error)
        return folded


class _StreamedTensor:
    """Duck-types the ndarray that GGUFWriter.write_tensor_data writes, producing bytes chunk by chunk."""

    def __init__(self, job: TensorJob, chunks: Iterator[torch.Tensor], on_bytes: Callable[[int], None]):
        self.job, self._chunks, self._on_bytes = job, chunks, on_bytes
        self.nbytes = job.nbytes

    def tofile(self, fout) -> None:
        written = 0
        for chunk in self._chunks:
            data = quantize(chunk, self.job.qtype)
            data.tofile(fout)
            written += data.nbytes
            self._on_bytes(data.nbytes)
        if written != self.nbytes:
            raise ExportError(f"tensor {self.job.source}: wrote {written} bytes; expected {self.nbytes}")


# ---------------------------------------------------------------------------------------------- hashing
def hash_files(paths: list[Path]) -> str:
    """sha256 of the safetensors files concatenated in name order (`cat ... | sha256sum`)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(16 << 20):
                digest.update(block)
    return digest.hexdigest()


class _BackgroundHash(threading.Thread):
    """Hashes the source while the export runs; hashlib releases the GIL on large updates."""

    def __init__(self, paths: list[Path]):
        super().__init__(daemon=True)
        self.paths, self.result, self.error = paths, None, None

    def run(self) -> None:
        try:
            self.result = hash_files(self.paths)
        except OSError as err:
            self.error = err


# ---------------------------------------------------------------------------------------------- writing
def default_output(model_dir: Path, quant: str) -> Path:
    return Path.cwd() / f"{model_dir.resolve().name}-{quant}.gguf"


def write_qwen3_hparams(writer: gguf.GGUFWriter, config: SO8TConfig) -> None:
    """Every qwen3.* key llama.cpp reads. key_length is required: Qwen3-4B's head_dim 128 != 2560 / 32."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)


def export_gguf(model_dir: str | Path, output: str | Path | None = None, *, quant: str = "q8_0",
                name: str | None = None, progress: Callable[[int, int, str], None] | None = None) -> ExportReport:
    """Export model_dir (an SO8T or plain Qwen3 checkpoint) to a GGUF file and return what was written.

    progress(bytes_done, bytes_total, tensor_name) is called as data is written.
    """
    start = time.perf_counter()
    model_dir = Path(model_dir)
    quant = quant.lower()
    if quant not in OUTPUT_TYPES:
        raise ExportError(f"--quant {quant!r} is not supported; expected one of {', '.join(OUTPUT_TYPES)}")
    output = Path(output) if output is not None else default_output(model_dir, quant)
    if not output.parent.is_dir():
        raise ExportError(f"{output}: output folder {output.parent} does not exist")

    reader = CheckpointReader(model_dir)
    is_so8t = reader.raw_config.get("model_type") == MODEL_TYPE
    config = SO8TConfig.from_dict(reader.raw_config, source=str(model_dir / "config.json"))
    rotations, cross_head, heads = rotations_and_heads(reader, config, is_so8t)
    plan = plan_rotations(config, rotations.double(), cross_head.double())
    jobs, fallbacks = plan_tensors(reader, config, quant)
    total = sum(job.nbytes for job in jobs)
    hasher = _BackgroundHash(reader.files())
    hasher.start()

    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        writer.add_name(name or model_dir.resolve().name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(FILE_TYPES[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_qwen3_hparams(writer, config)
        add_tokenizer(writer, model_dir, config.vocab_size)
        # The fold error and source hash are known only at the end: write placeholders of the final size
        # and patch them in place, as gguf-py's gguf_set_metadata does.
        add_so8t_metadata(writer, so8t_entries(config, rotations, cross_head, heads, 0.0, _HASH_PLACEHOLDER))
        for job in jobs:
            writer.add_tensor_info(job.target, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        folded = FoldedTensors(reader, plan, is_so8t)
        done = 0
        for job in jobs:
            def advance(n: int, job=job) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(done, total, job.target)
            writer.write_tensor_data(_StreamedTensor(job, folded.chunks(job), advance),
                                     tensor_endianess=gguf.GGUFEndian.LITTLE)
        writer.close()
        hasher.join()
        if hasher.error:
            raise ExportError(f"cannot hash the source weights: {hasher.error}")
        _patch_metadata(tmp, folded.max_error, hasher.result)
        os.replace(tmp, output)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    return ExportReport(output=output, quant=quant, source_kind="so8t" if is_so8t else "qwen3", tensors=len(jobs),
                        bytes_written=output.stat().st_size, seconds=time.perf_counter() - start,
                        fold_max_abs_error=folded.max_error, source_sha256=hasher.result, fallbacks=fallbacks)


def _patch_metadata(path: Path, fold_max_abs_error: float, source_sha256: str) -> None:
    reader = gguf.GGUFReader(path, "r+")
    error_field = reader.get_field(FOLD_ERROR_KEY)
    error_field.parts[error_field.data[0]][0] = np.float32(fold_max_abs_error)
    hash_field = reader.get_field(SOURCE_HASH_KEY)
    encoded = np.frombuffer(source_sha256.encode("ascii"), dtype=np.uint8)
    hash_field.parts[hash_field.data[0]][:] = encoded
    reader.data.flush()
    del reader
