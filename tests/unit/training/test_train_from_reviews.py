"""`jobs.train --reviews`: people's decisions from the review tool become training rows.

Real parts throughout: manifests of the bundled sample catalog's and the Grocery Store's photos,
a reviews table written by pipeline.sinks.reviews, and (slow) a one-epoch training run."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs._main import run_job
from jobs.train import main as train_main
from pipeline import logs
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.importers import make_manifest
from pipeline.models.artifact import load_metadata
from pipeline.sinks.reviews import Decision, ReviewsTable
from pipeline.training.data import load_data
from tests.conftest import photos_by_category, write_manifest

CATEGORIES = 4  # a few classes keep the manifest small; load_data reads no image


def sample_manifest(path) -> tuple[str, dict[str, dict]]:
    """A labelled manifest of the sample catalog's photos in CATEGORIES categories: each
    category's first photo is split 'val', the rest 'train'. Returns it and its rows by id."""
    rows = []
    for category, photos in list(photos_by_category().items())[:CATEGORIES]:
        for i, photo in enumerate(photos):
            rows.append({"product_id": f"{category}-{i}", "image_uri": str(photo),
                         "category": category, "split": "val" if i == 0 else "train"})
    write_manifest(path, rows)
    return str(path), {r["product_id"]: r for r in rows}


def decision(product_id: str, category: str, image_uri: str | None,
             image_version: str | None = "v1") -> Decision:
    return Decision(product_id=product_id, image_version=image_version, image_uri=image_uri,
                    decided_category=category, replaces_category=None,
                    predicted_category=None, model_version="m", reviewer="ana", run_id="r1")


def by_id(data, split: str) -> dict[str, tuple[str, str]]:
    """product_id -> (image_uri, category) of one split of load_data's result."""
    table = getattr(data, split)
    return {p: (u, data.classes[label]) for p, u, label in zip(
        *(table.column(c).to_pylist() for c in ("product_id", "image_uri", "label")), strict=True)}


def test_reviewed_products_train_with_the_decided_category(tmp_path):
    manifest, rows = sample_manifest(tmp_path / "m.parquet")
    categories = sorted({r["category"] for r in rows.values()})
    train_ids = [p for p, r in rows.items() if r["split"] == "train"]
    relabel, moved, undone, twice = train_ids[0], next(
        p for p, r in rows.items() if r["split"] == "val"), train_ids[1], train_ids[2]
    other = next(c for c in categories if c != rows[relabel]["category"])
    new_photo = str(photos_by_category()[categories[0]][-1])
    reviews = ReviewsTable(str(tmp_path / "reviews"))
    reviews.append([decision(relabel, other, "reviewed/relabel.jpg"),
                    decision(moved, other, None),  # no image recorded: the manifest's is used
                    decision("sku-only-in-reviews", categories[1], new_photo),
                    decision(twice, other, "reviewed/old.jpg", image_version="v1")])
    (voided,) = reviews.append([decision(undone, other, "reviewed/undone.jpg")])
    reviews.undo(voided["decision_id"], reviewer="ana", run_id="r2")
    # The product's picture changed and was reviewed again: the newer decision trains.
    reviews.append([decision(twice, categories[0], "reviewed/new.jpg", image_version="v2")])

    plain = load_data(TrainConfig(manifest=manifest, calibration_fraction=0))
    data = load_data(TrainConfig(manifest=manifest, calibration_fraction=0,
                                 reviews=str(tmp_path / "reviews")))

    train, val = by_id(data, "train"), by_id(data, "val")
    assert train[relabel] == ("reviewed/relabel.jpg", other)
    assert train[moved] == (rows[moved]["image_uri"], other) and moved not in val
    assert train["sku-only-in-reviews"] == (new_photo, categories[1])
    assert train[twice] == ("reviewed/new.jpg", categories[0])
    assert train[undone] == (rows[undone]["image_uri"], rows[undone]["category"])
    # De-duplicated by product_id: one row per product, and nothing else moved.
    assert data.train.num_rows == len(set(data.train.column("product_id").to_pylist()))
    assert set(train) == set(by_id(plain, "train")) | {moved, "sku-only-in-reviews"}
    assert set(val) == set(by_id(plain, "val")) - {moved}
    assert data.classes == plain.classes
    assert data.reviews == {"uri": str(tmp_path / "reviews"), "decisions": 5, "products": 4,
                            "replaced": 3, "relabelled": 2, "added": 1, "without_image": 0,
                            "train_rows": 4}
    assert plain.reviews is None


def test_reviews_never_shift_the_held_out_splits_of_other_products(tmp_path):
    """The splits come from the manifest alone: a review takes its own product out of the
    calibration rows, and every other product stays where it was."""
    manifest, rows = sample_manifest(tmp_path / "m.parquet")
    table = pq.read_table(manifest)  # no split column: val and calibration are seeded shares
    pq.write_table(table.drop_columns(["split"]), tmp_path / "nosplit.parquet")
    cfg = TrainConfig(manifest=str(tmp_path / "nosplit.parquet"), val_fraction=0.2,
                      calibration_fraction=0.3)
    plain = load_data(cfg)
    held_out = sorted(set(by_id(plain, "calibration")))[0]
    ReviewsTable(str(tmp_path / "reviews")).append(
        [decision(held_out, rows[held_out]["category"], None)])
    data = load_data(cfg.model_copy(update={"reviews": str(tmp_path / "reviews")}))
    assert set(by_id(data, "calibration")) == set(by_id(plain, "calibration")) - {held_out}
    assert set(by_id(data, "val")) == set(by_id(plain, "val"))
    assert set(by_id(data, "train")) == set(by_id(plain, "train")) | {held_out}


def test_a_decided_category_the_manifest_lacks_is_refused_before_anything_is_written(
        tmp_path, capsys):
    manifest, rows = sample_manifest(tmp_path / "m.parquet")
    product = next(iter(rows))
    ReviewsTable(str(tmp_path / "reviews")).append(
        [decision(product, "Dragon-Fruit", None), decision("sku-x", "Rambutan", "x.jpg")])
    out = tmp_path / "run"
    code = run_job(train_main, ["--manifest", manifest, "--reviews", str(tmp_path / "reviews"),
                                "--output", str(out), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == ConfigError.exit_code and len(err.splitlines()) == 1
    assert "Dragon-Fruit, Rambutan" in err and "--reviews" in err
    assert not out.exists()


def test_a_reviews_path_that_holds_no_table_is_refused(tmp_path):
    manifest, _ = sample_manifest(tmp_path / "m.parquet")
    with pytest.raises(ConfigError, match="no reviews table there"):
        load_data(TrainConfig(manifest=manifest, reviews=str(tmp_path / "typo")))


def test_relative_reviews_path_is_recorded_absolute(tmp_path, monkeypatch):
    # The recorded config is re-read by jobs.calibrate from another folder.
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(reviews="out/reviews").reviews == str(tmp_path / "out" / "reviews")


@pytest.mark.slow
def test_training_with_reviews_records_the_reviewed_rows(ray_local, grocery_root, tmp_path,
                                                         capfd, monkeypatch):
    monkeypatch.setenv(logs.FORMAT_ENV, "text")  # restored after: --log-format json sets it
    full = tmp_path / "full.parquet"
    make_manifest(str(grocery_root), str(full))
    table = pq.read_table(full).to_pylist()
    keep = ("Granny-Smith", "Kiwi", "Banana")  # three classes, few photos: a tiny run
    rows = [r for c in keep for r in [r for r in table if r["category"] == c and
                                      r["split"] == "train"][:12]
            + [r for r in table if r["category"] == c and r["split"] == "val"][:3]]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    kiwi = [r for r in rows if r["category"] == "Kiwi" and r["split"] == "train"]
    # Two Kiwi photos relabelled Banana, one Kiwi photo of another product added as Banana.
    extra = [r for r in table if r["category"] == "Kiwi" and r["split"] == "train"][12]
    ReviewsTable(str(tmp_path / "reviews")).append(
        [decision(kiwi[0]["product_id"], "Banana", None),
         decision(kiwi[1]["product_id"], "Banana", kiwi[1]["image_uri"]),
         decision("reviewed-new", "Banana", extra["image_uri"])])
    out = tmp_path / "run"
    code = run_job(train_main, [
        "--manifest", str(manifest), "--reviews", str(tmp_path / "reviews"), "--output",
        str(out), "--epochs", "1", "--input-size", "64", "--batch-size", "8",
        "--calibration-fraction", "0", "--dataset-root", str(grocery_root),
        "--log-format", "json"])
    assert code == 0
    # --log-format json: the job's own lines are JSON objects, the epoch line printed by the
    # driver (not a worker's prefixed print); Ray Train's INFO lines are off.
    printed, err = capfd.readouterr()
    events = [json.loads(line) for line in (err + printed).splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e["event"] != "warning"] == ["data", "epoch", "summary"]
    assert events[1]["epoch"] == 1 and events[1]["job"] == "jobs.train"
    assert 0 <= events[1]["val_accuracy"] <= 1
    assert "Checkpoint successfully created" not in err and "epoch 1/1" not in printed + err
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["train_rows"] == 12 * 3 + 1 and summary["unreadable_rows"] == 0
    assert summary["reviews"]["train_rows"] == 3 and summary["reviews"]["relabelled"] == 2
    assert summary["reviews"]["added"] == 1
    meta = load_metadata(str(out / "model"))
    assert meta.training["reviews"] == summary["reviews"] and meta.classes == sorted(keep)
