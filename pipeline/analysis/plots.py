"""The evaluation report's plots as PNG bytes: confusion matrix, reliability diagram and the
accuracy-coverage curve. matplotlib loads on the first plot (`pipeline.pages.pyplot`)."""

from __future__ import annotations

import numpy as np

from pipeline.pages import png_bytes, pyplot

FULL_MATRIX_FONT_SIZE = {"few": 9, "many": 5}
FEW_CLASSES = 20  # up to this many classes the full confusion PNG uses the larger font


def confusion_png(matrix: np.ndarray, classes: list[str]) -> bytes:
    """Row-normalized confusion matrix (true class per row) of the classes that occur. Written as
    a file for completeness; with many classes its labels are too small for the page."""
    plt = pyplot()
    keep = np.flatnonzero(matrix.sum(0) + matrix.sum(1))
    m = matrix[np.ix_(keep, keep)].astype(np.float64)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = max(5.0, 0.16 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    names = [classes[i] for i in keep]
    font = FULL_MATRIX_FONT_SIZE["few" if len(keep) <= FEW_CLASSES else "many"]
    ax.set_xticks(range(len(keep)), names, rotation=90, fontsize=font)
    ax.set_yticks(range(len(keep)), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (share of each true class)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return png_bytes(fig)


def reliability_png(bins: list[dict], ece: float) -> bytes:
    """Accuracy against confidence per bin (the gap to the diagonal shaded), rows per bin below."""
    plt = pyplot()
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["high"] - bins[0]["low"]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar([b["low"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled],
           bottom=[b["accuracy"] for b in filled], width=width, align="edge", color="#dd8452",
           alpha=0.5, edgecolor="black", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    ax_n.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge",
             color="gray", edgecolor="black")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("rows")
    ax_n.set_xlim(0, 1)
    return png_bytes(fig)


def coverage_png(curve: dict, accept: dict) -> bytes:
    """Accuracy of the auto-accepted rows against their share, with the target and its threshold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(curve["coverage"], curve["accuracy"], color="#4c72b0", label="accepted above threshold")
    ax.axhline(accept["target_accuracy"], color="#c44e52", linestyle="--",
               label=f"target {accept['target_accuracy']:.0%}")
    if accept["threshold"] is not None:
        ax.plot([accept["coverage"]], [accept["accuracy"]], "o", color="#c44e52",
                label=f"threshold {accept['threshold']:.3f}: {accept['coverage']:.0%} covered")
    ax.set_xlabel("coverage (share of scored products auto-accepted)")
    ax.set_ylabel("accuracy of auto-accepted")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title("Accuracy vs coverage")
    ax.legend(loc="lower left")
    return png_bytes(fig)
