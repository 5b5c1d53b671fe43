"""SO8T or Qwen3 checkpoint -> GGUF that stock llama.cpp and Ollama run as a plain qwen3 model.

One streaming pass: each tensor (or row chunk of a large one) goes read -> dequantise -> fold -> check ->
quantise -> write, so memory holds one chunk at a time. Rotations are folded into the weights (exact, see
fold.py); the triality data and the two classification heads travel as so8t.* metadata (metadata.py).
The file is written under a temporary name and renamed at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import hashlib
import importlib.metadata
import itertools
import math
import mmap
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from .checkpoint import INDEX_FILE, CheckpointReader
from .config import LLAMA_QUANT_TYPE_NAMES, MODEL_TYPE, SO8TConfig
from .fold import absorbed_error, fold_error, fold_weight, role
from .gguf_tokenizer import add_tokenizer
from .io import atomic_output, check_output_path
from .loading import TOKENIZER_FILES, check_tensors, holds_folded_weights, is_so8t_extra, rotations_and_heads
from .metadata import FOLD_ERROR_KEY, FOLD_ERROR_LIMIT, SOURCE_HASH_KEY, add_so8t_metadata, so8t_entries
from .quants import FILE_TYPES, OUTPUT_TYPES, BlockFP8, QuantError, nonfinite_encoded, quantize, quantized_nbytes
from .rotation import RotationPlan, plan_rotations

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3]
CHUNK_ELEMENTS = 1 << 22  # 16 MiB as float32: glibc then reuses freed chunk buffers instead of mapping fresh
# zeroed pages for each (measured: a third less kernel time, and a lower peak RSS, than 64 MiB chunks)
LOOKAHEAD = 3  # encoded chunks computed ahead of the writer
ENCODERS = 2  # worker threads; the kernels and reads release the GIL, so chunks encode side by side
ROW_ALIGN = 128
DIRECT_IO = getattr(os, "O_DIRECT", 0)  # 0 where the platform has no direct IO
DIRECT_ALIGN = 4096  # buffer address, file offset and length of every O_DIRECT write
DIRECT_STAGING = 32 << 20
HASH_BLOCK = 1 << 20  # one reused buffer that stays in cache: the hash runs at sha256's speed (~1.6 GB/s)
# Relative to the projection's magnitude. Folding an SO8T tensor is exact to float64 rounding (~1e-16); the
# absorbed check of a Qwen3 source is bounded by the float32 rotation buffers, orthogonal to ~1e-7. Both are
# measured against the map applied by sparse matrices (fold.fold_error), so a transposed rotation or a swapped
# mixing order is off by O(1).
FOLD_TOLERANCE = 1e-9
ABSORB_TOLERANCE = 1e-6
PROBE_ROWS = 4
PROBE_SAMPLE = 128  # rows (or q/k/v columns) of a Qwen3 source chunk the absorbed check reads
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
    # llama.cpp's quantiser types (llama_quantize.py): tensor type -> count in the file, and the imatrix used.
    tensor_types: dict[str, int] = field(default_factory=dict)
    imatrix: str | None = None

    def summary(self) -> str:
        mib = self.bytes_written / 2**20
        line = (f"wrote {self.output} ({self.quant}, {self.tensors} tensors, {mib:.1f} MiB) in {self.seconds:.1f} s "
                f"from a {self.source_kind} checkpoint; fold max abs error {self.fold_max_abs_error:.2e}")
        if self.tensor_types:
            mix = ", ".join(f"{count} x {name}" for name, count in self.tensor_types.items())
            line += f"; llama.cpp's mix: {mix}" + (f"; {self.imatrix}" if self.imatrix else "; no imatrix")
        return line


# ---------------------------------------------------------------------------------------------- planning
@functools.cache
def _tensor_names(num_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, num_layers)  # ~10 ms to build: once per layer count


def gguf_name(name: str, num_layers: int) -> str:
    """Standard llama.cpp tensor name of a checkpoint tensor (gguf-py's Qwen3 table)."""
    name = "lm_head.weight" if name == "task_head.weight" else name
    mapped = _tensor_names(num_layers).get_name(name, try_suffixes=(".weight",))
    if mapped is None:
        raise ExportError(f"tensor {name} has no qwen3 GGUF name; SO8T/Qwen3 checkpoints have no such tensor")
    return mapped


def output_type(name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    """Norms and other 1-D tensors stay F32, as llama.cpp's converter keeps them."""
    if len(shape) == 1 or name.endswith("norm.weight"):
        return gguf.GGMLQuantizationType.F32
    return OUTPUT_TYPES[quant]


def qwen3_weights(reader: CheckpointReader, config: SO8TConfig) -> list[str]:
    """The checkpoint tensors a stock qwen3 graph reads (the GGUF and the HF export both write these): not the
    heads or rotation buffers, and no LM head when it is tied (llama.cpp and vLLM reuse the embedding)."""
    tied = ("lm_head.weight", "task_head.weight") if config.tie_word_embeddings else ()
    return [name for name in reader.names() if not is_so8t_extra(name) and name not in tied]


def plan_tensors(reader: CheckpointReader, config: SO8TConfig, quant: str) -> tuple[list[TensorJob], list[str]]:
    """One job per weight the qwen3 graph reads. Heads and rotation buffers are metadata, not tensors."""
    jobs, fallbacks = [], []
    for name in qwen3_weights(reader, config):
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
def row_chunks(job: TensorJob, whole: bool) -> list[slice | None]:
    """Row ranges a job is processed in: about CHUNK_ELEMENTS each, or the whole tensor (None)."""
    if whole or len(job.shape) != 2 or job.shape[0] * job.shape[1] <= CHUNK_ELEMENTS:
        return [None]
    # Multiples of 128 rows: Qwen's FP8 tiles are 128 rows tall, so a chunk reads whole tiles (other tile
    # heights work too: BlockFP8.first_row places a chunk inside its first tile).
    rows = max(ROW_ALIGN, CHUNK_ELEMENTS // job.shape[1] // ROW_ALIGN * ROW_ALIGN)
    return [slice(start, min(start + rows, job.shape[0])) for start in range(0, job.shape[0], rows)]


class FoldedTensors:
    """Stock Qwen3 weights from an SO8T or Qwen3 checkpoint, one row chunk at a time, each fold checked."""

    def __init__(self, reader: CheckpointReader, plan: RotationPlan, is_so8t: bool):
        self.reader, self.plan, self.is_so8t = reader, plan, is_so8t
        self.max_error = 0.0
        self._lock = threading.Lock()

    def chunks(self, job: TensorJob) -> list[slice | None]:
        # A q/k/v check or fold mixes rows across heads, so it takes the whole tensor (at most ~40 MiB);
        # gate/up rotate within rows.
        return row_chunks(job, whole=role(job.source).side == "rows")

    def needs_fold(self, job: TensorJob) -> bool:
        """Whether a tensor is folded on the way out; every other tensor is written as it is stored."""
        return self.is_so8t and role(job.source).side != "none"

    def encode(self, job: TensorJob, rows: slice | None) -> np.ndarray:
        """Read, dequantise, check, fold and quantise one chunk."""
        if self.needs_fold(job):
            return self._check_range(job, quantize(self.folded(job, rows).float(), job.qtype))
        # A block-FP8 chunk goes straight from its bytes to GGUF.
        stored = self.stored(job, rows)
        encoded = stored.encode(job.qtype) if isinstance(stored, BlockFP8) else quantize(stored, job.qtype)
        return self._check_range(job, encoded)

    def stored(self, job: TensorJob, rows: slice | None) -> BlockFP8 | torch.Tensor:
        """One chunk of a tensor that is written as stored (needs_fold false), checked: finite, and for a
        Qwen3 source's q/k/v/gate/up the absorbed check. Block FP8 stays FP8 (its bytes); anything else is
        float32, which holds bf16/f16/f32 values exactly."""
        side = role(job.source).side
        fp8 = self.reader.read_fp8(job.source, rows)
        if fp8 is not None:
            if fp8.nonfinite():
                self._nonfinite(job, fp8.dequantize())
            if side != "none":
                self._check_absorbed(job, rows, fp8.corner(*self._sample(job, fp8.weight.shape)).dequantize())
            return fp8
        weight = self.reader.read(job.source, torch.float32, rows)
        self._require_finite(job, weight)
        if side != "none":
            sample_rows, sample_cols = self._sample(job, tuple(weight.shape))
            self._check_absorbed(job, rows, weight[:sample_rows, :sample_cols])
        return weight

    def _check_range(self, job: TensorJob, encoded: np.ndarray) -> np.ndarray:
        """The source was finite, so an Inf in the output means a value beyond the output type's range (f16
        and Q8_0's f16 scales stop at 65504), or a fold that left float32's."""
        overflowed = nonfinite_encoded(encoded, job.qtype)
        if overflowed:
            raise ExportError(f"{self.reader.location(job.source)}: tensor {job.source}: {overflowed} values "
                              f"overflow {job.qtype.name}; expected values within its range (use --quant bf16 "
                              "or f32 for this checkpoint)")
        return encoded

    def _require_finite(self, job: TensorJob, weight: torch.Tensor) -> None:
        low, high = torch.aminmax(weight)  # propagates NaN: one fast pass instead of isfinite().all()
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            self._nonfinite(job, weight)

    def _nonfinite(self, job: TensorJob, weight: torch.Tensor) -> None:
        bad = int((~torch.isfinite(weight)).sum())
        raise ExportError(f"{self.reader.location(job.source)}: tensor {job.source} has {bad} NaN or Inf values; "
                          "expected finite weights")

    @staticmethod
    def _sample(job: TensorJob, shape: tuple[int, ...]) -> tuple[int, int]:
        """The corner of a chunk the absorbed check reads: the rotated side whole, PROBE_SAMPLE of the other.
        Every row (q/k/v: column) meets the same rotation, so more of them would re-check the same identity."""
        if role(job.source).side == "rows":
            return shape[0], min(shape[1], PROBE_SAMPLE)
        return min(shape[0], PROBE_SAMPLE), shape[1]

    @staticmethod
    def _probe(job: TensorJob, rows: slice | None, width: int) -> torch.Tensor:
        # Seeded by tensor and chunk, so results do not depend on thread timing.
        seed = zlib.crc32(f"{job.source}:{rows.start if rows else 0}".encode())
        return torch.randn(PROBE_ROWS, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def _check_absorbed(self, job: TensorJob, rows: slice | None, sample: torch.Tensor) -> None:
        """A Qwen3 source loads into SO8T by absorbing the inverse rotations and folds straight back:
        fold(unfold(W)) = W, so W is written as it is and the probe checks the absorbed model."""
        probe = self._probe(job, rows, sample.shape[-1])
        error, scale = absorbed_error(job.source, sample, self.plan, probe)
        self._record(job, error, ABSORB_TOLERANCE * max(1.0, scale))

    def folded(self, job: TensorJob, rows: slice | None) -> torch.Tensor:
        """One chunk of an SO8T tensor folded (needs_fold true), in float64 and checked against the SO8T
        projection; the caller rounds it once to its output type."""
        weight = self.reader.read(job.source, torch.float64, rows)
        self._require_finite(job, weight)
        folded = fold_weight(job.source, weight, self.plan)
        probe = self._probe(job, rows, weight.shape[-1])
        error = fold_error(job.source, weight, folded, self.plan, probe)
        self._record(job, error, FOLD_TOLERANCE * max(1.0, (probe @ folded.T).abs().max().item()))
        return folded

    def _record(self, job: TensorJob, error: float, tolerance: float) -> None:
        if error > tolerance:
            raise ExportError(f"fold check failed for {job.source}: max abs error {error:.3e} against the SO8T "
                              f"projection (tolerance {tolerance:.1e})")
        with self._lock:
            self.max_error = max(self.max_error, error)


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's CPU kernels run on, found among the libraries this process has loaded."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line})
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
            library.omp_set_num_threads.argtypes = [ctypes.c_int]
            return library
        except (OSError, AttributeError):
            continue
    return None


def one_kernel_thread() -> None:
    """Worker initializer: torch kernels started from this thread use this thread alone.

    The ENCODERS threads are the parallelism; torch's own threads on top oversubscribe the cores (measured on
    the 2-core benchmark machine: 38 s instead of 47 s for the FP8 -> q8_0 export). torch.set_num_threads is
    process-wide (and what new threads inherit), so it is not ours to change; OpenMP's thread count is per
    thread, so setting it here leaves every other thread of the process as it was.
    """
    torch.get_num_threads()  # let torch initialise this thread's OpenMP state first, or it would reset ours
    runtime = _openmp_runtime()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


def encoded_stream(folded: FoldedTensors, jobs: list, encode: Callable | None = None,
                   chunks: Callable | None = None) -> Iterator:
    """Encoded chunks of every job, in file order, computed up to LOOKAHEAD chunks ahead by ENCODERS threads
    while the caller writes: torch and numpy release the GIL, so encoding and disk writes overlap. Closing
    the generator early (an error downstream) cancels the chunks not started and waits for the running ones.
    encode(job, rows) and chunks(job) default to the GGUF export's (folded.encode, folded.chunks)."""
    encode, chunks = encode or folded.encode, chunks or folded.chunks
    work = [(job, rows) for job in jobs for rows in chunks(job)]
    pool = ThreadPoolExecutor(ENCODERS, thread_name_prefix="so8t-encode", initializer=one_kernel_thread)
    pending: deque = deque()
    try:
        for job, rows in work:
            pending.append(pool.submit(encode, job, rows))
            if len(pending) > LOOKAHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _StreamedTensor:
    """Duck-types the ndarray that GGUFWriter.write_tensor_data writes, writing a job's chunks in turn."""

    def __init__(self, job: TensorJob, chunks: Iterator[np.ndarray], on_bytes: Callable[[int], None]):
        self.job, self._chunks, self._on_bytes = job, chunks, on_bytes
        self.nbytes = job.nbytes

    def tofile(self, fout) -> None:
        written = 0
        for data in self._chunks:
            fout.write(data.data)
            written += data.nbytes
            self._on_bytes(data.nbytes)
        if written != self.nbytes:
            raise ExportError(f"tensor {self.job.source}: wrote {written} bytes; expected {self.nbytes}")


class DirectFile:
    """The file object GGUFWriter writes tensor data through: appends at `offset` with O_DIRECT and truncates
    to the bytes written on close. Data is gathered in two page-aligned staging buffers: one fills while a
    background thread writes the other, so encoding goes on while the disk works.

    Why: on the 2-core benchmark machine, writing a 4 GB GGUF through the page cache cost 5-6 s of kernel CPU
    (copying into freshly allocated page-cache pages); direct writes cost 0.1 s, and leave the page cache to
    the source. Where the filesystem refuses O_DIRECT (tmpfs), it writes through the page cache instead.
    """

    def __init__(self, path: Path, offset: int):
        self.path, self._position = path, offset
        self._start = offset // DIRECT_ALIGN * DIRECT_ALIGN  # file offset of the filling buffer's first byte
        # anonymous maps are page-aligned, as O_DIRECT needs
        self._buffers = [memoryview(mmap.mmap(-1, DIRECT_STAGING)) for _ in range(2)]
        self._view = self._buffers[0]
        with path.open("rb") as f:  # the partial block before offset is rewritten with the data that follows
            f.seek(self._start)
            self._used = f.readinto(self._view[:offset - self._start])
        if self._used != offset - self._start:
            raise ExportError(f"{path}: {self._used} header bytes before offset {offset}; expected "
                              f"{offset - self._start}")
        self._direct = bool(DIRECT_IO)
        self._fd = self._open()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="so8t-write")
        self._in_flight = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | (DIRECT_IO if self._direct else 0))
        except OSError as err:
            if self._direct and err.errno == errno.EINVAL:
                self._direct = False
                return self._open()
            raise

    def tell(self) -> int:
        return self._position

    def write(self, data) -> int:
        data = memoryview(data)
        if not data.nbytes:
            return 0
        data = data.cast("B")
        done = 0
        while done < data.nbytes:
            take = min(data.nbytes - done, len(self._view) - self._used)
            self._view[self._used:self._used + take] = data[done:done + take]
            self._used += take
            done += take
            if self._used == len(self._view):
                self._hand_over()
        self._position += done
        return done

    def _hand_over(self) -> None:
        """Queue the filling buffer for writing and fill the other once its own write has finished."""
        if self._in_flight is not None:
            self._in_flight.result()  # re-raises the writer's error
        self._in_flight = self._writer.submit(self._pwrite, self._view[:self._used], self._start)
        self._start += self._used
        self._view = self._buffers[1] if self._view is self._buffers[0] else self._buffers[0]
        self._used = 0

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view.nbytes:
            try:
                written = os.pwrite(self._fd, view, offset)
            except OSError as err:  # a filesystem that accepted O_DIRECT at open but not for this write
                if err.errno != errno.EINVAL or not self._direct:
                    raise
                self._direct = False  # once: a buffered write that fails too is an error
                fd, self._fd = self._fd, -1
                os.close(fd)
                self._fd = self._open()
                continue
            view, offset = view[written:], offset + written

    def flush(self) -> None:
        """Data goes out as whole aligned buffers; the tail on close."""

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            tail = -self._used % DIRECT_ALIGN  # O_DIRECT writes whole blocks: pad, then truncate
            self._view[self._used:self._used + tail] = bytes(tail)
            self._used += tail
            self._hand_over()
            self._in_flight.result()
            os.ftruncate(self._fd, self._position)
        finally:
            self._writer.shutdown()
            self._writer = None
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1


# ---------------------------------------------------------------------------------------------- hashing
def hash_files(paths: list[Path], stop: threading.Event | None = None) -> str | None:
    """sha256 of the safetensors files concatenated in name order (`cat ... | sha256sum`); None if stopped."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while size := f.readinto(buffer):
                if stop is not None and stop.is_set():
                    return None
                digest.update(view[:size])
    return digest.hexdigest()


class _BackgroundHash(threading.Thread):
    """Hashes the source while the export runs; hashlib releases the GIL on large updates. A failed export
    stops it at the next block instead of letting it read gigabytes for nothing."""

    def __init__(self, paths: list[Path]):
        super().__init__(daemon=True, name="so8t-hash")
        self.paths, self.result, self.error = paths, None, None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self.result = hash_files(self.paths, self.stop)
        except OSError as err:
            self.error = err

    def cancel(self) -> None:
        self.stop.set()
        self.join()


# ---------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def frozen_gc():
    """Exempt the objects alive now (torch, the tokenizer's 150k strings) from the cyclic GC while streaming:
    each full collection walked them all, ~5% of the export's CPU time (measured with perf). The GC is
    process-wide, so only the command line, which owns the process, uses this; export_gguf never does. Left
    alone when objects were frozen already (gc.unfreeze would thaw those too)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


def input_files(model_dir: Path, reader: CheckpointReader) -> list[Path]:
    """Every file of the source an export reads: an output must never replace one of them."""
    names = ("config.json", INDEX_FILE, *TOKENIZER_FILES, "chat_template.json")
    return [*reader.files(), *(model_dir / name for name in names if (model_dir / name).exists())]


@dataclass
class Source:
    """What every export reads first from a checkpoint, all of it checked: the config, whether it is SO8T,
    the validated rotation buffers, the heads and the float64 rotation plan."""

    config: SO8TConfig
    is_so8t: bool
    rotations: torch.Tensor
    cross_head: torch.Tensor
    heads: dict[str, torch.Tensor]
    plan: RotationPlan

    def folded_tensors(self, reader: CheckpointReader) -> FoldedTensors:
        # Only an SO8T checkpoint's rotated weights need folding; a Qwen3 source holds the folded ones.
        return FoldedTensors(reader, self.plan, self.is_so8t and not holds_folded_weights(self.config, self.is_so8t))


def read_source(reader: CheckpointReader, heads_dtype: torch.dtype = torch.float32) -> Source:
    """Config, tensor names and shapes, rotations and heads of a checkpoint, checked before anything is
    written; every problem is one line naming the file, tensor or key."""
    config_path = str(reader.model_dir / "config.json")
    is_so8t = reader.raw_config.get("model_type") == MODEL_TYPE
    config = SO8TConfig.from_dict(reader.raw_config, source=config_path)
    config.check_token_ids(config_path)
    check_tensors(reader, config, is_so8t)
    rotations, cross_head, heads = rotations_and_heads(reader, config, is_so8t, heads_dtype)
    plan = plan_rotations(config, rotations.double(), cross_head.double())
    return Source(config, is_so8t, rotations, cross_head, heads, plan)


def export_gguf(model_dir: str | Path, output: str | Path | None = None, *, quant: str = "q8_0",
                name: str | None = None, progress: Callable[[int, int, str], None] | None = None,
                imatrix: str | Path | None = None, calibration: str | Path | None = None) -> ExportReport:
    """Export model_dir (an SO8T or plain Qwen3 checkpoint) to a GGUF file and return what was written.

    f32, f16, bf16 and q8_0 are encoded here; llama.cpp's k- and i-quant types (config.LLAMA_QUANT_TYPE_NAMES)
    go through llama_quantize.export_quantized, with imatrix (a GGUF imatrix file) or calibration (a text
    to compute one from).

    progress(bytes_done, bytes_total, tensor_name) is called as data is written. The file appears whole or
    not at all (an existing output is replaced atomically), and an input is never overwritten.
    """
    start = time.perf_counter()
    model_dir = Path(model_dir)
    quant = quant.lower()
    if quant in LLAMA_QUANT_TYPE_NAMES:  # llama.cpp's quantiser makes these from our float export
        from .llama_quantize import export_quantized

        return export_quantized(model_dir, output, quant=quant, name=name, imatrix=imatrix,
                                calibration=calibration, progress=progress)
    if imatrix is not None or calibration is not None:
        raise ExportError(f"--quant {quant} is written by so8t-export's own encoder, which takes no imatrix; "
                          f"--imatrix and --calibration apply to llama.cpp's types ({', '.join(LLAMA_QUANT_TYPE_NAMES)})")
    if quant not in OUTPUT_TYPES:
        raise ExportError(f"--quant {quant!r} is not supported; expected one of "
                          f"{', '.join([*OUTPUT_TYPES, *LLAMA_QUANT_TYPE_NAMES])}")
    output = Path(output) if output is not None else default_output(model_dir, quant)

    with CheckpointReader(model_dir) as reader:
        check_output_path(output, input_files(model_dir, reader))
        source = read_source(reader)
        config, is_so8t, rotations, cross_head, heads = (source.config, source.is_so8t, source.rotations,
                                                         source.cross_head, source.heads)
        jobs, fallbacks = plan_tensors(reader, config, quant)
        folded = source.folded_tensors(reader)
        # The fold error and source hash are known only at the end: placeholders of the final size now,
        # patched in place at the end, as gguf-py's gguf_set_metadata does.
        so8t = so8t_entries(config, rotations, cross_head, heads, 0.0, _HASH_PLACEHOLDER)
        hasher = _BackgroundHash(reader.files())
        hasher.start()
        try:
            with atomic_output(output) as tmp:
                _write_gguf(tmp, reader, config, quant, name or model_dir.resolve().name, so8t, jobs, folded,
                            hasher, progress)
        finally:
            hasher.cancel()  # a no-op once it has finished
    return ExportReport(output=output, quant=quant, source_kind="so8t" if is_so8t else "qwen3", tensors=len(jobs),
                        bytes_written=output.stat().st_size, seconds=time.perf_counter() - start,
                        fold_max_abs_error=folded.max_error, source_sha256=hasher.result, fallbacks=fallbacks)


# The gguf-py release whose GGUFWriter internals send_tensor_data_through_direct_file relies on (pyproject.toml
# pins it; tests/test_export.py compares the result with the plain writer's, byte for byte).
GGUF_TESTED_VERSION = "0.19.0"


def send_tensor_data_through_direct_file(writer: gguf.GGUFWriter, path: Path) -> int:
    """Once the header, key-values and tensor infos are written, swap the writer's file for a DirectFile at the
    same offset, so that gguf-py still lays out the tensor data (alignment padding) while we choose how the bytes
    reach the disk. GGUFWriter has no API for this: it writes through its fout list, which other gguf-py
    releases may shape differently, so the installed version is checked first. Returns the header's end."""
    installed = importlib.metadata.version("gguf")
    if installed != GGUF_TESTED_VERSION:
        raise ExportError(f"gguf {installed} is installed; expected {GGUF_TESTED_VERSION}, the release whose "
                          f"GGUFWriter internals the exporter writes through (pip install gguf=={GGUF_TESTED_VERSION})")
    fout = getattr(writer, "fout", None)
    if not (isinstance(fout, list) and len(fout) == 1 and hasattr(fout[0], "tell")):
        raise ExportError(f"gguf {installed}: GGUFWriter.fout is {type(fout).__name__}; expected a list holding the "
                          "one open output file")
    header_end = fout[0].tell()
    fout[0].close()
    fout[0] = DirectFile(path, header_end)
    return header_end


def _write_gguf(tmp: Path, reader: CheckpointReader, config: SO8TConfig, quant: str, name: str,
                so8t: list[tuple], jobs: list[TensorJob], folded: FoldedTensors, hasher: _BackgroundHash,
                progress: Callable[[int, int, str], None] | None) -> None:
    """Lay out the GGUF at tmp with gguf-py, stream the tensor data through DirectFile, patch the two values
    known only at the end. Every file it opens is closed however it ends."""
    total = sum(job.nbytes for job in jobs)
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        writer.add_name(name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(FILE_TYPES[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_qwen3_hparams(writer, config)
        add_tokenizer(writer, reader.model_dir, config.vocab_size)
        add_so8t_metadata(writer, so8t)
        for job in jobs:
            writer.add_tensor_info(job.target, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        header_end = send_tensor_data_through_direct_file(writer, tmp)

        done = 0
        with contextlib.closing(encoded_stream(folded, jobs)) as stream:
            for job in jobs:
                def advance(n: int, job=job) -> None:
                    nonlocal done
                    done += n
                    if progress:
                        progress(done, total, job.target)
                chunks = itertools.islice(stream, len(folded.chunks(job)))
                writer.write_tensor_data(_StreamedTensor(job, chunks, advance),
                                         tensor_endianess=gguf.GGUFEndian.LITTLE)
        writer.close()
    except BaseException:
        with contextlib.suppress(Exception):  # closing may re-raise the write error that brought us here
            writer.close()
        raise
    hasher.join()
    if hasher.error:
        raise ExportError(f"cannot hash the source weights: {hasher.error}")
    if folded.max_error > FOLD_ERROR_LIMIT:  # readers refuse a file above it, so never write one
        raise ExportError(f"{reader.model_dir}: fold max abs error {folded.max_error:.2e} is above "
                          f"{FOLD_ERROR_LIMIT:g}, the bound every reader of so8t.fold.max_abs_error checks")
    _patch_metadata(tmp, header_end, folded.max_error, hasher.result)


def _patch_metadata(path: Path, header_end: int, fold_max_abs_error: float, source_sha256: str) -> None:
    """Overwrite the two placeholders in place, as gguf-py's gguf_set_metadata does, but without GGUFReader:
    it parses every field, and the tokenizer's 151936-string arrays took 5 s. A GGUF key-value entry is
    key length (u64), key, value type (u32), value; a string value is its length (u64) and bytes."""
    values = {FOLD_ERROR_KEY: (gguf.GGUFValueType.FLOAT32, struct.pack("<f", fold_max_abs_error)),
              SOURCE_HASH_KEY: (gguf.GGUFValueType.STRING,
                                struct.pack("<Q", len(source_sha256)) + source_sha256.encode("ascii"))}
    with path.open("r+b") as f:
        header = f.read(header_end)
        for key, (value_type, value) in values.items():
            tag = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", value_type)
            at = header.find(tag)
            if at < 0 or header.find(tag, at + 1) >= 0:
                raise ExportError(f"{path}: metadata key {key} is not in the header exactly once")
            f.seek(at + len(tag))
            f.write(value)
