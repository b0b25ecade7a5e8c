"""The Iceberg table sink: commits a night's committed Parquet run to a warehouse table.

After the Parquet run folder is committed, `IcebergSink.commit` copies its rows into an Iceberg
table through pyiceberg, as ONE snapshot whose current state is exactly the night's products:
the snapshot deletes every data file of the previous night and adds the new ones (an Iceberg
OVERWRITE operation; the first night is an APPEND). Products that left the catalog are thus gone
from the current state, and every earlier night stays readable by time travel until its
snapshot expires. The run id rides in the snapshot summary (`RUN_ID_PROPERTY`), which makes the
commit idempotent: a re-run after a crash between the Parquet and the Iceberg commit finds its
snapshot already current and adds none.

Why a full overwrite and not pyiceberg's upsert: `benchmarks/iceberg_commit.py` measures both;
upsert is orders of magnitude slower (it scans the table with a predicate listing every key),
commits several snapshots, and still leaves departed products in place.

Memory stays flat whatever the night's size: the run's files are read batch by batch and written
one Iceberg data file at a time (pyiceberg's own streaming path hands every file to a thread
pool's `map`, which queues the whole input first). The data is copied into the table's location
because run folders are deleted a few nights later, so zero-copy `add_files` cannot be used.

Catalog properties are pyiceberg's own (`load_catalog(name, **properties)`); an optional `name`
key picks the catalog name (default `default`, which also merges `~/.pyiceberg.yaml` and
`PYICEBERG_CATALOG__DEFAULT__*` environment variables, the place for credentials).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.catalog import Catalog, MetastoreCatalog, load_catalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
    ValidationException,
)
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import (
    _check_pyarrow_schema_compatible,
    bin_pack_record_batches,
    pyarrow_to_schema,
    write_file,
)
from pyiceberg.manifest import DataFile, DataFileContent, ManifestContent
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot, ancestors_of
from pyiceberg.utils.properties import property_as_int

from pipeline import storage
from pipeline.errors import ConfigError, OutputError

# Snapshot summary key holding the run id of the night a snapshot committed.
RUN_ID_PROPERTY = "catalog-recategorizer.run-id"
# The product key: declared as the table's identifier field so engines (and pyiceberg's upsert)
# know it without being told.
# Data files are written one at a time from Arrow batches, and the writer holds about three
# times this many Arrow bytes at its peak: a smaller target keeps the commit's memory flat
# however large the night (BENCHMARKS.md, "Warehouse table").
TARGET_FILE_BYTES = 64 * 1024**2
KEY_COLUMN = "product_id"
# Optional key of --iceberg-catalog naming the catalog for load_catalog (not a catalog property).
CATALOG_NAME_KEY = "name"
DEFAULT_CATALOG_NAME = "default"
WAREHOUSE_KEY = "warehouse"
# Rows per batch read from the run's Parquet files: small enough to keep the reader's memory
# a few tens of MB, large enough that per-batch overhead does not show.
READ_BATCH_ROWS = 64 * 1024
# One part of a table identifier (a namespace level or the table name).
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_TABLE_HELP = "pass --iceberg-table NAMESPACE.TABLE, e.g. --iceberg-table retail.categories"
_CATALOG_HELP = ("pass --iceberg-catalog KEY=VALUE,... with pyiceberg catalog properties, e.g. "
                 "type=sql,uri=sqlite:////abs/catalog.db,warehouse=file:///abs/warehouse")
_SCHEMA_FIX = ("choose a new table with --iceberg-table, or migrate the existing table to the "
               "pipeline's output schema (or drop it) with your warehouse's ALTER TABLE")


def _output_schema() -> pa.Schema:
    """The pipeline's output schema as it is now (looked up at call time: columns get added)."""
    from pipeline.sinks import rows

    return rows.OUTPUT_SCHEMA


def parse_catalog_properties(text: str) -> dict[str, str]:
    """`KEY=VALUE,KEY=VALUE` -> pyiceberg catalog properties; ConfigError on malformed input.

    Values may contain `=` (split at the first one) but not `,`. Error messages name keys and
    positions, never values: properties may hold credentials.
    """
    if not text or not text.strip():
        raise ConfigError(f"--iceberg-catalog is empty; {_CATALOG_HELP}")
    properties: dict[str, str] = {}
    for position, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            raise ConfigError(f"--iceberg-catalog entry {position} is empty; remove the extra comma")
        key, sep, value = entry.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"--iceberg-catalog entry {position} ({entry!r}) has no '='; "
                              f"write it as KEY=VALUE ({_CATALOG_HELP})")
        if not key:
            raise ConfigError(f"--iceberg-catalog entry {position} has no key before '='; "
                              "write it as KEY=VALUE")
        if not value:
            raise ConfigError(f"--iceberg-catalog key {key!r} has an empty value; give it a value "
                              "or leave the key out")
        if key in properties:
            raise ConfigError(f"--iceberg-catalog sets key {key!r} twice; keep one of them")
        properties[key] = value
    return properties


def parse_table_name(text: str) -> tuple[str, str]:
    """`NAMESPACE.TABLE` -> (namespace, table); the last dot splits, so namespaces may nest."""
    namespace, dot, table = (text or "").strip().rpartition(".")
    if not dot:
        raise ConfigError(f"Iceberg table {text!r} has no namespace; {_TABLE_HELP}")
    for part in [*namespace.split("."), table]:
        if not _NAME_PART.match(part):
            raise ConfigError(
                f"Iceberg table {text!r} has an empty or invalid name part {part!r} (letters, digits, "
                f"'_' and '-' only, dot-separated); {_TABLE_HELP}")
    return namespace, table


class IcebergSink:
    """Commits committed Parquet runs to one Iceberg table, one snapshot per night."""

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
            try:
                self._catalog = load_catalog(self.catalog_name, **self._properties)
            except Exception as exc:  # every backend fails differently; all mean a bad config
                keys = ", ".join(sorted(self._properties)) or "none"
                raise ConfigError(
                    f"cannot load Iceberg catalog {self.catalog_name!r} (properties given: {keys}): "
                    f"{type(exc).__name__}: {exc}; check --iceberg-catalog ({_CATALOG_HELP})"
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
                              f"the pipeline's output: {'; '.join(problems)}; {_SCHEMA_FIX}")
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
                              f"the pipeline's output: {exc}; {_SCHEMA_FIX}") from exc
        return evolution if evolved != current else None

    # -- the sink interface ------------------------------------------------------------------

    def check(self, schema: pa.Schema) -> None:
        """Fail fast, before the job does any work: the catalog must load, and the table must
        either be creatable or take `schema` rows. Creates nothing (beyond what the catalog
        itself sets up on load, e.g. the SQL catalog's bookkeeping tables)."""
        table = self._load_table()
        if table is None:
            self._check_creatable(self._load_catalog())
            return
        self._schema_evolution(table, schema)

    def current_run_id(self) -> str | None:
        """The run id of the table's current snapshot (None before the first)."""
        table = self._load_table()
        current = table.current_snapshot() if table is not None else None
        return _run_id(current) if current is not None else None

    def commit(self, files: list[str], run_id: str,
               properties: dict[str, str] | None = None) -> dict[str, Any]:
        """Make the rows of `files` (a committed run's Parquet files, in the output schema) the
        table's current state, in one snapshot tagged with `run_id` and `properties`.

        Idempotent: when the current snapshot already carries `run_id`, it is returned and
        nothing is written. Returns {"table", "snapshot_id", "rows", "already_committed"}, rows
        counted from the data files written.
        """
        schema = _output_schema()
        catalog = self._load_catalog()
        table = self._load_table()
        if table is None:
            self._check_creatable(catalog)
            try:
                table = self._create_table(catalog, schema)
            except Exception as exc:
                raise OutputError(f"cannot create Iceberg table {self.identifier!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        done = self._committed_run(table, run_id)
        if done is not None:
            return done
        evolution = self._schema_evolution(table, schema)
        previous = _data_files(table, table.current_snapshot())

        # Snapshot summaries hold strings; the run id is set last so no property can mask it.
        summary = {**{str(k): str(v) for k, v in (properties or {}).items()}, RUN_ID_PROPERTY: run_id}
        txn = table.transaction()
        if evolution is not None:
            with txn.update_schema() as update:
                update.union_by_name(evolution)
        written: list[DataFile] = []
        try:
            with txn.update_snapshot(snapshot_properties=summary).overwrite() as overwrite:
                if previous:
                    # A full overwrite: every live file of the previous night goes.
                    overwrite.delete_by_predicate(AlwaysTrue())
                    for data_file in previous:
                        overwrite.delete_data_file(data_file)
                rows_read = _RowCounter()
                for data_file in _write_data_files(txn.table_metadata, table.io, schema,
                                                   rows_read.count(_read_batches(files, schema)),
                                                   overwrite.commit_uuid):
                    written.append(data_file)
                    overwrite.append_data_file(data_file)
                rows = sum(f.record_count for f in written)
                if rows != rows_read.rows:  # checked before the snapshot is staged
                    raise OutputError(f"wrote {rows} rows to Iceberg table {self.identifier!r} but "
                                      f"read {rows_read.rows} from the run's files")
        except Exception as exc:
            _delete_quietly(table.io, written)  # nothing references them: nothing was committed
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"writing run {run_id!r} to Iceberg table {self.identifier!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        try:
            committed = txn.commit_transaction()
        except (CommitFailedException, ValidationException) as exc:
            # Both guarantee the commit did not land, so our files are unreferenced.
            _delete_quietly(table.io, written)
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
        snapshot = committed.current_snapshot()
        return {"table": self.identifier, "snapshot_id": snapshot.snapshot_id, "rows": rows,
                "already_committed": False}

    def committed_files(self) -> list[str]:
        """Paths of the data files of the table's current snapshot (empty before the first)."""
        table = self._load_table()
        if table is None:
            return []
        return sorted(f.file_path for f in _data_files(table, table.current_snapshot()))

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


def _data_files(table: Table, snapshot: Snapshot | None) -> list[DataFile]:
    """The live data files of `snapshot` (not delete files), from its manifests."""
    if snapshot is None:
        return []
    return [entry.data_file
            for manifest in snapshot.manifests(table.io) if manifest.content == ManifestContent.DATA
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
            if entry.data_file.content == DataFileContent.DATA]


class _RowCounter:
    """Counts the rows that pass through a batch stream."""

    def __init__(self) -> None:
        self.rows = 0

    def count(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.rows += batch.num_rows
            yield batch


def _read_batches(files: list[str], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The rows of `files`, batch by batch, in `schema` (column order and types)."""
    for uri in files:
        fs, path = storage.arrow_filesystem(uri)
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                missing = [name for name in schema.names if name not in parquet.schema_arrow.names]
                if missing:
                    raise OutputError(f"run file {uri!r} lacks output columns {missing}; it is not "
                                      "a file of this pipeline's output schema")
                for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=schema.names):
                    yield batch.select(schema.names).cast(schema)
        except OutputError:
            raise
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise OutputError(f"cannot read run file {uri!r} for the Iceberg commit: "
                              f"{type(exc).__name__}: {exc}") from exc


def _write_data_files(metadata: TableMetadata, file_io: FileIO, schema: pa.Schema,
                      batches: Iterator[pa.RecordBatch], write_uuid: uuid.UUID) -> Iterator[DataFile]:
    """Write `batches` as Iceberg data files of the table's target size, one file at a time so
    that memory holds at most one file's rows."""
    target_bytes = property_as_int(metadata.properties, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
                                   TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT)
    # Field ids of the batches' columns, matched by name against the (evolved) table schema.
    batch_schema = pyarrow_to_schema(schema, name_mapping=metadata.schema().name_mapping,
                                     format_version=metadata.format_version)
    task_ids = itertools.count()
    for group in bin_pack_record_batches(batches, target_bytes):
        task = WriteTask(write_uuid=write_uuid, task_id=next(task_ids), record_batches=group,
                         schema=batch_schema)
        yield from write_file(file_io, metadata, iter([task]))


def _delete_quietly(file_io: FileIO, data_files: list[DataFile]) -> None:
    """Best-effort removal of data files no snapshot references (else orphan-file cleanup
    gets them)."""
    for data_file in data_files:
        with contextlib.suppress(Exception):
            file_io.delete(data_file.file_path)
