"""The Iceberg sink on a real pyiceberg SQL catalog (SQLite) with real Parquet run files."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog import load_catalog

from pipeline.errors import ConfigError, OutputError
from pipeline.sinks import rows
from pipeline.sinks.base import NightRun
from pipeline.sinks.iceberg import RUN_ID_PROPERTY, IcebergSink
from pipeline.sinks.iceberg_options import parse_catalog_properties, parse_table_name
from tests.conftest import night_table

TABLE = "retail.categories"
NIGHT_1 = {"p1": "Apple", "p2": "Banana", "p3": "Kiwi", "p4": "Lemon"}
# p2 left the catalog, p5 joined, p3 changed category.
NIGHT_2 = {"p1": "Apple", "p3": "Mango", "p4": "Lemon", "p5": "Pear"}


def write_night(folder: Path, run_id: str, categories: dict[str, str]) -> list[str]:
    """The night as a committed run folder of two Parquet files."""
    table = night_table(run_id, categories)
    run = folder / run_id
    run.mkdir(parents=True)
    half = table.num_rows // 2
    files = []
    for i, part in enumerate([table.slice(0, half), table.slice(half)]):
        path = run / f"part-{i:05d}.parquet"
        pq.write_table(part, path)
        files.append(str(path))
    return files


def night(files: list[str], run_id: str, properties: dict[str, str] | None = None) -> NightRun:
    """What the job hands the sink at commit time: the run's checked files."""
    return NightRun(run_id, tuple(files), properties or {})


def sorted_rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: r["product_id"])


@pytest.fixture
def catalog_props(tmp_path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db",
            "warehouse": f"file://{tmp_path}/warehouse"}


def load_table(props: dict[str, str]):
    return load_catalog("default", **props).load_table(TABLE)


def test_parse_catalog_properties():
    text = "type=sql, uri=sqlite:////abs/cat.db?mode=rwc ,warehouse=file:///abs/wh"
    assert parse_catalog_properties(text) == {
        "type": "sql", "uri": "sqlite:////abs/cat.db?mode=rwc", "warehouse": "file:///abs/wh"}


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("type=sql,,uri=x", "entry 2 is empty"),
    ("type=sql,warehouse", "no '='"),
    ("=sql", "no key"),
    ("type=", "empty value"),
    ("type=sql,type=rest", "twice"),
])
def test_parse_catalog_properties_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_catalog_properties(text)


def test_parse_table_name():
    assert parse_table_name("retail.categories") == ("retail", "categories")
    assert parse_table_name("lake.retail.categories") == ("lake.retail", "categories")


@pytest.mark.parametrize("text", ["categories", ".categories", "retail.", "lake..categories",
                                  "retail.cate gories", ""])
def test_parse_table_name_rejects(text):
    with pytest.raises(ConfigError, match=r"NAMESPACE\.TABLE"):
        parse_table_name(text)


def test_nights_replace_the_current_state_one_snapshot_each(tmp_path, catalog_props):
    sink = IcebergSink(TABLE, catalog_props)
    sink.check(rows.OUTPUT_SCHEMA)  # a table that does not exist yet is fine, and not created
    assert not load_catalog("default", **catalog_props).table_exists(TABLE)

    first = sink.commit(night(write_night(tmp_path / "runs", "night-1", NIGHT_1), "night-1",
                              {"catalog-recategorizer.manifest": "s3://m/1/"}))
    assert first["rows"] == len(NIGHT_1) and first["table"] == TABLE
    files_1 = sink.committed_files()
    second = sink.commit(night(write_night(tmp_path / "runs", "night-2", NIGHT_2), "night-2"))
    assert second["rows"] == len(NIGHT_2)

    table = load_table(catalog_props)
    snapshots = table.snapshots()
    assert [s.snapshot_id for s in snapshots] == [first["snapshot_id"], second["snapshot_id"]]
    assert table.current_snapshot().summary.operation.value == "overwrite"
    assert [s.summary.additional_properties[RUN_ID_PROPERTY] for s in snapshots] == ["night-1", "night-2"]
    assert snapshots[0].summary.additional_properties["catalog-recategorizer.manifest"] == "s3://m/1/"

    # Current state: exactly night 2, p2 gone; by pyiceberg and by DuckDB.
    assert sorted_rows(table.scan().to_arrow()) == sorted_rows(night_table("night-2", NIGHT_2))
    con = table.scan().to_duckdb("categories")
    assert con.execute("SELECT product_id, predicted_category FROM categories ORDER BY 1").fetchall() \
        == sorted(NIGHT_2.items())
    assert con.execute("SELECT count(*) FROM categories WHERE product_id = 'p2'").fetchone() == (0,)
    current = table.scan().to_arrow()  # noqa: F841 (read by DuckDB's replacement scan)
    assert duckdb.sql("SELECT count(*), count(DISTINCT product_id) FROM current").fetchall() == [(4, 4)]

    # Time travel: night 1 as it was.
    night_1 = table.scan(snapshot_id=first["snapshot_id"]).to_arrow()
    assert sorted_rows(night_1) == sorted_rows(night_table("night-1", NIGHT_1))

    # The data was copied into the warehouse, and night 2's files replaced night 1's.
    files_2 = sink.committed_files()
    warehouse = catalog_props["warehouse"]
    assert files_2 and all(f.startswith(warehouse) for f in files_1 + files_2)
    assert not set(files_1) & set(files_2)


def test_same_run_twice_adds_no_snapshot(tmp_path, catalog_props):
    sink = IcebergSink(TABLE, catalog_props)
    files = write_night(tmp_path / "runs", "night-1", NIGHT_1)
    first = sink.commit(night(files, "night-1"))
    again = IcebergSink(TABLE, catalog_props).commit(night(files, "night-1"))
    assert again == {**first, "already_committed": True}
    assert len(load_table(catalog_props).snapshots()) == 1


def test_an_older_run_is_not_committed_over_a_newer_one(tmp_path, catalog_props):
    sink = IcebergSink(TABLE, catalog_props)
    files_1 = write_night(tmp_path / "runs", "night-1", NIGHT_1)
    sink.commit(night(files_1, "night-1"))
    sink.commit(night(write_night(tmp_path / "runs", "night-2", NIGHT_2), "night-2"))
    with pytest.raises(OutputError, match="roll the table back"):
        sink.commit(night(files_1, "night-1"))
    assert len(load_table(catalog_props).snapshots()) == 2


def test_many_data_files_still_one_snapshot(tmp_path, catalog_props):
    """A tiny target file size makes the streaming writer roll over to new data files."""
    catalog = load_catalog("default", **catalog_props)
    catalog.create_namespace("retail")
    catalog.create_table(TABLE, schema=rows.OUTPUT_SCHEMA,
                         properties={"write.target-file-size-bytes": "1"})
    products = {f"p{i:03d}": "Apple" for i in range(40)}
    result = IcebergSink(TABLE, catalog_props).commit(night(
        write_night(tmp_path / "runs", "night-1", products), "night-1"))
    table = load_table(catalog_props)
    assert result["rows"] == len(products) == table.scan().to_arrow().num_rows
    assert len(table.snapshots()) == 1
    assert len(IcebergSink(TABLE, catalog_props).committed_files()) > 1


def test_new_output_columns_are_added_to_an_existing_table(tmp_path, catalog_props):
    older = pa.schema([f for f in rows.OUTPUT_SCHEMA if f.name != "current_category"])
    catalog = load_catalog("default", **catalog_props)
    catalog.create_namespace("retail")
    catalog.create_table(TABLE, schema=older)
    sink = IcebergSink(TABLE, catalog_props)
    sink.check(rows.OUTPUT_SCHEMA)
    sink.commit(night(write_night(tmp_path / "runs", "night-1", NIGHT_1), "night-1"))
    table = load_table(catalog_props)
    assert not table.schema().find_field("current_category").required
    assert sorted_rows(table.scan().to_arrow()) == sorted_rows(night_table("night-1", NIGHT_1))


@pytest.mark.parametrize("change, message", [
    (lambda f: pa.field(f.name, pa.int64(), nullable=False) if f.name == "product_id" else f,
     "product_id"),
    (lambda f: f.with_nullable(False) if f.name == "confidence" else f, "confidence"),
])
def test_check_refuses_an_incompatible_table(tmp_path, catalog_props, change, message):
    catalog = load_catalog("default", **catalog_props)
    catalog.create_namespace("retail")
    catalog.create_table(TABLE, schema=pa.schema([change(f) for f in rows.OUTPUT_SCHEMA]))
    sink = IcebergSink(TABLE, catalog_props)
    with pytest.raises(OutputError, match=f"incompatible.*{message}.*--iceberg-table"):
        sink.check(rows.OUTPUT_SCHEMA)
    with pytest.raises(OutputError, match="incompatible"):
        sink.commit(night(write_night(tmp_path / "runs", "night-1", NIGHT_1), "night-1"))
    assert load_table(catalog_props).snapshots() == []


def test_check_refuses_a_table_requiring_a_column_we_do_not_write(catalog_props):
    catalog = load_catalog("default", **catalog_props)
    catalog.create_namespace("retail")
    catalog.create_table(TABLE, schema=rows.OUTPUT_SCHEMA.append(
        pa.field("legacy_code", pa.string(), nullable=False)))
    with pytest.raises(OutputError, match="'legacy_code' is required"):
        IcebergSink(TABLE, catalog_props).check(rows.OUTPUT_SCHEMA)


def test_check_reports_a_bad_catalog(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot load Iceberg catalog.*--iceberg-catalog"):
        IcebergSink(TABLE, {"type": "no-such-type"}).check(rows.OUTPUT_SCHEMA)
    no_warehouse = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db"}
    with pytest.raises(ConfigError, match="warehouse"):
        IcebergSink(TABLE, no_warehouse).check(rows.OUTPUT_SCHEMA)


def test_a_sqlite_catalog_in_a_folder_not_made_yet_is_created(tmp_path):
    folder = tmp_path / "not" / "yet"
    props = {"type": "sql", "uri": f"sqlite:///{folder}/catalog.db",
             "warehouse": f"file://{tmp_path}/warehouse"}
    assert IcebergSink(TABLE, props).check(rows.OUTPUT_SCHEMA) is None  # no table yet
    assert (folder / "catalog.db").is_file()


def test_a_catalog_that_cannot_load_is_one_line(tmp_path):
    unopenable = {"type": "sql", "uri": f"sqlite:///{tmp_path}", "warehouse": f"file://{tmp_path}"}
    with pytest.raises(ConfigError) as raised:  # a folder where the database file should be
        IcebergSink(TABLE, unopenable).check(rows.OUTPUT_SCHEMA)
    assert "\n" not in str(raised.value) and "cannot load Iceberg catalog" in str(raised.value)


def test_unreadable_run_file_is_an_output_error(tmp_path, catalog_props):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(OutputError, match="cannot read run file"):
        IcebergSink(TABLE, catalog_props).commit(night([str(broken)], "night-1"))
    assert load_table(catalog_props).snapshots() == []
