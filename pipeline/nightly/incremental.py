"""Planning a night: which products to score and which to carry forward from the last night.

A night can carry a product's row forward from the output's committed run when that run was
made with the same model version and the same row-affecting options, the product is still in
the manifest at the same image URI, its last row is not an error, and its image is unchanged:
the manifest's `image_version` column when it has one, else the store's change signal (ETag,
or size and modification time; `fetch.image_signal`) probed now against the one recorded when
the row was scored. Everything else is scored. Removed products are simply not carried.

The join runs in DuckDB over Arrow datasets (local or object store) with a memory limit, so it
spills to disk instead of growing with the catalog; the driver never holds the manifest.
Carried rows are written straight into the run folder; the rows to score into the run's
staging, where the scoring pass reads them in chunks.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.catalog import Manifest, open_dataset
from pipeline.sinks import parquet as run_folder
from pipeline.sinks.rows import KNOWN_ERROR_COLUMN, OUTPUT_SCHEMA

PLAN_FILE = "plan.json"
RESCORE_FILE = "rescore.parquet"
PROBED_DIR = "probed"
# DuckDB's working memory for the join; beyond it, it spills to a temporary folder.
PLAN_MEMORY_LIMIT = "2GB"
PLAN_BATCH_ROWS = 65_536
# Options that change a row's values: a committed row made under other values is not reused.
ROW_OPTIONS = ("top_k", "review_threshold", "change_precision", "max_image_bytes", "max_image_pixels",
               "allowed_uri_schemes", "allowed_uri_prefixes", "allowed_networks", "tta",
               "precision")


@dataclass
class NightPlan:
    mode: str  # "full" or "incremental"
    reason: str
    source: str  # what the scoring pass reads: the manifest, or the rows to re-score
    rows_rescored: int
    rows_carried: int
    new_products: int | None
    removed_products: int | None
    previous_run_id: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def options_key(cfg: Any) -> str:
    """A digest of the row-affecting options (recorded in `_SUCCESS`, compared next night)."""
    values = {name: getattr(cfg, name) for name in ROW_OPTIONS}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dataset(uris: str | list[str]) -> pads.Dataset:
    """Parquet of a file-or-folder URI, or of a list of file URIs, as one Arrow dataset."""
    if isinstance(uris, str):
        fs, path = storage.arrow_filesystem(uris)
        return pads.dataset(path, filesystem=fs, format="parquet")
    fs, _ = storage.arrow_filesystem(uris[0])
    return pads.dataset([storage.filesystem(u)[1] for u in uris], filesystem=fs, format="parquet")


def _connect():
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{PLAN_MEMORY_LIMIT}'")
    con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/catalog-recategorizer-duckdb'")
    con.execute("SET preserve_insertion_order = false")  # lets the join stream and spill
    return con


def count_changes(con) -> tuple[int, int]:
    """(new products, removed products) between the registered manifest `m` and last night `p`."""
    new = con.execute("SELECT count(*) FROM m ANTI JOIN p USING (product_id)").fetchall()[0][0]
    removed = con.execute("SELECT count(*) FROM p ANTI JOIN m USING (product_id)").fetchall()[0][0]
    return int(new), int(removed)


def write_rows(reader, uri: str) -> int:
    """Record batches into one Parquet file (the rows to score); returns the row count."""
    fs, path = storage.arrow_filesystem(uri)
    if storage.is_local(uri):
        storage.makedirs(storage.parent(uri))
    rows = 0
    with pq.ParquetWriter(path, reader.schema, filesystem=fs) as writer:
        for batch in reader:
            writer.write_batch(batch, row_group_size=PLAN_BATCH_ROWS)
            rows += batch.num_rows
    return rows


def write_carried(reader, folder: str, rows_per_file: int) -> int:
    """Carried rows into `carried-*.parquet` files of the run folder; returns the row count."""
    rows = index = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal index, pending, pending_rows
        table = pa.Table.from_batches(pending).cast(OUTPUT_SCHEMA)
        run_folder.write_table(storage.join(folder, run_folder.carried_file_name(index, len(table))),
                               table)
        index, pending, pending_rows = index + 1, [], 0

    for batch in reader:
        pending.append(batch)
        pending_rows += batch.num_rows
        rows += batch.num_rows
        if pending_rows >= rows_per_file:
            flush()
    if pending:
        flush()
    return rows


def _carry_condition(version: str, current: str) -> str:
    """SQL: last night's row `p` may stand for manifest row `m` (image version `version`,
    current category `current`). A product whose current category changed (a change applied,
    a review decided) is scored again: its decision depends on that category."""
    # Parenthesized: it is negated for the rows to score ("NOT a AND b" would bind as "(NOT a) AND b").
    return (f"(coalesce(p.status = 'ok' AND p.image_uri = m.image_uri AND "
            f"p.image_version = {version}, false) AND "
            f"p.current_category IS NOT DISTINCT FROM {current})")


def _carried_select(manifest: Manifest, run_id: str) -> str:
    """Last night's columns in output order, with this night's catalog category and run id."""
    current = "m.current_category" if manifest.has("current_category") else "NULL::VARCHAR"
    replaced = {
        "product_id": "p.product_id",
        "current_category": f"{current} AS current_category",
        "category_changed": f"(p.predicted_category <> {current}) AS category_changed",
        "run_id": f"'{run_id}' AS run_id",
    }
    return ", ".join(replaced.get(n, f"p.{n}") for n in OUTPUT_SCHEMA.names)


def plan_night(manifest: Manifest, previous: dict[str, Any] | None, output: str, *,
               model_version: str, opts_key: str, full: bool, run_id: str, staging: str,
               rows_per_file: int, probe) -> NightPlan:
    """Decide what this night scores; write the carried rows into the run folder and the rows
    to score into `staging`. `probe(candidates_uri, out_folder)` writes the store's change
    signal of each candidate's image (used when the manifest has no image_version)."""
    everything = NightPlan("full", "", manifest.uri, manifest.num_rows, 0, None, None, None)
    if previous is None:
        everything.reason = "no committed run in the output"
        return everything
    everything.previous_run_id = previous.get("run_id")
    con = _connect()
    con.register("m", open_dataset(manifest.uri))  # the file set validation read
    con.register("p", _dataset(run_folder.committed_uris(output, previous)))
    everything.new_products, everything.removed_products = count_changes(con)
    if full:
        everything.reason = "--full"
    elif previous.get("model_version") != model_version:
        everything.reason = (f"the model changed ({previous.get('model_version')} -> "
                             f"{model_version})")
    elif previous.get("options_key") != opts_key:
        everything.reason = "row-affecting options changed since the committed run"
    if everything.reason:
        return everything

    join = "m LEFT JOIN p USING (product_id)"
    if manifest.has("image_version"):
        version = "CAST(m.image_version AS VARCHAR)"
    else:  # ask the store whether each image that could be carried changed since
        candidates = storage.join(staging, "probe.parquet")
        write_rows(con.sql(
            "SELECT m.product_id, m.image_uri FROM m JOIN p USING (product_id) WHERE "
            "p.status = 'ok' AND p.image_uri = m.image_uri AND p.image_version IS NOT NULL"
        ).fetch_arrow_reader(PLAN_BATCH_ROWS), candidates)
        probed = storage.join(staging, PROBED_DIR)
        storage.remove(probed)
        probe(candidates, probed)
        files = storage.list_files(probed, suffix=".parquet")
        if files:
            con.register("v", _dataset(files))
            join += " LEFT JOIN v USING (product_id)"
            version = "v.image_version"
        else:
            version = "NULL::VARCHAR"
    carry = _carry_condition(version, "m.current_category" if manifest.has("current_category")
                             else "NULL::VARCHAR")

    folder = run_folder.run_uri(output, run_id)
    for name, _ in run_folder.list_run(folder).carried:  # what a killed plan left
        storage.remove(storage.join(folder, name))
    carried = write_carried(con.sql(
        f"SELECT {_carried_select(manifest, run_id)} FROM {join} WHERE {carry}"
    ).fetch_arrow_reader(PLAN_BATCH_ROWS), folder, rows_per_file)
    keep = ["m.product_id", "m.image_uri"] + [f"m.{c}" for c in ("current_category",)
                                               if manifest.has(c)]
    if manifest.has("image_version"):
        keep.append("CAST(m.image_version AS VARCHAR) AS image_version")
    keep.append(f"coalesce(p.status <> 'ok' AND p.image_uri = m.image_uri, false) "
                f"AS {KNOWN_ERROR_COLUMN}")
    source = storage.join(staging, RESCORE_FILE)
    rescored = write_rows(con.sql(
        f"SELECT {', '.join(keep)} FROM {join} WHERE NOT {carry}"
    ).fetch_arrow_reader(PLAN_BATCH_ROWS), source)
    return NightPlan("incremental", f"same model and options as run {previous.get('run_id')}",
                     source, rescored, carried, everything.new_products,
                     everything.removed_products, previous.get("run_id"))


def load_or_plan(staging: str, make) -> NightPlan:
    """The plan a killed attempt of this run already made, else a new one (recorded last, so a
    plan cut short is made again)."""
    uri = storage.join(staging, PLAN_FILE)
    if storage.exists(uri):
        return NightPlan(**storage.read_json(uri))
    plan = make()
    storage.write_json(uri, plan.to_json())
    return plan
