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

Neighbour searches use faiss, queried in blocks of rows (`audit_search`); the findings are made
in `audit_checks` and drawn on one page by `audit_page`. The embeddings themselves are still held
on the driver (N x D float32): the label check's logistic regression and the near-duplicate
confirmation read them. Rows whose image cannot be read are error rows with the reason.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.analysis.audit_checks import (
    Embedded,
    find_duplicates,
    find_label_issues,
    find_outliers,
)
from pipeline.analysis.audit_page import report_page
from pipeline.analysis.audit_search import phash_value
from pipeline.analysis.findings import (
    DUPLICATES_FILE,
    ERRORS_FILE,
    ERRORS_SCHEMA,
    LABEL_ISSUES_FILE,
    OUTLIERS_FILE,
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

LABEL_COLUMNS = ("category", "current_category")  # looked for in this order without --label-column
# An all-zero embedding (possible after ReLU) has no direction: normalized against this instead.
MIN_NORM = 1e-12


@dataclass(frozen=True)
class AuditSettings:
    """An AuditEmbedder's settings as the engine passes them (it adds device and threads)."""

    model_uri: str


class AuditEmbedder(Embedder):
    """Engine predictor: the penultimate-layer embedding of each readable image (the feature
    route's Embedder) plus its perceptual hash; error rows pass through."""

    def __init__(self, model_uri: str, num_threads: int = 1, device: str = "cpu"):
        super().__init__(EmbedConfig(backbone=model_uri), num_threads, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["status"]) == "ok"
        hashes = np.zeros(len(ok), dtype=np.uint64)
        for i in np.flatnonzero(ok):
            hashes[i] = phash_value(batch["image"][i])
        return {**super().__call__(batch), "phash": hashes}


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
    session = engine.start(cfg, table.num_rows)
    batches = engine.score(session, images, table, engine.Predictor(
        AuditEmbedder, AuditSettings(storage.normalize(cfg.model))), columns=OUTPUT_COLUMNS)
    return batches, session.executor, session.reason


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
