"""The audit's findings (`pipeline.analysis.audit`) from the embedded rows: duplicate groups,
suspected wrong labels (confident learning on out-of-fold probabilities: `audit_labels`) and
outlier images. The embeddings are read a block at a time from the audit's `EmbeddingStore` (or
an array); the per-row arrays kept are a few bytes a row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analysis.audit_labels import label_flags, out_of_fold_store
from pipeline.analysis.audit_search import near_pairs, neighbour_distances, phash_codes, row_cosines
from pipeline.analysis.audit_store import EmbeddingStore, Scratch
from pipeline.analysis.findings import DUPLICATES_SCHEMA, LABEL_ISSUES_SCHEMA, OUTLIERS_SCHEMA
from pipeline.config import AuditConfig

# A median absolute deviation of zero (every score equal) would flag any difference at all.
MIN_MAD = 1e-6
# Bytes of each image's SHA-256 kept to find exact copies: 128 bits do not collide by chance.
DIGEST_BYTES = 16


def digests(content_hash: np.ndarray) -> np.ndarray:
    """Hex SHA-256 strings -> (n,) 16-byte values (equal exactly when the bytes are)."""
    return np.frombuffer(b"".join(bytes.fromhex(h[:2 * DIGEST_BYTES]) for h in content_hash),
                         dtype=np.dtype((np.void, DIGEST_BYTES)))


@dataclass
class Embedded:
    """The readable rows, in manifest order, and the error rows."""

    product_id: pa.Array  # string
    image_uri: pa.Array  # string
    given: pa.Array  # string: given category, null where the row has none
    digest: np.ndarray  # (n,) 16-byte prefixes of the images' SHA-256 (`digests`)
    phash: np.ndarray  # uint64
    features: EmbeddingStore | np.ndarray  # (n, d), L2-normalized, read by block
    errors: pa.Table
    scratch: str | None = None  # folder for the checks' own temporary stores


# ---- duplicates ------------------------------------------------------------------------------

def group_roots(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Each row's group representative given pairs (i, j) of the same group: the smallest
    position (the first row in manifest order) of its connected component, so representatives
    do not depend on the order pairs are found."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    # positions ascend, so the first row of each component is its smallest
    _, first = np.unique(component, return_index=True)
    return first[component].astype(np.int64)


def find_duplicates(data: Embedded, cfg: AuditConfig) -> tuple[pa.Table, np.ndarray]:
    """duplicates.parquet's rows, and each row's group representative (its own position when it
    is not a duplicate)."""
    n = len(data.digest)
    _, first, inverse = np.unique(data.digest, return_index=True, return_inverse=True)
    copies = np.flatnonzero(first[inverse] != np.arange(n))
    distinct = np.sort(first).astype(np.int64)
    near = np.array([(i, j) for i, j, _ in near_pairs(
        phash_codes(data.phash), data.features, distinct, cfg.phash_max_distance,
        cfg.near_min_cosine)], dtype=np.int64).reshape(-1, 2)
    roots = group_roots(n, np.concatenate([copies, near[:, 0]]),
                        np.concatenate([first[inverse[copies]], near[:, 1]]))
    members = np.flatnonzero(roots != np.arange(n))
    exact = data.digest[members] == data.digest[roots[members]]
    similarity = np.where(exact, 1.0, row_cosines(data.features, members, roots[members]))
    table = pa.table({"product_id": data.product_id.take(members),
                      "duplicate_of": data.product_id.take(roots[members]),
                      "kind": np.where(exact, "exact", "near").tolist(),
                      "similarity": similarity.astype(np.float32)}, schema=DUPLICATES_SCHEMA)
    return table, roots


# ---- label issues ----------------------------------------------------------------------------

def category_codes(given: pa.Array, folds: int) -> tuple[np.ndarray, list[str], pa.Array]:
    """Each row's class index among the categories with at least `folds` rows (sorted by name),
    -1 for the other rows; those categories; and each row's reason for not being judged
    (null where it is judged or has no category)."""
    encoded = given.dictionary_encode()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    names = encoded.dictionary.to_pylist()
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    classes = sorted(name for name, c in zip(names, counts, strict=True) if c >= folds)
    index = {c: k for k, c in enumerate(classes)}
    to_class = np.array([index.get(name, -1) for name in names] + [-1], dtype=np.int64)
    reasons = [None if c >= folds else f"category has {c} readable row(s), fewer than "
               f"--label-folds {folds}" for c in counts] + [None]
    return to_class[codes], classes, pa.array(reasons, pa.string()).take(
        pa.array(np.where(codes >= 0, codes, len(names))))


def find_label_issues(data: Embedded, cfg: AuditConfig) -> pa.Table:
    """label_issues.parquet: every readable row with a given category; rows of categories
    with fewer than --label-folds rows are not judged (score null, the reason says why)."""
    from cleanlab.rank import get_label_quality_scores

    has = data.given.is_valid().to_numpy(zero_copy_only=False)
    labels, classes, reason = category_codes(data.given, cfg.label_folds)
    judged = np.flatnonzero(labels >= 0)
    score = np.full(len(labels), np.nan, dtype=np.float32)
    suggested = np.full(len(labels), -1, dtype=np.int64)
    flagged = np.zeros(len(labels), dtype=bool)
    if len(classes) >= 2:
        with Scratch(data.scratch) as folder:
            probs, order = out_of_fold_store(data.features, judged, labels[judged],
                                             cfg.label_folds, cfg.seed, Path(folder))
            rows, sorted_labels = judged[order], labels[judged][order]
            for start, block in probs.blocks():
                at = rows[start:start + len(block)]
                score[at] = 1.0 - get_label_quality_scores(labels[at], block)
                suggested[at] = block.argmax(1)
            flagged[rows] = label_flags(sorted_labels, probs, cfg.label_filter)
    elif len(judged):
        reason = pc.if_else(pa.array(labels >= 0), pa.scalar(
            "fewer than 2 categories with enough rows to cross-validate"), reason)
    return pa.table({"product_id": data.product_id.filter(has),
                     "given_category": data.given.filter(has),
                     "suggested_category": pa.array(classes, pa.string()).take(
                         pa.array(suggested, mask=suggested < 0)).filter(has),
                     "score": pa.array(score, pa.float32(), mask=np.isnan(score)).filter(has),
                     "flagged": pa.array(flagged).filter(has),
                     "reason": reason.filter(has)}, schema=LABEL_ISSUES_SCHEMA)


# ---- outliers --------------------------------------------------------------------------------

def find_outliers(data: Embedded, roots: np.ndarray, cfg: AuditConfig) -> pa.Table:
    """outliers.parquet: every readable row. Scored among distinct images (one per duplicate
    group), so ten copies of one placeholder do not make each other look normal; the members
    of a group share their representative's score."""
    distinct = np.unique(roots)
    scores = np.zeros(len(roots), dtype=np.float32)
    scores[distinct] = neighbour_distances(data.features, cfg.outlier_neighbours, distinct)
    scores = scores[roots]
    median = float(np.median(scores[distinct])) if len(distinct) else 0.0
    mad = float(np.median(np.abs(scores[distinct] - median))) if len(distinct) else 0.0
    flagged = scores > median + cfg.outlier_mads * max(mad, MIN_MAD)
    return pa.table({"product_id": data.product_id, "score": scores, "flagged": flagged},
                    schema=OUTLIERS_SCHEMA)
