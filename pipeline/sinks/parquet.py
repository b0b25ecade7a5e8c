"""The Parquet run folder: the night's rows, written once, published by one atomic marker.

Layout of an output folder:
- `runs/<run_id>/part-<chunk>-<digest>-<rows>.parquet`: scored rows, written straight here by
  the write tasks (nothing is moved at commit, which on object stores is a copy and a delete).
  The name says which resumable chunk the rows belong to and how many there are, so the
  folder's listing is the run's progress log: a chunk is done when its files hold all its rows.
  The digest is of the rows' product ids, so a retried write task replaces its file.
- `runs/<run_id>/carried-<n>-<rows>.parquet`: rows an incremental night carried forward.
- `_SUCCESS`: the commit point (run id, files, counts), replaced in one atomic write; locally
  the `predictions` link then flips to the run's folder. Readers follow either and so see one
  complete night or the next. The previous night's folder stays until the night after.
- `_staging/<key>/`: the run id and the incremental plan of a run in progress.

Each file's statistics (`pipeline.sinks.stats.table_stats`) ride in its Parquet footer, so the run's
counts come from the writes, never from reading the rows back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from pipeline import storage
from pipeline.errors import OutputError
from pipeline.images.security import safe_name
from pipeline.sinks import stats as row_stats
from pipeline.sinks.rows import CHUNK_COLUMN, OUTPUT_SCHEMA

PREDICTIONS_DIR = "predictions"  # local outputs: a link to the committed run's folder
RUNS_DIR = "runs"
STAGING_DIR = "_staging"
SUCCESS_FILE = "_SUCCESS"
SUMMARY_FILE = "summary.json"
STATS_KEY = b"catalog_recategorizer.stats"
CHUNK_FILE = re.compile(r"^part-(\d{6})-([0-9a-f]{16})-(\d+)\.parquet$")
CARRIED_FILE = re.compile(r"^carried-(\d{5})-(\d+)\.parquet$")
# Footers of files an earlier attempt wrote are read in parallel (object-store latency).
FOOTER_THREADS = 16


def run_uri(output: str, run_id: str) -> str:
    return storage.join(output, RUNS_DIR, safe_name(run_id, "run id"))


def staging_uri(output: str, key: str) -> str:
    """Where a run in progress keeps its id and plan: keyed by the run's arguments, not its id,
    so a restarted run with the same arguments finds them."""
    return storage.join(output, STAGING_DIR, safe_name(key, "staging key"))


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
        table = pa.concat_tables(tables)
        out = []
        for chunk in pc.unique(table.column(CHUNK_COLUMN)).to_pylist():
            rows = table.filter(pc.equal(table.column(CHUNK_COLUMN), chunk)).drop_columns(
                [CHUNK_COLUMN])
            rows = rows.sort_by("product_id")
            name = chunk_file_name(chunk, rows.column("product_id").combine_chunks())
            stats = write_table(storage.join(self.folder, name), rows.cast(OUTPUT_SCHEMA))
            out.append({"file": name, "chunk": chunk, "rows": rows.num_rows, "stats": stats})
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


def commit(output: str, run_id: str, listing: Listing, sizes: list[int], carried_rows: int,
           expected_rows: int, info: dict[str, Any]) -> dict[str, Any]:
    """The marker of a finished run, after checking from the listing that every chunk holds
    exactly its rows and the run holds one row per manifest row."""
    for chunk, size in enumerate(sizes):
        rows = sum(r for _, r in listing.chunks.get(chunk, []))
        if rows != size:
            raise OutputError(f"run {run_id}: chunk {chunk} holds {rows} rows for {size} "
                              "manifest rows; not committing")
    carried = sum(r for _, r in listing.carried)
    scored_rows = sum(sizes)
    rows = scored_rows + carried
    if carried != carried_rows or rows != expected_rows:
        raise OutputError(f"run {run_id} holds {rows} rows for a manifest of {expected_rows}; "
                          "not committing")
    return {**info, "run_id": run_id, "rows": rows, "rows_rescored": scored_rows,
            "rows_carried": carried_rows,
            "files": [f"{RUNS_DIR}/{run_id}/{n}" for n in listing.names]}


def previous_run(output: str) -> dict[str, Any] | None:
    marker = storage.join(output, SUCCESS_FILE)
    return storage.read_json(marker) if storage.exists(marker) else None


def publish(output: str, marker: dict[str, Any], staging_key: str,
            fence: Callable[[], None] | None = None) -> None:
    """The commit point: write `_SUCCESS` (atomic), then point the local link, then tidy up:
    runs other than this night's and the previous one, and this run's staging (and `_staging/`
    itself when no other run's staging is left in it). `fence` (the lease's renewal) runs
    immediately before each visible write and raises when this run no longer holds the
    output, so a run that stalled past its lease never overwrites the run that took it."""
    fence = fence or (lambda: None)
    marker = {**marker, "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    try:
        previous = previous_run(output)
    except (ValueError, OSError):  # an unreadable marker being replaced under --overwrite
        previous = None
    fence()
    storage.write_json(storage.join(output, SUCCESS_FILE), marker)
    if storage.is_local(output):
        fence()
        storage.point_link(storage.join(output, PREDICTIONS_DIR), f"{RUNS_DIR}/{marker['run_id']}")
    keep = {marker["run_id"], (previous or {}).get("run_id")}
    for old in storage.list_dirs(storage.join(output, RUNS_DIR)):
        if old not in keep:
            storage.remove(storage.join(output, RUNS_DIR, old))
    storage.remove(staging_uri(output, staging_key))
    storage.remove_if_empty(storage.join(output, STAGING_DIR))  # kept while another run stages


def committed_uris(output: str, marker: dict[str, Any]) -> list[str]:
    """URIs of the Parquet files a `_SUCCESS` marker lists."""
    return [storage.join(output, *f.split("/")) for f in marker["files"]]


def committed_files(output: str) -> list[str]:
    """URIs of the Parquet files of the completed run in `output` (what readers should read)."""
    marker = previous_run(output)
    if not marker:
        raise OutputError(f"output {output!r} holds no completed run (no {SUCCESS_FILE})")
    return committed_uris(output, marker)


def check_output(output: str, overwrite: bool) -> dict[str, Any] | None:
    """The output's committed run, if any, checked readable before any work."""
    storage.check_writable(output)
    try:
        return previous_run(output)
    except (ValueError, OSError) as exc:
        if overwrite:
            return None
        raise OutputError(f"output {output!r} has an unreadable {SUCCESS_FILE}: {exc}; "
                          "remove it or pass --overwrite") from exc
