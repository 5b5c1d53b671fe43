"""The k-quant and i-quant types, made by llama.cpp's own quantiser (llama_model_quantize) from our float GGUF.

Route: the checkpoint is exported (folded, streamed, checked: export.py) to a bf16 GGUF in a temporary folder
beside the output, and llama-cpp-python's llama_model_quantize turns that file into the requested type, with
llama.cpp's own per-tensor mix (Q4_K_M puts Q6_K on token_embd and some attn_v/ffn_down, ...). bf16 because it
is what llama.cpp's converter writes for Qwen3 before llama-quantize, and half the bytes of f32: the quantiser
reads every float type as f32 anyway, and a bf16 or FP8-sourced plain Qwen3 weight is exact in bf16 (folded
SO8T weights are rounded once more, far below the 2-6 bit rounding that follows; README, "Quant types",
gives the measured difference). The quantiser copies every metadata key, so the so8t.* keys survive; it
sets general.file_type itself.

The temporary folder (float file, candidates) is removed however the command ends, and the output is written
under a temporary name and renamed at the end: llama.cpp leaves a truncated file when it fails.

The imatrix (per-column mean squared activation) reaches llama.cpp as in-memory llama_model_imatrix_data
entries: libllama has no imatrix file reader (that is in llama.cpp's common library), so the file is read
with imatrix.read_imatrix, or computed from a calibration text with imatrix.compute_imatrix.

`--quant auto --max-kld X` measures candidates against the f32 PyTorch reference's logits on the calibration
text (parity.kl_divergence) and keeps the smallest whose mean KLD is at most X.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import llama_log
from .checkpoint import CheckpointReader
from .config import LLAMA_QUANT_TYPE_NAMES
from .export import ExportError, ExportReport, default_output, export_gguf, input_files
from .gguf_file import read_gguf_header
from .io import atomic_output, check_output_path

__all__ = ["FLOAT_STAGE", "IMATRIX_REQUIRED", "LLAMA_FTYPES", "AutoReport", "Quality", "QuantizeError",
           "ReferenceLogits", "choose_quant", "export_quantized", "quantize_file", "quantized_types",
           "require_imatrix"]

_F = gguf.LlamaFileType
# --quant name -> llama_ftype (llama.h's LLAMA_FTYPE_MOSTLY_*; gguf-py mirrors the enum).
LLAMA_FTYPES: dict[str, gguf.LlamaFileType] = {name: _F[f"MOSTLY_{name.upper()}"] for name in LLAMA_QUANT_TYPE_NAMES}
# The float file the quantiser reads (module docstring says why bf16).
FLOAT_STAGE = "bf16"
# The types whose tensors llama.cpp refuses to make without an imatrix (llama-quant.cpp, tensor_requires_imatrix
# over the per-tensor mix at 0c1e57098): their main type is IQ1_*, IQ2_* or IQ3_XXS, and IQ3_XXS puts IQ2_S on
# attn_q/attn_k. token_embd is exempt, which is why q2_k and iq3_s, with some Q2_K/IQ3_XXS mixed in elsewhere
# only for other ftypes, are not here. The quantiser's own refusal is turned into the same message as well.
IMATRIX_REQUIRED = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs"})
# Bytes of rows the quantiser converts at a time (llama_model_quantize_params.max_buf_size; llama.cpp's default is
# 8 GiB, which for Qwen3-4B's 151936 x 2560 token_embd means a 1.56 GB f32 copy plus its output at once). 64 MiB
# slabs still give every thread thousands of rows.
QUANT_BUFFER_BYTES = 64 << 20
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")  # llama_model_quantize's "[  3/ 26] blk.0.attn_q.weight"
AUTO_CHUNK_SIZE = 512  # tokens per measured chunk (llama-perplexity's default context)
AUTO_MAX_CHUNKS = 4  # chunks of the calibration text measured: 2048 tokens, a few seconds per candidate on a 4B


class QuantizeError(ExportError):
    """llama.cpp's quantiser refused or failed; names the file and carries llama.cpp's own reason."""


def how_to_get_imatrix(quant: str) -> str:
    return (f"--quant {quant} needs an importance matrix (llama.cpp refuses to make it without one); pass "
            "--imatrix FILE (from `so8t-export imatrix MODEL_DIR --text calib.txt -o imatrix.gguf` or llama.cpp's "
            "llama-imatrix) or --calibration calib.txt to compute one on the fly")


def require_imatrix(quant: str, has_imatrix: bool) -> None:
    """Refuse, before any work, a type llama.cpp cannot make without an imatrix when none is given."""
    if quant in IMATRIX_REQUIRED and not has_imatrix:
        raise QuantizeError(how_to_get_imatrix(quant))


# ------------------------------------------------------------------------------------------------- imatrix
def load_imatrix(model_dir: Path, imatrix: Path | None, calibration: Path | None, *,
                 progress: Callable[[int, int], None] | None = None):
    """The Imatrix to quantise with: read from a GGUF imatrix file, computed from a calibration text by the
    PyTorch reference, or None. (imatrix.py imports torch and transformers: loaded only when asked for.)"""
    if imatrix is not None and calibration is not None:
        raise QuantizeError(f"--imatrix {imatrix} and --calibration {calibration}: give one of them; expected "
                            "either an imatrix file or a text to compute one from")
    if imatrix is None and calibration is None:
        return None
    from .imatrix import compute_imatrix, read_calibration_text, read_imatrix

    if imatrix is not None:
        return read_imatrix(imatrix)
    return compute_imatrix(model_dir, read_calibration_text(calibration), dataset=str(calibration),
                           progress=progress)


def _imatrix_entries(means: dict[str, np.ndarray], llama_cpp):
    """A NULL-terminated llama_model_imatrix_data array over means (name -> float32 values); the arrays it
    points into are returned with it and must outlive the quantiser call."""
    kept = {name.encode(): np.ascontiguousarray(values, dtype=np.float32) for name, values in means.items()}
    entries = (llama_cpp.llama_model_imatrix_data * (len(kept) + 1))()
    for entry, (name, values) in zip(entries, kept.items()):
        entry.name = name
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    return entries, kept


# ------------------------------------------------------------------------------------------------ quantiser
def quantize_file(source: Path, output: Path, quant: str, *, imatrix=None, threads: int = 0,
                  progress: Callable[[int, int, str], None] | None = None) -> None:
    """llama_model_quantize(source -> output) to quant (an LLAMA_FTYPES name) with llama.cpp's default
    parameters; imatrix: an imatrix.Imatrix or None. progress(tensor_index, tensor_count, name) as each
    tensor starts. llama.cpp's lines are logged through llama_log (shown with --verbose); a failure is one
    QuantizeError with llama.cpp's reason. Whatever it leaves at output on failure is the caller's to remove."""
    from .runtime import _llama_cpp

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_FTYPES[quant])
    params.nthread = threads  # 0: llama.cpp uses every hardware thread
    params.max_buf_size = QUANT_BUFFER_BYTES
    kept = None
    if imatrix is not None:
        entries, kept = _imatrix_entries(imatrix.means(), llama_cpp)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))

    def on_line(level: int, text: str) -> None:
        match = _TENSOR_LINE.match(text)
        if progress and match:
            progress(int(match.group(1)) - 1, int(match.group(2)), match.group(3))

    llama_log.install()
    with llama_log.collect_errors() as errors, llama_log.watch(on_line):
        status = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(output), ctypes.byref(params))
    del kept  # the imatrix arrays were read by the call; they may go now
    if status != 0:
        # llama.cpp frames some errors in lines of '='; its last line, "failed to quantize: <why>", says it all.
        failed = [line for line in errors if "failed to quantize:" in line]
        reason = (" ".join(failed[-1].split()) if failed else llama_log.summary(errors)) or \
            f"llama_model_quantize returned {status}"
        if "requires an imatrix" in reason or "Missing importance matrix" in reason:
            raise QuantizeError(f"{source}: {how_to_get_imatrix(quant)} (llama.cpp: {reason})")
        raise QuantizeError(f"{source}: llama.cpp's quantiser could not make {quant}: {reason}")


def quantized_types(path: Path, quant: str) -> dict[str, int]:
    """Tensor type name -> count, in order of first appearance, of the quantiser's output; checks that it says
    general.file_type = quant and that every tensor's data lies inside the file (a truncated write does not)."""
    header = read_gguf_header(path)
    field = header.get_field("general.file_type")
    found = field.contents() if field is not None else None
    if found != int(LLAMA_FTYPES[quant]):
        raise QuantizeError(f"{path}: general.file_type = {found}; expected {int(LLAMA_FTYPES[quant])} "
                            f"({LLAMA_FTYPES[quant].name})")
    size = path.stat().st_size
    for tensor in header.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise QuantizeError(f"{path}: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes}; "
                                f"expected it inside the {size}-byte file (a truncated write)")
    return dict(Counter(t.tensor_type.name for t in header.tensors))


def _float_tensor_bytes(path: Path) -> dict[str, int]:
    return {t.name: t.n_bytes for t in read_gguf_header(path).tensors}


class _TwoStages:
    """One progress(done, total, label) over the float export (its bytes) and the quantiser (the float bytes
    of the tensors it has finished): each stage is half of the bar."""

    def __init__(self, progress: Callable[[int, int, str], None] | None, quantiser_runs: int = 1):
        self.progress, self.runs, self.float_total, self.run, self.sizes = progress, quantiser_runs, 0, 0, []

    def export(self, done: int, total: int, tensor: str) -> None:
        self.float_total = total
        if self.progress:
            self.progress(done, total * (1 + self.runs), tensor)

    def start_run(self, float_file: Path) -> None:
        self.sizes = list(_float_tensor_bytes(float_file).values())

    def quantise(self, quant: str):
        def update(index: int, count: int, tensor: str) -> None:
            if self.progress:
                done = self.float_total * (1 + self.run) + sum(self.sizes[:index])
                self.progress(done, self.float_total * (1 + self.runs), f"{quant}: {tensor}")
        return update

    def end_run(self) -> None:
        self.run += 1
        if self.progress:
            self.progress(self.float_total * (1 + self.run), self.float_total * (1 + self.runs), "")


def return_freed_memory() -> None:
    """Hand the heap the float export freed back to the system before the quantiser maps its input: glibc
    keeps freed chunks for reuse, and on Qwen3-4B the quantiser's mapped 778 MB embedding came on top of them
    (measured: peak RSS 1648 MB, 574 MB of it heap). A no-op where there is no glibc."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check_paths(model_dir: Path, output: Path, extra_inputs: tuple[Path | None, ...]) -> None:
    with CheckpointReader(model_dir) as reader:
        inputs = input_files(model_dir, reader)
    check_output_path(output, [*inputs, *(p for p in extra_inputs if p is not None)])


def _workspace(output: Path) -> tempfile.TemporaryDirectory:
    """A private folder beside the output for the float file and candidates, removed however the command
    ends (beside it: same filesystem, so the final rename is a rename, and space is checked where it is used)."""
    return tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.")


def _imatrix_label(imatrix: Path | None, calibration: Path | None) -> str | None:
    return f"imatrix {imatrix}" if imatrix else f"imatrix from {calibration}" if calibration else None


def export_quantized(model_dir: str | Path, output: str | Path | None = None, *, quant: str,
                     name: str | None = None, imatrix: str | Path | None = None,
                     calibration: str | Path | None = None, threads: int = 0,
                     progress: Callable[[int, int, str], None] | None = None) -> ExportReport:
    """Export model_dir to quant (one of LLAMA_FTYPES) through a bf16 GGUF and llama.cpp's quantiser.

    imatrix: a GGUF imatrix file; calibration: a text to compute one from (not both). The report's
    tensor_types names the per-tensor types the quantiser chose. Nothing but the output is left behind, and
    the output appears whole or not at all."""
    start = time.perf_counter()
    model_dir, quant = Path(model_dir), quant.lower()
    if quant not in LLAMA_FTYPES:
        raise QuantizeError(f"--quant {quant!r} is not one of llama.cpp's quantiser types; expected one of "
                            f"{', '.join(LLAMA_FTYPES)}")
    imatrix = Path(imatrix) if imatrix is not None else None
    calibration = Path(calibration) if calibration is not None else None
    output = Path(output) if output is not None else default_output(model_dir, quant)
    _check_paths(model_dir, output, (imatrix, calibration))
    require_imatrix(quant, imatrix is not None or calibration is not None)
    data = load_imatrix(model_dir, imatrix, calibration)
    stages = _TwoStages(progress)
    with _workspace(output) as work:
        float_file = Path(work) / f"float-{FLOAT_STAGE}.gguf"
        report = export_gguf(model_dir, float_file, quant=FLOAT_STAGE, name=name or model_dir.resolve().name,
                             progress=stages.export)
        stages.start_run(float_file)
        return_freed_memory()
        with atomic_output(output) as tmp:
            quantize_file(float_file, tmp, quant, imatrix=data, threads=threads, progress=stages.quantise(quant))
            types = quantized_types(tmp, quant)
        stages.end_run()
    return dataclasses.replace(report, output=output, quant=quant, bytes_written=output.stat().st_size,
                               seconds=time.perf_counter() - start, tensor_types=types,
                               imatrix=_imatrix_label(imatrix, calibration))


# ------------------------------------------------------------------------------------------------- quality
@dataclass
class Quality:
    """One file measured against the reference: size, KL(reference || file) per token, top-1 agreement."""

    quant: str
    bytes: int
    bits_per_weight: float
    mean_kld: float
    p99_kld: float
    top1: float


def bits_per_weight(path: Path) -> float:
    """Tensor data bits per tensor element (norms included), as llama-quantize reports BPW."""
    tensors = read_gguf_header(path).tensors
    return 8 * sum(t.n_bytes for t in tensors) / sum(math.prod(t.shape) for t in tensors)


class ReferenceLogits:
    """The f32 PyTorch reference's logits over the first max_chunks chunks of chunk_size tokens of a text,
    computed once; measure() runs a GGUF through llama.cpp on the same tokens and compares."""

    def __init__(self, model_dir: str | Path, text: str, *, chunk_size: int = AUTO_CHUNK_SIZE,
                 max_chunks: int = AUTO_MAX_CHUNKS):
        import torch

        from .imatrix import chunk_tokens
        from .model import SO8TTransformerForCausalLM
        from .parity import load_tokenizer, require_finite_weights

        tokenizer = load_tokenizer(model_dir)
        tokens = tokenizer(text, add_special_tokens=False).input_ids  # special-token text parsed, as parity does
        if not tokens:
            raise QuantizeError(f"{model_dir}: the calibration text has no tokens; expected text to measure on")
        size = min(chunk_size, len(tokens))
        self.chunks = [c.tolist() for c in chunk_tokens(tokens, size, None)[:max_chunks]]
        model = SO8TTransformerForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        require_finite_weights(model, model_dir)
        with torch.inference_mode():
            self.logits = [model(torch.tensor([chunk])).task_logits[0].float().numpy() for chunk in self.chunks]

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.chunks)

    def measure(self, path: Path, quant: str) -> Quality:
        from .parity import kl_divergence
        from .runtime import SO8TRuntime

        runtime = SO8TRuntime(path, n_ctx=max(len(c) for c in self.chunks))
        klds, agree = [], []
        for chunk, ref in zip(self.chunks, self.logits):
            ours = runtime.evaluate(chunk).logits
            klds.append(kl_divergence(ref, ours))
            agree.append(ref.argmax(-1) == ours.argmax(-1))
        del runtime
        kld = np.concatenate(klds)
        return Quality(quant=quant, bytes=path.stat().st_size, bits_per_weight=bits_per_weight(path),
                       mean_kld=float(kld.mean()), p99_kld=float(np.percentile(kld, 99)),
                       top1=float(np.concatenate(agree).mean()))


@dataclass
class AutoReport:
    max_kld: float
    rows: list[Quality]  # every candidate measured
    tokens: int  # calibration tokens the KLD is measured on
    chosen: str | None
    export: ExportReport | None

    def table(self) -> str:
        head = f"{'quant':<8} {'MiB':>8} {'bpw':>6} {'mean KLD':>10} {'p99 KLD':>10} {'top-1':>7}"
        lines = [f"--quant auto: mean KLD against the f32 reference on {self.tokens} calibration tokens, "
                 f"bound {self.max_kld:g}", head, "-" * len(head)]
        for r in sorted(self.rows, key=lambda r: r.bytes):
            mark = "  <- chosen" if r.quant == self.chosen else "" if r.mean_kld <= self.max_kld else "  over"
            lines.append(f"{r.quant:<8} {r.bytes / 2**20:>8.2f} {r.bits_per_weight:>6.2f} {r.mean_kld:>10.3e} "
                         f"{r.p99_kld:>10.3e} {r.top1:>7.1%}{mark}")
        return "\n".join(lines)


def choose_quant(model_dir: str | Path, output: str | Path | None = None, *, max_kld: float,
                 calibration: str | Path | None = None, imatrix: str | Path | None = None,
                 name: str | None = None, threads: int = 0, chunk_size: int = AUTO_CHUNK_SIZE,
                 max_chunks: int = AUTO_MAX_CHUNKS,
                 progress: Callable[[int, int, str], None] | None = None) -> AutoReport:
    """The smallest of llama.cpp's types whose mean KLD against the f32 reference on the calibration text
    (default: the shipped one) is at most max_kld, written to output (default ./<MODEL_DIR>-<type>.gguf).

    Candidates are searched by bisection over LLAMA_QUANT_TYPE_NAMES (ordered by bits per weight), so about
    five are made and measured, all from one float export; KLD falls with bits per weight, which is what the
    bisection relies on. Every type gets an imatrix: the given file, or one computed from the calibration text.
    When none stays under the bound the report's chosen is None and nothing is written."""
    from .imatrix import CALIBRATION_TEXT, compute_imatrix, read_calibration_text, read_imatrix

    start = time.perf_counter()
    if not (isinstance(max_kld, (int, float)) and math.isfinite(max_kld) and max_kld > 0):
        raise QuantizeError(f"--max-kld {max_kld!r}; expected a positive number")
    model_dir = Path(model_dir)
    calibration = Path(calibration) if calibration is not None else CALIBRATION_TEXT
    imatrix = Path(imatrix) if imatrix is not None else None
    final = Path(output) if output is not None else None
    probe = final or default_output(model_dir, "auto")  # where the workspace goes; checked again at the end
    _check_paths(model_dir, probe, (imatrix, calibration))
    text = read_calibration_text(calibration)
    data = read_imatrix(imatrix) if imatrix is not None else compute_imatrix(model_dir, text,
                                                                              dataset=str(calibration))
    reference = ReferenceLogits(model_dir, text, chunk_size=chunk_size, max_chunks=max_chunks)
    ascending = list(reversed(LLAMA_QUANT_TYPE_NAMES))
    stages = _TwoStages(progress, quantiser_runs=math.ceil(math.log2(len(ascending) + 1)))
    rows: dict[str, Quality] = {}
    with _workspace(probe) as work:
        float_file = Path(work) / f"float-{FLOAT_STAGE}.gguf"
        report = export_gguf(model_dir, float_file, quant=FLOAT_STAGE, name=name or model_dir.resolve().name,
                             progress=stages.export)
        return_freed_memory()
        best: int | None = None
        low, high = 0, len(ascending) - 1
        while low <= high:
            mid = (low + high) // 2
            quant = ascending[mid]
            candidate = Path(work) / f"{quant}.gguf"
            stages.start_run(float_file)
            quantize_file(float_file, candidate, quant, imatrix=data, threads=threads,
                          progress=stages.quantise(quant))
            quantized_types(candidate, quant)
            stages.end_run()
            rows[quant] = reference.measure(candidate, quant)
            if rows[quant].mean_kld <= max_kld:
                if best is not None:
                    (Path(work) / f"{ascending[best]}.gguf").unlink()
                best, high = mid, mid - 1
            else:
                candidate.unlink()
                low = mid + 1
        if progress:
            progress(1, 1, "")
        if best is None:
            return AutoReport(max_kld, list(rows.values()), reference.tokens, None, None)
        chosen = ascending[best]
        final = final or default_output(model_dir, chosen)
        _check_paths(model_dir, final, (imatrix, calibration))
        with atomic_output(final) as tmp:
            os.replace(Path(work) / f"{chosen}.gguf", tmp)
            types = quantized_types(tmp, chosen)
    export = dataclasses.replace(report, output=final, quant=chosen, bytes_written=final.stat().st_size,
                                 seconds=time.perf_counter() - start, tensor_types=types,
                                 imatrix=_imatrix_label(imatrix, None if imatrix else calibration))
    return AutoReport(max_kld, list(rows.values()), reference.tokens, chosen, export)
