"""The Parquet run folder: the night's rows, written once, published by one atomic marker.

`RunFolderSink` is the only code that knows an output folder's layout:
- `runs/<run_id>/`: the run's Parquet files (`pipeline.sinks.files`: chunk files written by the
  scoring pass, carried files written by the plan), and its own copies of the run summary
  (`_summary.json`), the config (`_config.yaml`), the drift report (`_drift.html`) and, for a
  night over its error budget, an error sample (`_errors.json`). "_" keeps them out of Parquet
  readers that read the whole folder.
- `_SUCCESS`: the commit point (run id, files, counts), replaced in one atomic write; locally
  the `predictions` link then flips to the run's folder. Readers follow either and so see one
  complete night or the next. The previous night's folder stays until the night after.
- `_staging/<key>/`: a run in progress: its id (`run.json`) and its plan (the planner's files).
  The key is a digest of the run's arguments, so a restarted run with the same arguments finds
  them.
- `summary.json`, `config.yaml`, `drift.html`, `ray_data_stats.txt`: the committed night's
  summary, config, drift report and Ray Data statistics, next to `_SUCCESS`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.errors import ConfigError, OutputError
from pipeline.images.security import safe_name
from pipeline.sinks.base import NightRun
from pipeline.sinks.files import (
    ChunkSink,
    check_complete,
    finished_chunks,
    list_run,
    run_stats,
    write_carried,
)

PREDICTIONS_DIR = "predictions"  # local outputs: a link to the committed run's folder
RUNS_DIR = "runs"
STAGING_DIR = "_staging"
SUCCESS_FILE = "_SUCCESS"
SUMMARY_FILE = "summary.json"
RUN_ID_FILE = "run.json"
RUN_SUMMARY_FILE = "_summary.json"
ERROR_SAMPLE_FILE = "_errors.json"
CONFIG_FILE = "config.yaml"
DRIFT_FILE = "drift.html"
STATS_FILE = "ray_data_stats.txt"
# What `_SUCCESS` records of each sink committed before the run folder: where to find its commit.
EARLIER_COMMIT_KEYS = ("table", "snapshot_id")


def run_uri(output: str, run_id: str) -> str:
    return storage.join(output, RUNS_DIR, safe_name(run_id, "run id"))


def staging_uri(output: str, key: str) -> str:
    """Where a run in progress keeps its id and plan: keyed by the run's arguments, not its id,
    so a restarted run with the same arguments finds them."""
    return storage.join(output, STAGING_DIR, safe_name(key, "staging key"))


def committed_uris(output: str, marker: dict[str, Any]) -> list[str]:
    """URIs of the Parquet files a `_SUCCESS` marker lists."""
    return [storage.join(output, *f.split("/")) for f in marker["files"]]


def committed_files(output: str) -> list[str]:
    """URIs of the Parquet files of the completed run in `output` (what readers should read)."""
    return RunFolderSink(output).committed_files()


@dataclass(frozen=True)
class SealedRun:
    """A run folder checked complete: what `_SUCCESS` will say, the counts from the writes,
    and this night's scored files (not the carried ones)."""

    marker: dict[str, Any]
    stats: dict[str, Any]
    scored_files: tuple[str, ...]


@dataclass(frozen=True)
class NightDocuments:
    """What a night says about itself, kept in its run folder and, once committed, next to
    `_SUCCESS`: the summary, the config (yaml), the drift report (html), Ray Data's stats."""

    summary: dict[str, Any]
    config_yaml: str
    report_html: str
    ray_stats: str


class RunFolderSink:
    """The output folder of the nightly job, one run folder per night (see the module doc).

    One instance serves one night: `check`, `stage`, write (`datasink`, `write_carried`),
    `seal`, `attach`, then `commit`, or (`keep_refused` and) `abort`."""

    name = "parquet"

    def __init__(self, output: str, overwrite: bool = False):
        self.output = output
        self.overwrite = overwrite
        self.key: str | None = None
        self._sealed: SealedRun | None = None
        self._documents: NightDocuments | None = None

    # -- the sink interface --------------------------------------------------------------

    def check(self) -> dict[str, Any] | None:
        """The output's committed run (its `_SUCCESS`), if any, checked readable before any
        work; under --overwrite an unreadable one counts as none."""
        storage.check_writable(self.output)
        try:
            return self.committed_run()
        except (ValueError, OSError) as exc:
            if self.overwrite:
                return None
            raise OutputError(f"output {self.output!r} has an unreadable {SUCCESS_FILE}: {exc}; "
                              "remove it or pass --overwrite") from exc

    def commit(self, run: NightRun) -> dict[str, Any]:
        """Keep the night's documents in its run folder, publish it (`publish`, fenced by
        `run.fence`), then put the documents next to `_SUCCESS`. Returns the marker."""
        sealed, docs = self._sealed, self._documents
        if sealed is None or docs is None or sealed.marker["run_id"] != run.run_id:
            raise OutputError(f"run {run.run_id} was not sealed and documented before its commit")
        folder = run_uri(self.output, run.run_id)
        storage.write_json(storage.join(folder, RUN_SUMMARY_FILE), {**docs.summary, **run.earlier})
        storage.write_text(storage.join(folder, "_" + CONFIG_FILE), docs.config_yaml)
        storage.write_text(storage.join(folder, "_" + DRIFT_FILE), docs.report_html)
        marker = dict(sealed.marker)
        for name, result in run.earlier.items():
            # _SUCCESS names the commits it matches: readers (and the next night) can tell
            # whether the table and the Parquet run agree.
            marker[name] = {k: result[k] for k in EARLIER_COMMIT_KEYS if k in result}
        self.publish(marker, self._staged_key(), fence=run.fence)
        storage.write_text(storage.join(self.output, CONFIG_FILE), docs.config_yaml)
        storage.write_text(storage.join(self.output, DRIFT_FILE), docs.report_html)
        storage.write_text(storage.join(self.output, STATS_FILE), docs.ray_stats)
        return marker

    def abort(self, run: NightRun) -> None:
        """Drop the run's staging: started again, it scores afresh under a new run id. Its
        rows stay in its run folder until a later night tidies up."""
        if self.key is not None:
            storage.remove(staging_uri(self.output, self.key))
            storage.remove_if_empty(storage.join(self.output, STAGING_DIR))  # as publish does

    def committed_files(self) -> list[str]:
        marker = self.committed_run()
        if not marker:
            raise OutputError(f"output {self.output!r} holds no completed run (no {SUCCESS_FILE})")
        return committed_uris(self.output, marker)

    # -- the committed run ---------------------------------------------------------------

    def committed_run(self) -> dict[str, Any] | None:
        """The `_SUCCESS` marker of the committed run, or None."""
        marker = storage.join(self.output, SUCCESS_FILE)
        return storage.read_json(marker) if storage.exists(marker) else None

    def run_files(self, marker: dict[str, Any]) -> list[str]:
        """URIs of the Parquet files a marker (e.g. last night's) lists."""
        return committed_uris(self.output, marker)

    def run_uri(self, run_id: str) -> str:
        """The run's folder (for messages and the summary; its files are the sink's)."""
        return run_uri(self.output, run_id)

    def run_statistics(self, marker: dict[str, Any] | None) -> dict[str, Any] | None:
        """A committed run's statistics, from its run summary (kept until the night after)."""
        if not marker:
            return None
        uri = storage.join(run_uri(self.output, marker["run_id"]), RUN_SUMMARY_FILE)
        return storage.read_json(uri).get("stats") if storage.exists(uri) else None

    # -- staging and writing -------------------------------------------------------------

    def stage(self, key: str, new_run_id: str) -> str:
        """The run id of an interrupted run staged under `key`, else `new_run_id` (checked
        unused, then recorded)."""
        self.key = key
        info = storage.join(staging_uri(self.output, key), RUN_ID_FILE)
        if storage.exists(info):
            return storage.read_json(info)["run_id"]
        run_id = safe_name(new_run_id, "--run-id")
        if storage.exists(run_uri(self.output, run_id)):
            raise ConfigError(f"--run-id {run_id!r} is already used in output {self.output!r}; "
                              "choose another")
        storage.write_json(info, {"run_id": run_id})
        return run_id

    def plan_folder(self) -> str:
        """A folder for the night's plan, kept until the run commits or is aborted; the
        planner names the files inside it (the sink's own is `run.json`)."""
        return staging_uri(self.output, self._staged_key())

    def finished_chunks(self, run_id: str, sizes: list[int]) -> set[int]:
        """Chunks a killed attempt of the run finished (the rest of its files are removed)."""
        return finished_chunks(run_uri(self.output, run_id), sizes)

    def datasink(self, run_id: str, rows_per_write: int) -> ChunkSink:
        """The Ray Data datasink whose write tasks put scored rows into the run folder."""
        return ChunkSink(run_uri(self.output, run_id), rows_per_write)

    def write_carried(self, run_id: str, batches: Iterable[pa.RecordBatch],
                      rows_per_file: int) -> int:
        """Rows carried forward unchanged into the run folder; returns the row count."""
        return write_carried(batches, run_uri(self.output, run_id), rows_per_file)

    def seal(self, run_id: str, sizes: list[int], carried_rows: int, expected_rows: int,
             written: list[dict[str, Any]], info: dict[str, Any]) -> SealedRun:
        """Check the run folder holds every chunk's rows and one row per manifest row, and
        gather the run's statistics; OutputError (nothing committed) otherwise."""
        folder = run_uri(self.output, run_id)
        listing = list_run(folder)
        stats = run_stats(folder, listing, written)
        rows = check_complete(run_id, listing, sizes, carried_rows, expected_rows)
        marker = {**info, "run_id": run_id, "rows": rows, "rows_rescored": sum(sizes),
                  "rows_carried": carried_rows,
                  "files": [f"{RUNS_DIR}/{run_id}/{n}" for n in listing.names]}
        scored = tuple(storage.join(folder, n) for files in listing.chunks.values()
                       for n, _ in files)
        self._sealed = SealedRun(marker, stats, scored)
        return self._sealed

    def attach(self, documents: NightDocuments) -> None:
        """The documents the commit keeps with the run."""
        self._documents = documents

    def keep_refused(self, run_id: str, summary: dict[str, Any], sample: dict[str, Any]) -> str:
        """A night refused before its commit: keep its summary and error sample with its rows
        (the job then aborts the run); returns the run folder (for the message)."""
        folder = run_uri(self.output, run_id)
        storage.write_json(storage.join(folder, ERROR_SAMPLE_FILE), sample)
        storage.write_json(storage.join(folder, RUN_SUMMARY_FILE), summary)
        return folder

    def write_summary(self, summary: dict[str, Any]) -> None:
        """The committed night's summary next to `_SUCCESS` (written last)."""
        storage.write_json(storage.join(self.output, SUMMARY_FILE), summary)

    # -- publishing ----------------------------------------------------------------------

    def publish(self, marker: dict[str, Any], staging_key: str,
                fence: Callable[[], None] | None = None) -> None:
        """The commit point: write `_SUCCESS` (atomic), then point the local link, then tidy
        up: runs other than this night's and the previous one, and this run's staging (and
        `_staging/` itself when no other run's staging is left in it). `fence` (the lease's
        renewal) runs immediately before each visible write and raises when this run no
        longer holds the output, so a run that stalled past its lease never overwrites the
        run that took it."""
        fence = fence or (lambda: None)
        output = self.output
        marker = {**marker, "committed_at": dt.datetime.now(dt.UTC).isoformat()}
        try:
            previous = self.committed_run()
        except (ValueError, OSError):  # an unreadable marker being replaced under --overwrite
            previous = None
        fence()
        storage.write_json(storage.join(output, SUCCESS_FILE), marker)
        if storage.is_local(output):
            fence()
            storage.point_link(storage.join(output, PREDICTIONS_DIR),
                               f"{RUNS_DIR}/{marker['run_id']}")
        keep = {marker["run_id"], (previous or {}).get("run_id")}
        for old in storage.list_dirs(storage.join(output, RUNS_DIR)):
            if old not in keep:
                storage.remove(storage.join(output, RUNS_DIR, old))
        storage.remove(staging_uri(output, staging_key))
        storage.remove_if_empty(storage.join(output, STAGING_DIR))  # kept while another stages

    def _staged_key(self) -> str:
        if self.key is None:
            raise OutputError("the run folder sink has no staged run (call stage first)")
        return self.key
