"""Training data: the manifest's labels and splits (read on the driver, a few columns), and the
decoded images (fetched and decoded once by Ray Data CPU tasks, cached in the object store;
every epoch re-augments the cached uint8 images on the worker).

With --reviews, the decisions people made in the review tool (pipeline.sinks.reviews) join the
training rows: each reviewed product trains on the image the person saw, labelled with the
category they chose, in place of the manifest's row of the same product."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.catalog import CALIBRATION_SPLIT, open_dataset, stratified_split, validate_manifest
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.inference.fail_fast import FAILURE_SAMPLE_ROWS, mass_failure

DECODE_MARGIN = 1.15  # training images are decoded this much larger than the crop size


@dataclass
class LabelledData:
    train: pa.Table  # product_id, image_uri, label, coarse_label
    val: pa.Table
    classes: list[str]
    coarse_classes: dict[str, str]
    base_uri: str
    excluded: dict[str, int] | None = None  # training rows left out per audit finding (--exclude)
    # Held out of training and of the reported metrics: the temperature, the open-set threshold
    # and the decision thresholds are fitted here, so val reports them honestly. None: fitted on
    # val (--calibration-fraction 0), and the artifact says so.
    calibration: pa.Table | None = None
    # --reviews: where the reviewed rows came from and how many joined (reviewed_rows' counts,
    # plus train_rows: how many of the training rows are reviewed ones). None without --reviews.
    reviews: dict[str, Any] | None = None


def load_data(cfg: TrainConfig) -> LabelledData:
    """The manifest's labelled rows as train, val and (optionally) calibration tables."""
    manifest = validate_manifest(cfg.manifest, training=True)
    cols = ["product_id", "image_uri", "category"] + [
        c for c in ("coarse_category", "split") if manifest.has(c)]
    table = open_dataset(manifest.uri).to_table(columns=cols)
    excluded = None
    if cfg.exclude:
        table, excluded = exclude_flagged(table, cfg.exclude)
    classes = sorted(set(table.column("category").to_pylist()))
    coarse_classes = coarse_of(table) if manifest.has("coarse_category") else {}
    reviewed, reviews = (reviewed_rows(cfg.reviews, table, classes) if cfg.reviews
                         else (None, None))
    split_column = table.column("split") if manifest.has("split") else None
    table, labels = label_table(table, classes, coarse_classes)
    # The splits are drawn from the manifest alone, so a review never moves another product
    # between train, val and calibration (recalibration recomputes them from the manifest).
    is_train, is_val, is_calibration = split_masks(split_column, labels, cfg)
    manifest_rows = table.num_rows
    if reviewed is not None:
        # A reviewed product's manifest row leaves whichever split held it; its reviewed row
        # trains. Review picks the model's hard cases, so they stay out of the held-out rows.
        replaced = pc.is_in(table.column("product_id"),
                            value_set=reviewed.column("product_id")).to_numpy(zero_copy_only=False)
        reviewed, _ = label_table(reviewed, classes, coarse_classes)
        table = pa.concat_tables([table, reviewed.cast(table.schema)])
        added = np.ones(reviewed.num_rows, dtype=bool)
        is_train = np.concatenate([is_train & ~replaced, added])
        is_val = np.concatenate([is_val & ~replaced, ~added])
        is_calibration = np.concatenate([is_calibration & ~replaced, ~added])
    rng = np.random.default_rng(cfg.seed)
    train_idx = rng.permutation(np.flatnonzero(is_train))  # shuffled: manifests are class-sorted
    if cfg.max_train_rows:
        train_idx = train_idx[: cfg.max_train_rows]
    if reviews is not None:
        reviews["train_rows"] = int((train_idx >= manifest_rows).sum())
    train = table.take(pa.array(train_idx))
    val = table.take(pa.array(np.flatnonzero(is_val)))
    calibration = (table.take(pa.array(np.flatnonzero(is_calibration)))
                   if is_calibration.any() else None)
    if train.num_rows == 0 or val.num_rows == 0:
        raise TrainingError(
            f"manifest {manifest.uri!r} gives {train.num_rows} training and {val.num_rows} "
            "validation rows; both must be non-empty")
    return LabelledData(train, val, classes, coarse_classes, manifest.base_uri, excluded,
                        calibration, reviews)


def reviewed_rows(uri: str, manifest: pa.Table, classes: list[str]
                  ) -> tuple[pa.Table, dict[str, Any]]:
    """(product_id, image_uri, category) of every product with a decision in force in the
    reviews table `uri`, and what they do to the manifest's rows (counts).

    One row per product: a product decided for two images (its picture changed between
    reviews) trains on the newer decision. The image is the one the reviewer saw; a decision
    recorded without one uses the manifest's image of the product, and is left out (counted)
    for a product the manifest lacks. A decided category the manifest does not have is refused:
    the class list comes from the manifest, and a category without validation and calibration
    rows would get neither a measured accuracy nor fitted thresholds."""
    from pipeline.sinks.reviews import ReviewsTable

    table = ReviewsTable(uri)
    if not table.exists():
        raise ConfigError(f"--reviews {uri}: no reviews table there; give the folder that "
                          "python -m jobs.review writes (<nightly output>/reviews)")
    latest = table.latest()
    image_of = dict(zip(*(table.rows().column(c).to_pylist() for c in ("decision_id", "image_uri")),
                        strict=True))
    newest: dict[str, dict[str, Any]] = {}
    for row in latest.to_pylist():
        held = newest.get(row["product_id"])
        if held is None or row["decided_at"] > held["decided_at"]:
            newest[row["product_id"]] = row
    unknown = sorted({r["decided_category"] for r in newest.values()} - set(classes))
    if unknown:
        raise ConfigError(
            f"--reviews {uri}: decided categories {', '.join(unknown)} are not among the "
            f"manifest's {len(classes)} categories; add labelled rows of them to the manifest "
            "(train and val) first, or correct those decisions in the review tool")
    ids = pa.array(sorted(newest), type=pa.string())
    known = manifest.filter(pc.is_in(manifest.column("product_id"), value_set=ids))
    listed = {p: (u, c) for p, u, c in zip(*(known.column(c).to_pylist()
                                              for c in ("product_id", "image_uri", "category")),
                                           strict=True)}
    out: dict[str, list] = {"product_id": [], "image_uri": [], "category": []}
    without_image = 0
    for product, row in sorted(newest.items()):
        image = image_of.get(row["decision_id"]) or listed.get(product, (None, None))[0]
        if not image:
            without_image += 1
            continue
        out["product_id"].append(product)
        out["image_uri"].append(image)
        out["category"].append(row["decided_category"])
    rows = pa.table(out, schema=pa.schema([("product_id", pa.string()),
                                           ("image_uri", pa.string()),
                                           ("category", pa.string())]))
    used = set(out["product_id"])
    counts = {
        "uri": uri, "decisions": latest.num_rows, "products": len(used),
        "replaced": sum(p in listed for p in used),
        "relabelled": sum(p in listed and listed[p][1] != c
                          for p, c in zip(out["product_id"], out["category"], strict=True)),
        "added": sum(p not in listed for p in used), "without_image": without_image}
    return rows, counts


def coarse_of(table: pa.Table) -> dict[str, str]:
    """Coarse category of each fine category that has one."""
    coarse_classes: dict[str, str] = {}
    for fine, coarse in zip(table.column("category").to_pylist(),
                            table.column("coarse_category").to_pylist(), strict=True):
        if coarse is not None:
            coarse_classes[fine] = coarse
    return coarse_classes


def label_table(table: pa.Table, classes: list[str], coarse_classes: dict[str, str]
                ) -> tuple[pa.Table, np.ndarray]:
    """(product_id, image_uri, label, coarse_label) of every row (coarse_label -1 where the
    category has no coarse one), and the fine labels."""
    index = {c: i for i, c in enumerate(classes)}
    categories = table.column("category").to_pylist()
    labels = np.array([index[c] for c in categories], dtype=np.int64)
    coarse_names = sorted(set(coarse_classes.values()))
    coarse_index = {c: i for i, c in enumerate(coarse_names)}
    coarse_labels = np.array([coarse_index.get(coarse_classes.get(c), -1) for c in categories],
                             dtype=np.int64)
    out = table.select(["product_id", "image_uri"]).append_column(
        "label", pa.array(labels)).append_column("coarse_label", pa.array(coarse_labels))
    return out, labels


def split_masks(split_column: pa.ChunkedArray | None, labels: np.ndarray, cfg: TrainConfig
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, calibration) row masks: the manifest's split column (missing: train), with
    seeded stratified shares held out where the manifest names no val or calibration rows."""
    if split_column is not None:
        split = np.asarray(pc.fill_null(split_column, "train").to_pylist(), dtype=object)
    else:
        split = np.full(len(labels), "train", dtype=object)
    is_train, is_val = split == "train", split == "val"
    is_calibration = split == CALIBRATION_SPLIT
    if not is_val.any():  # no validation rows given: hold out a seeded stratified share
        is_val = np.zeros(len(labels), dtype=bool)
        is_val[is_train] = stratified_split(labels[is_train], cfg.val_fraction, cfg.seed)
        is_train &= ~is_val
    if not is_calibration.any() and cfg.calibration_fraction > 0:
        # a seed of its own, so a random share does not depend on the validation split's
        is_calibration[is_train] = stratified_split(
            labels[is_train], cfg.calibration_fraction, cfg.seed + 1,
            block=cfg.calibration_sampling == "block")
        is_train &= ~is_calibration
    return is_train, is_val, is_calibration


def exclude_flagged(table: pa.Table, audit_dir: str) -> tuple[pa.Table, dict[str, int]]:
    """The manifest rows without the training rows an audit flagged (`jobs.audit`), and how many
    each finding removed. Validation rows stay, so accuracy is measured on the same rows with
    and without the cleaning."""
    from pipeline.analysis.findings import flagged_products

    flagged = flagged_products(audit_dir)
    ids = table.column("product_id").to_pylist()
    train = (np.asarray(pc.fill_null(table.column("split"), "train").to_pylist()) == "train"
             if "split" in table.column_names else np.ones(len(ids), dtype=bool))
    drop = np.zeros(len(ids), dtype=bool)
    counts = {}
    for finding, products in flagged.items():
        hit = train & np.array([p in products for p in ids], dtype=bool)
        counts[finding] = int(hit.sum())
        drop |= hit
    counts["rows"] = int(drop.sum())
    return table.filter(pa.array(~drop)), counts


def fine_to_coarse_map(data: LabelledData) -> tuple[list[int] | None, list[str]]:
    """Coarse index of each fine class, when every class has a coarse category."""
    coarse_names = sorted(set(data.coarse_classes.values()))
    if len(data.coarse_classes) != len(data.classes):
        return None, coarse_names
    return [coarse_names.index(data.coarse_classes[c]) for c in data.classes], coarse_names


def decoded_dataset(cfg: TrainConfig, table: pa.Table, size: int, base_uri: str):
    """Ray Data: fetch + decode once with the scoring engine (the nightly job's URI policy and
    fetch limits), drop rows that fail (counted), cache in the object store."""
    from pipeline.inference import engine

    images = engine.ImageSettings.from_config(cfg, size, base_uri)
    ds = engine.decoded(engine.table_dataset(table), images, engine.Placement.from_config(cfg, "cpu"))
    ds.context.execution_options.preserve_order = True  # same row order every run: resumable
    ds = ds.materialize()
    failed = ds.filter(expr="status != 'ok'")
    bad = failed.count()
    if bad * 2 > table.num_rows:
        sample = failed.select_columns(["error_type", "error_message"]).take(FAILURE_SAMPLE_ROWS)
        failure = mass_failure([r["error_type"] for r in sample],
                               [r["error_message"] for r in sample], table.num_rows, "images",
                               failed_rows=bad)
        raise TrainingError(f"most training images could not be read: {failure}")
    ok = ds.filter(expr="status == 'ok'").select_columns(["image", "label", "coarse_label"])
    return ok.materialize(), bad
