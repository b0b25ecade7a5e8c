"""Incremental nights: a run into an output holding a committed run of the same model and
options scores only new products, moved images and changed images, carries the rest forward
unchanged, and drops products that left the catalog; the rows equal a full run's."""

import json
import os
import shutil

import pytest

from pipeline.config import RecategorizeConfig
from pipeline.nightly.recategorize import run
from tests.conftest import catalog_image, committed_table, dated_catalog, write_manifest

# Columns a carried row and a re-scored row must agree on (scores compared with a tolerance).
COMPARED = ["product_id", "image_uri", "status", "error_type", "predicted_category",
            "current_category", "category_changed", "needs_review", "model_version",
            "image_version", "action", "action_reason"]
ROWS = 10


@pytest.fixture
def catalog(tmp_path, sample_images):
    """(folder, rows): ROWS real photos plus one missing image, and two spare photos."""
    folder = tmp_path / "catalog"
    return folder, dated_catalog(folder, sample_images, ROWS, spare=2)


def image(folder, i: int) -> str:
    return catalog_image(folder, i)


def night(folder, rows, name: str, out, model: str, **options) -> dict:
    manifest = write_manifest(folder / name / "manifest.parquet", rows)
    return run(RecategorizeConfig(manifest=str(manifest), model=model, output=str(out),
                                  batch_size=8, allowed_uri_prefixes=str(folder), **options))


def iceberg_options(tmp_path) -> tuple[dict[str, str], dict[str, str]]:
    """A pyiceberg SQL catalog on SQLite under tmp_path: its properties and the job's options."""
    props = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db",
             "warehouse": f"file://{tmp_path}/warehouse"}
    return props, {"iceberg_table": "retail.predictions",
                   "iceberg_catalog": ",".join(f"{k}={v}" for k, v in props.items())}


def assert_same_rows(got, want) -> None:
    assert got.num_rows == want.num_rows
    for column in COMPARED:
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    assert got.column("confidence").to_pylist() == pytest.approx(
        want.column("confidence").to_pylist(), abs=1e-5, nan_ok=True)


def test_second_night_carries_unchanged_rows_and_equals_a_full_run(ray_local, catalog, tmp_path,
                                                                   tiny_model):
    folder, rows = catalog
    out = tmp_path / "out"
    first = night(folder, rows, "2026-11-22", out, tiny_model)
    assert first["mode"] == "full" and first["rows_rescored"] == ROWS + 1

    moved = {**rows[1], "image_uri": image(folder, ROWS)}
    added = {"product_id": "p-new", "image_uri": image(folder, ROWS + 1),
             "current_category": "Banana"}
    relabelled = {**rows[2], "current_category": "Banana"}  # the catalog's side changed
    tonight = [moved, relabelled, *rows[3:], added]  # p00 left the catalog
    second = night(folder, tonight, "2026-11-23", out, tiny_model)
    assert second["mode"] == "incremental"
    assert (second["new_products"], second["removed_products"]) == (1, 1)
    # the moved image, the new product, the error row (retried every night) and the product
    # whose current category changed (its decision depends on it) are scored
    assert (second["rows_rescored"], second["rows_carried"]) == (4, ROWS - 3)
    got = committed_table(out)
    assert "p00" not in got.column("product_id").to_pylist()
    scored_by = dict(zip(got.column("product_id").to_pylist(),
                         got.column("scored_run_id").to_pylist(), strict=True))
    assert {p for p, r in scored_by.items() if r == second["run_id"]} == {
        "p01", "p02", "p-new", "p-missing"}
    assert set(got.column("run_id").to_pylist()) == {second["run_id"]}
    assert second["drift"]["products"] == {"new": 1, "removed": 1}
    assert (out / "drift.html").read_text().count("<img") >= 1

    full = night(folder, tonight, "2026-11-23", tmp_path / "full", tiny_model, full=True)
    assert full["mode"] == "full" and full["rows_rescored"] == len(tonight)
    assert_same_rows(got, committed_table(tmp_path / "full"))


@pytest.mark.parametrize("signal", ["store", "image_version"])
def test_an_image_replaced_at_the_same_uri_is_scored_again(ray_local, catalog, tmp_path,
                                                          sample_images, tiny_model, signal):
    folder, rows = catalog
    if signal == "image_version":
        rows = [{**r, "image_version": "v1"} for r in rows]
    out = tmp_path / "out"
    night(folder, rows, "n1", out, tiny_model)
    replaced = folder / "images" / "03.jpg"
    shutil.copyfile(sample_images[-1], replaced)  # another photo, same URI
    stat = replaced.stat()
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    if signal == "image_version":
        rows = [{**r, "image_version": "v2"} if r["product_id"] == "p03" else r for r in rows]
    second = night(folder, rows, "n2", out, tiny_model)
    assert second["mode"] == "incremental"
    assert (second["rows_rescored"], second["rows_carried"]) == (2, ROWS - 1)  # p03, p-missing
    night(folder, rows, "n2", tmp_path / "full", tiny_model)
    assert_same_rows(committed_table(out), committed_table(tmp_path / "full"))


def test_a_new_model_or_new_options_score_everything(ray_local, catalog, tmp_path, tiny_model,
                                                     bundled_model):
    folder, rows = catalog
    out = tmp_path / "out"
    night(folder, rows, "n1", out, tiny_model)
    other_options = night(folder, rows, "n2", out, tiny_model, review_threshold=0.9)
    assert other_options["mode"] == "full" and "options" in other_options["mode_reason"]
    precision = night(folder, rows, "n2", out, tiny_model, review_threshold=0.9, change_precision=0.9)
    assert precision["mode"] == "full" and "options" in precision["mode_reason"]
    new_model = night(folder, rows, "n3", out, bundled_model)
    assert new_model["mode"] == "full" and "model changed" in new_model["mode_reason"]
    assert new_model["rows_rescored"] == len(rows) and new_model["rows_carried"] == 0
    got = committed_table(out)
    assert set(got.column("scored_run_id").to_pylist()) == {new_model["run_id"]}
    assert set(got.column("model_name").to_pylist()) == {"efficientnet_lite0"}


def test_each_night_is_one_iceberg_snapshot_and_a_removed_product_leaves_the_table(
        ray_local, catalog, tmp_path, tiny_model):
    from pyiceberg.catalog import load_catalog

    folder, rows = catalog
    props, options = iceberg_options(tmp_path)
    out = tmp_path / "out"
    first = night(folder, rows, "n1", out, tiny_model, **options)
    second = night(folder, rows[1:], "n2", out, tiny_model, **options)  # p00 left the catalog
    assert second["iceberg"]["rows"] == len(rows) - 1

    table = load_catalog("default", **props).load_table("retail.predictions")
    con = table.scan().to_duckdb("predictions")
    ids = {r[0] for r in con.sql("SELECT product_id FROM predictions").fetchall()}
    assert ids == {r["product_id"] for r in rows[1:]}
    runs = con.sql("SELECT DISTINCT run_id FROM predictions").fetchall()
    assert runs == [(second["run_id"],)]
    snapshots = {s.summary["catalog-recategorizer.run-id"]: s.snapshot_id
                 for s in table.snapshots()}
    assert set(snapshots) == {first["run_id"], second["run_id"]}
    # _SUCCESS names the table snapshot it matches: the table and the Parquet run agree.
    marker = json.loads((out / "_SUCCESS").read_text())
    assert marker["iceberg"] == {"table": "retail.predictions",
                                 "snapshot_id": snapshots[second["run_id"]]}
    night1 = table.scan(snapshot_id=snapshots[first["run_id"]]).to_arrow()
    assert "p00" in night1.column("product_id").to_pylist()
    assert night1.num_rows == len(rows)
    # the catalog properties do not end up in the config written next to the outputs
    assert "sqlite" not in (out / "config.yaml").read_text()


def test_a_table_left_ahead_of_success_is_reported_and_brought_back_in_line(catalog, tmp_path,
                                                                           tiny_model, capsys):
    """A run that stopped between its table commit and `_SUCCESS` leaves them on different
    runs; the next night says so and commits both."""
    from pipeline.sinks.base import NightRun
    from pipeline.sinks.iceberg import IcebergSink
    from pipeline.sinks.parquet import RunFolderSink

    folder, rows = catalog
    props, options = iceberg_options(tmp_path)
    out = tmp_path / "out"
    first = night(folder, rows, "n1", out, tiny_model, **options)
    sink = IcebergSink("retail.predictions", props)
    files = tuple(RunFolderSink(str(out)).committed_files())
    sink.commit(NightRun("stopped-run", files))  # its _SUCCESS never came
    assert sink.current_run_id() == "stopped-run"
    second = night(folder, rows, "n2", out, tiny_model, **options)
    assert second["table_run_split"] == {"table_run_id": "stopped-run",
                                         "parquet_run_id": first["run_id"]}
    assert "stopped between its table commit" in capsys.readouterr().err
    marker = json.loads((out / "_SUCCESS").read_text())
    assert sink.current_run_id() == marker["run_id"] == second["run_id"]
