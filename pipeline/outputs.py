"""Output stage: the predictions schema, the batch formatter, the commit, the run summary.

One output row per manifest row. A run writes finished partitions into
`<output>/_staging/<identity>/part-NNNNN/` (each closed by a `_DONE` file), moves them into a new
`<output>/runs/<run_id>/` folder when all are there, and then publishes that folder by replacing
`_SUCCESS` (file list, row count) in one atomic write; locally a `predictions` symlink is then
flipped to it. Readers follow `_SUCCESS` (or the link) and so see one complete run or the next.
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
from pipeline.security import safe_name

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
    pa.field("unfamiliarity", pa.float32()),
    pa.field("current_category", pa.string()),
    pa.field("category_changed", pa.bool_()),
    pa.field("needs_review", pa.bool_(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
])
PREDICTIONS_DIR = "predictions"  # local outputs: a link to the committed run's folder
RUNS_DIR = "runs"
STAGING_DIR = "_staging"
DONE_FILE = "_DONE"
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
                 review_threshold: float, open_set_threshold: float | None = None):
        self.classes = pa.array(classes, pa.string())
        self.model_name = model_name
        self.model_version = model_version
        self.run_id = run_id
        self.review_threshold = review_threshold
        self.open_set_threshold = open_set_threshold

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
        unfamiliar = pa.array(batch["unfamiliarity"], pa.float32(), mask=~ok)
        needs_review = pc.or_(pa.array(~ok), pc.fill_null(low, True))
        if self.open_set_threshold is not None:  # a product unlike every learned category
            above = pc.greater(unfamiliar, pa.scalar(self.open_set_threshold, pa.float32()))
            needs_review = pc.or_(needs_review, pc.fill_null(above, True))
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
            "unfamiliarity": unfamiliar,
            "current_category": current,
            "category_changed": changed,
            "needs_review": needs_review,
            "model_name": pa.array([self.model_name] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }
        return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)


def staging_uri(output: str, identity: str) -> str:
    """Where a run's finished partitions wait: keyed by the run's identity, not its id, so a
    restarted run with the same arguments finds them."""
    return storage.join(output, STAGING_DIR, safe_name(identity, "staging key"))


def partition_uri(output: str, identity: str, partition: int) -> str:
    return storage.join(staging_uri(output, identity), f"part-{partition:05d}")


def run_uri(output: str, run_id: str) -> str:
    return storage.join(output, RUNS_DIR, safe_name(run_id, "run id"))


def previous_run(output: str) -> dict[str, Any] | None:
    marker = storage.join(output, SUCCESS_FILE)
    return storage.read_json(marker) if storage.exists(marker) else None


def check_output(output: str, manifest: str, model_version: str, overwrite: bool) -> None:
    """Refuse, before any work, an output holding a completed run of another manifest or model."""
    storage.check_writable(output)
    try:
        previous = previous_run(output)
    except (ValueError, OSError) as exc:
        raise OutputError(f"output {output!r} has an unreadable {SUCCESS_FILE}: {exc}; "
                          "remove it or pass --overwrite") from exc
    if previous and not overwrite and (
        previous.get("manifest") != manifest or previous.get("model_version") != model_version
    ):
        raise OutputError(
            f"output {output!r} already holds completed run {previous.get('run_id')!r} of "
            f"manifest {previous.get('manifest')!r} with model {previous.get('model_version')!r}; "
            "choose another --output or pass --overwrite to replace it"
        )


def _count(uris: list[str], output: str) -> tuple[int, int]:
    """(rows, distinct product_id values) over Parquet files."""
    if not uris:
        return 0, 0
    fs, _ = storage.arrow_filesystem(output)
    paths = [storage.filesystem(u)[1] for u in uris]
    ids = ds.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["product_id"])
    return ids.num_rows, pc.count_distinct(ids.column("product_id")).as_py()


def partition_done(output: str, identity: str, partition: int) -> bool:
    return storage.exists(storage.join(partition_uri(output, identity, partition), DONE_FILE))


def finish_partition(output: str, identity: str, partition: int, expected_rows: int) -> None:
    """Mark a written partition finished, after checking it holds each of its rows once."""
    folder = partition_uri(output, identity, partition)
    rows, distinct = _count(storage.list_files(folder, suffix=".parquet"), output)
    if rows != expected_rows or distinct != expected_rows:
        raise OutputError(f"partition {partition} wrote {rows} rows ({distinct} distinct products) "
                          f"for {expected_rows} manifest rows; not marking it finished")
    storage.write_json(storage.join(folder, DONE_FILE), {"rows": rows})


def commit(output: str, identity: str, run_id: str, manifest: str, model_version: str,
           expected_rows: int) -> dict:
    """Move the finished partitions into runs/<run_id>/ and publish them with one atomic write.

    Until `_SUCCESS` is replaced, readers following it (or the local `predictions` link) see the
    previous complete run; after, the new one. Nothing a reader can reach is ever half-written:
    the new folder is complete before anything names it, and the old one stays until the run
    after next (a reader that started on it can finish).
    """
    staging = staging_uri(output, identity)
    staged = storage.list_files(staging, suffix=".parquet")
    target = run_uri(output, run_id)
    for uri in staged:  # names are deterministic, so a commit cut short can simply run again
        storage.move(uri, storage.join(target, uri[len(staging):].lstrip("/").replace("/", "-")))
    moved = storage.list_files(target, suffix=".parquet")
    rows, distinct = _count(moved, output)
    if rows != expected_rows or distinct != expected_rows:
        raise OutputError(f"run {run_id} holds {rows} rows ({distinct} distinct products) for a "
                          f"manifest of {expected_rows}; not committing")
    files = [f"{RUNS_DIR}/{run_id}/{u.rsplit('/', 1)[-1]}" for u in moved]
    return {"run_id": run_id, "manifest": manifest, "model_version": model_version,
            "rows": rows, "files": files, "staging_key": identity}


def publish(output: str, marker: dict) -> None:
    """The commit point: write `_SUCCESS` (atomic), then point the local link, then tidy up."""
    marker = {**marker, "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    try:
        previous = previous_run(output)
    except (ValueError, OSError):  # an unreadable marker being replaced under --overwrite
        previous = None
    storage.write_json(storage.join(output, SUCCESS_FILE), marker)
    if storage.is_local(output):
        storage.point_link(storage.join(output, PREDICTIONS_DIR), f"{RUNS_DIR}/{marker['run_id']}")
    keep = {marker["run_id"], (previous or {}).get("run_id")}
    for old in storage.list_dirs(storage.join(output, RUNS_DIR)):
        if old not in keep:
            storage.remove(storage.join(output, RUNS_DIR, old))
    storage.remove(staging_uri(output, marker["staging_key"]))


def committed_files(output: str) -> list[str]:
    """URIs of the Parquet files of the completed run in `output` (what readers should read)."""
    marker = previous_run(output)
    if not marker:
        raise OutputError(f"output {output!r} holds no completed run (no {SUCCESS_FILE})")
    return [storage.join(output, *f.split("/")) for f in marker["files"]]


def summarize(output: str, run_id: str, wall_time_s: float, extra: dict[str, Any]) -> dict:
    """Counts from the run's Parquet, streamed batch by batch (constant memory)."""
    fs, _ = storage.arrow_filesystem(output)
    files = storage.list_files(run_uri(output, run_id), suffix=".parquet")
    dataset = ds.dataset([storage.filesystem(u)[1] for u in files], filesystem=fs, format="parquet")
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

