"""What the review page shows: the committed run's rows to review, worst first, with a seeded
random audit sample of the rows the night changed on its own spread through them.

Only those rows are read (a pyarrow dataset filter on `action`, pushed down to the Parquet
row groups, and only the columns the page needs): a night of millions of rows sends a few
thousand to review, and the page must not hold the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.errors import OutputError
from pipeline.models.decide import CHANGE, REVIEW
from pipeline.nightly import tables
from pipeline.sinks.parquet import RUN_SUMMARY_FILE, RunFolderSink, run_uri

# The run's columns the page needs (the rest of the output schema stays on disk).
QUEUE_COLUMNS = ["product_id", "image_uri", "current_category", "predicted_category",
                 "confidence", "top_k", "action", "action_reason", "p_current", "image_version",
                 "model_version", "run_id", "error_type"]
AUDIT_REASON = "audit"  # how the page names an audit item's reason: the night changed it itself


@dataclass(frozen=True)
class CommittedRun:
    """The run the page reviews: its id, its Parquet files, the manifest it scored and the
    model folder it scored with."""

    output: str
    run_id: str
    files: tuple[str, ...]
    manifest: str
    model: str | None
    model_version: str | None

    @property
    def base_uri(self) -> str:
        """Where the run's relative image URIs resolve, as the night resolved them
        (`catalog.Manifest.base_uri`): the manifest's folder, or the manifest itself when it is
        a folder of Parquet files."""
        fs, path = storage.filesystem(self.manifest)
        return self.manifest if fs.isdir(path) else storage.parent(self.manifest)


def committed_run(output: str) -> CommittedRun:
    """The committed run of a nightly output folder, found as the nightly job finds it
    (`_SUCCESS`); OutputError when there is none."""
    if not storage.exists(output):
        raise OutputError(f"--output {output}: no such folder; give the nightly job's --output")
    sink = RunFolderSink(output)
    marker = sink.committed_run()
    if not marker:
        raise OutputError(f"output {output!r} holds no committed run (no _SUCCESS): run "
                          f"python -m jobs.recategorize --output {output} first")
    if not marker.get("manifest"):
        raise OutputError(f"{output}/_SUCCESS names no manifest: not a nightly output folder")
    # The run's own copy of its summary: the one next to _SUCCESS is written after the commit,
    # so for a moment it can be the previous night's.
    summary_uri = storage.join(run_uri(output, marker["run_id"]), RUN_SUMMARY_FILE)
    summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
    return CommittedRun(output, marker["run_id"], tuple(sink.committed_files()),
                        marker["manifest"], summary.get("model"),
                        marker.get("model_version") or summary.get("model_version"))


def _read(dataset: pads.Dataset, condition: pc.Expression) -> pa.Table:
    columns = [c for c in QUEUE_COLUMNS if c in dataset.schema.names]
    return dataset.to_table(columns=columns, filter=condition)


def audit_sample(dataset: pads.Dataset, share: float, seed: int) -> pa.Table:
    """ceil(share x the night's changes) of its 'change' rows, drawn with `seed` from the
    product ids in sorted order, so the sample depends on the seed, not on the file layout."""
    if share <= 0:
        return _read(dataset, pc.scalar(False))
    changed = dataset.to_table(columns=["product_id"], filter=pc.field("action") == CHANGE)
    ids = pc.sort_indices(changed, [("product_id", "ascending")])
    ids = changed.column("product_id").take(ids)
    count = min(len(ids), math.ceil(share * len(ids)))
    if count == 0:
        return _read(dataset, pc.scalar(False))
    picked = np.sort(np.random.default_rng(seed).choice(len(ids), size=count, replace=False))
    chosen = ids.take(pa.array(picked, pa.int64())).combine_chunks().cast(pa.string())
    return _read(dataset, (pc.field("action") == CHANGE) & pc.field("product_id").isin(chosen))


def _interleave(review: pa.Table, audit: pa.Table) -> pa.Table:
    """The review rows in order with the audit rows spread evenly among them (not all at the
    end, where a person who stops early would never see one)."""
    if audit.num_rows == 0:
        return review
    total = review.num_rows + audit.num_rows
    slots = {round((i + 0.5) * total / audit.num_rows - 0.5) for i in range(audit.num_rows)}
    order, r, a = [], 0, 0
    for position in range(total):
        if (position in slots and a < audit.num_rows) or r == review.num_rows:
            order.append(review.num_rows + a)
            a += 1
        else:
            order.append(r)
            r += 1
    both = pa.concat_tables([review, audit.cast(review.schema)])
    return both.take(pa.array(order, pa.int64()))


def load_queue(files: list[str] | tuple[str, ...], audit_share: float, seed: int) -> pa.Table:
    """The queue: the run's 'review' rows, lowest confidence first (rows with no confidence,
    the unreadable images, first of all), with the audit sample spread among them; an `audit`
    column tells them apart."""
    dataset = tables.dataset(list(files))
    review = _read(dataset, pc.field("action") == REVIEW)
    review = review.sort_by([("confidence", "ascending"), ("product_id", "ascending")])
    # sort_by puts nulls last; an unreadable image is the first thing a person should see.
    missing = pc.is_null(review.column("confidence"))
    review = pa.concat_tables([review.filter(missing), review.filter(pc.invert(missing))])
    audit = audit_sample(dataset, audit_share, seed)
    review = review.append_column("audit", pa.array([False] * review.num_rows, pa.bool_()))
    audit = audit.append_column("audit", pa.array([True] * audit.num_rows, pa.bool_()))
    return _interleave(review, audit)
