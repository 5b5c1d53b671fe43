"""train-heads and eval-heads: fit the safety and authority heads on labelled data, and measure them.

Features are frozen (the base model is never changed): each head is a logistic regression on the final
normed hidden state at an example's last prompt token (features.py), fitted by fit.fit_head. The reported
metrics come from the eval set, or from a held-out split of the training data when none is given; the
threshold that reaches ``target_fpr`` on that set becomes the head's default in the checkpoint's config
(so8t_<head>_threshold), which the export and set-heads carry into the GGUF.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import HEAD_LABELS
from ..io import PathError, write_bytes_atomic
from ..loading import check_save_target
from .data import DataError, Example, labelled, read_examples
from .features import GGUFFeatures, Progress, ReferenceFeatures
from .fit import HeadMetrics, fit_head, measure, positive_probability, threshold_at_fpr

REPORT_FILE = "heads_report.json"
DEFAULT_HOLDOUT = 0.2


@dataclass
class HeadResult:
    """One head on the evaluation set: its probabilities of class 1, the labels and the metrics."""

    probabilities: np.ndarray
    labels: np.ndarray
    metrics: HeadMetrics | None  # None: no example of the set carries this head's label
    trained_on: int = 0  # training examples (train-heads); 0 for a head left as it was
    iterations: int = 0
    converged: bool = True


@dataclass
class HeadsReport:
    features: str  # where the hidden states came from: a checkpoint folder or a GGUF
    evaluated_on: str
    heads: dict[str, HeadResult]
    output: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "features": self.features,
            "evaluated_on": self.evaluated_on,
            "output": None if self.output is None else str(self.output),
            "seconds": round(self.seconds, 3),
            "heads": {head: {"trained_on": r.trained_on, "iterations": r.iterations, "converged": r.converged,
                             **({"metrics": r.metrics.to_dict()} if r.metrics else {"metrics": None})}
                      for head, r in self.heads.items()},
            "notes": self.notes,
        }

    def table(self) -> str:
        lines = [f"features: {self.features}", f"evaluated on: {self.evaluated_on}",
                 f"{'head':<10} {'n':>5} {'pos':>5} {'thresh':>7} {'acc':>6} {'auroc':>6} {'prec':>6} "
                 f"{'recall':>6} {'fpr':>6} {'ece':>6}"]

        def number(value) -> str:
            return "-" if value is None else f"{value:.3f}"
        for head, result in self.heads.items():
            m = result.metrics
            if m is None:
                lines.append(f"{head:<10} no labelled examples")
                continue
            lines.append(f"{head:<10} {m.examples:>5} {m.positives:>5} {m.threshold:>7.4f} {number(m.accuracy):>6} "
                         f"{number(m.auroc):>6} {number(m.precision):>6} {number(m.recall):>6} "
                         f"{number(m.false_positive_rate):>6} {number(m.expected_calibration_error):>6}")
        lines += self.notes
        if self.output is not None:
            lines.append(f"wrote {self.output} in {self.seconds:.1f} s")
        return "\n".join(lines)


def _split(examples: list[Example], holdout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out split, stratified by the labels an example carries where every stratum allows it."""
    from sklearn.model_selection import train_test_split

    if not 0 < holdout < 1:
        raise ValueError(f"holdout fraction {holdout!r}; expected a number in (0, 1)")
    strata = [tuple(sorted(example.labels.items())) for example in examples]
    try:
        train, held = train_test_split(examples, test_size=holdout, random_state=seed, stratify=strata)
    except ValueError:  # a label combination with a single example cannot be stratified
        train, held = train_test_split(examples, test_size=holdout, random_state=seed)
    return list(train), list(held)


def _stored(values: np.ndarray, dtype) -> np.ndarray:
    """values as the checkpoint stores them (the model's dtype), back in float64: what the file will hold."""
    import torch

    return torch.as_tensor(values).to(dtype).double().numpy()


def _fingerprint(path: Path) -> dict:
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def train_heads(model_dir: str | Path, data: str | Path, output: str | Path, *, eval_data: str | Path | None = None,
                gguf: str | Path | None = None, l2: float = 1.0, balanced: bool = False,
                target_fpr: float | None = None, holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
                batch_size: int = 8, n_ctx: int | None = None, n_threads: int | None = None,
                progress: Progress | None = None, device=None) -> HeadsReport:
    """Fit both heads of the SO8T model in model_dir (an SO8T or plain Qwen3 checkpoint) on data and write
    the model with the new heads and thresholds to output (save_pretrained, plus heads_report.json).

    A head without any label in data keeps its weights and threshold. Thresholds: the one that reaches
    target_fpr on the evaluation set, or 0.5 when target_fpr is None. Reference features run on device
    (from_pretrained's device_map forms; the CPU by default).
    """
    from transformers import AutoTokenizer

    from ..model import SO8TTransformerForCausalLM

    start = time.perf_counter()
    model_dir, data, output = Path(model_dir), Path(data), Path(output)
    if not model_dir.is_dir():
        raise PathError(f"{model_dir}: model folder is missing")
    if output.exists() and os.path.samefile(output, model_dir):
        raise PathError(f"{output}: is the model folder this command reads; write the new checkpoint to "
                        "another folder")
    if l2 <= 0 or not np.isfinite(l2):
        raise ValueError(f"l2 = {l2!r}; expected a positive regularisation strength")
    check_save_target(output)  # before the features, which can take hours on a large model
    examples = read_examples(data)
    if eval_data is not None:
        train_set, eval_set = examples, read_examples(eval_data)
        evaluated_on, eval_path = str(eval_data), Path(eval_data)
    else:
        train_set, eval_set = _split(examples, holdout, seed)
        evaluated_on, eval_path = f"{len(eval_set)} examples held out of {data} (seed {seed})", data
    for head, names in HEAD_LABELS.items():
        _, labels = labelled(train_set, head)
        if labels and len(set(labels)) < 2:
            raise DataError(f"{data}: every {head}-labelled training example is {names[labels[0]]!r}; fitting "
                            f"the {head} head needs both {names[0]!r} and {names[1]!r}")

    if gguf is not None:
        model = SO8TTransformerForCausalLM.from_pretrained(model_dir).eval()
        extract = GGUFFeatures(gguf, n_ctx=n_ctx, n_threads=n_threads)
        if extract.hidden_size != model.config.hidden_size:
            raise ValueError(f"{gguf}: qwen3.embedding_length = {extract.hidden_size}, but {model_dir} has "
                             f"hidden_size = {model.config.hidden_size}; the GGUF must be an export of this model")
    else:
        # The features come from the folded model, which runs as plain Qwen3 with no rotation kernels and
        # computes the same hidden states (to float rounding; tests/test_devices.py).
        model = None
        features_model = SO8TTransformerForCausalLM.from_pretrained(model_dir, fold=True, device=device).eval()
        extract = ReferenceFeatures(features_model, AutoTokenizer.from_pretrained(model_dir),
                                    batch_size=batch_size, source=str(model_dir))
    total = len(train_set) + len(eval_set)
    x_train = extract(train_set, data, progress and (lambda done, _: progress(done, total)))
    x_eval = extract(eval_set, eval_path, progress and (lambda done, _: progress(len(train_set) + done, total)))
    if model is None:
        # The checkpoint is written from the weights as stored (not unfolded from the folded ones), so that
        # every tensor but the heads is the input's, byte for byte; the features' model goes first.
        del extract, features_model
        model = SO8TTransformerForCausalLM.from_pretrained(model_dir).eval()

    dtype = model.safety_head.weight.dtype
    results, notes = {}, []
    for head in HEAD_LABELS:
        rows, labels = labelled(train_set, head)
        linear = getattr(model, f"{head}_head")
        if not rows:
            notes.append(f"{head}: no labelled training examples; its head and threshold are left as they were")
            weight = linear.weight.detach().double().numpy()
            bias = linear.bias.detach().double().numpy()
            threshold, fitted = model.config.head_threshold(head), None
        else:
            fitted = fit_head(x_train[rows], labels, l2=l2, balanced=balanced)
            if not fitted.converged:
                notes.append(f"{head}: L-BFGS stopped after {fitted.iterations} iterations without converging")
            weight, bias = _stored(fitted.weight, dtype), _stored(fitted.bias, dtype)
        eval_rows, eval_labels = labelled(eval_set, head)
        probabilities = positive_probability(x_eval[eval_rows], weight, bias)
        if fitted is not None:
            threshold = 0.5
            if target_fpr is not None:
                try:
                    threshold = threshold_at_fpr(probabilities, eval_labels, target_fpr)
                except ValueError as err:
                    notes.append(f"{head}: threshold kept at 0.5: {err}")
        results[head] = HeadResult(probabilities, np.asarray(eval_labels),
                                   measure(probabilities, eval_labels, threshold) if eval_rows else None,
                                   trained_on=len(rows), iterations=fitted.iterations if fitted else 0,
                                   converged=fitted.converged if fitted else True)
        if fitted is not None:
            import torch

            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(weight))
                linear.bias.copy_(torch.from_numpy(bias))
            setattr(model.config, f"so8t_{head}_threshold", float(threshold))

    report = HeadsReport(features=str(gguf) if gguf is not None else f"{model_dir} (PyTorch reference)",
                         evaluated_on=evaluated_on, heads=results, output=output, notes=notes)
    model.save_pretrained(output)
    report.seconds = time.perf_counter() - start
    record = report.to_dict()
    record["training"] = {"data": _fingerprint(data), "eval": _fingerprint(Path(eval_data)) if eval_data else None,
                          "l2": l2, "balanced": balanced, "target_fpr": target_fpr, "holdout": holdout, "seed": seed}
    write_bytes_atomic(output / REPORT_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return report


def evaluate_heads(source: str | Path, data: str | Path, *, thresholds: dict[str, float] | None = None,
                   batch_size: int = 8, n_ctx: int | None = None, n_threads: int | None = None,
                   progress: Progress | None = None) -> HeadsReport:
    """The heads of source, a checkpoint folder (PyTorch reference) or a GGUF (llama.cpp, heads and
    thresholds from its so8t.* metadata), measured on data; thresholds overrides the stored ones."""
    source, data = Path(source), Path(data)
    examples = read_examples(data)
    if source.is_dir():
        extract = ReferenceFeatures.from_pretrained(source, batch_size=batch_size)
        model = extract.model
        heads = {head: (getattr(model, f"{head}_head").weight.detach().double().numpy(),
                        getattr(model, f"{head}_head").bias.detach().double().numpy()) for head in HEAD_LABELS}
        stored = {head: model.config.head_threshold(head) for head in HEAD_LABELS}
        described = f"{source} (PyTorch reference)"
    else:
        from ..gguf_file import MetadataError

        extract = GGUFFeatures(source, n_ctx=n_ctx, n_threads=n_threads)
        metadata = extract.engine.runtime.metadata
        if metadata is None:
            raise MetadataError(f"{source}: no so8t.* metadata, so no heads to evaluate (a stock qwen3 GGUF)")
        heads = {head: metadata.heads[head][:2] for head in HEAD_LABELS}
        stored = dict(metadata.thresholds)
        described = f"{source} (llama.cpp)"
    stored.update(thresholds or {})
    start = time.perf_counter()
    x = extract(examples, data, progress)
    results = {}
    for head in HEAD_LABELS:
        rows, labels = labelled(examples, head)
        probabilities = positive_probability(x[rows], *heads[head])
        results[head] = HeadResult(probabilities, np.asarray(labels),
                                   measure(probabilities, labels, stored[head]) if rows else None)
    return HeadsReport(features=described, evaluated_on=str(data), heads=results,
                       seconds=time.perf_counter() - start)
