"""Planning a night: which products to score and which to carry forward from the last night.

A night can carry a product's row forward from the output's committed run when that run was
made with the same model version and the same row-affecting options, the product is still in
the manifest at the same image URI, its last row is not an error, and its image is unchanged:
the manifest's `image_version` column when it has one, else the store's change signal (ETag,
or size and modification time; `fetch.image_signal`) probed now against the one recorded when
the row was scored. Everything else is scored. Removed products are simply not carried.

A product a person decided for its current image (a decision in force in the reviews table,
`pipeline.sinks.reviews`) is never carried, nor is one whose last row was `reviewed`: its row
depends on the decisions, which change without the model, the options or the image changing
(a new decision, an undo).

The join runs in DuckDB over Arrow datasets (local or object store) with a memory limit, so it
spills to disk instead of growing with the catalog; the driver never holds the manifest.
Carried rows are written straight into the run folder (`RunFolderSink.write_carried`); the rows
to score into the plan folder the sink hands out, where the scoring pass reads them in chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.catalog import Manifest, open_dataset
from pipeline.models.decide import REVIEWED
from pipeline.nightly import tables
from pipeline.sinks.parquet import RunFolderSink
from pipeline.sinks.rows import KNOWN_ERROR_COLUMN, OUTPUT_SCHEMA

# The planner's files, in the plan folder the run folder sink hands it.
PLAN_FILE = "plan.json"
RESCORE_FILE = "rescore.parquet"
PROBE_FILE = "probe.parquet"
PROBED_DIR = "probed"
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


def _carry_condition(version: str, current: str, decided: str = "false") -> str:
    """SQL: last night's row `p` may stand for manifest row `m` (image version `version`,
    current category `current`; `decided`: a person's decision is in force for the product).
    A product whose current category changed (a change applied, a review decided) is scored
    again: its decision depends on that category. So is a decided product, and one whose last
    row applied a decision (it may have been undone since)."""
    # Parenthesized: it is negated for the rows to score ("NOT a AND b" would bind as "(NOT a) AND b").
    return (f"(coalesce(p.status = 'ok' AND p.image_uri = m.image_uri AND "
            f"p.image_version = {version}, false) AND "
            f"p.current_category IS NOT DISTINCT FROM {current} AND "
            f"p.action_reason IS DISTINCT FROM '{REVIEWED}' AND NOT {decided})")


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


def plan_night(manifest: Manifest, previous: dict[str, Any] | None, sink: RunFolderSink, *,
               model_version: str, opts_key: str, full: bool, run_id: str, rows_per_file: int,
               probe: Callable[[str, str], None], reviewed: str | None = None) -> NightPlan:
    """Decide what this night scores; write the carried rows into the run folder (through
    `sink`) and the rows to score into the sink's plan folder. `probe(candidates_uri,
    out_folder)` writes the store's change signal of each candidate's image (used when the
    manifest has no image_version). `reviewed`: the night's snapshot of the decisions in force
    (`sinks.reviews.write_in_force`); the products they name at tonight's image are scored,
    never carried."""
    everything = NightPlan("full", "", manifest.uri, manifest.num_rows, 0, None, None, None)
    if previous is None:
        everything.reason = "no committed run in the output"
        return everything
    everything.previous_run_id = previous.get("run_id")
    con = tables.connect()
    con.register("m", open_dataset(manifest.uri))  # the file set validation read
    con.register("p", tables.dataset(sink.run_files(previous)))
    everything.new_products, everything.removed_products = count_changes(con)
    everything.reason = full_reason(previous, full, model_version, opts_key)
    if everything.reason:
        return everything
    folder = sink.plan_folder()
    join, version = image_versions(con, manifest, folder, probe)
    carry = _carry_condition(version, "m.current_category" if manifest.has("current_category")
                             else "NULL::VARCHAR", decided(con, version, reviewed))
    carried = sink.write_carried(run_id, con.sql(
        f"SELECT {_carried_select(manifest, run_id)} FROM {join} WHERE {carry}"
    ).fetch_arrow_reader(PLAN_BATCH_ROWS), rows_per_file)
    source = storage.join(folder, RESCORE_FILE)
    rescored = write_rows(con.sql(
        f"SELECT {', '.join(_rescore_columns(manifest))} FROM {join} WHERE NOT {carry}"
    ).fetch_arrow_reader(PLAN_BATCH_ROWS), source)
    return NightPlan("incremental", f"same model and options as run {previous.get('run_id')}",
                     source, rescored, carried, everything.new_products,
                     everything.removed_products, previous.get("run_id"))


def full_reason(previous: dict[str, Any], full: bool, model_version: str, opts_key: str) -> str:
    """Why the night scores everything although a committed run exists; "" when it need not."""
    if full:
        return "--full"
    if previous.get("model_version") != model_version:
        return f"the model changed ({previous.get('model_version')} -> {model_version})"
    if previous.get("options_key") != opts_key:
        return "row-affecting options changed since the committed run"
    return ""


def image_versions(con: Any, manifest: Manifest, folder: str,
                   probe: Callable[[str, str], None]) -> tuple[str, str]:
    """(the join of manifest `m` with last night `p`, SQL of each product's image version
    tonight): the manifest's own column, else the store's change signal probed now into
    `folder` for the images that could be carried."""
    join = "m LEFT JOIN p USING (product_id)"
    if manifest.has("image_version"):
        return join, "CAST(m.image_version AS VARCHAR)"
    candidates = storage.join(folder, PROBE_FILE)
    write_rows(con.sql(
        "SELECT m.product_id, m.image_uri FROM m JOIN p USING (product_id) WHERE "
        "p.status = 'ok' AND p.image_uri = m.image_uri AND p.image_version IS NOT NULL"
    ).fetch_arrow_reader(PLAN_BATCH_ROWS), candidates)
    probed = storage.join(folder, PROBED_DIR)
    storage.remove(probed)
    probe(candidates, probed)
    files = storage.list_files(probed, suffix=".parquet")
    if not files:
        return join, "NULL::VARCHAR"
    con.register("v", tables.dataset(files))
    return join + " LEFT JOIN v USING (product_id)", "v.image_version"


def decided(con: Any, version: str, reviewed: str | None) -> str:
    """SQL: a decision is in force for the product's image tonight (`version`). A decision
    for an image the product no longer has does not stop it being carried."""
    if reviewed is None:
        return "false"
    con.register("r", tables.dataset(reviewed))
    return ("EXISTS (SELECT 1 FROM r WHERE r.product_id = m.product_id AND "
            f"r.image_version IS NOT DISTINCT FROM {version})")


def _rescore_columns(manifest: Manifest) -> list[str]:
    """SQL columns of the rows to score: the manifest's, and whether the committed row was an
    error at the same image."""
    keep = ["m.product_id", "m.image_uri"] + [f"m.{c}" for c in ("current_category",)
                                               if manifest.has(c)]
    if manifest.has("image_version"):
        keep.append("CAST(m.image_version AS VARCHAR) AS image_version")
    keep.append(f"coalesce(p.status <> 'ok' AND p.image_uri = m.image_uri, false) "
                f"AS {KNOWN_ERROR_COLUMN}")
    return keep


def load_or_plan(folder: str, make: Callable[[], NightPlan]) -> NightPlan:
    """The plan a killed attempt of this run already made in `folder`, else a new one
    (recorded last, so a plan cut short is made again)."""
    uri = storage.join(folder, PLAN_FILE)
    if storage.exists(uri):
        return NightPlan(**storage.read_json(uri))
    plan = make()
    storage.write_json(uri, plan.to_json())
    return plan
