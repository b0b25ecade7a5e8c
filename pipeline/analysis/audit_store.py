"""The audit's on-disk embedding store (`pipeline.analysis.audit`): rows appended block by block
as they stream out of the scoring engine, read back a block at a time with positional reads.

The driver then holds a block of embeddings at a time, not every row: float16 halves the bytes of
float32 on disk (embeddings are L2-normalized, so every value lies in [-1, 1], where float16
keeps about three significant digits). Reads copy rows out of the file (os.preadv) rather than
through a memory map: every page a map touches, and the neighbouring pages the kernel maps with
it, count in the process's resident memory while the map lives, so a scattered gather of a few
thousand rows would show as hundreds of megabytes; read pages stay in the kernel's page cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import numpy as np

# Rows per block when a store is swept or rewritten: a block of float32 rows of the bundled
# model's width is a few megabytes.
STORE_BLOCK_ROWS = 4096


class EmbeddingStore:
    """An append-only (n, dim) matrix in a raw file: `append` blocks, then read rows back as
    float32 by slice (`store[a:b]`) or by positions (`store[idx]`), like an array."""

    def __init__(self, path: str | Path, dim: int, dtype: np.dtype | type = np.float16):
        self.path = Path(path)
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # noqa: SIM115 (kept open across appends)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.dim

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self.rows * self.dim * self.dtype.itemsize

    def __len__(self) -> int:
        return self.rows

    def append(self, block: np.ndarray) -> None:
        """Add rows at the end (cast to the store's dtype)."""
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"expected rows of {self.dim} values, got shape {block.shape}")
        if self._file is None:
            raise ValueError(f"{self.path} is closed for appending")
        self._file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def finish(self) -> EmbeddingStore:
        """Flush and stop appending; the store stays readable."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self

    def read(self, positions: np.ndarray) -> np.ndarray:
        """Rows at ascending `positions`, in the store's dtype: one positional read per run of
        consecutive positions."""
        if self._file is not None:
            self._file.flush()
        out = np.empty((len(positions), self.dim), dtype=self.dtype)
        if not len(positions):
            return out
        row_bytes = self.dim * self.dtype.itemsize
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(positions) != 1) + 1, [len(positions)]])
        buffer = memoryview(out).cast("B")
        with open(self.path, "rb") as f:
            for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
                done, size, offset = a * row_bytes, (b - a) * row_bytes, int(positions[a]) * row_bytes
                while size:  # a read may return less than asked (over 2 GB at once, say)
                    got = os.preadv(f.fileno(), [buffer[done:done + size]], offset)
                    if not got:
                        raise EOFError(f"{self.path} ends before row {positions[b - 1]}")
                    done, size, offset = done + got, size - got, offset + got
        return out

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        """Rows as a float32 copy: a slice, or an array of positions (any order, repeats)."""
        if isinstance(key, slice):
            return self.read(np.arange(*key.indices(self.rows))).astype(np.float32)
        key = np.asarray(key, dtype=np.int64)
        # Read the file in position order (sequential where positions are dense), then put the
        # rows back in the order asked for.
        order = np.argsort(key, kind="stable")
        out = np.empty((len(key), self.dim), dtype=np.float32)
        out[order] = self.read(key[order])
        return out

    def blocks(self, rows: int = STORE_BLOCK_ROWS):
        """(start, float32 rows) over the whole store, in order."""
        for start in range(0, self.rows, rows):
            yield start, self[start:start + rows]

    def reordered(self, order: np.ndarray, path: str | Path) -> EmbeddingStore:
        """A new store at `path` whose row p is this store's row order[p], written a block at a
        time (this store is left as it is)."""
        out = EmbeddingStore(path, self.dim, self.dtype)
        for start in range(0, len(order), STORE_BLOCK_ROWS):
            out.append(self[order[start:start + STORE_BLOCK_ROWS]])
        return out.finish()


class Scratch:
    """A private temporary folder for an audit's stores, removed on exit (also on errors).
    `parent` (default: the system's temporary folder, $TMPDIR) should be a local disk with room
    for the embeddings: rows x width x 2 bytes."""

    def __init__(self, parent: str | None = None):
        self.parent = parent

    def __enter__(self) -> Path:
        if self.parent:
            os.makedirs(self.parent, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="audit-", dir=self.parent))
        return self.path

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
