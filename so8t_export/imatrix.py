"""Importance matrix (imatrix) from the PyTorch reference, in llama.cpp's GGUF imatrix format.

An imatrix holds, for each weight matrix, the mean squared input activation of every input column over a
calibration text; the quantiser weights its rounding error by it. We measure it on the folded model
(from_pretrained(fold=True)), which runs as plain Qwen3 with exactly the weights of the exported file, so
each Linear's input is what the folded GGUF weight multiplies: for gate/up that is the normed MLP input
*before* the SO8T rotation (the rotation lives in the folded weight). An imatrix of the unfolded model's
rotated inputs would be diag(R^T Sigma R) of the wrong basis.

What llama.cpp's llama-imatrix does (tools/imatrix/imatrix.cpp at 0c1e57098), and so what this does, so that
the two files agree (tests/test_imatrix.py compares them on the same f32 GGUF and text):
- the whole text is tokenised once, with the tokenizer's own special tokens added (BOS where the tokenizer
  adds one; Qwen3 adds none); special-token text such as <|im_start|> is parsed as the special token with
  parse_special (llama-imatrix --parse-special), else tokenised as plain text (its default);
- the tokens are cut into len // chunk_size chunks of chunk_size tokens (the remainder is dropped), each run
  from an empty cache, with its first token replaced by BOS where the tokenizer adds one;
- every token of every chunk counts (the half-chunk rule is only for llama-imatrix's perplexity);
- recorded: each multiplication by a weight named blk.* (attn_q/k/v/output, ffn_gate/up/down) as the
  per-column sum of x^2 and the number of tokens; output.weight only with process_output (llama-imatrix
  --process-output; our untied LM head), token_embd never (the tied output matrix is named token_embd);
- the file: general.type "imatrix", imatrix.datasets (string array), imatrix.chunk_count and
  imatrix.chunk_size (u32), and per weight <name>.in_sum2 (F32, [n_mat, columns]) and <name>.counts (F32,
  [n_mat, 1]), sorted by weight name. Sums and counts are stored raw; readers divide (Imatrix.means).
Where we differ: the sums are accumulated in float64 (llama-imatrix adds float32 squares into float32), and
llama-imatrix also drops batches under 16 tokens, which its chunking never makes for chunk sizes >= 16.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from .checkpoint import CheckpointReader
from .io import PathError, atomic_output, check_output_path, require_regular_file

__all__ = ["CALIBRATION_TEXT", "DEFAULT_CHUNK_SIZE", "Imatrix", "ImatrixError", "ImatrixReport", "added_bos",
           "chunk_tokens", "column_square_sums", "compute_imatrix", "read_calibration_text", "read_imatrix",
           "recorded_linears", "write_imatrix", "write_imatrix_file"]

CALIBRATION_TEXT = Path(__file__).parent / "calibration" / "calibration.txt"  # ours; see its README
DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's default context, so its and our chunk counts agree
BATCH_TOKENS = 2048  # llama-imatrix's default batch: it runs 2048 // chunk_size chunks side by side
OUTPUT_WEIGHT = "output.weight"
DEFAULT_DATASET = "calibration text"  # imatrix.datasets' entry for a text given as a string (llama-imatrix: its path)
_IN_SUM2, _COUNTS = ".in_sum2", ".counts"


class ImatrixError(ValueError):
    """Bad calibration input or imatrix file; the message names the file or tensor, expected and found."""


@dataclass
class Imatrix:
    """Raw importance data as llama.cpp's GGUF imatrix stores it, keyed by GGUF weight name."""

    sums: dict[str, np.ndarray]  # float32 [n_mat, columns]: sum over tokens of each input column's square
    counts: dict[str, np.ndarray]  # float32 [n_mat]: tokens summed (n_mat is 1 for a dense model)
    chunk_count: int
    chunk_size: int
    datasets: list[str]
    text_tokens: int | None = None  # the tokenised text's length, where it is known (not stored in the file)

    def means(self) -> dict[str, np.ndarray]:
        """Per-column mean squared activation, flat (n_mat * columns float32): the entries
        llama_model_quantize takes, computed as llama-quantize computes them from a file (a matrix that no
        token reached gets ones)."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].astype(np.float32)[:, None]
            safe = np.where(counts > 0, counts, np.float32(1))
            out[name] = np.where(counts > 0, sums / safe, np.float32(1)).astype(np.float32).reshape(-1)
        return out


@dataclass
class ImatrixReport:
    output: Path
    tensors: int
    chunks: int
    chunk_size: int
    tokens: int  # tokenised text length; chunks * chunk_size of them were evaluated
    seconds: float

    def summary(self) -> str:
        return (f"wrote {self.output} ({self.tensors} weights, {self.chunks} chunks of {self.chunk_size} tokens, "
                f"{self.chunks * self.chunk_size} of {self.tokens} tokens) in {self.seconds:.1f} s")


# ------------------------------------------------------------------------------------------------- text
def read_calibration_text(path: str | Path) -> str:
    """A calibration text file, UTF-8; one line naming it when it is missing, special, not UTF-8 or empty."""
    path = Path(path)
    try:
        require_regular_file(path, "calibration text")
        text = path.read_text(encoding="utf-8")
    except PathError as err:
        raise ImatrixError(str(err)) from None
    except UnicodeDecodeError as err:
        raise ImatrixError(f"{path}: calibration text is not UTF-8 (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise ImatrixError(f"{path}: calibration text is empty; expected text to run the model over")
    return text


def added_bos(tokenizer, where: str) -> int | None:
    """The BOS id the tokenizer puts before every text, or None (Qwen3). llama.cpp adds the same
    (gguf_tokenizer checks the export); llama-imatrix refuses a vocabulary that appends EOS, and so do we."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    marked = tokenizer("a", add_special_tokens=True).input_ids
    if marked == plain:
        return None
    if len(marked) == len(plain) + 1 and marked[1:] == plain:
        return marked[0]
    raise ImatrixError(f"{where}: the tokenizer turns {plain} into {marked}; llama-imatrix (and so this) "
                       "expects a tokenizer that adds at most a BOS in front of a text")


def chunk_tokens(tokens: list[int], chunk_size: int, bos: int | None) -> torch.Tensor:
    """[chunks, chunk_size] int64: len(tokens) // chunk_size consecutive chunks, the remainder dropped, each
    chunk's first token replaced by bos when the tokenizer adds one (llama-imatrix's chunking)."""
    count = len(tokens) // chunk_size
    chunks = torch.tensor(tokens[:count * chunk_size], dtype=torch.int64).view(count, chunk_size)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


# ------------------------------------------------------------------------------------------------ model
def column_square_sums(x: torch.Tensor) -> torch.Tensor:
    """x [..., columns] -> float64 [columns]: each column's sum of squares over all tokens (squared in
    float32, as llama.cpp squares its float32 activations, summed in float64)."""
    return x.reshape(-1, x.shape[-1]).float().square().sum(0, dtype=torch.float64)


def recorded_linears(model) -> dict[str, torch.nn.Linear]:
    """GGUF weight name -> the Linear of a decoder layer whose input llama-imatrix records for it."""
    from .export import gguf_name

    layers = model.config.num_hidden_layers
    return {gguf_name(f"{name}.weight", layers): module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")}


@torch.inference_mode()
def compute_imatrix(model_dir: str | Path, text: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    parse_special: bool = True, process_output: bool = False, dtype: str = "f32",
                    dataset: str = DEFAULT_DATASET,
                    progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """The imatrix of model_dir (SO8T or plain Qwen3) over text, as llama-imatrix computes it on the model's
    folded GGUF (module docstring). dtype "f32" or "bf16" is the reference's (bf16 halves its memory);
    dataset names the text in errors and in imatrix.datasets. progress(chunks_done, chunks_total) is called
    after each batch of chunks."""
    from .model import SO8TTransformerForCausalLM
    from .parity import load_tokenizer, reference_dtype

    torch_dtype = reference_dtype(dtype)  # before anything is read
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ImatrixError(f"chunk size {chunk_size!r}; expected a positive number of tokens")
    if not text.strip():
        raise ImatrixError(f"{dataset}: calibration text is empty; expected text to run the model over")
    with CheckpointReader(model_dir):  # a missing folder or config is one line before the tokenizer looks
        pass
    tokenizer = load_tokenizer(model_dir)
    bos = added_bos(tokenizer, str(model_dir))
    tokens = tokenizer(text, add_special_tokens=True, split_special_tokens=not parse_special).input_ids
    if len(tokens) < chunk_size:
        raise ImatrixError(f"{dataset}: the text is {len(tokens)} tokens long; expected at least one chunk of "
                           f"{chunk_size} (a longer text or a smaller --chunk-size)")
    chunks = chunk_tokens(tokens, chunk_size, bos)

    model = SO8TTransformerForCausalLM.from_pretrained(model_dir, torch_dtype=torch_dtype, fold=True).eval()
    linears = recorded_linears(model)
    sums = {name: torch.zeros(module.in_features, dtype=torch.float64) for name, module in linears.items()}
    # Tied, the output matrix is token_embd, which llama-imatrix never records; untied, its input is the
    # final normed hidden state.
    record_output = process_output and not model.config.tie_word_embeddings
    if record_output:
        sums[OUTPUT_WEIGHT] = torch.zeros(model.config.hidden_size, dtype=torch.float64)

    def record(name: str):
        def hook(module, args):
            sums[name] += column_square_sums(args[0])
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in linears.items()]
    try:
        per_batch = max(1, BATCH_TOKENS // chunk_size)
        for start in range(0, len(chunks), per_batch):
            hidden, _, _ = model.model(chunks[start:start + per_batch])  # no logits: nothing records them
            if record_output:
                sums[OUTPUT_WEIGHT] += column_square_sums(hidden)
            if progress:
                progress(min(start + per_batch, len(chunks)), len(chunks))
    finally:
        for handle in handles:
            handle.remove()
    for name, total in sums.items():
        if not torch.isfinite(total).all():
            raise ImatrixError(f"{model_dir}: the inputs of {name} have NaN or Inf values over {dataset}; "
                               "expected finite activations")
    evaluated = np.array([chunks.numel()], dtype=np.float32)
    return Imatrix(sums={name: total.float().numpy()[None] for name, total in sums.items()},
                   counts={name: evaluated.copy() for name in sums}, chunk_count=len(chunks),
                   chunk_size=chunk_size, datasets=[dataset], text_tokens=len(tokens))


# ------------------------------------------------------------------------------------------------- files
def write_imatrix_file(imatrix: Imatrix, output: str | Path) -> None:
    """llama.cpp's GGUF imatrix file (module docstring), written atomically with gguf-py's writer."""
    output = Path(output)
    check_output_path(output)
    with atomic_output(output) as tmp:
        # GGUFWriter always writes general.architecture; an imatrix is for one model family, so naming it harms
        # nothing (llama.cpp's loader reads only the keys and tensors below).
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
        try:
            writer.add_type(gguf.GGUFType.IMATRIX)
            writer.add_array(gguf.Keys.IMatrix.DATASETS, list(imatrix.datasets))
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, imatrix.chunk_count)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
            for name in sorted(imatrix.sums):
                writer.add_tensor(name + _IN_SUM2, np.ascontiguousarray(imatrix.sums[name], dtype=np.float32))
                writer.add_tensor(name + _COUNTS, np.asarray(imatrix.counts[name], dtype=np.float32)[:, None])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def read_imatrix(path: str | Path) -> Imatrix:
    """A GGUF imatrix file (ours or llama-imatrix's), checked as llama-quantize checks it: every <name>.in_sum2
    has a <name>.counts, both F32, and the three imatrix.* keys are present."""
    path = Path(path)
    try:
        require_regular_file(path, "imatrix file")
        reader = gguf.GGUFReader(path)
    except PathError as err:
        raise ImatrixError(str(err)) from None
    except (ValueError, OSError) as err:
        raise ImatrixError(f"{path}: not a GGUF imatrix file ({err})") from None

    def field(key: str):
        found = reader.get_field(key)
        if found is None:
            raise ImatrixError(f"{path}: key {key} is missing; expected llama.cpp's GGUF imatrix metadata")
        return found

    kind = field(gguf.Keys.General.TYPE).contents()
    if kind != gguf.GGUFType.IMATRIX:
        raise ImatrixError(f"{path}: general.type = {kind!r}; expected {gguf.GGUFType.IMATRIX!r}")
    datasets = field(gguf.Keys.IMatrix.DATASETS).contents()
    chunk_count = int(field(gguf.Keys.IMatrix.CHUNK_COUNT).contents())
    chunk_size = int(field(gguf.Keys.IMatrix.CHUNK_SIZE).contents())
    tensors = {t.name: t for t in reader.tensors}
    sums, counts = {}, {}
    for tensor_name, tensor in tensors.items():
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {tensor_name} is {tensor.tensor_type.name}; expected F32")
        if tensor_name.endswith(_IN_SUM2):
            name = tensor_name.removesuffix(_IN_SUM2)
            if name + _COUNTS not in tensors:
                raise ImatrixError(f"{path}: tensor {tensor_name} has no {name}{_COUNTS}")
            n_mat = int(np.prod(tensors[name + _COUNTS].shape))
            data = np.array(tensor.data, dtype=np.float32).reshape(-1)
            if data.size % n_mat:
                raise ImatrixError(f"{path}: tensor {tensor_name} has {data.size} values; expected a multiple "
                                   f"of the {n_mat} counts in {name}{_COUNTS}")
            sums[name] = data.reshape(n_mat, -1)
            counts[name] = np.array(tensors[name + _COUNTS].data, dtype=np.float32).reshape(-1)
        elif tensor_name.endswith(_COUNTS) and tensor_name.removesuffix(_COUNTS) + _IN_SUM2 not in tensors:
            raise ImatrixError(f"{path}: tensor {tensor_name} has no {tensor_name.removesuffix(_COUNTS)}{_IN_SUM2}")
    if not sums:
        raise ImatrixError(f"{path}: no <weight>{_IN_SUM2} tensors; expected at least one")
    return Imatrix(sums=sums, counts=counts, chunk_count=chunk_count, chunk_size=chunk_size,
                   datasets=[str(d) for d in datasets])


def write_imatrix(model_dir: str | Path, text: str, output: str | Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  parse_special: bool = True, process_output: bool = False, dtype: str = "f32",
                  dataset: str = DEFAULT_DATASET, inputs: tuple[Path, ...] = (),
                  progress: Callable[[int, int], None] | None = None) -> ImatrixReport:
    """compute_imatrix, then write it to output (atomically; it may replace an old output, never one of
    inputs, e.g. the text file, nor a file of model_dir)."""
    start = time.perf_counter()
    model_dir, output = Path(model_dir), Path(output)
    model_files = list(model_dir.iterdir()) if model_dir.is_dir() else []
    check_output_path(output, [*inputs, *model_files])  # before the model runs
    imatrix = compute_imatrix(model_dir, text, chunk_size=chunk_size, parse_special=parse_special,
                              process_output=process_output, dtype=dtype, dataset=dataset, progress=progress)
    write_imatrix_file(imatrix, output)
    return ImatrixReport(output=output, tensors=len(imatrix.sums), chunks=imatrix.chunk_count,
                         chunk_size=chunk_size, tokens=imatrix.text_tokens, seconds=time.perf_counter() - start)
