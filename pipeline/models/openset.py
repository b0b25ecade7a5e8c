"""Open-set score: how unlike every learned category a product looks (`unfamiliarity`,
higher = less familiar).

Softmax confidence alone is a poor guard against goods the model never learned: a new product
is often forced, confidently, into the nearest known category. Scores, all from one forward pass:
- centroid (default): 1 - the largest cosine similarity between the image's embedding (the input
  of the final Linear layer) and the mean embedding of each learned category's training images.
  It asks "does this look like any category's photos?" rather than "which category wins?";
  the artifact stores the centroids (`open_set.safetensors`).
- energy (Liu et al., NeurIPS 2020): -T * logsumexp(logits / T), from the logits alone;
- max_logit, max_softmax: the negated largest logit or probability (the plain baseline).
BENCHMARKS.md and docs/training.md compare them with categories held out of training.

An artifact carries the score kind and a threshold set on its validation images so that
`KNOWN_KEEP_SHARE` of familiar products stay below it; products above it go to review.
No Ray imports.
"""

from __future__ import annotations

import numpy as np
import torch

OPEN_SET_SCORES = ("centroid", "energy", "max_logit", "max_softmax")
DEFAULT_SCORE = "centroid"
LOGIT_SCORE = "energy"  # what an artifact without centroids falls back to
# Share of validation images of learned categories that must pass the threshold unflagged.
KNOWN_KEEP_SHARE = 0.95


def class_centroids(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unit-length mean of each class's unit-length embeddings ([num_classes, dim]); a class
    without rows gets a zero row, which no image resembles."""
    z = torch.nn.functional.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, labels.long(), z)
    return torch.nn.functional.normalize(sums, dim=1)


def unfamiliarity(logits: torch.Tensor, temperature: float = 1.0, kind: str = LOGIT_SCORE,
                  embeddings: torch.Tensor | None = None,
                  centroids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row open-set score (float32); higher = less like any learned class. `centroid`
    needs the rows' embeddings and the class centroids; the others read the logits."""
    if kind not in OPEN_SET_SCORES:
        raise ValueError(f"unknown open-set score {kind!r}; valid: {', '.join(OPEN_SET_SCORES)}")
    if kind == "centroid":
        if embeddings is None or centroids is None:
            raise ValueError("the centroid score needs embeddings and class centroids")
        z = torch.nn.functional.normalize(embeddings.float(), dim=1)
        return 1 - (z @ centroids.to(z.device).float().T).max(dim=1).values
    logits = logits.float()
    if kind == "energy":
        return -temperature * torch.logsumexp(logits / temperature, dim=1)
    if kind == "max_logit":
        return -logits.max(dim=1).values
    return -torch.softmax(logits / temperature, dim=1).max(dim=1).values


def auroc(known: np.ndarray, unknown: np.ndarray) -> float | None:
    """Area under the ROC curve for telling unknown (positive) from known rows by the score;
    None when either side is empty. 0.5 is chance, 1.0 perfect."""
    from sklearn.metrics import roc_auc_score

    if len(known) == 0 or len(unknown) == 0:
        return None
    y = np.concatenate([np.zeros(len(known)), np.ones(len(unknown))])
    return float(roc_auc_score(y, np.concatenate([known, unknown])))


def threshold_for(known: np.ndarray, keep_share: float = KNOWN_KEEP_SHARE) -> float:
    """The score below which `keep_share` of the known rows fall."""
    return float(np.quantile(np.asarray(known, dtype=np.float64), keep_share))


def calibrate(logits: torch.Tensor, temperature: float, embeddings: torch.Tensor | None = None,
              centroids: torch.Tensor | None = None) -> dict:
    """The artifact's open-set record from validation rows of learned categories: the centroid
    score when centroids are given, else energy."""
    kind = DEFAULT_SCORE if centroids is not None else LOGIT_SCORE
    scores = unfamiliarity(logits, temperature, kind, embeddings, centroids).numpy()
    return {"score": kind, "threshold": threshold_for(scores), "known_keep_share": KNOWN_KEEP_SHARE}


def open_set_metrics(unfamiliar: np.ndarray, confidence: np.ndarray, is_unknown: np.ndarray,
                     record: dict) -> dict:
    """How well the artifact's open-set score tells products of categories it never learned
    (`is_unknown`) from the rest, beside the plain-confidence baseline (1 - confidence), and
    what its review threshold flags on each side."""
    known, unknown = unfamiliar[~is_unknown], unfamiliar[is_unknown]
    threshold = record.get("threshold")
    out = {"score": record.get("score", LOGIT_SCORE), "auroc": auroc(known, unknown),
           "baseline": "max_softmax",
           "baseline_auroc": auroc(1 - confidence[~is_unknown], 1 - confidence[is_unknown]),
           "known_rows": len(known), "unknown_rows": len(unknown), "threshold": threshold,
           "flagged_known_share": None, "flagged_unknown_share": None}
    if threshold is not None:
        if len(known):
            out["flagged_known_share"] = float((known > threshold).mean())
        if len(unknown):
            out["flagged_unknown_share"] = float((unknown > threshold).mean())
    return out
