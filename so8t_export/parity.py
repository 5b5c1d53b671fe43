"""Parity: the PyTorch reference against llama.cpp running the exported GGUF, on the same prompts.

The reference is SO8TTransformerForCausalLM loaded from the source checkpoint in float32 (or bfloat16, so that
a 4B reference fits in 24 GB; rotations applied online); llama.cpp runs the folded file. KLD is KL(reference
|| llama.cpp) per token, in float64.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from .gguf_file import GGUFHeader, read_gguf_header, read_qwen3_hparams, scalar_value
from .metadata import read_optional_so8t_metadata
from .model import SO8TTransformerForCausalLM
from .runtime import SO8TRuntime, softmax

DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
    "东京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji check: 🚀🔥 café naïve — “quotes” and 😀👍🏽!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])",
    ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nIs 17 prime?<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n"),
]


@dataclass(frozen=True)
class Thresholds:
    max_abs_logit: float | None  # only meaningful for f32 (other types round the weights)
    mean_kld: float
    top1: float  # fraction of positions whose argmax agrees
    greedy: float  # fraction of greedy tokens matching before the first divergence
    head_prob: float


# f32 must reproduce the reference (F32 KV cache); the others are bounded by what llama.cpp's own
# converter reaches on the same checkpoint (README, "Parity"): llama.cpp quantises activations too.
THRESHOLDS = {
    "f32": Thresholds(max_abs_logit=1e-3, mean_kld=1e-6, top1=1.0, greedy=1.0, head_prob=1e-4),
    "f16": Thresholds(max_abs_logit=None, mean_kld=1e-3, top1=0.95, greedy=0.5, head_prob=1e-2),
    "bf16": Thresholds(max_abs_logit=None, mean_kld=5e-3, top1=0.9, greedy=0.25, head_prob=5e-2),
    "q8_0": Thresholds(max_abs_logit=None, mean_kld=1e-3, top1=0.95, greedy=0.5, head_prob=1e-2),
}
# The reference's dtypes (parity --dtype). A bf16 reference rounds every weight and activation to bf16 itself,
# so it cannot certify a file more exactly than a bf16 GGUF is certified: reference_thresholds.
REFERENCE_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def reference_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a REFERENCE_DTYPES name; ValueError naming the choices otherwise."""
    try:
        return REFERENCE_DTYPES[dtype]
    except (KeyError, TypeError):
        choices = ", ".join(REFERENCE_DTYPES)
        raise ValueError(f"reference dtype {dtype!r}; expected one of {choices}") from None


def reference_thresholds(file_type: str, dtype: str = "f32") -> Thresholds:
    """The thresholds a file of file_type is held to against a reference run in dtype.

    f32 reference: THRESHOLDS[file_type]. bf16 reference: for each measure the looser of the file type's and
    the bf16 file's thresholds, and no max-abs-logit bound (the reference rounds its own logits). A bf16
    reference is itself about a bf16 file's rounding away from the exact model (README, "Parity"), so it
    cannot certify any file more exactly than a bf16 file.
    """
    own = THRESHOLDS[file_type]
    if reference_dtype(dtype) == torch.float32:
        return own
    bf16 = THRESHOLDS["bf16"]
    return Thresholds(max_abs_logit=None, mean_kld=max(own.mean_kld, bf16.mean_kld),
                      top1=min(own.top1, bf16.top1), greedy=min(own.greedy, bf16.greedy),
                      head_prob=max(own.head_prob, bf16.head_prob))


FILE_TYPE_NAMES = {gguf.LlamaFileType.ALL_F32: "f32", gguf.LlamaFileType.MOSTLY_F16: "f16",
                   gguf.LlamaFileType.MOSTLY_BF16: "bf16", gguf.LlamaFileType.MOSTLY_Q8_0: "q8_0"}


@dataclass
class PromptParity:
    prompt: str
    tokens: int
    tokens_equal: bool
    max_abs_logit: float
    mean_kld: float
    p99_kld: float
    top1: float
    greedy_matched: int
    greedy_total: int
    safety_diff: float | None  # None when the GGUF has no so8t.* heads
    authority_diff: float | None


@dataclass
class ParityReport:
    file_type: str
    kv_cache: str
    rows: list[PromptParity]
    thresholds: Thresholds
    reference_dtype: str = "f32"  # a REFERENCE_DTYPES key
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def has_heads(self) -> bool:
        return all(r.safety_diff is not None for r in self.rows)

    def aggregate(self) -> dict:
        klds = [r.mean_kld for r in self.rows]
        heads = self.has_heads
        return {
            "tokens_equal": all(r.tokens_equal for r in self.rows),
            "max_abs_logit": max(r.max_abs_logit for r in self.rows),
            "mean_kld": float(np.mean(klds)),
            "p99_kld": max(r.p99_kld for r in self.rows),
            "top1": float(np.mean([r.top1 for r in self.rows])),
            "greedy": sum(r.greedy_matched for r in self.rows) / max(1, sum(r.greedy_total for r in self.rows)),
            "safety_diff": max(r.safety_diff for r in self.rows) if heads else None,
            "authority_diff": max(r.authority_diff for r in self.rows) if heads else None,
        }

    def to_json(self) -> str:
        return json.dumps({"file_type": self.file_type, "kv_cache": self.kv_cache,
                           "reference_dtype": self.reference_dtype, "passed": self.passed,
                           "failures": self.failures, "notes": self.notes, "aggregate": self.aggregate(),
                           "thresholds": asdict(self.thresholds), "prompts": [asdict(r) for r in self.rows]},
                          indent=2, ensure_ascii=False)

    def table(self) -> str:
        head = f"{'prompt':<28} {'tok':>4} {'tok=':>4} {'max|dlogit|':>11} {'mean KLD':>9} {'p99 KLD':>9} " \
               f"{'top1':>6} {'greedy':>7} {'d safety':>9} {'d author':>9}"
        title = f"parity: {self.file_type} GGUF, {self.kv_cache} KV cache, {self.reference_dtype} reference"
        lines = [title, head, "-" * len(head)]
        for r in self.rows:
            label = r.prompt.replace("\n", "\\n")[:28]
            lines.append(f"{label:<28} {r.tokens:>4} {'yes' if r.tokens_equal else 'NO':>4} {r.max_abs_logit:>11.2e} "
                         f"{r.mean_kld:>9.2e} {r.p99_kld:>9.2e} {r.top1:>6.1%} "
                         f"{f'{r.greedy_matched}/{r.greedy_total}':>7} {_diff(r.safety_diff)} {_diff(r.authority_diff)}")
        a = self.aggregate()
        lines.append("-" * len(head))
        lines.append(f"{'all':<28} {sum(r.tokens for r in self.rows):>4} {'yes' if a['tokens_equal'] else 'NO':>4} "
                     f"{a['max_abs_logit']:>11.2e} {a['mean_kld']:>9.2e} {a['p99_kld']:>9.2e} {a['top1']:>6.1%} "
                     f"{a['greedy']:>7.1%} {_diff(a['safety_diff'])} {_diff(a['authority_diff'])}")
        lines += [f"note: {note}" for note in self.notes]
        lines.append("PASS" if self.passed else "FAIL: " + "; ".join(self.failures))
        return "\n".join(lines)


def _diff(value: float | None) -> str:
    return f"{'n/a':>9}" if value is None else f"{value:>9.2e}"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64."""
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_test) per row, in float64."""
    log_p, log_q = log_softmax(ref_logits), log_softmax(test_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def read_prompts(path: str | Path | None) -> list[str]:
    """A .json list of strings, or a text file with one prompt per line (\\n escapes allowed)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    from .io import require_regular_file

    path = Path(path)
    require_regular_file(path, "prompts file")
    try:
        text = path.read_text(encoding="utf-8")
        prompts = json.loads(text) if path.suffix == ".json" else [
            line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: expected UTF-8 {'JSON' if path.suffix == '.json' else 'text'} prompts ({err})") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path}: expected a non-empty list of non-empty prompt strings")
    return prompts


def gguf_file_type(path: Path, reader: GGUFHeader | gguf.GGUFReader | None = None) -> str:
    """general.file_type as parity's name for it; reader: the header (read_gguf_header) if already read."""
    reader = read_gguf_header(path) if reader is None else reader
    value = scalar_value(reader, "general.file_type", path, (gguf.GGUFValueType.UINT32,))
    try:
        return FILE_TYPE_NAMES[gguf.LlamaFileType(value)]
    except (ValueError, KeyError):
        raise ValueError(f"{path}: general.file_type = {value}; parity knows f32, f16, bf16 and q8_0") from None


def load_tokenizer(model_dir: str | Path):
    """transformers' tokenizer of MODEL_DIR; a broken tokenizer file is one error naming it."""
    from transformers import AutoTokenizer

    from .checkpoint import read_json

    model_dir = Path(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).exists() or (model_dir / name).is_symlink():
            read_json(model_dir / name, name, ValueError)  # names the file (and refuses a FIFO before open)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001 - transformers raises ValueError, OSError, KeyError, TypeError, ...
        raise ValueError(f"{model_dir}: transformers cannot load the tokenizer (tokenizer.json, "
                         f"tokenizer_config.json): {type(err).__name__}: {err}") from None


def require_finite_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """The reference must be finite: a NaN weight would only show as NaN columns in the table."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and tensor.numel():
            low, high = torch.aminmax(tensor.detach())  # propagates NaN: one pass
            if not (np.isfinite(low.item()) and np.isfinite(high.item())):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{model_dir}: tensor {name} has {bad} NaN or Inf values; expected finite "
                                 "weights for the reference")


@torch.inference_mode()
def run_parity(model_dir: str | Path, gguf_path: str | Path, *, prompts: list[str] | None = None,
               greedy_tokens: int = 64, f32_kv_cache: bool | None = None, tokenizer=None,
               dtype: str = "f32") -> ParityReport:
    """Compare reference and llama.cpp on each prompt; failures list the thresholds that were missed.

    dtype: the reference's, "f32" or "bf16" (half the memory; held to reference_thresholds).
    """
    torch_dtype = reference_dtype(dtype)  # before anything is read
    gguf_path = Path(gguf_path)
    reader = read_gguf_header(gguf_path)  # read once; every check of the file runs before the reference loads
    file_type = gguf_file_type(gguf_path, reader)
    hparams = read_qwen3_hparams(reader, gguf_path)
    has_heads = read_optional_so8t_metadata(reader, gguf_path, hparams) is not None
    thresholds = reference_thresholds(file_type, dtype)
    prompts = prompts if prompts is not None else list(DEFAULT_PROMPTS)
    tokenizer = tokenizer or load_tokenizer(model_dir)
    model = SO8TTransformerForCausalLM.from_pretrained(model_dir, torch_dtype=torch_dtype)
    require_finite_weights(model, model_dir)
    n_ctx = max(256, max(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts) + greedy_tokens + 8)
    runtime = SO8TRuntime(gguf_path, n_ctx=n_ctx, f32_kv_cache=f32_kv_cache, reader=reader)
    f32_kv_cache = runtime.f32_kv_cache  # None: f32 for an f32 file, else llama.cpp's f16
    del reader
    stops = set(model.config.eos_token_ids)
    rows = []
    for prompt in prompts:
        ref_tokens = tokenizer(prompt, add_special_tokens=False).input_ids
        ours = runtime.evaluate(ref_tokens)
        out = model(torch.tensor([ref_tokens]))
        ref_logits = out.task_logits[0].float().numpy()  # bf16 -> f32 is exact
        ref_safety = softmax(out.safety_logits[0].float().numpy())
        ref_authority = softmax(out.authority_logits[0].float().numpy())
        kld = kl_divergence(ref_logits, ours.logits)
        ref_greedy = model.generate(torch.tensor([ref_tokens]), max_new_tokens=greedy_tokens,
                                    eos_token_id=stops)[0, len(ref_tokens):].tolist()
        llama_greedy = runtime.greedy(ref_tokens, len(ref_greedy), stops)
        matched = next((i for i, (a, b) in enumerate(zip(ref_greedy, llama_greedy)) if a != b),
                       min(len(ref_greedy), len(llama_greedy)))
        rows.append(PromptParity(
            prompt=prompt, tokens=len(ref_tokens), tokens_equal=runtime.tokenize(prompt) == ref_tokens,
            max_abs_logit=float(np.abs(ref_logits - ours.logits).max()), mean_kld=float(kld.mean()),
            p99_kld=float(np.percentile(kld, 99)), top1=float((ref_logits.argmax(-1) == ours.logits.argmax(-1)).mean()),
            greedy_matched=matched, greedy_total=len(ref_greedy),
            safety_diff=float(np.abs(ref_safety - ours.safety).max()) if has_heads else None,
            authority_diff=float(np.abs(ref_authority - ours.authority).max()) if has_heads else None,
        ))
    report = ParityReport(file_type, "F32" if f32_kv_cache else "F16", rows, thresholds, dtype)
    if dtype != "f32":
        report.notes.append(f"{dtype} reference (itself rounded): the file is held to the looser of its own "
                            "and bf16's thresholds, without a max-abs-logit bound")
    if not has_heads:
        report.notes.append(f"{gguf_path} has no so8t.* metadata (a stock qwen3 GGUF): logits compared, "
                            "safety/authority head columns skipped")
    a = report.aggregate()
    checks = [
        (a["tokens_equal"], "tokenisation differs"),
        (thresholds.max_abs_logit is None or a["max_abs_logit"] <= thresholds.max_abs_logit,
         f"max abs logit diff {a['max_abs_logit']:.2e} > {thresholds.max_abs_logit}"),
        (a["mean_kld"] <= thresholds.mean_kld, f"mean KLD {a['mean_kld']:.2e} > {thresholds.mean_kld}"),
        (a["top1"] >= thresholds.top1, f"top-1 agreement {a['top1']:.1%} < {thresholds.top1:.0%}"),
        (a["greedy"] >= thresholds.greedy, f"greedy agreement {a['greedy']:.1%} < {thresholds.greedy:.0%}"),
    ]
    if has_heads:
        head_diff = max(a["safety_diff"], a["authority_diff"])
        checks.append((head_diff <= thresholds.head_prob,
                       f"head probability diff {head_diff:.2e} > {thresholds.head_prob}"))
    report.failures = [message for ok, message in checks if not ok]
    return report
