"""Fitting a head, and measuring one: L2-regularised logistic regression on frozen hidden states.

A head is Linear(hidden, 2) read through a softmax, and softmax([z0, z1])[1] = sigmoid(z1 - z0): a binary
logistic regression w.x + b is the head with rows (-w/2, w/2) and biases (-b/2, b/2), exactly. The fit is
scikit-learn's LogisticRegression (L-BFGS) on standardised features, folded back into the raw feature
space afterwards, so that the regularisation does not depend on the scale of each hidden dimension.

Decisions follow the gate: an example is flagged (class 1: unsafe, escalate) when its probability is at or
above the threshold.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from ..runtime import softmax

CALIBRATION_BINS = 10
CONSTANT_RELATIVE_SPREAD = 1e-6  # a std below this times the mean's size counts as constant


@dataclass
class FittedHead:
    weight: np.ndarray  # [2, hidden] float64, rows in HEAD_LABELS order
    bias: np.ndarray  # [2]
    iterations: int
    converged: bool


def fit_head(features: np.ndarray, labels, *, l2: float = 1.0, balanced: bool = False,
             max_iter: int = 5000) -> FittedHead:
    """The head that minimises mean log loss + l2 / (2 n) * |w|^2 over standardised features (scikit-learn's
    C = 1 / l2). Both classes must be present."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    classes = np.unique(y)
    if classes.size != 2:
        raise ValueError(f"a head needs examples of both classes to be fitted; found only class {classes}")
    mean = x.mean(0)
    scale = x.std(0)
    # A dimension that is constant up to rounding carries no information; standardising it would blow its
    # rounding noise up to unit size and its weight up by the inverse (to Inf in an f16 file). Leave it unscaled.
    scale[scale <= CONSTANT_RELATIVE_SPREAD * np.maximum(np.abs(mean), 1.0)] = 1.0
    model = LogisticRegression(C=1.0 / l2, class_weight="balanced" if balanced else None, max_iter=max_iter,
                               tol=1e-10)
    with warnings.catch_warnings():  # non-convergence is reported through FittedHead.converged instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit((x - mean) / scale, y)
    w = model.coef_[0] / scale
    b = float(model.intercept_[0] - w @ mean)
    iterations = int(np.max(model.n_iter_))
    if not (np.isfinite(w).all() and math.isfinite(b)):
        raise ValueError("the fitted head has NaN or Inf weights; expected finite ones (are the features finite?)")
    return FittedHead(weight=np.stack([-w / 2, w / 2]), bias=np.array([-b / 2, b / 2]), iterations=iterations,
                      converged=iterations < max_iter)


def positive_probability(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """P(class 1) of each row of features under a Linear(hidden, 2) head, in float64."""
    logits = np.asarray(features, dtype=np.float64) @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64)
    return softmax(logits)[:, 1]


@dataclass
class HeadMetrics:
    """How one head scores a labelled set, class 1 (unsafe, escalate) being the positive class."""

    examples: int
    positives: int
    threshold: float
    accuracy: float
    auroc: float | None  # None when the set holds one class only
    precision: float | None  # None when nothing is flagged
    recall: float | None  # None without positives
    false_positive_rate: float | None  # None without negatives
    expected_calibration_error: float

    def to_dict(self) -> dict:
        return {key: (None if value is None else round(value, 6) if isinstance(value, float) else value)
                for key, value in asdict(self).items()}


def measure(probabilities, labels, threshold: float) -> HeadMetrics:
    """Accuracy, AUROC, precision, recall and false-positive rate at threshold, and the expected calibration
    error (see calibration_bins)."""
    from sklearn.metrics import auc, confusion_matrix, roc_curve

    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    flagged = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, flagged, labels=[0, 1]).ravel())
    both = 0 < y.sum() < y.size
    if both:
        fpr, tpr, _ = roc_curve(y, p)
        auroc = float(auc(fpr, tpr))
    else:
        auroc = None
    bins = calibration_bins(p, y)
    ece = float(sum(count * abs(mean_p - frequency) for count, mean_p, frequency in bins) / y.size)
    return HeadMetrics(
        examples=int(y.size), positives=int(y.sum()), threshold=float(threshold),
        accuracy=(tp + tn) / y.size, auroc=auroc,
        precision=tp / (tp + fp) if tp + fp else None,
        recall=tp / (tp + fn) if tp + fn else None,
        false_positive_rate=fp / (fp + tn) if fp + tn else None,
        expected_calibration_error=ece,
    )


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS):
    """(count, mean predicted P(class 1), observed frequency of class 1) of each non-empty bin of equal width
    in P(class 1): the points of a reliability diagram. The expected calibration error is their
    count-weighted mean distance from the diagonal."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)  # P = 1 goes to the last bin
    counts = np.bincount(index, minlength=bins)
    sums_p = np.bincount(index, weights=p, minlength=bins)
    sums_y = np.bincount(index, weights=y, minlength=bins)
    return [(int(counts[b]), sums_p[b] / counts[b], sums_y[b] / counts[b]) for b in range(bins) if counts[b]]


def threshold_at_fpr(probabilities, labels, target_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on this set is at most target_fpr, placed halfway
    between the lowest score it flags and the next score below, so that a score that moves by rounding
    (a quantised file) does not change sides. 1.0 when even the top score is a negative's that breaks the
    target; the set must hold negatives."""
    from sklearn.metrics import roc_curve

    if not 0 <= target_fpr <= 1 or math.isnan(target_fpr):
        raise ValueError(f"target false-positive rate {target_fpr!r}; expected a number in [0, 1]")
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if y.sum() == y.size:
        raise ValueError("a threshold for a false-positive rate needs negative examples; the set has none")
    if y.sum() == 0:
        raise ValueError("a threshold for a false-positive rate needs positive examples; the set has none")
    fpr, _, thresholds = roc_curve(y, p, drop_intermediate=False)
    allowed = np.flatnonzero(fpr <= target_fpr + 1e-12)
    lowest = float(thresholds[allowed[-1]])  # thresholds fall as fpr rises; the first is +inf
    if not math.isfinite(lowest):
        return 1.0
    below = p[p < lowest]
    return (lowest + float(below.max())) / 2 if below.size else lowest
