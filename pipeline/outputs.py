"""Output stage: the predictions schema, the batch formatter, the commit, the run summary.

One output row per manifest row. A run writes into `<output>/_staging/<run_id>/`, then the
commit moves the files to `<output>/predictions/` and writes `_SUCCESS` last (file list and row
counts): readers should treat a folder without `_SUCCESS` as incomplete.
"""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import storage
from pipeline.errors import OutputError

TOP_K_TYPE = pa.list_(pa.struct([("category", pa.string()), ("score", pa.float32())]))
OUTPUT_SCHEMA = pa.schema([
    pa.field("product_id", pa.string(), nullable=False),
    pa.field("image_uri", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("predicted_category", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("top_k", TOP_K_TYPE),
    pa.field("current_category", pa.string()),
    pa.field("category_changed", pa.bool_()),
    pa.field("needs_review", pa.bool_(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
PREDICTIONS_DIR = "predictions"
STAGING_DIR = "_staging"
SUCCESS_FILE = "_SUCCESS"
SUMMARY_FILE = "summary.json"


def _strings(values: np.ndarray | None, n: int) -> pa.Array:
    """A string column from a batch; an all-null column arrives from Arrow as float NaNs."""
    if values is None or np.asarray(values).dtype.kind in "fc":
        return pa.nulls(n, pa.string())
    return pa.array(values, pa.string())


class OutputFormatter:
    """numpy batch of predictions -> pyarrow Table in OUTPUT_SCHEMA."""

    def __init__(self, classes: list[str], model_name: str, model_version: str, run_id: str,
                 review_threshold: float):
        self.classes = pa.array(classes, pa.string())
        self.model_name = model_name
        self.model_version = model_version
        self.run_id = run_id
        self.review_threshold = review_threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["product_id"])
        ok = np.asarray(batch["status"]) == "ok"
        confidence = pa.array(batch["confidence"], pa.float32(), mask=~ok)
        index, scores = batch["top_k_index"], batch["top_k_scores"]
        k = index.shape[1]
        flat = index.reshape(-1)
        names = self.classes.take(pa.array(flat, pa.int32(), mask=flat < 0))
        structs = pa.StructArray.from_arrays(
            [names, pa.array(scores.reshape(-1), pa.float32())],
            fields=list(TOP_K_TYPE.value_type))
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        top_k = pa.ListArray.from_arrays(offsets, structs, mask=pa.array(~ok))
        current = _strings(batch.get("current_category"), n)
        predicted = _strings(batch["predicted_category"], n)
        changed = pc.not_equal(predicted, current)  # null when either side is null
        low = pc.less(confidence, pa.scalar(self.review_threshold, pa.float32()))
        needs_review = pc.or_(pa.array(~ok), pc.fill_null(low, True))
        now = dt.datetime.now(dt.timezone.utc)
        columns = {
            "product_id": _strings(batch["product_id"], n),
            "image_uri": _strings(batch["image_uri"], n),
            "status": _strings(batch["status"], n),
            "error_type": _strings(batch["error_type"], n),
            "error_message": _strings(batch["error_message"], n),
            "predicted_category": predicted,
            "confidence": confidence,
            "top_k": top_k,
            "current_category": current,
            "category_changed": changed,
            "needs_review": needs_review,
            "model_name": pa.array([self.model_name] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }
        return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)


def staging_uri(output: str, run_id: str) -> str:
    return storage.join(output, STAGING_DIR, run_id)


def previous_run(output: str) -> dict[str, Any] | None:
    marker = storage.join(output, SUCCESS_FILE)
    return storage.read_json(marker) if storage.exists(marker) else None


def check_output(output: str, manifest: str, model_version: str, overwrite: bool) -> None:
    """Refuse, before any work, an output holding a completed run of another manifest or model."""
    storage.check_writable(output)
    previous = previous_run(output)
    if previous and not overwrite and (
        previous.get("manifest") != manifest or previous.get("model_version") != model_version
    ):
        raise OutputError(
            f"output {output!r} already holds completed run {previous.get('run_id')!r} of "
            f"manifest {previous.get('manifest')!r} with model {previous.get('model_version')!r}; "
            "choose another --output or pass --overwrite to replace it"
        )


def commit(output: str, run_id: str, manifest: str, model_version: str, expected_rows: int) -> dict:
    """Move staged files into predictions/ and write _SUCCESS last; verify no row was lost."""
    staged = storage.list_files(staging_uri(output, run_id), suffix=".parquet")
    fs, _ = storage.arrow_filesystem(output)
    paths = [storage.filesystem(u)[1] for u in staged]
    rows = ds.dataset(paths, filesystem=fs, format="parquet").count_rows() if paths else 0
    if rows != expected_rows:
        raise OutputError(
            f"run {run_id} produced {rows} rows for a manifest of {expected_rows}; not committing")
    final_dir = storage.join(output, PREDICTIONS_DIR)
    storage.remove(storage.join(output, SUCCESS_FILE), recursive=False)
    storage.remove(final_dir)
    files = []
    for uri in staged:
        name = uri.rsplit("/", 1)[-1]
        storage.move(uri, storage.join(final_dir, name))
        files.append(f"{PREDICTIONS_DIR}/{name}")
    storage.remove(staging_uri(output, run_id))
    marker = {"run_id": run_id, "manifest": manifest, "model_version": model_version,
              "rows": rows, "files": files,
              "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.write_json(storage.join(output, SUCCESS_FILE), marker)
    return marker


def summarize(output: str, run_id: str, wall_time_s: float, extra: dict[str, Any]) -> dict:
    """Counts from the committed Parquet, streamed batch by batch (constant memory)."""
    fs, path = storage.arrow_filesystem(storage.join(output, PREDICTIONS_DIR))
    dataset = ds.dataset(path, filesystem=fs, format="parquet")
    cols = ["status", "error_type", "predicted_category", "category_changed", "needs_review"]
    rows = ok = changed = review = 0
    errors: collections.Counter = collections.Counter()
    categories: collections.Counter = collections.Counter()
    for batch in dataset.to_batches(columns=cols):
        rows += batch.num_rows
        ok += pc.sum(pc.equal(batch.column("status"), "ok")).as_py() or 0
        changed += pc.sum(pc.fill_null(batch.column("category_changed"), False)).as_py() or 0
        review += pc.sum(batch.column("needs_review")).as_py() or 0
        errors.update(e for e in batch.column("error_type").to_pylist() if e)
        categories.update(c for c in batch.column("predicted_category").to_pylist() if c)
    return {
        "run_id": run_id, "rows": rows, "ok": ok, "errors": rows - ok,
        "errors_by_type": dict(errors.most_common()), "category_changed": changed,
        "needs_review": review, "top_categories": dict(categories.most_common(10)),
        "wall_time_s": round(wall_time_s, 2),
        "images_per_s": round(rows / wall_time_s, 1) if wall_time_s > 0 else None,
        **extra,
    }

