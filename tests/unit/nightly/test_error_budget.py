"""The error budget: a night with too many error rows, or whose first rows all fail the same way,
publishes nothing and exits 7. Real local Ray, real photos, the tiny model, real Parquet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline.errors import ErrorBudgetError, FailFastError
from pipeline.inference.fail_fast import FAIL_FAST_MIN_ROWS, FailFast, fail_fast_rows, fix_hint
from pipeline.nightly.budget import BUDGET_FREE_ERRORS, BudgetCheck, night_errors
from tests.conftest import committed_table, make_catalog, summary_json, write_manifest

REFUSED = "not allowed: location is outside the allowed prefixes"


def rows(error_types: list[str | None], message: str = REFUSED) -> pa.Table:
    """Formatted rows as the inference actor returns them (the columns FailFast reads)."""
    n = len(error_types)
    return pa.table({"product_id": [f"p{i}" for i in range(n)],
                     "image_uri": [f"/elsewhere/{i}.jpg" for i in range(n)],
                     "status": ["ok" if t is None else "error" for t in error_types],
                     "error_type": pa.array(error_types, pa.string()),
                     "error_message": [None if t is None else message for t in error_types]})


def test_fail_fast_trips_only_on_a_uniform_start():
    watch = FailFast(window=10)
    watch.observe(rows(["fetch_failed"] * 6))
    with pytest.raises(FailFastError) as info:
        watch.observe(rows(["fetch_failed"] * 6))
    assert "first 12 rows" in str(info.value) and "--allowed-uri-prefixes" in str(info.value)
    assert info.value.exit_code == 7

    mixed = FailFast(window=10)
    mixed.observe(rows(["fetch_failed"] * 6))
    mixed.observe(rows(["fetch_failed"] * 5 + [None]))  # one good row ends the watch
    mixed.observe(rows(["fetch_failed"] * 50))
    two_kinds = FailFast(window=10)
    two_kinds.observe(rows(["fetch_failed"] * 6))
    two_kinds.observe(rows(["fetch_not_found"] * 6))
    # The committed run's own broken images, re-tried tonight, are not a new failure.
    known = FailFast(window=10)
    known.observe(rows(["fetch_not_found"] * 30), [True] * 30)
    assert not (mixed.watching or two_kinds.watching) and known.seen == 0


def test_windows_and_hints():
    assert fail_fast_rows(30, 1) == FAIL_FAST_MIN_ROWS
    assert fail_fast_rows(10_000_000, 4) == 500  # the first 2,000 rows over four actors
    assert "--allowed-uri-prefixes" in fix_hint("fetch_failed", REFUSED)
    assert "credentials" in fix_hint("fetch_failed", "ClientError: An error occurred (ExpiredToken)")
    assert "--allowed-networks" in fix_hint(
        "fetch_failed", "not allowed: host 'x' resolves to non-public address 10.0.0.1")


def test_budget_counts_new_errors_of_the_rows_scored():
    # One broken image among three re-scored rows is within the free errors, not an outage.
    assert not BudgetCheck(3, 1, 0, 0, 0.05).over
    assert BudgetCheck(BUDGET_FREE_ERRORS + 1, BUDGET_FREE_ERRORS + 1, 0, 0, 0.05).over
    # An incremental night: 1,000 re-scored rows all failing trips it, whatever was carried.
    assert BudgetCheck(1000, 1000, 0, 0, 0.05).over
    # 900 of the re-tried rows were already broken last night: 100 new rows, 5 new errors.
    steady = BudgetCheck(1000, 905, 900, 900, 0.05)
    assert (steady.judged_rows, steady.new_errors, steady.over) == (100, 5, False)
    assert not BudgetCheck(1000, 1000, 0, 0, 1.0).over  # 1 turns it off


def test_night_errors_leave_out_the_committed_runs_broken_images(tmp_path):
    last = rows(["fetch_not_found", "fetch_not_found", None, None], "HTTP 404")
    pq.write_table(last, tmp_path / "last.parquet")
    # Tonight p0 is still broken at the same image, p1 moved to a new (broken) image, p2 and p3
    # now fail: three new errors, one known.
    tonight = rows(["fetch_not_found", "fetch_failed", "fetch_failed", "fetch_failed"])
    tonight = tonight.set_column(1, "image_uri", pa.array(
        ["/elsewhere/0.jpg", "/elsewhere/moved.jpg", "/elsewhere/2.jpg", "/elsewhere/3.jpg"]))
    pq.write_table(tonight, tmp_path / "tonight.parquet")
    found = night_errors([str(tmp_path / "tonight.parquet")], [str(tmp_path / "last.parquet")])
    assert (found.known_errors, found.still_broken) == (1, 1)
    assert found.new_by_type == {"fetch_failed": 3}
    assert [e["product_id"] for e in found.sample["fetch_failed"]] == ["p1", "p2", "p3"]
    assert BudgetCheck(4, 4, found.known_errors, found.still_broken, 0.05).new_errors == 3
    first_night = night_errors([str(tmp_path / "tonight.parquet")], None)
    assert first_night.new_by_type == {"fetch_failed": 3, "fetch_not_found": 1}


def job(capsys, *args) -> tuple[int, str, str]:
    code = run_job(recategorize_main, [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def published(out: Path) -> tuple[bytes, str, pa.Table]:
    return ((out / "_SUCCESS").read_bytes(), os.readlink(out / "predictions"),
            committed_table(out))


@pytest.mark.slow
def test_all_refused_fails_fast_and_leaves_last_night_current(ray_local, small_catalog, tmp_path,
                                                             tiny_model, capsys):
    manifest, n, _ = small_catalog
    out = tmp_path / "out"
    common = ["--model", tiny_model, "--output", out, "--batch-size", 64]
    assert job(capsys, "--manifest", manifest, *common)[0] == 0
    before = published(out)

    # Tonight's manifest lives apart from the images: the default allow-list refuses them all.
    table = pq.read_table(manifest).to_pylist()
    images = manifest.parent / "images"
    moved = write_manifest(tmp_path / "manifests" / "tonight.parquet", [
        {**r, "image_uri": str(manifest.parent / r["image_uri"])} for r in table])
    for attempt in range(2):  # started again, it refuses again: nothing resumes into a publish
        code, _, err = job(capsys, "--manifest", moved, *common)
        line = err.strip().splitlines()[-1]
        assert code == 7, err
        assert "stopped early" in line and "were all fetch_failed errors" in line and REFUSED in line
        assert "--allowed-uri-prefixes" in line and "previous run stays current" in line
        assert published(out) == before, attempt
        assert not (out / "_staging").exists()  # docs/guarantees.md: no staging left behind

    # The fix the message names works.
    code, stdout, err = job(capsys, "--manifest", moved, *common,
                            "--allowed-uri-prefixes", f"{images}/")
    assert code == 0, err
    summary = summary_json(stdout)
    assert summary["rows"] == n and summary["error_budget"]["over_budget"] is False
    assert published(out)[0] != before[0] and committed_table(out).num_rows == n


@pytest.mark.slow
def test_fail_fast_stops_a_night_on_ray(small_catalog, tmp_path, tiny_model):
    """The same stop from inside Ray Data's actor pool, in its own process as a night runs."""
    manifest, _, _ = small_catalog
    moved = write_manifest(tmp_path / "manifests" / "tonight.parquet", [
        {**r, "image_uri": str(manifest.parent / r["image_uri"])}
        for r in pq.read_table(manifest).to_pylist()])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.recategorize", "--manifest", str(moved), "--model", tiny_model,
         "--output", str(out), "--executor", "ray", "--num-cpus", "2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 7, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert REFUSED in line and "--allowed-uri-prefixes" in line
    assert not (out / "_SUCCESS").exists() and not (out / "_LEASE.json").exists()


@pytest.mark.slow
def test_over_budget_keeps_rows_summary_and_sample_then_a_higher_budget_publishes(
        ray_local, tmp_path, sample_images, tiny_model, capsys):
    manifest, n = make_catalog(tmp_path / "catalog", sample_images, good=16)
    outside = [{"product_id": f"far-{i}", "image_uri": str(p), "current_category": "Banana"}
               for i, p in enumerate(sample_images[16:21])]
    manifest = write_manifest(manifest, pq.read_table(manifest).to_pylist() + outside)
    n += len(outside)  # 16 good, 5 refused, 3 broken: 8 errors of 24 rows
    out = tmp_path / "out"
    args = ["--manifest", manifest, "--model", tiny_model, "--output", out]

    code, _, err = job(capsys, *args)
    assert code == 7, err
    assert "error budget exceeded: 8 of 24 rows" in err and "33.3%" in err
    assert "--max-error-rate 0.05" in err and "most are fetch_failed (5 rows)" in err
    assert "--allowed-uri-prefixes" in err
    assert not (out / "_SUCCESS").exists() and not (out / "predictions").exists()
    (folder,) = (out / "runs").iterdir()
    summary = json.loads((folder / "_summary.json").read_text())
    assert summary["error_budget"]["over_budget"] is True
    assert summary["errors_by_type"] == {"fetch_failed": 5, "decode_failed": 1,
                                         "not_an_image": 1, "fetch_not_found": 1}
    sample = json.loads((folder / "_errors.json").read_text())
    assert sorted(sample) == ["decode_failed", "fetch_failed", "fetch_not_found", "not_an_image"]
    assert [e["product_id"] for e in sample["fetch_failed"]] == [f"far-{i}" for i in range(5)]
    assert all(e["error_message"] == REFUSED for e in sample["fetch_failed"])
    staged = pq.ParquetDataset(sorted(str(p) for p in folder.glob("part-*.parquet"))).read()
    assert staged.num_rows == n  # the staged rows, there to inspect

    code, stdout, err = job(capsys, *args, "--max-error-rate", 0.5)
    assert code == 0, err
    summary = summary_json(stdout)
    assert summary["run_id"] != folder.name and summary["chunks_resumed"] == 0  # scored afresh
    assert summary["error_budget"]["new_errors"] == 8 and summary["errors"] == 8
    assert committed_table(out).num_rows == n and not folder.exists()


def test_refusal_is_a_pipeline_error_with_its_own_exit_code():
    assert ErrorBudgetError.exit_code == 7 and issubclass(FailFastError, ErrorBudgetError)
