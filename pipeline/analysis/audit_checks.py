"""The audit's findings (`pipeline.analysis.audit`) from the embedded rows: duplicate groups,
suspected wrong labels (confident learning on out-of-fold probabilities) and outlier images."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.analysis.audit_search import near_pairs, neighbour_distances, phash_codes
from pipeline.analysis.findings import DUPLICATES_SCHEMA, LABEL_ISSUES_SCHEMA, OUTLIERS_SCHEMA
from pipeline.config import AuditConfig, EmbedConfig

# A median absolute deviation of zero (every score equal) would flag any difference at all.
MIN_MAD = 1e-6
# The label check's classifier: the feature route's own logistic regression settings.
LABEL_MODEL_C = EmbedConfig.model_fields["C"].default
LABEL_MODEL_MAX_ITER = EmbedConfig.model_fields["max_iter"].default


@dataclass
class Embedded:
    """The readable rows, in manifest order, and the error rows."""

    product_id: np.ndarray
    image_uri: np.ndarray
    given: np.ndarray  # given category, None where the row has none
    content_hash: np.ndarray
    phash: np.ndarray  # uint64
    features: np.ndarray  # (n, d) float32, L2-normalized
    errors: pa.Table


# ---- duplicates ------------------------------------------------------------------------------

class _Groups:
    """Union-find over row positions; the root of a group is its smallest position (the first
    row in manifest order), so representatives do not depend on the order pairs are found."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return int(i)

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def find_duplicates(data: Embedded, cfg: AuditConfig) -> tuple[pa.Table, np.ndarray]:
    """duplicates.parquet's rows, and each row's group representative (its own position when it
    is not a duplicate)."""
    groups = _Groups(len(data.product_id))
    first: dict[str, int] = {}
    for i, digest in enumerate(data.content_hash):
        if digest in first:
            groups.union(first[digest], i)
        else:
            first[digest] = i
    distinct = np.array(sorted(first.values()), dtype=np.int64)
    for i, j, _ in near_pairs(phash_codes(data.phash), data.features, distinct,
                              cfg.phash_max_distance, cfg.near_min_cosine):
        groups.union(i, j)
    roots = groups.roots()
    members = np.flatnonzero(roots != np.arange(len(roots)))
    exact = data.content_hash[members] == data.content_hash[roots[members]]
    similarity = np.where(exact, 1.0, np.einsum("ij,ij->i", data.features[members],
                                                data.features[roots[members]]))
    table = pa.table({"product_id": data.product_id[members].tolist(),
                      "duplicate_of": data.product_id[roots[members]].tolist(),
                      "kind": np.where(exact, "exact", "near").tolist(),
                      "similarity": similarity.astype(np.float32)}, schema=DUPLICATES_SCHEMA)
    return table, roots


# ---- label issues ----------------------------------------------------------------------------

def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int
                              ) -> np.ndarray:
    """Each row's class probabilities from a logistic regression that did not see the row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(),
                          LogisticRegression(C=LABEL_MODEL_C, max_iter=LABEL_MODEL_MAX_ITER))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, features, labels, cv=cv, method="predict_proba")


def find_label_issues(data: Embedded, cfg: AuditConfig) -> pa.Table:
    """label_issues.parquet: every readable row with a given category; rows of categories
    with fewer than --label-folds rows are not judged (score null, the reason says why)."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    has = np.array([g is not None for g in data.given], dtype=bool)
    n = len(data.given)
    counts = Counter(data.given[has].tolist())
    judged = has & np.array([counts.get(g, 0) >= cfg.label_folds for g in data.given], dtype=bool)
    reason = np.full(n, None, dtype=object)
    for i in np.flatnonzero(has & ~judged):
        reason[i] = (f"category has {counts[data.given[i]]} readable row(s), fewer than "
                     f"--label-folds {cfg.label_folds}")
    score = np.full(n, np.nan, dtype=np.float32)
    suggested = np.full(n, None, dtype=object)
    flagged = np.zeros(n, dtype=bool)
    classes = sorted(set(data.given[judged].tolist()))
    if len(classes) >= 2:
        index = {c: k for k, c in enumerate(classes)}
        labels = np.array([index[g] for g in data.given[judged]], dtype=np.int64)
        probs = out_of_fold_probabilities(data.features[judged], labels, cfg.label_folds, cfg.seed)
        score[judged] = 1.0 - get_label_quality_scores(labels, probs)
        flagged[judged] = cleanlab_issues(labels, probs, filter_by=cfg.label_filter, n_jobs=1)
        suggested[judged] = np.array(classes, dtype=object)[probs.argmax(1)]
    else:
        for i in np.flatnonzero(judged):
            reason[i] = "fewer than 2 categories with enough rows to cross-validate"
    return pa.table({"product_id": data.product_id[has].tolist(),
                     "given_category": data.given[has].tolist(),
                     "suggested_category": suggested[has].tolist(),
                     "score": pa.array(score[has], pa.float32(), mask=np.isnan(score[has])),
                     "flagged": flagged[has], "reason": reason[has].tolist()},
                    schema=LABEL_ISSUES_SCHEMA)


# ---- outliers --------------------------------------------------------------------------------

def find_outliers(data: Embedded, roots: np.ndarray, cfg: AuditConfig) -> pa.Table:
    """outliers.parquet: every readable row. Scored among distinct images (one per duplicate
    group), so ten copies of one placeholder do not make each other look normal; the members
    of a group share their representative's score."""
    distinct = np.unique(roots)
    scores = np.zeros(len(roots), dtype=np.float32)
    scores[distinct] = neighbour_distances(data.features[distinct], cfg.outlier_neighbours)
    scores = scores[roots]
    median = float(np.median(scores[distinct])) if len(distinct) else 0.0
    mad = float(np.median(np.abs(scores[distinct] - median))) if len(distinct) else 0.0
    flagged = scores > median + cfg.outlier_mads * max(mad, MIN_MAD)
    return pa.table({"product_id": data.product_id.tolist(), "score": scores, "flagged": flagged},
                    schema=OUTLIERS_SCHEMA)
