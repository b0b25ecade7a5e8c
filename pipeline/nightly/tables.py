"""DuckDB over Arrow datasets: how the nightly job joins tables bigger than its memory.

The plan (`pipeline.nightly.incremental`) and the error budget (`pipeline.nightly.budget`) both
query Parquet files (local or object store) through one connection each, with a memory limit,
so a join spills to disk instead of growing with the catalog.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pyarrow.dataset as pads

from pipeline import storage

# DuckDB's working memory for a join; beyond it, it spills to a temporary folder.
MEMORY_LIMIT = "2GB"


def dataset(uris: str | list[str]) -> pads.Dataset:
    """Parquet of a file-or-folder URI, or of a list of file URIs, as one Arrow dataset."""
    if isinstance(uris, str):
        fs, path = storage.arrow_filesystem(uris)
        return pads.dataset(path, filesystem=fs, format="parquet")
    fs, _ = storage.arrow_filesystem(uris[0])
    return pads.dataset([storage.filesystem(u)[1] for u in uris], filesystem=fs, format="parquet")


def connect() -> Any:
    """A DuckDB connection that streams and spills rather than holding a join in memory."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/catalog-recategorizer-duckdb'")
    con.execute("SET preserve_insertion_order = false")  # lets the join stream and spill
    return con
