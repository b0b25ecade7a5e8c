"""Catalog manifests: schemas, validation before any work, and where relative URIs resolve.

Validation reads only the metadata and streams the `product_id` column, so it is cheap next to
the job itself, and a bad manifest stops the job before Ray starts any task or anything is written.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import storage
from pipeline.errors import ManifestError

REQUIRED = {"product_id": pa.string(), "image_uri": pa.string()}
OPTIONAL = {"current_category": pa.string()}
TRAINING_REQUIRED = {**REQUIRED, "category": pa.string()}
TRAINING_OPTIONAL = {"coarse_category": pa.string(), "split": pa.string()}
# Rows held out of training to fit the temperature and decision thresholds (pipeline.training.train).
CALIBRATION_SPLIT = "calibration"
SPLITS = ("train", "val", "test", CALIBRATION_SPLIT)


@dataclass(frozen=True)
class Manifest:
    uri: str
    base_uri: str  # folder that relative image_uri values resolve against
    num_rows: int
    columns: tuple[str, ...]

    def has(self, column: str) -> bool:
        return column in self.columns


VERSION_COLUMN = "image_version"


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int,
                     block: bool = False) -> np.ndarray:
    """Boolean mask of held-out rows: `val_fraction` of each class (at least one where a class
    has two or more rows), chosen with a seeded permutation, or with `block` the class's last
    rows in manifest order. Photo sets number consecutive shots of one product together: a
    block is new photos, where a random share would be near-copies of training photos (and
    would calibrate an over-confident model)."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            continue
        k = max(1, round(len(idx) * val_fraction))
        is_val[idx[-k:] if block else rng.permutation(idx)[:k]] = True
    return is_val


def _is_version_type(t: pa.DataType) -> bool:
    """A scalar the night's plan can compare as text: not a list, struct or map."""
    return (_is_stringish(t) or pa.types.is_integer(t) or pa.types.is_temporal(t)
            or pa.types.is_decimal(t))


def _is_stringish(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def manifest_files(uri: str) -> list[str]:
    """The data files a manifest URI names, in a stable order: the file itself, or every file
    under the folder, recursively and whatever its suffix (Hive and Trino write data files
    without one), except those under a name starting with '.' or '_' (hidden files, _SUCCESS,
    _staging and other writers' metadata). Validation, chunk planning and the night's plan all
    read this one set."""
    fs, path = storage.filesystem(uri)
    if not fs.isdir(path):
        return [path]
    root = path.rstrip("/")
    return sorted(f for f in fs.find(path) if not _hidden(f[len(root):]))


def open_dataset(uri: str) -> ds.Dataset:
    fs, _ = storage.arrow_filesystem(uri)
    try:
        files = manifest_files(uri)
        if not files:
            raise ManifestError(f"manifest {uri!r} is a folder without data files (names "
                                "starting with '.' or '_' are skipped)")
        return ds.dataset(files, filesystem=fs, format="parquet")
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {uri!r} not found") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {uri!r} is not readable Parquet: {exc}") from exc


def _sample(values: list, limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return shown + (f" ... ({len(values)} in all)" if len(values) > limit else "")


def validate_manifest(uri: str, training: bool = False) -> Manifest:
    """Check columns, types, emptiness and product_id uniqueness; raise ManifestError naming
    the file, the column and the offending values."""
    uri = storage.normalize(uri)
    dataset = open_dataset(uri)
    required = TRAINING_REQUIRED if training else REQUIRED
    optional = {**OPTIONAL, **(TRAINING_OPTIONAL if training else {})}
    schema = dataset.schema
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ManifestError(
            f"manifest {uri!r} lacks required column(s) {', '.join(missing)} "
            f"(has: {', '.join(schema.names)})"
        )
    for name in [*required, *(c for c in optional if c in schema.names)]:
        t = schema.field(name).type
        if not _is_stringish(t):
            raise ManifestError(f"manifest {uri!r}: column {name!r} must be string, found {t}")
    if VERSION_COLUMN in schema.names and not _is_version_type(schema.field(VERSION_COLUMN).type):
        raise ManifestError(
            f"manifest {uri!r}: column {VERSION_COLUMN!r} must be a string, integer, date or "
            f"timestamp (an updated-at time or a content hash), found "
            f"{schema.field(VERSION_COLUMN).type}; cast it when writing the manifest")
    try:
        num_rows, nulls, dupes = scan_product_ids(dataset)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {uri!r} is not readable Parquet: {exc}") from exc
    if num_rows == 0:
        raise ManifestError(f"manifest {uri!r} is empty (0 rows)")
    if nulls:
        raise ManifestError(f"manifest {uri!r}: column 'product_id' has {nulls} null value(s)")
    if dupes:
        raise ManifestError(
            f"manifest {uri!r}: column 'product_id' has duplicate values: {_sample(dupes)}")
    if training:
        _validate_training_columns(uri, dataset)
    fs, path = storage.filesystem(uri)
    base = uri if fs.isdir(path) else storage.parent(uri)
    return Manifest(uri=uri, base_uri=base, num_rows=num_rows, columns=tuple(schema.names))


def _id_hashes(ids: pa.Array) -> np.ndarray:
    return pd.util.hash_array(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object))


def scan_product_ids(dataset: ds.Dataset) -> tuple[int, int, list[str]]:
    """Rows, nulls and duplicate values of `product_id`, streaming the column in batches.

    The driver holds 8 bytes per row (a hash), not the ids: a 100M-row manifest costs 800 MB
    instead of several GB. Ids whose hashes collide are checked exactly in a second pass.
    """
    rows = nulls = 0
    hashes = []
    for batch in dataset.to_batches(columns=["product_id"], batch_size=1 << 20):
        ids = batch.column(0)
        rows += len(ids)
        nulls += ids.null_count
        hashes.append(_id_hashes(ids))
    if rows == 0:
        return 0, 0, []
    ordered = np.sort(np.concatenate(hashes))
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if repeated.size == 0:
        return rows, nulls, []
    counts: collections.Counter = collections.Counter()
    for batch in dataset.to_batches(columns=["product_id"], batch_size=1 << 20):
        ids = batch.column(0)
        candidates = ids.filter(pa.array(np.isin(_id_hashes(ids), repeated)))
        counts.update(v for v in candidates.to_pylist() if v is not None)
    return rows, nulls, sorted(v for v, c in counts.items() if c > 1)


def _validate_training_columns(uri: str, dataset: ds.Dataset) -> None:
    cols = [c for c in ("category", "split") if c in dataset.schema.names]
    table = dataset.to_table(columns=cols)
    if table.column("category").null_count:
        raise ManifestError(
            f"manifest {uri!r}: column 'category' has {table.column('category').null_count} null "
            "value(s); every training row needs a label"
        )
    if "split" in cols:
        found = set(pc.unique(table.column("split")).to_pylist())
        bad = sorted(str(v) for v in found - set(SPLITS))
        if bad:
            raise ManifestError(
                f"manifest {uri!r}: column 'split' has invalid value(s) {_sample(bad)} "
                f"(valid: {', '.join(SPLITS)})"
            )
