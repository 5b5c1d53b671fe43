"""A ROC curve and a reliability diagram per head, as one image (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_output
from .fit import calibration_bins


def plot_heads(report, path: str | Path) -> Path:
    """report: a HeadsReport (train.evaluate_heads). The format follows path's suffix (.png, .svg, .pdf)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, whatever the environment says
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    path = Path(path)
    heads = [(head, result) for head, result in report.heads.items() if result.metrics is not None]
    figure, axes = plt.subplots(len(heads), 2, figsize=(9, 4.2 * len(heads)), squeeze=False)
    for (head, result), (roc, reliability) in zip(heads, axes):
        m = result.metrics
        if m.auroc is not None:
            fpr, tpr, _ = roc_curve(result.labels, result.probabilities)
            roc.plot(fpr, tpr, label=f"AUROC {m.auroc:.3f}")
        if m.false_positive_rate is not None and m.recall is not None:
            roc.plot([m.false_positive_rate], [m.recall], "o", label=f"threshold {m.threshold:.3g}")
        roc.plot([0, 1], [0, 1], ":", color="grey")
        roc.set(title=f"{head}: ROC ({m.examples} examples, {m.positives} positive)",
                xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.02))
        roc.legend(loc="lower right")
        bins = calibration_bins(result.probabilities, result.labels)
        reliability.plot([b[1] for b in bins], [b[2] for b in bins], "o-",
                         label=f"ECE {m.expected_calibration_error:.3f}")
        reliability.plot([0, 1], [0, 1], ":", color="grey")
        reliability.set(title=f"{head}: reliability", xlabel="mean predicted probability",
                        ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1.02))
        reliability.legend(loc="upper left")
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(figure)
    return path
