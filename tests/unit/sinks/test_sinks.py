"""The sink interface: both sinks implement it, and a run folder written and committed through
it reads back."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import OutputError
from pipeline.sinks.base import NightRun, Sink, commit_in_order
from pipeline.sinks.iceberg import IcebergSink
from pipeline.sinks.parquet import NightDocuments, RunFolderSink
from pipeline.sinks.rows import CHUNK_COLUMN
from tests.conftest import night_table


def test_both_sinks_implement_the_interface(tmp_path):
    props = {"type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db",
             "warehouse": f"file://{tmp_path}/warehouse"}
    assert isinstance(RunFolderSink(str(tmp_path / "out")), Sink)
    assert isinstance(IcebergSink("retail.categories", props), Sink)


def test_a_run_folder_written_and_committed_through_the_interface_reads_back(tmp_path):
    out = str(tmp_path / "out")
    sink = RunFolderSink(out)
    assert sink.check() is None
    run_id = sink.stage("key", "night-1")
    assert sink.stage("key", "ignored") == run_id  # a restart finds its run
    rows = night_table(run_id, {"p1": "Apple", "p2": "Banana", "p3": "Kiwi"})
    writer = sink.datasink(run_id, rows_per_write=10)
    written = writer.write([rows.append_column(CHUNK_COLUMN, pa.array([0, 0, 1]))], None)
    assert sink.finished_chunks(run_id, [2, 1]) == {0, 1}
    sealed = sink.seal(run_id, [2, 1], 0, 3, written, {"model_version": "m"})
    assert sealed.marker["rows"] == 3 and sealed.stats["ok"] == 3
    sink.attach(NightDocuments({"run_id": run_id}, "a: 1\n", "<html/>", "stats\n"))
    fenced = []
    commits = commit_in_order([sink], NightRun(run_id, fence=lambda: fenced.append(1)))
    assert commits[sink.name]["run_id"] == run_id and fenced
    assert sink.check()["run_id"] == run_id
    read = pq.read_table(sink.committed_files()).sort_by("product_id")
    assert read.column("product_id").to_pylist() == ["p1", "p2", "p3"]
    assert not (tmp_path / "out" / "_staging").exists()


def test_a_run_folder_missing_rows_is_not_sealed(tmp_path):
    sink = RunFolderSink(str(tmp_path / "out"))
    run_id = sink.stage("key", "night-1")
    with pytest.raises(OutputError, match="chunk 0 holds 0 rows"):
        sink.seal(run_id, [2], 0, 2, [], {})
