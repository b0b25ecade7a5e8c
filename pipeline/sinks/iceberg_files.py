"""The data files of an Iceberg table: read a run's Parquet rows, write them as the table's
data files (one at a time, so memory holds at most one file's rows), list a snapshot's.

pyiceberg's own streaming path hands every file to a thread pool's `map`, which queues the
whole input first; writing file by file here keeps the commit's memory flat whatever the
night's size.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import bin_pack_record_batches, pyarrow_to_schema, write_file
from pyiceberg.manifest import DataFile, DataFileContent, ManifestContent
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.utils.properties import property_as_int

from pipeline import storage
from pipeline.errors import OutputError

# Rows per batch read from the run's Parquet files: small enough to keep the reader's memory
# a few tens of MB, large enough that per-batch overhead does not show.
READ_BATCH_ROWS = 64 * 1024


def data_files(table: Table, snapshot: Snapshot | None) -> list[DataFile]:
    """The live data files of `snapshot` (not delete files), from its manifests."""
    if snapshot is None:
        return []
    return [entry.data_file
            for manifest in snapshot.manifests(table.io) if manifest.content == ManifestContent.DATA
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
            if entry.data_file.content == DataFileContent.DATA]


class RowCounter:
    """Counts the rows that pass through a batch stream."""

    def __init__(self) -> None:
        self.rows = 0

    def count(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            self.rows += batch.num_rows
            yield batch


def read_batches(files: list[str], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
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


def write_data_files(metadata: TableMetadata, file_io: FileIO, schema: pa.Schema,
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


def delete_quietly(file_io: FileIO, data_files: list[DataFile]) -> None:
    """Best-effort removal of data files no snapshot references (else orphan-file cleanup
    gets them)."""
    for data_file in data_files:
        with contextlib.suppress(Exception):
            file_io.delete(data_file.file_path)
