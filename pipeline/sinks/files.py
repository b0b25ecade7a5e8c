"""The Parquet files of one run folder: how they are named, written and listed.

- `part-<chunk>-<digest>-<rows>.parquet`: scored rows, written straight into the run folder by
  the write tasks (nothing is moved at commit, which on object stores is a copy and a delete).
  The name says which resumable chunk the rows belong to and how many there are, so the
  folder's listing is the run's progress log: a chunk is done when its files hold all its rows.
  The digest is of the rows' product ids, so a retried write task replaces its file.
- `carried-<n>-<rows>.parquet`: rows an incremental night carried forward.

Each file's statistics (`pipeline.sinks.stats.table_stats`) ride in its Parquet footer, so the
run's counts come from the writes, never from reading the rows back. Where run folders sit in
an output, and how a run is committed, is `pipeline.sinks.parquet`'s business.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from pipeline import storage
from pipeline.errors import OutputError
from pipeline.sinks import stats as row_stats
from pipeline.sinks.rows import CHUNK_COLUMN, OUTPUT_SCHEMA, REPORT_KEY

STATS_KEY = b"catalog_recategorizer.stats"
CHUNK_FILE = re.compile(r"^part-(\d{6})-([0-9a-f]{16})-(\d+)\.parquet$")
CARRIED_FILE = re.compile(r"^carried-(\d{5})-(\d+)\.parquet$")
# Footers of files an earlier attempt wrote are read in parallel (object-store latency).
FOOTER_THREADS = 16


def chunk_file_name(chunk: int, product_ids: pa.Array) -> str:
    digest = hashlib.sha256("\n".join(product_ids.to_pylist()).encode()).hexdigest()[:16]
    return f"part-{chunk:06d}-{digest}-{len(product_ids)}.parquet"


def carried_file_name(index: int, rows: int) -> str:
    return f"carried-{index:05d}-{rows}.parquet"


def write_table(uri: str, table: pa.Table) -> dict[str, Any]:
    """Write one output file with its statistics in the footer; returns the statistics.

    Locally the file is written under a temporary name and renamed, so a killed writer never
    leaves a file that the progress listing would count; an object-store PUT is atomic."""
    stats = row_stats.table_stats(table)
    table = table.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
    fs, path = storage.arrow_filesystem(uri)
    target = path
    if storage.is_local(uri):
        storage.makedirs(storage.parent(uri))
        path = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, path, filesystem=fs)
    if path != target:
        fs.move(path, target)
    return stats


def file_stats(uri: str) -> dict[str, Any]:
    """The statistics a file's writer left in its footer (metadata only, no rows read)."""
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        meta = pq.read_schema(f).metadata or {}
    if STATS_KEY not in meta:
        raise OutputError(f"{uri} has no row statistics in its footer; it was not written by "
                          "this job: remove it or write to another --output")
    return json.loads(meta[STATS_KEY])


class ChunkSink(Datasink):
    """A Ray Data datasink: each write task splits its rows by chunk and writes one file per
    chunk into the run folder; its statistics come back to the driver with the write."""

    def __init__(self, folder: str, rows_per_write: int):
        self.folder = folder
        self.rows_per_write = rows_per_write
        self.written: list[dict[str, Any]] = []

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        self.written = []

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> list[dict[str, Any]]:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return []
        reports = [json.loads(b.schema.metadata[REPORT_KEY]) for b in tables
                   if b.schema.metadata and REPORT_KEY in b.schema.metadata]
        table = pa.concat_tables(tables, promote_options="none").replace_schema_metadata(None)
        out = []
        for chunk in pc.unique(table.column(CHUNK_COLUMN)).to_pylist():
            rows = table.filter(pc.equal(table.column(CHUNK_COLUMN), chunk)).drop_columns(
                [CHUNK_COLUMN])
            rows = rows.sort_by("product_id")
            name = chunk_file_name(chunk, rows.column("product_id").combine_chunks())
            stats = write_table(storage.join(self.folder, name), rows.cast(OUTPUT_SCHEMA))
            out.append({"file": name, "chunk": chunk, "rows": rows.num_rows, "stats": stats})
        if out and reports:
            out[0]["scorer_reports"] = reports
        return out

    def on_write_complete(self, write_result: Any) -> None:
        self.written = [w for task in write_result.write_returns for w in task]

    def get_name(self) -> str:
        return "RunFolder"

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write


@dataclass
class Listing:
    """A run folder's Parquet files, from one listing: scored files by chunk
    ({chunk: [(name, rows), ...]}) and carried files ([(name, rows), ...])."""

    chunks: dict[int, list[tuple[str, int]]]
    carried: list[tuple[str, int]]

    @property
    def names(self) -> list[str]:
        scored = sorted(n for files in self.chunks.values() for n, _ in files)
        return scored + [n for n, _ in self.carried]


def list_run(folder: str) -> Listing:
    listing = Listing({}, [])
    for uri in storage.list_files(folder, suffix=".parquet"):
        name = uri.rsplit("/", 1)[-1]
        if match := CHUNK_FILE.match(name):
            listing.chunks.setdefault(int(match.group(1)), []).append((name, int(match.group(3))))
        elif match := CARRIED_FILE.match(name):
            listing.carried.append((name, int(match.group(2))))
    listing.carried.sort()
    return listing


def finished_chunks(folder: str, sizes: list[int]) -> set[int]:
    """Chunks whose files hold all their rows. The files of a chunk a killed run left half
    written are removed, so it is scored again from scratch."""
    done = set()
    for chunk, files in list_run(folder).chunks.items():
        rows = sum(r for _, r in files)
        if chunk < len(sizes) and rows == sizes[chunk]:
            done.add(chunk)
        else:
            for name, _ in files:
                storage.remove(storage.join(folder, name))
    return done


def run_stats(folder: str, listing: Listing, written: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of every listed file: from this attempt's writes, and from the footers of
    files an earlier attempt (or the night's plan) wrote."""
    known = {w["file"]: w["stats"] for w in written}
    names = listing.names
    missing = [n for n in names if n not in known]
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        found = pool.map(lambda n: file_stats(storage.join(folder, n)), missing)
        known.update(zip(missing, found, strict=True))
    total = row_stats.empty_stats()
    for name in names:
        total = row_stats.merge_stats(total, known[name])
    return total




def check_complete(run_id: str, listing: Listing, sizes: list[int], carried_rows: int,
                   expected_rows: int) -> int:
    """Check from the listing that every chunk holds exactly its rows and the run holds one
    row per manifest row; returns the run's rows. OutputError otherwise: not committed."""
    for chunk, size in enumerate(sizes):
        rows = sum(r for _, r in listing.chunks.get(chunk, []))
        if rows != size:
            raise OutputError(f"run {run_id}: chunk {chunk} holds {rows} rows for {size} "
                              "manifest rows; not committing")
    carried = sum(r for _, r in listing.carried)
    rows = sum(sizes) + carried
    if carried != carried_rows or rows != expected_rows:
        raise OutputError(f"run {run_id} holds {rows} rows for a manifest of {expected_rows}; "
                          "not committing")
    return rows


def write_carried(batches: Iterable[pa.RecordBatch], folder: str, rows_per_file: int) -> int:
    """Carried rows into `carried-*.parquet` files of the run folder, replacing any a killed
    attempt left; returns the row count."""
    for name, _ in list_run(folder).carried:
        storage.remove(storage.join(folder, name))
    rows = index = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal index, pending, pending_rows
        table = pa.Table.from_batches(pending).cast(OUTPUT_SCHEMA)
        write_table(storage.join(folder, carried_file_name(index, len(table))), table)
        index, pending, pending_rows = index + 1, [], 0

    for batch in batches:
        pending.append(batch)
        pending_rows += batch.num_rows
        rows += batch.num_rows
        if pending_rows >= rows_per_file:
            flush()
    if pending:
        flush()
    return rows
