"""Deterministic chunks of a Parquet source: the unit of resume.

A chunk is a run of consecutive rows of one file (whole row groups where they fit, slices of a
row group larger than a chunk). Chunks are planned on the driver from the files' footers only,
so the same files always give the same chunks and nothing scans the rows; each chunk is read
once, by one task, inside the single streaming pass of the night.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.catalog import manifest_files
from pipeline.sinks.rows import CHUNK_COLUMN


@dataclass(frozen=True)
class Chunk:
    index: int
    path: str  # inside the filesystem of the source URI
    row_groups: tuple[int, ...]
    offset: int  # rows to skip in the first row group
    rows: int


def source_files(uri: str) -> list[str]:
    """The Parquet files of a file-or-folder URI, in a stable order: the manifest's own file
    set, the one validation read (pipeline.catalog.manifest_files)."""
    return manifest_files(uri)


def plan_chunks(uri: str, chunk_rows: int) -> list[Chunk]:
    """Chunks of at most `chunk_rows` rows over the source's files, from their footers."""
    fs, _ = storage.arrow_filesystem(uri)
    chunks: list[Chunk] = []
    for path in source_files(uri):
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        groups: list[int] = []
        start = taken = 0  # offset of the chunk in groups[0]; rows collected so far
        for g in range(meta.num_row_groups):
            size, pos = meta.row_group(g).num_rows, 0
            while pos < size:
                if taken == 0:
                    start, groups = pos, []
                if not groups or groups[-1] != g:
                    groups.append(g)
                take = min(size - pos, chunk_rows - taken)
                taken, pos = taken + take, pos + take
                if taken == chunk_rows:
                    chunks.append(Chunk(len(chunks), path, tuple(groups), start, taken))
                    taken = 0
        if taken:
            chunks.append(Chunk(len(chunks), path, tuple(groups), start, taken))
    return chunks


class ChunkReader:
    """Ray Data callable: a batch of chunk descriptions -> their rows (with the chunk index),
    the columns the night needs, image_version cast to string."""

    def __init__(self, source_uri: str, columns: list[str]):
        self.source_uri = source_uri
        self.columns = columns

    def read(self, chunk: Chunk) -> pa.Table:
        fs, _ = storage.arrow_filesystem(self.source_uri)
        with fs.open_input_file(chunk.path) as f:
            table = pq.ParquetFile(f).read_row_groups(list(chunk.row_groups), columns=self.columns)
        table = table.slice(chunk.offset, chunk.rows)
        if "image_version" in table.column_names:
            i = table.column_names.index("image_version")
            table = table.set_column(i, "image_version",
                                     pc.cast(table.column(i), pa.string()))
        return table.append_column(CHUNK_COLUMN, pa.array(np.full(table.num_rows, chunk.index)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self.read(Chunk(**{**row, "row_groups": tuple(row["row_groups"])}))
                                 for row in batch.to_pylist()])


def chunk_items(chunks: list[Chunk]) -> list[dict]:
    return [asdict(c) for c in chunks]
