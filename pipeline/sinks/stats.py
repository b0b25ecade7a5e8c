"""Statistics of written prediction tables: what each output write task returns.

Each write task calls `table_stats` on the table it writes; the driver folds the results with
`merge_stats` and stores them in the run's summary (`pipeline.nightly.drift` compares them with
the previous night's), so no output is ever read back to be counted.

Stats are plain JSON: integer counts only (the confidence sum is kept in integer micro-units), so
merging is exact and gives the same result in any order and for any split of the rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CONFIDENCE_BINS = 20  # equal bins over [0, 1]; 0.05 wide is finer than any review threshold step
CONFIDENCE_SUM_SCALE = 1_000_000  # micro-units: an exact integer sum; float sums depend on order
UNKNOWN_ERROR_TYPE = "unknown"  # an error row without an error_type still counts as an error
OK = "ok"

STAT_COUNTS = ("rows", "ok", "errors", "category_changed", "needs_review", "confidence_sum_micro")
STAT_MAPS = ("errors_by_type", "categories", "actions", "action_reasons")


def empty_stats() -> dict[str, Any]:
    """The stats of no rows: the identity of `merge_stats`."""
    return {**dict.fromkeys(STAT_COUNTS, 0), **{key: {} for key in STAT_MAPS},
            "confidence_histogram": [0] * CONFIDENCE_BINS}


def _value_counts(values: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """{value: n} over the non-null values, most frequent first."""
    counts = pc.value_counts(pc.drop_null(values))
    pairs = zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
    return _sorted_counts(dict(pairs))


def _sorted_counts(counts: dict[str, int]) -> dict[str, int]:
    """Most frequent first, then by name: a stable order for the JSON summary."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _true_count(mask: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)


def table_stats(table: pa.Table | pa.RecordBatch) -> dict[str, Any]:
    """JSON-serializable stats of one written table in OUTPUT_SCHEMA (or any table with its
    status, error_type, predicted_category, confidence, category_changed and needs_review).

    `categories` and `confidence_histogram` cover the ok rows only: an error row has no
    prediction. `category_changed` counts rows whose category changed (null = not comparable,
    not counted). `errors_by_type` sums to `errors`."""
    ok_mask = pc.equal(table.column("status"), OK)  # status is non-nullable
    ok = _true_count(ok_mask)
    errors_by_type = _value_counts(pc.fill_null(
        pc.filter(table.column("error_type"), pc.invert(ok_mask)), UNKNOWN_ERROR_TYPE))
    # the histogram skips a NaN (cast to int it would land in an arbitrary bin)
    confidence = pc.filter(table.column("confidence"), ok_mask)
    confidence = pc.filter(confidence, pc.is_finite(confidence)).to_numpy().astype(np.float64)
    # clip: confidence 1.0 belongs in the last bin, and a rounding overshoot must not add a bin
    bins = np.clip((confidence * CONFIDENCE_BINS).astype(np.int64), 0, CONFIDENCE_BINS - 1)
    micro = np.rint(confidence * CONFIDENCE_SUM_SCALE).astype(np.int64)
    return {
        "rows": table.num_rows,
        "ok": ok,
        "errors": table.num_rows - ok,
        "errors_by_type": errors_by_type,
        "category_changed": _true_count(table.column("category_changed")),
        "needs_review": _true_count(table.column("needs_review")),
        "categories": _value_counts(pc.filter(table.column("predicted_category"), ok_mask)),
        # rows written before decisions existed have no action columns
        "actions": (_value_counts(table.column("action"))
                    if "action" in table.column_names else {}),
        "action_reasons": (_value_counts(table.column("action_reason"))
                           if "action_reason" in table.column_names else {}),
        "confidence_histogram": np.bincount(bins, minlength=CONFIDENCE_BINS).tolist(),
        "confidence_sum_micro": int(micro.sum()),
    }


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, n in b.items():
        out[key] = out.get(key, 0) + n
    return _sorted_counts(out)


def merge_stats(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The stats of the rows of both (associative and commutative; `empty_stats()` is the
    identity). Neither argument is changed."""
    ha, hb = a["confidence_histogram"], b["confidence_histogram"]
    if len(ha) != len(hb):
        raise ValueError(f"cannot merge confidence histograms of {len(ha)} and {len(hb)} bins")
    return {
        **{key: a[key] + b[key] for key in STAT_COUNTS},
        **{key: _add_counts(a.get(key, {}), b.get(key, {})) for key in STAT_MAPS},
        "confidence_histogram": [x + y for x, y in zip(ha, hb, strict=True)],
    }
