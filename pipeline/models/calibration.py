"""Confidence that means what it says: expected calibration error and temperature scaling.

A network trained with cross-entropy is usually over-confident on new data. Dividing its logits
by one scalar temperature, fitted on validation data by minimizing the negative log-likelihood,
fixes most of that without changing any prediction (the argmax is unchanged). The review
threshold a report's auto-accept analysis chose is read here too, so the nightly job's config
needs nothing from the evaluation job. No Ray imports.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

ECE_BINS = 15
# A model no better than chance drives the NLL optimum towards infinity; keep T sane.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 50.0


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Share-weighted mean |accuracy - mean confidence| over equal-width confidence bins."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return float("nan")
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per-bin count, mean confidence and accuracy (the reliability diagram's data)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        in_bin = which == b
        n = int(in_bin.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                     "confidence": float(confidence[in_bin].mean()) if n else None,
                     "accuracy": float(correct[in_bin].mean()) if n else None})
    return rows


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T minimizing NLL of softmax(logits / T) on (validation) data, by LBFGS.

    Optimizes log T so T stays positive."""
    logits = logits.detach().float().clone()  # a clone is never an inference-mode tensor
    labels = labels.detach().long().clone()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(min(max(log_t.exp().item(), MIN_TEMPERATURE), MAX_TEMPERATURE))
