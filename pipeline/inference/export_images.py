"""The images an export is calibrated on (a source's training images) and judged on (images the
calibration never saw), sampled evenly over categories and decoded by the scoring engine through
the URI policy, as every job reads images. No Ray or torch imports."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.images.security import UriPolicy

CALIBRATION_MAX_BYTES = 50_000_000  # the jobs' default --max-image-bytes


def source_items(source: str) -> list[tuple[str, str, str]]:
    """(image path, category, split) of every image of `source`: the Grocery Store dataset
    (its train and val splits), a folder of class folders, or a labelled Parquet manifest."""
    from pipeline.importers import folder_rows, grocery_store_rows

    path = Path(source)
    if path.is_dir():
        rows = (grocery_store_rows(source, ["train", "val"]) if (path / "classes.csv").exists()
                else folder_rows(source))
    elif path.is_file() and path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            if not os.path.isabs(row["image_uri"]) and "://" not in row["image_uri"]:
                row["image_uri"] = str(path.parent / row["image_uri"])
    else:
        raise ConfigError(f"--calibration-source {source}: neither a folder of images (the "
                          "Grocery Store dataset, class folders) nor a .parquet manifest")
    return [(r["image_uri"], r.get("category") or "", r.get("split") or "") for r in rows]


def calibration_uris(source: str) -> list[tuple[str, str]]:
    """(image path, category) of the training images of `source` (its train split where it has
    one)."""
    items = source_items(source)
    if any(split == "train" for _, _, split in items):
        items = [i for i in items if i[2] == "train"]
    return [(uri, category) for uri, category, _ in items]


def held_out_uris(source: str, calibration: list[str], count: int,
                  seed: int) -> list[tuple[str, str]]:
    """Up to `count` (image path, category) the calibration never saw, to judge parity on: the
    source's val split where it has one, else a balanced sample of the rest of its images."""
    items = source_items(source)
    if any(split == "val" for _, _, split in items):
        pool = [(uri, category) for uri, category, split in items if split == "val"]
    else:
        seen = set(calibration)
        pool = [(uri, category) for uri, category, split in items
                if uri not in seen and split != "test"]
    category = dict(pool)
    return [(uri, category[uri]) for uri in sample_balanced(pool, count, seed)]


def sample_balanced(items: list[tuple[str, str]], count: int, seed: int) -> list[str]:
    """Up to `count` image paths, round-robin over categories in a seeded order, so every
    category is represented before any has two."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[str]] = {}
    for uri, category in sorted(items):
        by_category.setdefault(category, []).append(uri)
    queues = [list(rng.permutation(uris)) for _, uris in sorted(by_category.items())]
    chosen: list[str] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(str(queue.pop()))
    return chosen


def decode_uris(source: str, uris: list[str], size: int,
                what: str = "training images") -> tuple[np.ndarray, np.ndarray]:
    """`uris` decoded by the scoring engine as every job decodes them: (uint8 NHWC images of the
    readable ones, which were readable)."""
    from pipeline.inference import engine

    # The guarded fetch path, as every job reads images: local files under the source's own
    # folder only (no http, no '../'), regular files, the byte limit.
    root = os.path.abspath(source if Path(source).is_dir() else str(Path(source).parent))
    images = engine.ImageSettings(size, root, UriPolicy.from_options("file", "", "", root),
                                  max_bytes=CALIBRATION_MAX_BYTES, fetch_retries=0)
    rows = pa.table({"product_id": [str(i) for i in range(len(uris))], "image_uri": uris})
    batches = engine.decode_rows(images, rows) if uris else []
    if not batches:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, bool)
    ok = np.concatenate([b["status"] for b in batches]) == "ok"
    if not ok.any():
        messages = [m for b in batches for m in b["error_message"] if m]
        refused = sum(str(m).startswith("not allowed") for m in messages)
        why = (f"; {refused} refused by the URI policy: images must be local files under {root}"
               if refused else "")
        raise ConfigError(f"--calibration-source {source}: no readable {what}{why}")
    return np.concatenate([b["image"] for b in batches])[ok], ok


def calibration_sample(source: str, size: int, count: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A balanced sample of `source`'s training images, decoded: (the readable images, which of
    the sampled paths were readable, the sampled paths)."""
    uris = sample_balanced(calibration_uris(source), count, seed)
    if not uris:
        raise ConfigError(f"--calibration-source {source}: no readable training images")
    images, ok = decode_uris(source, uris, size)
    return images, ok, uris


def calibration_images(source: str, size: int, count: int, seed: int) -> tuple[np.ndarray, int]:
    """A balanced sample of `source`'s training images, decoded; returns them and how many
    unreadable files were skipped."""
    images, ok, _ = calibration_sample(source, size, count, seed)
    return images, int((~ok).sum())
