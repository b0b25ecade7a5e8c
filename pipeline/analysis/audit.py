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
in `audit_checks` and drawn on one page by `audit_page`. The embeddings are not held on the
driver: each batch's are appended, as float16, to an on-disk `EmbeddingStore` in a temporary
folder (under $TMPDIR, removed when the audit ends) as the batches stream out of the engine, and
the checks read them back a block at a time. The driver keeps a few small columns per row (ids,
URIs, categories, hashes). Rows whose image cannot be read are error rows with the reason.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.analysis.audit_checks import (
    Embedded,
    digests,
    find_duplicates,
    find_label_issues,
    find_outliers,
)
from pipeline.analysis.audit_page import report_page
from pipeline.analysis.audit_search import phash_value
from pipeline.analysis.audit_store import EmbeddingStore, Scratch
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
               ) -> tuple[Iterator[dict[str, np.ndarray]], str, str]:
    """Every row through the scoring engine: (batches as they come, executor, why)."""
    images = dataclasses.replace(engine.ImageSettings.from_config(cfg, input_size, base_uri),
                                 record_digest=True)
    session = engine.start(cfg, table.num_rows)
    predictor = engine.Predictor(AuditEmbedder, AuditSettings(storage.normalize(cfg.model)))
    return stream(session, images, table, predictor), session.executor, session.reason


def stream(session: engine.Session, images: engine.ImageSettings, table: pa.Table,
           predictor: engine.Predictor) -> Iterator[dict[str, np.ndarray]]:
    """`engine.score`, a batch at a time as the batches come (not all held at once; on Ray not
    necessarily in row order), restricted to OUTPUT_COLUMNS."""
    if session.executor == "local":
        score = engine.in_process_scorer(images, session.place, predictor)
        for start in range(0, table.num_rows, session.place.batch_size):
            for part in score(table.slice(start, session.place.batch_size)):
                yield {c: part[c] for c in OUTPUT_COLUMNS}
        return
    from pipeline.inference.cluster import surface_job_errors

    ds = engine.scored(engine.table_dataset(table), images, session.place, predictor)
    with surface_job_errors():
        yield from ds.select_columns(OUTPUT_COLUMNS).iter_batches(batch_format="numpy",
                                                                  batch_size=None)


def compact(name: str, values: np.ndarray) -> np.ndarray | pa.Array:
    """A batch's kept column as held until the checks: strings as Arrow (a few bytes over their
    length, where a Python string takes about fifty more), digests as 16 bytes, not 64 hex."""
    if name == "content_hash":
        return digests(values)
    if name in ("product_id", "image_uri", "given_category"):
        return pa.array(values, pa.string())
    return np.asarray(values, dtype=np.uint64 if name == "phash" else np.int64)


KEPT = ("row", "product_id", "image_uri", "given_category", "content_hash", "phash")


def collect(batches: Iterator[dict[str, np.ndarray]], folder: Path) -> Embedded:
    """The engine's batches as manifest-ordered columns of the readable rows, their L2-normalized
    embeddings appended to a float16 store in `folder` batch by batch, plus the error rows."""
    kept: dict[str, list] = {name: [] for name in KEPT}
    failed: list[dict[str, np.ndarray]] = []
    store = None
    for batch in batches:
        ok = np.asarray(batch["status"]) == "ok"
        if not ok.all():
            failed.append({name: np.asarray(batch[name])[~ok]
                           for name in [*ERRORS_SCHEMA.names, "row"]})
        if not ok.any():  # its features are of width 1 (Embedder)
            continue
        feats = np.stack(list(batch["features"]))[ok].astype(np.float32)
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), MIN_NORM)
        if store is None:
            store = EmbeddingStore(folder / "embeddings.f16", feats.shape[1])
        store.append(feats)
        for name in KEPT:
            kept[name].append(compact(name, np.asarray(batch[name])[ok]))
    errors = error_table(failed)
    ok_rows = sum(len(r) for r in kept["row"])
    failure = mass_failure(errors.column("error_type").to_pylist(),
                           errors.column("error_message").to_pylist(),
                           ok_rows + errors.num_rows, "rows")
    if failure and not ok_rows:
        raise ConfigError(f"no image could be read: {failure}")
    if failure:
        print(f"warning: {failure}", file=sys.stderr, flush=True)
    if store is None:  # no readable row: empty columns
        store = EmbeddingStore(folder / "embeddings.f16", 1)
        kept = {name: [compact(name, np.array([], dtype=object))] for name in KEPT}
    order = np.argsort(np.concatenate(kept["row"]), kind="stable")
    features = store.finish()
    if (order != np.arange(len(order))).any():  # Ray returned batches out of order
        features = store.reordered(order, folder / "embeddings-ordered.f16")
        store.path.unlink()

    def column(name: str) -> np.ndarray | pa.Array:
        parts = kept.pop(name)  # each batch's part is let go once joined
        if isinstance(parts[0], pa.Array):
            return pa.concat_arrays(parts).take(order)
        return np.concatenate(parts)[order]

    return Embedded(product_id=column("product_id"), image_uri=column("image_uri"),
                    given=column("given_category"), digest=column("content_hash"),
                    phash=column("phash"), features=features, errors=errors, scratch=str(folder))


def error_table(failed: list[dict[str, np.ndarray]]) -> pa.Table:
    """errors.parquet: the rows whose image could not be read, in manifest order."""
    row = np.concatenate([f["row"] for f in failed]) if failed else np.zeros(0, np.int64)
    bad = np.argsort(row, kind="stable")
    return pa.table({name: pa.array(np.concatenate([f[name] for f in failed])[bad] if failed
                                    else [], pa.string())
                     for name in ERRORS_SCHEMA.names}, schema=ERRORS_SCHEMA)


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
    with Scratch() as folder:
        data = collect(batches, folder)
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
