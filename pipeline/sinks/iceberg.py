"""The Iceberg table sink: commits each night to a warehouse table, one snapshot per night.

`IcebergSink` implements the sink interface (`pipeline.sinks.base.Sink`). Its commit copies the
night's rows from the run folder's checked files (`NightRun.files`) into the table through
pyiceberg, as ONE snapshot whose current state is exactly the night's products: the snapshot
deletes every data file of the previous night and adds the new ones (an Iceberg OVERWRITE
operation; the first night is an APPEND). Products that left the catalog are thus gone from the
current state, and every earlier night stays readable by time travel until its snapshot expires.
The run id rides in the snapshot summary (`RUN_ID_PROPERTY`), which makes the commit
idempotent: a re-run after a crash between the table commit and `_SUCCESS` finds its snapshot
already current and adds none.

Why a full overwrite and not pyiceberg's upsert: `benchmarks/iceberg_commit.py` measures both;
upsert is far slower (it scans the table with a predicate listing every key), commits several
snapshots, and still leaves departed products in place.

Why a copy: the run folder keeps only the current and the previous night, so data files the
table's snapshots reference must live in the table's own location; zero-copy `add_files` on the
run's files would leave older snapshots pointing at deleted files (and let the table's snapshot
expiry delete run files). The copy streams (`pipeline.sinks.iceberg_files`), so memory stays flat.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import pyarrow as pa
from pyiceberg.catalog import Catalog, MetastoreCatalog, load_catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table, TableProperties, Transaction
from pyiceberg.table.snapshots import Snapshot, ancestors_of

from pipeline.errors import ConfigError, OutputError
from pipeline.sinks.base import NightRun
from pipeline.sinks.iceberg_files import (
    RowCounter,
    data_files,
    delete_quietly,
    read_batches,
    write_data_files,
)
from pipeline.sinks.iceberg_options import CATALOG_HELP, parse_table_name

# Snapshot summary key holding the run id of the night a snapshot committed.
RUN_ID_PROPERTY = "catalog-recategorizer.run-id"
# Data files are written one at a time from Arrow batches, and the writer holds about three
# times this many Arrow bytes at its peak: a smaller target keeps the commit's memory flat
# however large the night (BENCHMARKS.md, "Warehouse table").
TARGET_FILE_BYTES = 64 * 1024**2
# The product key: declared as the table's identifier field so engines (and pyiceberg's upsert)
# know it without being told.
KEY_COLUMN = "product_id"
# Optional key of --iceberg-catalog naming the catalog for load_catalog (not a catalog property).
CATALOG_NAME_KEY = "name"
DEFAULT_CATALOG_NAME = "default"
WAREHOUSE_KEY = "warehouse"
SCHEMA_FIX = ("choose a new table with --iceberg-table, or migrate the existing table to the "
              "pipeline's output schema (or drop it) with your warehouse's ALTER TABLE")


def _output_schema() -> pa.Schema:
    """The pipeline's output schema as it is now (looked up at call time: columns get added)."""
    from pipeline.sinks import rows

    return rows.OUTPUT_SCHEMA


def create_sqlite_folder(properties: dict[str, str]) -> None:
    """A local SQLite catalog (`type=sql,uri=sqlite:////abs/catalog.db`) in a folder that does
    not exist yet: create the folder, as the output's own is created; SQLite creates the file
    but not its folder."""
    uri = properties.get("uri", "")
    if properties.get("type") != "sql" or not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///").split("?")[0]
    if path and path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)


class IcebergSink:
    """Commits nights to one Iceberg table, one snapshot per night."""

    name = "iceberg"

    def __init__(self, table: str, catalog_properties: dict[str, str]):
        self.namespace, self.table_name = parse_table_name(table)
        self.identifier = f"{self.namespace}.{self.table_name}"
        properties = dict(catalog_properties)
        self.catalog_name = properties.pop(CATALOG_NAME_KEY, DEFAULT_CATALOG_NAME)
        self._properties = properties
        self._catalog: Catalog | None = None

    # -- catalog and table -------------------------------------------------------------------

    def _load_catalog(self) -> Catalog:
        if self._catalog is None:
            create_sqlite_folder(self._properties)
            try:
                self._catalog = load_catalog(self.catalog_name, **self._properties)
            except Exception as exc:  # every backend fails differently; all mean a bad config
                keys = ", ".join(sorted(self._properties)) or "none"
                # One line: drivers add lines of their own (SQLAlchemy a link to its docs).
                why = (str(exc).strip().splitlines() or [""])[0]
                raise ConfigError(
                    f"cannot load Iceberg catalog {self.catalog_name!r} (properties given: {keys}): "
                    f"{type(exc).__name__}: {why}; check --iceberg-catalog ({CATALOG_HELP})"
                ) from exc
        return self._catalog

    def _load_table(self) -> Table | None:
        """The table, or None when it (or its namespace) does not exist yet."""
        catalog = self._load_catalog()
        try:
            return catalog.load_table(self.identifier)
        except (NoSuchTableError, NoSuchNamespaceError):
            return None
        except Exception as exc:  # unreachable catalog, permissions, corrupt metadata
            raise OutputError(f"cannot load Iceberg table {self.identifier!r}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _check_creatable(self, catalog: Catalog) -> None:
        """Metastore catalogs (SQL, Glue, Hive) need a location for a new table: the catalog's
        warehouse or the namespace's location. Checked up front so a night's work is not lost."""
        if not isinstance(catalog, MetastoreCatalog) or catalog.properties.get(WAREHOUSE_KEY):
            return
        try:
            location = catalog.load_namespace_properties(self.namespace).get("location")
        except NoSuchNamespaceError:
            location = None
        if not location:
            raise ConfigError(
                f"Iceberg table {self.identifier!r} does not exist yet and the catalog has no "
                f"'{WAREHOUSE_KEY}' property to create it in; add {WAREHOUSE_KEY}=file:///abs/path or "
                f"{WAREHOUSE_KEY}=s3://bucket/prefix to --iceberg-catalog")

    def _create_table(self, catalog: Catalog, schema: pa.Schema) -> Table:
        catalog.create_namespace_if_not_exists(self.namespace)
        try:
            table = catalog.create_table(self.identifier, schema=schema, properties={
                TableProperties.WRITE_TARGET_FILE_SIZE_BYTES: str(TARGET_FILE_BYTES)})
        except TableAlreadyExistsError:  # another run created it since we looked
            return catalog.load_table(self.identifier)
        if schema.field(KEY_COLUMN).nullable is False:
            with table.update_schema() as update:
                update.set_identifier_fields(KEY_COLUMN)
        return table

    # -- schema ------------------------------------------------------------------------------

    def _schema_evolution(self, table: Table, schema: pa.Schema) -> pa.Schema | None:
        """The schema to union into `table` before writing `schema` rows, or None when the table
        takes them as they are; OutputError when the table cannot take them.

        New output columns are added as optional: older snapshots have no values for them.
        """
        if not table.spec().is_unpartitioned():
            raise OutputError(
                f"Iceberg table {self.identifier!r} is partitioned ({table.spec()}); this sink streams "
                "into unpartitioned tables only; choose a new table with --iceberg-table, or drop the "
                "table's partition fields")
        current = table.schema()
        table_columns = {f.name: f for f in current.fields}
        problems = []
        for column in table_columns.values():
            if column.required and column.name not in schema.names:
                problems.append(f"column {column.name!r} is required in the table but the "
                                "pipeline does not write it")
        for field in schema:
            column = table_columns.get(field.name)
            if column is not None and column.required and field.nullable:
                problems.append(f"column {field.name!r} is required in the table but may be null "
                                "in the pipeline's output")
        if problems:
            raise OutputError(f"existing Iceberg table {self.identifier!r} is incompatible with "
                              f"the pipeline's output: {'; '.join(problems)}; {SCHEMA_FIX}")
        added = [f.name for f in schema if f.name not in table_columns]
        evolution = pa.schema([f.with_nullable(True) if f.name in added else f for f in schema])
        try:
            evolved = table.update_schema().union_by_name(evolution)._apply()
            # pyiceberg prints its field-by-field comparison table on a mismatch; the message
            # carries the same table, so keep it off the job's stdout.
            with contextlib.redirect_stdout(io.StringIO()):
                _check_pyarrow_schema_compatible(evolved, schema,
                                                 format_version=table.metadata.format_version)
        except Exception as exc:  # ValidationError, ValueError: a type that cannot change
            raise OutputError(f"existing Iceberg table {self.identifier!r} is incompatible with "
                              f"the pipeline's output: {exc}; {SCHEMA_FIX}") from exc
        return evolution if evolved != current else None

    # -- the sink interface ------------------------------------------------------------------

    def check(self, schema: pa.Schema | None = None) -> dict[str, Any] | None:
        """Fail fast, before the job does any work: the catalog must load, and the table must
        either be creatable or take `schema` rows (default: the output schema). Creates
        nothing (beyond what the catalog itself sets up on load, e.g. the SQL catalog's
        bookkeeping tables). Returns the current snapshot's run ({"table", "run_id",
        "snapshot_id"}), or None before the first."""
        table = self._load_table()
        if table is None:
            self._check_creatable(self._load_catalog())
            return None
        self._schema_evolution(table, schema if schema is not None else _output_schema())
        current = table.current_snapshot()
        if current is None:
            return None
        return {"table": self.identifier, "run_id": _run_id(current),
                "snapshot_id": current.snapshot_id}

    def current_run_id(self) -> str | None:
        """The run id of the table's current snapshot (None before the first)."""
        table = self._load_table()
        current = table.current_snapshot() if table is not None else None
        return _run_id(current) if current is not None else None

    def commit(self, run: NightRun) -> dict[str, Any]:
        """Make the rows of `run.files` (the run's checked Parquet files, in the output
        schema) the table's current state, in one snapshot tagged with the run id and
        `run.properties`; `run.fence` runs first.

        Idempotent: when the current snapshot already carries the run id, it is returned and
        nothing is written. Returns {"table", "snapshot_id", "rows", "already_committed"}, rows
        counted from the data files written.
        """
        run.fence()  # the table's snapshot is a visible commit: a run that lost its lease stops
        schema = _output_schema()
        table = self._open_table(schema)
        done = self._committed_run(table, run.run_id)
        if done is not None:
            return done
        evolution = self._schema_evolution(table, schema)
        # Snapshot summaries hold strings; the run id is set last so no property can mask it.
        summary = {**{str(k): str(v) for k, v in run.properties.items()},
                   RUN_ID_PROPERTY: run.run_id}
        txn = table.transaction()
        if evolution is not None:
            with txn.update_schema() as update:
                update.union_by_name(evolution)
        written, rows = self._stage_snapshot(txn, table, schema, list(run.files), summary,
                                             run.run_id)
        snapshot = self._commit_transaction(txn, table, written, run.run_id)
        return {"table": self.identifier, "snapshot_id": snapshot.snapshot_id, "rows": rows,
                "already_committed": False}

    def abort(self, run: NightRun) -> None:
        """Nothing to drop: the table is written only inside `commit`, which removes its own
        data files when its snapshot does not land."""

    def committed_files(self) -> list[str]:
        """Paths of the data files of the table's current snapshot (empty before the first)."""
        table = self._load_table()
        if table is None:
            return []
        return sorted(f.file_path for f in data_files(table, table.current_snapshot()))

    # -- committing ----------------------------------------------------------------------------

    def _open_table(self, schema: pa.Schema) -> Table:
        """The table, created for `schema` rows when it does not exist yet."""
        catalog = self._load_catalog()
        table = self._load_table()
        if table is not None:
            return table
        self._check_creatable(catalog)
        try:
            return self._create_table(catalog, schema)
        except Exception as exc:
            raise OutputError(f"cannot create Iceberg table {self.identifier!r}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _stage_snapshot(self, txn: Transaction, table: Table, schema: pa.Schema,
                        files: list[str], summary: dict[str, str],
                        run_id: str) -> tuple[list[DataFile], int]:
        """Stage the overwrite in `txn`: the previous night's data files out, the run's rows
        written as new ones; returns them and their row count. Nothing is committed: on any
        failure the new files are removed again."""
        previous = data_files(table, table.current_snapshot())
        written: list[DataFile] = []
        try:
            with txn.update_snapshot(snapshot_properties=summary).overwrite() as overwrite:
                if previous:
                    # A full overwrite: every live file of the previous night goes.
                    overwrite.delete_by_predicate(AlwaysTrue())
                    for data_file in previous:
                        overwrite.delete_data_file(data_file)
                rows_read = RowCounter()
                for data_file in write_data_files(txn.table_metadata, table.io, schema,
                                                  rows_read.count(read_batches(files, schema)),
                                                  overwrite.commit_uuid):
                    written.append(data_file)
                    overwrite.append_data_file(data_file)
                rows = sum(f.record_count for f in written)
                if rows != rows_read.rows:  # checked before the snapshot is staged
                    raise OutputError(f"wrote {rows} rows to Iceberg table {self.identifier!r} but "
                                      f"read {rows_read.rows} from the run's files")
        except Exception as exc:
            delete_quietly(table.io, written)  # nothing references them: nothing was committed
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"writing run {run_id!r} to Iceberg table {self.identifier!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        return written, rows

    def _commit_transaction(self, txn: Transaction, table: Table, written: list[DataFile],
                            run_id: str) -> Snapshot:
        """Commit the staged snapshot; returns it. OutputError says whether it may have
        landed."""
        try:
            committed = txn.commit_transaction()
        except (CommitFailedException, ValidationException) as exc:
            # Both guarantee the commit did not land, so our files are unreferenced.
            delete_quietly(table.io, written)
            raise OutputError(
                f"committing run {run_id!r} to Iceberg table {self.identifier!r} failed: {exc}; "
                "neither the table nor the Parquet output changed (the table commit comes first, "
                "and _SUCCESS still names the previous run); re-run the job: it resumes this run "
                "and retries the table commit") from exc
        except Exception as exc:  # outcome unknown: keep the files, a landed commit needs them
            raise OutputError(
                f"committing run {run_id!r} to Iceberg table {self.identifier!r} failed: "
                f"{type(exc).__name__}: {exc}; re-run the job: it finds the snapshot if it "
                "landed") from exc
        return committed.current_snapshot()

    def _committed_run(self, table: Table, run_id: str) -> dict[str, Any] | None:
        """The commit result when `run_id` is the current snapshot's run; OutputError when it is
        an older snapshot's (committing it again would roll the newer nights back)."""
        current = table.current_snapshot()
        if current is None:
            return None
        if _run_id(current) == run_id:
            return {"table": self.identifier, "snapshot_id": current.snapshot_id,
                    "rows": int(current.summary["total-records"]), "already_committed": True}
        for snapshot in ancestors_of(current, table.metadata):
            if _run_id(snapshot) == run_id:
                raise OutputError(
                    f"run {run_id!r} was committed to Iceberg table {self.identifier!r} as snapshot "
                    f"{snapshot.snapshot_id}, and a later run ({_run_id(current)!r}) is current now; "
                    "committing it again would roll the table back; to do that on purpose, use the "
                    "table's rollback (e.g. Spark's rollback_to_snapshot)")
        return None


def _run_id(snapshot: Snapshot) -> str | None:
    return snapshot.summary.additional_properties.get(RUN_ID_PROPERTY) if snapshot.summary else None
