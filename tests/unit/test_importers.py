import pyarrow.parquet as pq
import pytest

from pipeline.errors import ManifestError
from pipeline.importers import make_manifest


def test_grocery_store_counts_match_split_files(grocery_root, tmp_path):
    out = tmp_path / "m.parquet"
    n, _ = make_manifest(str(grocery_root), str(out))
    table = pq.read_table(out)
    lines = {s: sum(1 for line in (grocery_root / f"{s}.txt").read_text().splitlines() if line.strip())
             for s in ("train", "val")}
    assert n == table.num_rows == lines["train"] + lines["val"]
    splits = table.column("split").to_pylist()
    assert splits.count("train") == lines["train"] and splits.count("val") == lines["val"]
    assert len(set(table.column("category").to_pylist())) == 81
    assert len(set(table.column("coarse_category").to_pylist())) == 43
    assert len(set(table.column("product_id").to_pylist())) == n
    row = table.slice(0, 1).to_pylist()[0]
    assert (row["category"], row["coarse_category"]) == ("Golden-Delicious", "Apple")


def test_class_folder_tree(tmp_path, sample_images):
    for split in ("train", "val"):
        for src in sample_images[:3]:
            target = tmp_path / "tree" / split / src.parent.name / src.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
    (tmp_path / "tree" / "train" / "README.txt").write_text("not an image")
    n, _ = make_manifest(str(tmp_path / "tree"), str(tmp_path / "m.parquet"))
    table = pq.read_table(tmp_path / "m.parquet")
    assert n == 6
    assert sorted(set(table.column("category").to_pylist())) == sorted(
        p.parent.name for p in sample_images[:3])
    assert table.column("split").to_pylist().count("val") == 3


def test_held_out_categories_leave_the_manifest_whole(grocery_root, tmp_path):
    out = tmp_path / "known.parquet"
    n, held = make_manifest(str(grocery_root), str(out), holdout_categories=10, holdout_seed=3)
    known = pq.read_table(out)
    holdout = pq.read_table(tmp_path / "known.holdout.parquet")
    assert len(held) == 10 and n == known.num_rows
    assert not set(held) & set(known.column("category").to_pylist())
    assert set(holdout.column("category").to_pylist()) == set(held)
    assert "val" in holdout.column("split").to_pylist()  # every held-out category can be evaluated
    full, _ = make_manifest(str(grocery_root), str(tmp_path / "all.parquet"))
    assert known.num_rows + holdout.num_rows == full
    again = make_manifest(str(grocery_root), str(tmp_path / "again.parquet"), holdout_categories=10,
                          holdout_seed=3)[1]
    assert again == held


def test_holding_out_too_many_categories_is_refused(grocery_root, tmp_path):
    with pytest.raises(ManifestError, match="only 60 have val rows"):
        make_manifest(str(grocery_root), str(tmp_path / "m.parquet"), holdout_categories=59)


def test_calibration_share_marks_the_last_val_photos_of_each_category(grocery_root, tmp_path):
    out = tmp_path / "m.parquet"
    make_manifest(str(grocery_root), str(out), calibration_share=0.5)
    rows = pq.read_table(out).to_pylist()
    make_manifest(str(grocery_root), str(tmp_path / "p.parquet"))
    plain = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["product_id"] for r in rows] == [r["product_id"] for r in plain]
    assert [r["split"] == "train" for r in rows] == [r["split"] == "train" for r in plain]
    kiwi = [r["split"] for r in rows if r["category"] == "Kiwi" and r["split"] != "train"]
    half = round(len(kiwi) * 0.5)
    assert kiwi == ["val"] * (len(kiwi) - half) + ["calibration"] * half
