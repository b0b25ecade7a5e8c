"""The reviews table: append-only decisions on real Parquet files, locally and on S3 (moto)."""

import multiprocessing
import os
import threading
import time

import pyarrow.parquet as pq
import pytest

from pipeline.errors import OutputError
from pipeline.sinks.reviews import (
    LATEST_COLUMNS,
    REVIEWS_SCHEMA,
    Decision,
    ReviewsTable,
    in_force,
    read_in_force,
    write_in_force,
)


def decision(product_id: str, category: str, version: str | None = "v1",
             reviewer: str = "ana") -> Decision:
    return Decision(product_id=product_id, image_version=version,
                    image_uri=f"images/{product_id}.jpg", decided_category=category,
                    replaces_category="Banana", predicted_category="Kiwi", model_version="m1",
                    reviewer=reviewer, run_id="run-1")


def _append_many(uri: str, writer: int, count: int) -> None:
    """One writer process: `count` appends of one decision each."""
    table = ReviewsTable(uri)
    for i in range(count):
        table.append([decision(f"w{writer}-{i}", "Kiwi")])


def test_append_reads_back_every_field(tmp_path):
    table = ReviewsTable(str(tmp_path / "reviews"))
    assert not table.exists() and table.rows().num_rows == 0 and table.latest().num_rows == 0
    written = table.append([decision("p1", "Kiwi"), decision("p2", "Banana", version=None)])
    assert table.exists() and len(table.files()) == 1
    rows = table.rows()
    assert rows.schema == REVIEWS_SCHEMA
    assert rows.to_pylist() == written
    assert {r["kind"] for r in written} == {"decide"} and {r["undoes"] for r in written} == {None}
    assert len({r["decision_id"] for r in written}) == 2
    latest = table.latest()
    assert latest.column_names == LATEST_COLUMNS
    assert in_force(latest) == {("p1", "v1"): "Kiwi", ("p2", None): "Banana"}


def test_newest_decision_wins_and_an_undo_voids_one(tmp_path):
    table = ReviewsTable(str(tmp_path / "reviews"))
    first = table.append([decision("p1", "Kiwi")])[0]
    second = table.append([decision("p1", "Banana", reviewer="bo")])[0]
    table.append([decision("p1", "Oatly-Oat-Milk", version="v2")])  # another image of p1
    assert in_force(table.latest()) == {("p1", "v1"): "Banana", ("p1", "v2"): "Oatly-Oat-Milk"}

    undo = table.undo(second["decision_id"], reviewer="ana", run_id="run-2")
    assert (undo["kind"], undo["undoes"], undo["decided_category"]) == (
        "undo", second["decision_id"], None)
    # the undone decision is gone; the one it had replaced is in force again
    assert in_force(table.latest())[("p1", "v1")] == "Kiwi"
    assert table.latest().to_pylist()[0]["decision_id"] == first["decision_id"]

    table.undo(first["decision_id"], reviewer="ana", run_id="run-2")
    assert in_force(table.latest()) == {("p1", "v2"): "Oatly-Oat-Milk"}
    later = table.append([decision("p1", "Pink-Lady")])[0]  # a later decision wins again
    assert in_force(table.latest())[("p1", "v1")] == "Pink-Lady"
    assert table.latest().to_pylist()[0]["decision_id"] == later["decision_id"]
    assert table.rows().num_rows == 6  # nothing was rewritten or removed
    with pytest.raises(KeyError):
        table.undo("no-such-decision", reviewer="ana", run_id="run-2")


def test_an_undo_given_its_decision_row_matches_one_found_in_the_table(tmp_path):
    """The review server passes the row it wrote: the undo must be the one a table read gives."""
    table = ReviewsTable(str(tmp_path / "reviews"))
    written = table.append([decision("p1", "Kiwi"), decision("p2", "Banana")])
    looked_up = table.undo(written[0]["decision_id"], reviewer="bo", run_id="run-2")
    given = table.undo(written[1]["decision_id"], reviewer="bo", run_id="run-2",
                       decided=written[1])
    same = ("kind", "image_version", "model_version", "reviewer", "run_id")
    assert {k: given[k] for k in same} == {k: looked_up[k] for k in same}
    assert (given["product_id"], given["image_uri"]) == ("p2", "images/p2.jpg")
    assert given["undoes"] == written[1]["decision_id"]
    assert in_force(table.latest()) == {}
    with pytest.raises(KeyError):  # a row that is not that decision is not trusted
        table.undo("nope", reviewer="bo", run_id="run-2", decided=written[0])


def test_two_threads_appending_at_once_lose_nothing(tmp_path):
    table = ReviewsTable(str(tmp_path / "reviews"))
    start = threading.Barrier(2)

    def write(writer: int) -> None:
        start.wait()
        for i in range(20):
            table.append([decision(f"t{writer}-{i}", "Kiwi")])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert table.rows().num_rows == 40 and len(table.files()) == 40
    assert table.latest().num_rows == 40


def test_two_processes_appending_at_once_lose_nothing(tmp_path):
    uri = str(tmp_path / "reviews")
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_append_many, args=(uri, w, 15)) for w in range(2)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=120)
        assert p.exitcode == 0
    ids = set(ReviewsTable(uri).rows().column("product_id").to_pylist())
    assert ids == {f"w{w}-{i}" for w in range(2) for i in range(15)}


def test_a_crashed_writers_temporary_file_is_ignored(tmp_path):
    folder = tmp_path / "reviews"
    table = ReviewsTable(str(folder))
    table.append([decision("p1", "Kiwi")])
    complete = folder / table.files()[0]
    # what a writer killed before its rename leaves: a "_" name, here even half a file
    (folder / "_20261201T000000000000Z-dead.parquet.tmp").write_bytes(complete.read_bytes()[:40])
    (folder / "_20261201T000000000000Z-dead.parquet").write_bytes(b"PAR1 cut short")
    table.check()
    assert table.rows().num_rows == 1 and len(table.files()) == 1
    # a local append leaves no temporary file behind
    table.append([decision("p2", "Kiwi")])
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("_")) == sorted(
        os.path.basename(f) for f in table.files())


def test_check_refuses_what_is_not_a_reviews_table(tmp_path):
    ReviewsTable(str(tmp_path / "absent")).check()  # nothing decided yet
    (tmp_path / "file.parquet").write_bytes(b"x")
    with pytest.raises(OutputError, match="is a file"):
        ReviewsTable(str(tmp_path / "file.parquet")).check()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not decisions")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        ReviewsTable(str(other)).check()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    pq.write_table(pq.read_table(_a_reviews_file(tmp_path)).select(["product_id"]),
                   wrong / "part.parquet")
    with pytest.raises(OutputError, match="lacks columns"):
        ReviewsTable(str(wrong)).check()


def _a_reviews_file(tmp_path) -> str:
    table = ReviewsTable(str(tmp_path / "source"))
    table.append([decision("p1", "Kiwi")])
    return table.files()[0]


def test_the_nights_snapshot_round_trips(tmp_path):
    table = ReviewsTable(str(tmp_path / "reviews"))
    table.append([decision("p1", "Kiwi"), decision("p2", "Banana", version=None)])
    uri = str(tmp_path / "plan" / "reviewed.parquet")
    write_in_force(table.latest(), uri)
    assert read_in_force(uri) == {("p1", "v1"): "Kiwi", ("p2", None): "Banana"}


def test_on_s3(s3_bucket):
    uri = f"{s3_bucket}/out/reviews"
    table = ReviewsTable(uri)
    table.check()
    assert not table.exists() and table.latest().num_rows == 0
    first = table.append([decision("p1", "Kiwi")])[0]
    time.sleep(0.01)
    table.append([decision("p2", "Banana")])
    table.undo(first["decision_id"], reviewer="ana", run_id="run-2")
    assert all(f.startswith(f"{uri}/") for f in table.files()) and len(table.files()) == 3
    table.check()
    assert in_force(table.latest()) == {("p2", "v1"): "Banana"}
    assert ReviewsTable(uri + "/").rows().num_rows == 3
