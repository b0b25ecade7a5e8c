"""Turn labelled image folders into training manifests (Parquet)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.catalog import CALIBRATION_SPLIT, stratified_split
from pipeline.errors import ManifestError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
MANIFEST_SCHEMA = pa.schema([
    ("product_id", pa.string()),
    ("image_uri", pa.string()),
    ("category", pa.string()),
    ("coarse_category", pa.string()),
    ("split", pa.string()),
])


def grocery_store_rows(root: str, splits: list[str]) -> list[dict]:
    """Rows from the Grocery Store dataset's split files (`path, fine_id, coarse_id`) and
    classes.csv (fine and coarse names)."""
    root_path = Path(root)
    classes_file = root_path / "classes.csv"
    if not classes_file.exists():
        raise ManifestError(f"{root!r} has no classes.csv; is it the Grocery Store dataset?")
    fine, coarse = {}, {}
    with open(classes_file, newline="") as f:
        for row in csv.DictReader(f):
            fine[int(row["Class ID (int)"])] = row["Class Name (str)"].strip()
            coarse[int(row["Coarse Class ID (int)"])] = row["Coarse Class Name (str)"].strip()
    rows = []
    for split in splits:
        split_file = root_path / f"{split}.txt"
        if not split_file.exists():
            raise ManifestError(f"{root!r} has no split file {split}.txt")
        for line in split_file.read_text().splitlines():
            if not line.strip():
                continue
            rel, fine_id, coarse_id = (part.strip() for part in line.split(","))
            rows.append({
                "product_id": f"grocery/{Path(rel).with_suffix('').as_posix()}",
                "image_uri": str((root_path / rel).resolve()),
                "category": fine[int(fine_id)],
                "coarse_category": coarse[int(coarse_id)],
                "split": split,
            })
    return rows


def folder_rows(root: str) -> list[dict]:
    """Rows from `root/<class>/**/image` or `root/<split>/<class>/**/image` (split in
    train/val/test). The class is the first folder level under the split (or root)."""
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise ManifestError(f"{root!r} is not a folder")
    top = {p.name for p in root_path.iterdir() if p.is_dir()}
    split_layout = bool(top) and top <= {"train", "val", "test"}
    rows = []
    for dirpath, _, files in sorted(os.walk(root_path)):
        for name in sorted(files):
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = path.relative_to(root_path)
            parts = rel.parts
            if split_layout:
                if len(parts) < 3:
                    continue
                split, category = parts[0], parts[1]
            else:
                if len(parts) < 2:
                    continue
                split, category = None, parts[0]
            rows.append({"product_id": rel.with_suffix("").as_posix(), "image_uri": str(path),
                         "category": category, "coarse_category": None, "split": split})
    if not rows:
        raise ManifestError(f"no images found in class folders under {root!r}")
    return rows


def write_manifest(rows: list[dict], uri: str) -> int:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    fs, path = storage.arrow_filesystem(uri)
    if storage.is_local(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(table, path, filesystem=fs)
    return table.num_rows


def holdout_uri(output: str) -> str:
    """Where the held-out categories' rows go, beside the manifest."""
    stem = output[: -len(".parquet")] if output.endswith(".parquet") else output
    return f"{stem}.holdout.parquet"


def split_holdout(rows: list[dict], count: int, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    """(kept rows, held-out rows, held-out categories): `count` categories drawn with `seed`
    among those that have val rows (so the held-out set can be evaluated)."""
    with_val = sorted({r["category"] for r in rows if r["split"] == "val"})
    if count > len(with_val) - 2:
        raise ManifestError(f"cannot hold out {count} categories: only {len(with_val)} have val rows "
                            "and at least 2 must stay")
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(with_val, size=count, replace=False).tolist())
    return ([r for r in rows if r["category"] not in held],
            [r for r in rows if r["category"] in held], held)


def mark_calibration(rows: list[dict], share: float) -> list[dict]:
    """The rows with the last `share` of each category's val rows (in file order) marked split
    'calibration': new photos the model never trains on, from the same sessions as val, where
    the temperature and the decision thresholds are fitted."""
    val = [i for i, r in enumerate(rows) if r.get("split") == "val"]
    if not share or not val:
        return rows
    categories = sorted({rows[i]["category"] for i in val})
    labels = np.array([categories.index(rows[i]["category"]) for i in val])
    held = stratified_split(labels, share, seed=0, block=True)
    marked = {val[k] for k in np.flatnonzero(held)}
    return [{**r, "split": CALIBRATION_SPLIT} if i in marked else r for i, r in enumerate(rows)]


def make_manifest(source: str, output: str, layout: str = "auto",
                  splits: tuple[str, ...] = ("train", "val"), holdout_categories: int = 0,
                  holdout_seed: int = 0, calibration_share: float = 0.0) -> tuple[int, list[str]]:
    """Write the manifest; returns its row count and the held-out categories."""
    storage.check_writable(storage.parent(output))  # before the scan: exit 5, nothing written
    if layout == "auto":
        layout = "grocery-store" if (Path(source) / "classes.csv").exists() else "folders"
    rows = grocery_store_rows(source, list(splits)) if layout == "grocery-store" else folder_rows(source)
    rows = mark_calibration(rows, calibration_share)
    held: list[str] = []
    if holdout_categories:
        rows, held_rows, held = split_holdout(rows, holdout_categories, holdout_seed)
        write_manifest(held_rows, holdout_uri(output))
    return write_manifest(rows, output), held
