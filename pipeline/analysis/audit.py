"""Data audit: duplicates, suspected wrong labels and outliers in a manifest, with a report.

The scoring engine reads every image once (the nightly job's URI policy, limits, retries and
placement), hashes its bytes (exact duplicates), takes a 64-bit perceptual hash of the decoded
pixels, and embeds it with the model's penultimate layer (`embeddings.Embedder`). The driver
then finds:

- duplicates: identical bytes (exact), or perceptual hashes within `--phash-max-distance` bits
  confirmed by an embedding cosine of at least `--near-min-cosine` (near); each group keeps one
  representative (the first in manifest order), every other member names it in `duplicate_of`;
- label issues: confident learning (cleanlab) on out-of-fold probabilities of a
  cross-validated logistic regression on the embeddings; `score` = 1 - cleanlab's label quality;
- outliers: the mean cosine distance of each distinct image to its nearest distinct images,
  flagged a robust number of deviations above the median.

Neighbour searches use faiss, queried in blocks of rows: the duplicate candidates are an exact
Hamming range search over the 8-byte hashes (a flat binary index: a popcount per pair is cheaper
than the bookkeeping of hash-table indexes at catalog sizes), the outliers' nearest neighbours an
inverted-file index of 8-bit scalar-quantized embeddings (a byte per value instead of four; only
the lists nearest a query are searched). The embeddings themselves are still held on the driver
(N x D float32): the label check's logistic regression and the near-duplicate confirmation read
them. Rows whose image cannot be read are error rows with the reason.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.analysis import report
from pipeline.analysis.findings import (
    DUPLICATES_FILE,
    DUPLICATES_SCHEMA,
    ERRORS_FILE,
    ERRORS_SCHEMA,
    LABEL_ISSUES_FILE,
    LABEL_ISSUES_SCHEMA,
    OUTLIERS_FILE,
    OUTLIERS_SCHEMA,
    REPORT_FILE,
    SUMMARY_FILE,
)
from pipeline.catalog import open_dataset, validate_manifest
from pipeline.config import AuditConfig, EmbedConfig
from pipeline.errors import ConfigError
from pipeline.inference import engine
from pipeline.inference.fail_fast import mass_failure
from pipeline.models.artifact import load_artifact
from pipeline.training.embeddings import Embedder

if TYPE_CHECKING:
    import faiss

LABEL_COLUMNS = ("category", "current_category")  # looked for in this order without --label-column
PHASH_BITS = 64
# Rows per query block of a neighbour search: bounds its results and the pairs it confirms.
NEIGHBOUR_BLOCK_ROWS = 4096
# Outlier search, an IVF index of SQ8 codes: lists a small multiple of sqrt(N) balance choosing
# lists (a centroid each, and k-means to train them) against scanning them (N / lists rows each).
IVF_LISTS_PER_SQRT_ROW = 2.0
# k-means needs a few dozen points per centroid (faiss warns below 39); fewer rows, fewer lists.
IVF_TRAIN_ROWS_PER_LIST = 40
# Lists scanned per query. Catalogs of fewer than IVF_PROBES x IVF_TRAIN_ROWS_PER_LIST rows have
# no more lists than this, so every list is scanned: exhaustive, up to the 8-bit codes.
IVF_PROBES = 16
# The training sample of the IVF centroids and the quantizer's ranges: fixed, so runs repeat.
IVF_TRAIN_SEED = 0
# A median absolute deviation of zero (every score equal) would flag any difference at all.
MIN_MAD = 1e-6
# An all-zero embedding (possible after ReLU) has no direction: normalized against this instead.
MIN_NORM = 1e-12
# The label check's classifier: the feature route's own logistic regression settings.
LABEL_MODEL_C = EmbedConfig.model_fields["C"].default
LABEL_MODEL_MAX_ITER = EmbedConfig.model_fields["max_iter"].default

def phash_value(image: np.ndarray) -> np.uint64:
    """The 64-bit DCT perceptual hash of a uint8 HWC image, as one integer."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(image)).hash.flatten()
    return np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8")[0].astype(np.uint64)


def phash_bits(values: np.ndarray) -> np.ndarray:
    """uint64 hashes -> (n, 64) bool bits, as `phash_value` packed them."""
    raw = np.asarray(values, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(raw, axis=1).astype(bool)


def phash_codes(values: np.ndarray) -> np.ndarray:
    """uint64 hashes -> (n, 8) uint8 codes, the layout of a faiss binary index (the byte order
    does not change a Hamming distance)."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.uint64).astype(">u8")
                                .view(np.uint8).reshape(-1, PHASH_BITS // 8))


class AuditEmbedder(Embedder):
    """Engine predictor: the penultimate-layer embedding of each readable image (the feature
    route's Embedder) plus its perceptual hash; error rows pass through."""

    def __init__(self, model_uri: str, num_threads: int = 1, device: str = "cpu"):
        super().__init__({"backbone": model_uri}, num_threads, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["status"]) == "ok"
        hashes = np.zeros(len(ok), dtype=np.uint64)
        for i in np.flatnonzero(ok):
            hashes[i] = phash_value(batch["image"][i])
        return {**super().__call__(batch), "phash": hashes}


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


def label_column(cfg: AuditConfig, columns: tuple[str, ...]) -> str | None:
    """The column of given categories: --label-column, else the first of LABEL_COLUMNS."""
    if cfg.label_column is not None:
        if cfg.label_column not in columns:
            raise ConfigError(f"--label-column {cfg.label_column!r}: the manifest has no such column "
                              f"(it has {', '.join(columns)}); name one of them or leave the option "
                              "out")
        return cfg.label_column
    return next((c for c in LABEL_COLUMNS if c in columns), None)


def manifest_rows(cfg: AuditConfig) -> tuple[pa.Table, str, str | None]:
    """(product_id, image_uri, given_category, row) of every manifest row, the folder relative
    URIs resolve against, and the label column used."""
    manifest = validate_manifest(cfg.manifest)
    label = label_column(cfg, manifest.columns)
    columns = ["product_id", "image_uri"] + ([label] if label else [])
    table = open_dataset(manifest.uri).to_table(columns=columns)
    given = table[label].cast(pa.string()) if label else pa.nulls(table.num_rows, pa.string())
    if label and not pa.types.is_string(given.type):
        raise ConfigError(f"--label-column {label!r} must be a string column")
    table = pa.table({"product_id": table["product_id"].cast(pa.string()),
                      "image_uri": table["image_uri"].cast(pa.string()),
                      "given_category": given,
                      "row": pa.array(np.arange(table.num_rows, dtype=np.int64))})
    return table, manifest.base_uri, label


OUTPUT_COLUMNS = ["row", "product_id", "image_uri", "given_category", "status", "error_type",
                  "error_message", "content_hash", "phash", "features"]


def embed_rows(cfg: AuditConfig, table: pa.Table, base_uri: str, input_size: int
               ) -> tuple[list[dict[str, np.ndarray]], str, str]:
    """Every row through the scoring engine: (batches, executor, why)."""
    images = dataclasses.replace(engine.ImageSettings.from_config(cfg, input_size, base_uri),
                                 record_digest=True)
    executor, why = engine.choose_executor(cfg, table.num_rows)
    kwargs = {"model_uri": storage.normalize(cfg.model)}
    if executor == "local":
        place = engine.Placement.from_config(cfg, engine.local_device(cfg))
        score = engine.in_process_scorer(images, place, AuditEmbedder,
                                         {**kwargs, "device": place.device})
        return score(table), executor, why
    from pipeline.inference.cluster import init_ray, resolve_device

    init_ray(cfg.ray_address, cfg.num_cpus)
    place = engine.Placement.from_config(cfg, resolve_device(cfg.device))
    ds = engine.scored(engine.table_dataset(table), images, place, AuditEmbedder,
                       {**kwargs, "device": place.device})
    batches = ds.select_columns(OUTPUT_COLUMNS).iter_batches(batch_format="numpy", batch_size=None)
    return list(batches), executor, why


def collect(batches: list[dict[str, np.ndarray]]) -> Embedded:
    """The engine's batches as manifest-ordered arrays of the readable rows, plus error rows."""
    def cat(name: str) -> np.ndarray:
        return np.concatenate([np.asarray(b[name]) for b in batches]) if batches else np.array([])

    row, status = cat("row"), cat("status")
    ok = status == "ok"
    # A batch whose rows all failed has features of width 1 (Embedder): only ok rows are stacked.
    features = [np.stack(list(b["features"]))[np.asarray(b["status"]) == "ok"]
                for b in batches if (np.asarray(b["status"]) == "ok").any()]
    feats = np.concatenate(features).astype(np.float32) if features else np.zeros((0, 1), np.float32)
    order = np.argsort(row[ok], kind="stable")
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    bad = np.argsort(row[~ok], kind="stable")
    errors = pa.table({name: pa.array(cat(name)[~ok][bad], pa.string())
                       for name in ERRORS_SCHEMA.names}, schema=ERRORS_SCHEMA)
    failure = mass_failure(errors.column("error_type").to_pylist(),
                           errors.column("error_message").to_pylist(), len(ok), "rows")
    if failure and not ok.any():
        raise ConfigError(f"no image could be read: {failure}")
    if failure:
        print(f"warning: {failure}", file=sys.stderr, flush=True)
    return Embedded(product_id=cat("product_id")[ok][order].astype(str),
                    image_uri=cat("image_uri")[ok][order],
                    given=cat("given_category")[ok][order],
                    content_hash=cat("content_hash")[ok][order],
                    phash=cat("phash")[ok][order].astype(np.uint64),
                    features=(feats / np.maximum(norms, MIN_NORM))[order], errors=errors)


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


def row_cosines(features: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine of each pair (i[p], j[p]) of L2-normalized rows, gathered a block at a time so a
    burst of pairs (a cluster of flat-colour images) does not copy all their embeddings at once."""
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), NEIGHBOUR_BLOCK_ROWS):
        a, b = i[start:start + NEIGHBOUR_BLOCK_ROWS], j[start:start + NEIGHBOUR_BLOCK_ROWS]
        out[start:start + len(a)] = np.einsum("ij,ij->i", features[a], features[b])
    return out


def near_pairs(codes: np.ndarray, features: np.ndarray, candidates: np.ndarray,
               max_distance: int, min_cosine: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine), i < j, among `candidates` (row positions): perceptual hashes (`codes`,
    from `phash_codes`) within `max_distance` bits, confirmed by embedding cosine >= min_cosine.

    An exact range search of a flat faiss binary index, queried in blocks: every pair within the
    radius is found. Multi-index hashing (faiss IndexBinaryMultiHash) is exact too when its
    tables and bit flips cover the radius, but at a 12-bit radius on 64 bits it probes thousands
    of buckets per query and was slower than the flat scan at every size measured."""
    import faiss

    if len(candidates) < 2:
        return []
    index = faiss.IndexBinaryFlat(PHASH_BITS)
    index.add(codes[candidates])
    pairs = []
    for start in range(0, len(candidates), NEIGHBOUR_BLOCK_ROWS):
        block = candidates[start:start + NEIGHBOUR_BLOCK_ROWS]
        # faiss keeps distances strictly below the radius; Hamming distances are whole bits.
        lims, _, hits = index.range_search(codes[block], max_distance + 1)
        i = np.repeat(block, np.diff(lims.astype(np.int64)))
        j = candidates[hits]
        later = j > i
        i, j = i[later], j[later]
        cosine = row_cosines(features, i, j)
        ok = cosine >= min_cosine
        pairs += zip(i[ok].tolist(), j[ok].tolist(), cosine[ok].astype(float).tolist(), strict=True)
    return pairs


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

def embedding_index(features: np.ndarray) -> faiss.Index:
    """An inner-product faiss IVF index of 8-bit scalar-quantized rows (L2-normalized, so inner
    product is cosine): a byte per value plus an 8-byte id per row, a quarter of the float32
    embeddings; a query scans the `IVF_PROBES` lists whose centroids are nearest, not every row.

    `IVF_LISTS_PER_SQRT_ROW` x sqrt(N) lists, at most one per `IVF_TRAIN_ROWS_PER_LIST`
    rows; centroids and quantizer ranges are trained on a fixed random sample of that many rows
    per list. With no more lists than probes (small catalogs) the search is exhaustive."""
    import faiss

    n, d = features.shape
    lists = max(1, min(int(IVF_LISTS_PER_SQRT_ROW * np.sqrt(n)), n // IVF_TRAIN_ROWS_PER_LIST))
    index = faiss.index_factory(d, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(IVF_TRAIN_SEED).choice(
        n, min(n, lists * IVF_TRAIN_ROWS_PER_LIST), replace=False)
    index.train(np.ascontiguousarray(features[np.sort(sample)], dtype=np.float32))
    for start in range(0, n, NEIGHBOUR_BLOCK_ROWS):
        index.add(np.ascontiguousarray(features[start:start + NEIGHBOUR_BLOCK_ROWS],
                                       dtype=np.float32))
    index.nprobe = min(lists, IVF_PROBES)
    return index


def neighbour_distances(features: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row (L2-normalized) to its k nearest other rows, from
    `embedding_index` queried in blocks (approximate above a few hundred rows: see there)."""
    n = len(features)
    if min(k, n - 1) < 1:
        return np.zeros(n, dtype=np.float32)
    return mean_neighbour_distances(embedding_index(features), features, k)


def mean_neighbour_distances(index: faiss.Index, features: np.ndarray, k: int) -> np.ndarray:
    """`neighbour_distances` with the index of `features` given (the benchmark times the two
    parts apart)."""
    n = len(features)
    k = min(k, n - 1)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, NEIGHBOUR_BLOCK_ROWS):
        block = np.ascontiguousarray(features[start:start + NEIGHBOUR_BLOCK_ROWS], dtype=np.float32)
        sims, idx = index.search(block, k + 1)
        # Not the row itself (normally the first hit) nor a missing hit (-1: the scanned lists
        # held fewer than k + 1 rows); then the k nearest of the rest.
        keep = (idx != np.arange(start, start + len(idx))[:, None]) & (idx >= 0)
        keep &= np.cumsum(keep, axis=1) <= k
        dist = np.where(keep, 1.0 - sims, 0.0).sum(1)
        out[start:start + len(idx)] = dist / np.maximum(keep.sum(1), 1)
    return out


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


# ---- report ----------------------------------------------------------------------------------

REPORT_CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;
margin:8px 0 24px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.counts td:nth-child(2){text-align:right}
img{display:block;border:1px solid #bbb}
.pair{display:flex;gap:8px}.muted{color:#777}code{font-size:90%}"""


def _thumb(uri: str, fetch: Callable[[str], bytes], thumbs: dict[str, str]) -> str:
    """An <img> of one product image, made once per URI (or a note when it cannot be read)."""
    if uri not in thumbs:
        jpeg = report.thumbnail_jpeg(uri, fetch)
        thumbs[uri] = (report._img(jpeg, uri, "image/jpeg") if jpeg
                       else '<span class="muted">(no thumbnail)</span>')
    return thumbs[uri]


def report_page(summary: dict, data: Embedded, fetch: Callable[[str], bytes], duplicates: pa.Table,
                labels: pa.Table, outliers: pa.Table, items: int) -> str:
    """The audit as one self-contained HTML page: counts, then pictures of each finding."""
    e = report._e
    uri = dict(zip(data.product_id.tolist(), data.image_uri.tolist(), strict=True))
    thumbs: dict[str, str] = {}
    counts = [["rows in the manifest", summary["rows"]], ["readable", summary["ok"]],
              ["unreadable (errors.parquet)", summary["errors"]],
              ["exact duplicates", summary["duplicates"]["exact"]],
              ["near duplicates", summary["duplicates"]["near"]],
              ["suspected labels", summary["label_issues"]["flagged"]],
              ["labels not judged", summary["label_issues"]["not_judged"]],
              ["outliers", summary["outliers"]["flagged"]]]
    parts = [f"<h1>Data audit</h1><p>Manifest <code>{e(summary['manifest'])}</code>, model "
             f"<code>{e(summary['model'])}</code> (version {e(summary['model_version'])}), "
             f"labels from <code>{e(summary['label_column'] or 'none')}</code>.</p>",
             report._table(["finding", "rows"], [[e(a), e(b)] for a, b in counts], "counts")]
    dup = duplicates.sort_by([("similarity", "ascending")]).slice(0, items).to_pylist()
    parts.append(f"<h2>Duplicates ({duplicates.num_rows})</h2><p>Each product beside its group's "
                 "representative; least similar first, where a mistake is likeliest. A product "
                 "linked through another member of the group can be less similar to the "
                 "representative than the confirmation threshold.</p>")
    parts.append(report._table(["product", "duplicate of", "kind", "similarity"], [[
        f"{_thumb(uri[d['product_id']], fetch, thumbs)}<code>{e(d['product_id'])}</code>",
        f"{_thumb(uri[d['duplicate_of']], fetch, thumbs)}<code>{e(d['duplicate_of'])}</code>",
        e(d["kind"]), f"{d['similarity']:.3f}"] for d in dup]))
    flagged = labels.filter(labels["flagged"]).sort_by([("score", "descending")])
    parts.append(f"<h2>Suspected labels ({flagged.num_rows})</h2><p>Most suspicious first: the "
                 "given category, and the one the other products' pictures suggest.</p>")
    parts.append(report._table(["product", "given", "suggested", "score"], [[
        f"{_thumb(uri[r['product_id']], fetch, thumbs)}<code>{e(r['product_id'])}</code>",
        e(r["given_category"]), e(r["suggested_category"]), f"{r['score']:.3f}"]
        for r in flagged.slice(0, items).to_pylist()]))
    top = outliers.sort_by([("score", "descending")]).slice(0, items).to_pylist()
    parts.append(f"<h2>Outliers ({summary['outliers']['flagged']} flagged)</h2><p>The least "
                 "typical images first (mean cosine distance to their nearest distinct images); "
                 "flagged ones may be placeholders, logos or other non-product pictures.</p>")
    parts.append(report._table(["product", "score", "flagged"], [[
        f"{_thumb(uri[r['product_id']], fetch, thumbs)}<code>{e(r['product_id'])}</code>",
        f"{r['score']:.3f}", "yes" if r["flagged"] else "no"] for r in top]))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Data audit</title>"
            f"<style>{REPORT_CSS}</style></head><body>{''.join(parts)}</body></html>")


# ---- the job ---------------------------------------------------------------------------------

def write_table(uri: str, table: pa.Table) -> None:
    """One Parquet file at uri (local or object storage), written in one request."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def run(cfg: AuditConfig) -> dict:
    """Check the arguments, embed every row, find duplicates, label issues and outliers, write
    the outputs; return the summary (also in audit_summary.json)."""
    start = time.perf_counter()
    table, base_uri, label = manifest_rows(cfg)
    _, meta = load_artifact(cfg.model, "cpu")  # a missing or corrupt model stops the job here
    output = storage.normalize(cfg.output)
    storage.check_writable(output)

    batches, executor, why = embed_rows(cfg, table, base_uri, meta.input_size)
    data = collect(batches)
    duplicates, roots = find_duplicates(data, cfg)
    labels = find_label_issues(data, cfg)
    outliers = find_outliers(data, roots, cfg)

    kinds = Counter(duplicates["kind"].to_pylist())
    summary = {
        "manifest": storage.normalize(cfg.manifest), "model": storage.normalize(cfg.model),
        "model_version": meta.model_version, "label_column": label,
        "rows": table.num_rows, "ok": len(data.product_id), "errors": data.errors.num_rows,
        "errors_by_type": dict(Counter(data.errors["error_type"].to_pylist())),
        "duplicates": {"exact": kinds.get("exact", 0), "near": kinds.get("near", 0),
                       "groups": len(set(duplicates["duplicate_of"].to_pylist()))},
        "label_issues": {"judged": labels.num_rows - labels["score"].null_count,
                         "flagged": int(sum(labels["flagged"].to_pylist())),
                         "not_judged": int(labels["score"].null_count)},
        "outliers": {"flagged": int(sum(outliers["flagged"].to_pylist()))},
        "executor": executor, "executor_reason": why,
        "output": output,
    }
    write_table(storage.join(output, DUPLICATES_FILE), duplicates)
    write_table(storage.join(output, LABEL_ISSUES_FILE), labels)
    write_table(storage.join(output, OUTLIERS_FILE), outliers)
    write_table(storage.join(output, ERRORS_FILE), data.errors)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    storage.write_text(storage.join(output, REPORT_FILE),
                       report_page(summary, data, engine.ImageSettings.from_config(
                           cfg, meta.input_size, base_uri).fetch, duplicates, labels, outliers,
                                   cfg.report_items))
    storage.write_json(storage.join(output, SUMMARY_FILE), summary)
    cfg.save(storage.join(output, "config.yaml"))
    return summary
