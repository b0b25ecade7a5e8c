"""Output rows: the predictions schema and the formatter that builds it from a scored batch.

One output row per manifest row. Columns are added, never renamed (readers depend on them).
`run_id` is the run that committed the row; `scored_run_id` the run that scored it, which is
an earlier night's for a row carried forward unchanged by an incremental run.

A product a person decided (`pipeline.sinks.reviews`) for the image scored tonight is `keep`
(`reviewed`) with their category as its current category: `OutputFormatter.prepare` puts that
category in before the model computes `p_current`, and marks the row for `__call__`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.models import decide

# Resumable chunk of a row on its way to the sink; not an output column.
CHUNK_COLUMN = "_chunk"
# Schema metadata a scorer puts on its output table for the driver (its thread split): the
# writer hands it back with what it wrote; it never reaches a file.
REPORT_KEY = b"scorer_report"
# Column of the rows a night re-scores: the committed row was an error at the same image_uri
# (error rows are never carried, so a catalog's broken images are re-tried every night). The
# error budget does not count them as the night's new errors.
KNOWN_ERROR_COLUMN = "_known_error"
# Column of a batch on its way through the model: a person's decision is in force for the row
# (set by OutputFormatter.prepare); not an output column.
REVIEWED_COLUMN = "_reviewed"
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
    pa.field("image_version", pa.string()),
    pa.field("category_changed", pa.bool_()),
    pa.field("needs_review", pa.bool_(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("scored_run_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # The decision (pipeline.models.decide): keep, change or review, why, and the calibrated
    # probability of the current category (null without one, or for one the model does not know).
    pa.field("action", pa.string(), nullable=False),
    pa.field("action_reason", pa.string(), nullable=False),
    pa.field("p_current", pa.float32()),
])


def _strings(values: np.ndarray | None, n: int) -> pa.Array:
    """A string column from a batch; an all-null column arrives from Arrow as float NaNs."""
    if values is None or np.asarray(values).dtype.kind in "fc":
        return pa.nulls(n, pa.string())
    return pa.array(values, pa.string())


class OutputFormatter:
    """numpy batch of predictions -> pyarrow Table in OUTPUT_SCHEMA. `reviewed` maps
    (product_id, image_version) to the category a person decided (the decisions in force)."""

    def __init__(self, classes: list[str], model_name: str, model_version: str, run_id: str,
                 policy: decide.Policy, open_set_threshold: float | None = None,
                 change_floor: float | None = None,
                 reviewed: Mapping[tuple[str, str | None], str] | None = None):
        self.classes = pa.array(classes, pa.string())
        self.model_name = model_name
        self.model_version = model_version
        self.run_id = run_id
        self.policy = policy
        self.change_floor = change_floor or 0.0
        self.open_set_threshold = open_set_threshold
        self.reviewed = dict(reviewed or {})

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A decoded batch, before the model: rows whose image (same image_version, null
        matching null) a person decided get that category as current_category and are marked
        in REVIEWED_COLUMN. Only rows whose image was read: an error row stays an error."""
        if not self.reviewed:
            return batch
        n = len(batch["product_id"])
        ids = _strings(batch["product_id"], n).to_pylist()
        versions = _strings(batch.get("image_version"), n).to_pylist()
        ok = np.asarray(batch["status"]) == "ok"
        decided = [self.reviewed.get((pid, version)) if good else None
                   for pid, version, good in zip(ids, versions, ok, strict=True)]
        marked = np.array([d is not None for d in decided], dtype=bool)
        if not marked.any():
            return batch
        # A copy: Ray Data hands the actor read-only (zero-copy) arrays.
        current = np.array(_strings(batch.get("current_category"), n).to_pylist(), dtype=object)
        current[marked] = np.array(decided, dtype=object)[marked]
        return {**batch, "current_category": current, REVIEWED_COLUMN: marked}

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
        unfamiliar = pa.array(batch["unfamiliarity"], pa.float32(), mask=~ok)
        scores = np.asarray(batch["unfamiliarity"], dtype=np.float64)
        # a product unlike every learned category (a NaN score on an ok row counts as unlike)
        is_unfamiliar = (~(scores <= self.open_set_threshold) if self.open_set_threshold is not None
                         else np.zeros(n, dtype=bool))
        p_current = np.asarray(batch.get("p_current", np.full(n, np.nan)), dtype=np.float32)
        action, reason = decide.decide(ok, current.to_pylist(), predicted.to_pylist(),
                                       batch["confidence"], p_current, is_unfamiliar, self.policy,
                                       self.change_floor)
        if REVIEWED_COLUMN in batch:  # a person's decision stands over the model's
            marked = np.asarray(batch[REVIEWED_COLUMN], dtype=bool)
            action[marked], reason[marked] = decide.KEEP, decide.REVIEWED
        now = dt.datetime.now(dt.UTC)
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
            "image_version": _strings(batch.get("image_version"), n),
            "category_changed": changed,
            "needs_review": pa.array(action == decide.REVIEW, pa.bool_()),
            "model_name": pa.array([self.model_name] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "scored_run_id": pa.array([self.run_id] * n, pa.string()),
            "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "action": pa.array(action, pa.string()),
            "action_reason": pa.array(reason, pa.string()),
            "p_current": pa.array(p_current, pa.float32(), mask=np.isnan(p_current)),
        }
        table = pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
        if CHUNK_COLUMN in batch:  # which resumable chunk the rows belong to (the sink drops it)
            table = table.append_column(CHUNK_COLUMN, pa.array(batch[CHUNK_COLUMN], pa.int64()))
        return table
