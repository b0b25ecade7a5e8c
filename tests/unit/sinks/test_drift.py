"""Per-run stats of written tables, their merge, the night-to-night drift section and its page."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import random
import re

import numpy as np
import pyarrow as pa
import pytest
from scipy.spatial.distance import jensenshannon

from pipeline.nightly.drift import TOP_MOVERS, drift, js_divergence, render_drift_html
from pipeline.sinks.rows import OUTPUT_SCHEMA
from pipeline.sinks.stats import (
    CONFIDENCE_BINS,
    UNKNOWN_ERROR_TYPE,
    empty_stats,
    merge_stats,
    table_stats,
)

NOW = dt.datetime(2024, 5, 1, 2, 0, tzinfo=dt.UTC)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ok(category: str, confidence: float, changed: bool | None = False, review: bool = False) -> dict:
    return {"status": "ok", "category": category, "confidence": confidence, "changed": changed,
            "review": review}


def err(error_type: str | None) -> dict:
    return {"status": "error", "error_type": error_type, "review": True}


def output_table(rows: list[dict]) -> pa.Table:
    """A table in OUTPUT_SCHEMA, every non-nullable column filled, from short row specs."""
    records = [{
        "product_id": f"p{i:05d}", "image_uri": f"images/p{i:05d}.jpg", "status": r["status"],
        "error_type": r.get("error_type"),
        "error_message": None if r["status"] == "ok" else "could not decode image",
        "predicted_category": r.get("category"), "confidence": r.get("confidence"),
        "top_k": None if r["status"] != "ok" else [{"category": r["category"], "score": r["confidence"]}],
        "unfamiliarity": None if r["status"] != "ok" else 0.1,
        "current_category": r.get("category"), "category_changed": r.get("changed"),
        "needs_review": r["review"], "model_name": "efficientnet_lite0", "model_version": "v1",
        "run_id": "run-1", "processed_at": NOW,
        "action": "review" if r["review"] else "change" if r.get("changed") else "keep",
        "action_reason": "low_confidence" if r["review"] else "confirmed",
    } for i, r in enumerate(rows)]
    return pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)


def random_rows(n: int, seed: int) -> list[dict]:
    """Mixed rows: errors (some without a type), null category_changed, bin-edge confidences."""
    rng = random.Random(seed)
    edges = [0.0, 0.05, 0.5, 0.95, 1.0]
    rows = []
    for _ in range(n):
        if rng.random() < 0.15:
            rows.append(err(rng.choice(["DecodeError", "FetchError", None])))
        else:
            conf = rng.choice(edges) if rng.random() < 0.2 else rng.random()
            rows.append(ok(f"cat-{rng.randrange(12)}", conf, rng.choice([True, False, None]),
                           rng.random() < 0.3))
    return rows


def stats_of(counts: dict[str, int], confidence: float = 0.9, errors: int = 0) -> dict:
    """Stats of a night with `counts` ok rows per category, all at one confidence."""
    rows = [ok(c, confidence) for c, n in counts.items() for _ in range(n)]
    return table_stats(output_table(rows + [err("DecodeError")] * errors))


# ---- table_stats --------------------------------------------------------------------------

def test_table_stats_counts_errors_nulls_and_bins():
    table = output_table([
        ok("Fruit", 0.0, changed=True), ok("Fruit", 1.0, changed=None), ok("Dairy", 0.05, review=True),
        ok("Dairy", 0.97, changed=False), err("DecodeError"), err("DecodeError"), err(None),
    ])
    stats = table_stats(table)
    assert {k: stats[k] for k in ("rows", "ok", "errors", "category_changed", "needs_review")} == {
        "rows": 7, "ok": 4, "errors": 3, "category_changed": 1, "needs_review": 4}
    assert stats["errors_by_type"] == {"DecodeError": 2, UNKNOWN_ERROR_TYPE: 1}
    assert stats["categories"] == {"Dairy": 2, "Fruit": 2}
    assert stats["actions"] == {"review": 4, "change": 1, "keep": 2}
    assert stats["action_reasons"] == {"low_confidence": 4, "confirmed": 3}
    hist = stats["confidence_histogram"]
    assert len(hist) == CONFIDENCE_BINS and sum(hist) == 4  # error rows have no confidence
    assert hist[0] == 1 and hist[1] == 1 and hist[-1] == 2  # 1.0 belongs to the last bin
    assert stats["confidence_sum_micro"] == round((0.0 + 1.0 + 0.05 + 0.97) * 1e6)
    assert json.loads(json.dumps(stats)) == stats


def test_table_stats_of_no_rows_is_the_empty_stats():
    assert table_stats(output_table([])) == empty_stats()


# ---- merge --------------------------------------------------------------------------------

def test_merge_of_parts_equals_stats_of_the_whole_for_any_split():
    table = output_table(random_rows(60, seed=1))
    whole = table_stats(table)
    for cut in range(table.num_rows + 1):  # every two-part split, slices with offsets included
        parts = [table.slice(0, cut), table.slice(cut)]
        assert merge_stats(*map(table_stats, parts)) == whole, cut
    rng = random.Random(2)
    for _ in range(20):  # random many-part splits, folded in random order, through JSON
        cuts = sorted(rng.sample(range(1, table.num_rows), rng.randrange(1, 8)))
        bounds = list(zip([0, *cuts], [*cuts, table.num_rows], strict=True))
        parts = [json.loads(json.dumps(table_stats(table.slice(a, b - a)))) for a, b in bounds]
        rng.shuffle(parts)
        assert functools.reduce(merge_stats, parts, empty_stats()) == whole


def test_merge_matches_a_concatenated_multi_chunk_table_and_record_batches():
    tables = [output_table(random_rows(n, seed)) for seed, n in enumerate([30, 0, 45, 7])]
    combined = pa.concat_tables(tables)  # chunked columns, as a reader would see them
    merged = functools.reduce(merge_stats, map(table_stats, tables))
    assert merged == table_stats(combined) == table_stats(combined.combine_chunks())
    batches = combined.combine_chunks().to_batches()
    assert functools.reduce(merge_stats, map(table_stats, batches)) == merged


def test_merge_is_associative_with_an_identity_and_leaves_its_inputs_alone():
    a, b, c = (table_stats(output_table(random_rows(25, seed))) for seed in (5, 6, 7))
    before = json.dumps([a, b, c])
    assert merge_stats(merge_stats(a, b), c) == merge_stats(a, merge_stats(b, c))
    assert merge_stats(a, b) == merge_stats(b, a)
    assert merge_stats(empty_stats(), a) == a == merge_stats(a, empty_stats())
    assert json.dumps([a, b, c]) == before


def test_merge_refuses_histograms_of_different_bins():
    other = {**empty_stats(), "confidence_histogram": [0] * (CONFIDENCE_BINS + 1)}
    with pytest.raises(ValueError, match="bins"):
        merge_stats(empty_stats(), other)


# ---- drift --------------------------------------------------------------------------------

def test_drift_picks_the_top_mover_and_appeared_and_disappeared_categories():
    previous = stats_of({"Fruit & Veg": 50, "Dairy": 40, "Bakery": 10})
    current = stats_of({"Fruit & Veg": 10, "Dairy": 60, "Snacks": 30})
    section = drift(previous, current, new_products=30, removed_products=10)
    cats = section["categories"]
    top = cats["top_movers"][0]
    assert top == {"category": "Fruit & Veg", "previous_count": 50, "current_count": 10,
                   "previous_share": 0.5, "current_share": 0.1, "share_change": -0.4}
    assert [m["category"] for m in cats["top_movers"]] == ["Fruit & Veg", "Snacks", "Dairy", "Bakery"]
    assert [c["category"] for c in cats["appeared"]] == ["Snacks"] and cats["appeared_total"] == 1
    assert cats["disappeared"] == [{"category": "Bakery", "count": 10, "share": 0.1}]
    assert section["products"] == {"new": 30, "removed": 10}
    assert section["rows"] == {"previous": 100, "current": 100, "change": 0}
    assert 0 < cats["js_divergence"] < 1


def test_top_movers_are_capped_and_skip_unchanged_categories():
    previous = stats_of({f"c{i:02d}": 10 for i in range(30)})
    current = stats_of({**{f"c{i:02d}": 10 for i in range(30)}, "c00": 40, "c01": 1})
    movers = drift(previous, current)["categories"]["top_movers"]
    assert len(movers) == TOP_MOVERS and movers[0]["category"] == "c00"
    assert drift(previous, previous)["categories"]["top_movers"] == []


def test_js_divergence_is_0_for_identical_nights_and_1_for_disjoint_categories():
    night = stats_of({"Fruit": 30, "Dairy": 20})
    assert drift(night, night)["categories"]["js_divergence"] == 0.0
    disjoint = drift(stats_of({"Fruit": 30, "Dairy": 20}), stats_of({"Snacks": 5, "Bakery": 9}))
    assert disjoint["categories"]["js_divergence"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)  # against an independent implementation (scipy gives the root)
    for _ in range(5):
        p, q = rng.integers(0, 20, 8).astype(float) + 0.5, rng.integers(0, 20, 8).astype(float)
        assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)


def test_confidence_histogram_shift():
    low = stats_of({"Fruit": 40}, confidence=0.47)  # bin 9
    high = stats_of({"Fruit": 40}, confidence=0.97)  # bin 19
    conf = drift(low, high)["confidence"]
    assert conf["previous_histogram"][9] == 1.0 and conf["current_histogram"][19] == 1.0
    assert sum(conf["current_histogram"]) == pytest.approx(1.0)
    assert conf["total_variation"] == pytest.approx(1.0)
    assert conf["wasserstein"] == pytest.approx(0.5)  # all mass moved 10 bins of 0.05
    assert conf["mean"]["previous"] == pytest.approx(0.47, abs=1e-6)
    assert conf["mean"]["current"] == pytest.approx(0.97, abs=1e-6)
    assert len(conf["bin_edges"]) == CONFIDENCE_BINS + 1
    half = merge_stats(stats_of({"Fruit": 20}, confidence=0.47), stats_of({"Fruit": 20}, confidence=0.97))
    assert drift(low, half)["confidence"]["total_variation"] == pytest.approx(0.5)
    same = drift(low, low)["confidence"]
    assert same["total_variation"] == 0 and same["wasserstein"] == 0 and same["mean"]["change"] == 0


def test_rates_both_nights():
    previous = stats_of({"Fruit": 90}, errors=10)
    current = table_stats(output_table([ok("Fruit", 0.9, changed=True, review=True)] * 20
                                       + [ok("Fruit", 0.9)] * 60 + [err("FetchError")] * 20))
    rates = drift(previous, current)["rates"]
    assert rates["error"] == {"previous": 0.1, "current": 0.2, "change": 0.1}
    assert rates["needs_review"] == {"previous": 0.1, "current": 0.4, "change": 0.3}
    assert rates["category_changed"] == {"previous": 0.0, "current": 0.25, "change": 0.25}


def test_no_previous_night_still_gives_this_nights_figures():
    current = stats_of({"Fruit": 30, "Dairy": 10}, confidence=0.8, errors=10)
    section = drift(None, current)
    assert section["has_previous"] is False and "no previous night" in section["note"]
    assert section["rows"] == {"previous": None, "current": 50, "change": None}
    assert section["products"] == {"new": None, "removed": None}
    assert section["rates"]["error"] == {"previous": None, "current": 0.2, "change": None}
    cats = section["categories"]
    assert cats["js_divergence"] is None and cats["top_movers"] == [] and cats["appeared"] == []
    assert cats["top_current"][0] == {"category": "Fruit", "count": 30, "share": 0.75}
    conf = section["confidence"]
    assert conf["previous_histogram"] is None and conf["total_variation"] is None
    assert conf["current_histogram"][16] == 1.0 and conf["mean"]["current"] == pytest.approx(0.8)
    json.dumps(section)


def test_a_night_without_rows_compares_without_failing():
    section = drift(empty_stats(), stats_of({"Fruit": 3}))
    assert section["categories"]["js_divergence"] is None
    assert section["confidence"]["total_variation"] is None
    assert section["rates"]["error"]["previous"] is None
    assert section["categories"]["appeared_total"] == 1
    json.dumps(section)


def test_section_is_json_serializable_and_survives_a_round_trip():
    previous = table_stats(output_table(random_rows(80, seed=3)))
    current = table_stats(output_table(random_rows(90, seed=4)))
    section = drift(previous, current, new_products=4, removed_products=0)
    assert json.loads(json.dumps(section, allow_nan=False)) == section


# ---- HTML ---------------------------------------------------------------------------------

def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img[^>]* src="data:image/png;base64,([^"]+)"', page)]


def test_html_renders_plots_inline_and_names_the_mover():
    section = drift(stats_of({"Fruit & Veg": 50, "Dairy": 50}), stats_of({"Fruit & Veg": 10, "Dairy": 90}),
                    new_products=7, removed_products=2)
    page = render_drift_html(section)
    pngs = _pngs(page)
    assert len(pngs) == 2 and all(p.startswith(PNG_SIGNATURE) for p in pngs)  # movers, confidence
    assert "Fruit &amp; Veg" in page and "Fruit & Veg" not in page  # escaped, never raw
    assert "http" not in page  # self-contained: no external assets


def test_html_without_a_previous_night():
    page = render_drift_html(drift(None, stats_of({"Fruit": 5})))
    assert "no previous night" in page and "Fruit" in page
    assert len(_pngs(page)) == 1  # the confidence histogram; no movers to plot
