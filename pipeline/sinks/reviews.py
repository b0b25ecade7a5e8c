"""The reviews table: people's decisions on rows the nightly job sent to review.

An append-only folder of Parquet files (local path or object store). Every `append` writes one
new file under a "_"-prefixed temporary name and then moves it to its final name, so readers,
who skip names starting with "_" or ".", only ever see complete files. Nothing is rewritten or
deleted: a decision is withdrawn by appending an "undo" row that names it, and `latest` works
out which decisions are in force. Two writers at once never collide: each file is named by its
time and a fresh uuid.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import OutputError

REVIEWS_DIR = "reviews"  # default location: <output>/reviews/
KIND_DECIDE = "decide"
KIND_UNDO = "undo"

REVIEWS_SCHEMA = pa.schema([
    ("decision_id", pa.string()),         # uuid4 hex, made by append()
    ("kind", pa.string()),                # "decide" | "undo"
    ("undoes", pa.string()),              # the decision_id an undo row voids; null for "decide"
    ("product_id", pa.string()),
    ("image_version", pa.string()),       # the image the person saw (null when the run had none)
    ("image_uri", pa.string()),
    ("decided_category", pa.string()),    # the category the person chose (null on undo rows)
    ("replaces_category", pa.string()),   # the catalog's current category it replaces (nullable)
    ("predicted_category", pa.string()),  # the model's top-1 at review time (nullable)
    ("model_version", pa.string()),
    ("reviewer", pa.string()),
    ("decided_at", pa.timestamp("us", tz="UTC")),
    ("run_id", pa.string()),              # the committed run that was reviewed
])

LATEST_COLUMNS = ["product_id", "image_version", "decided_category", "decision_id", "reviewer",
                  "decided_at", "run_id"]
LATEST_SCHEMA = pa.schema([REVIEWS_SCHEMA.field(name) for name in LATEST_COLUMNS])


@dataclass(frozen=True)
class Decision:
    """What a caller gives; decision_id, kind, undoes and decided_at are filled by the table."""

    product_id: str
    image_version: str | None
    image_uri: str | None
    decided_category: str
    replaces_category: str | None
    predicted_category: str | None
    model_version: str
    reviewer: str
    run_id: str


def _now() -> datetime:
    return datetime.now(UTC)


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


class ReviewsTable:
    """An append-only folder of decisions (created on first write)."""

    def __init__(self, uri: str):
        self.uri = storage.normalize(uri)

    # -- writing ---------------------------------------------------------------------------

    def append(self, decisions: list[Decision]) -> list[dict]:
        """Write one new file holding `decisions`; return the rows written."""
        for d in decisions:
            if not d.product_id or not d.decided_category:
                raise ValueError("a decision needs a product_id and a decided_category")
        now = _now()
        rows = [{**asdict(d), "decision_id": uuid.uuid4().hex, "kind": KIND_DECIDE,
                 "undoes": None, "decided_at": now} for d in decisions]
        self._write(rows)
        return rows

    def undo(self, decision_id: str, reviewer: str, run_id: str,
             decided: dict[str, Any] | None = None) -> dict:
        """Append an "undo" row that voids `decision_id`; return it. `decided` is that decision's
        row as `append` returned it, when the caller has it: then the table is not read (a
        table of many files makes the look-up the slow part of an undo)."""
        if decided is not None and decided.get("decision_id") == decision_id and \
                decided.get("kind") == KIND_DECIDE:
            first = decided
        else:
            found = self.rows().filter(pc.equal(pc.field("decision_id"), decision_id))
            if found.num_rows == 0 or found.column("kind")[0].as_py() != KIND_DECIDE:
                raise KeyError(f"no decision {decision_id!r} in {self.uri}")
            first = found.slice(0, 1).to_pylist()[0]
        row = {name: None for name in REVIEWS_SCHEMA.names}
        row.update(decision_id=uuid.uuid4().hex, kind=KIND_UNDO, undoes=decision_id,
                   product_id=first["product_id"], image_version=first["image_version"],
                   image_uri=first["image_uri"], model_version=first["model_version"],
                   reviewer=reviewer, decided_at=_now(), run_id=run_id)
        self._write([row])
        return row

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=REVIEWS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        # Time first so a listing sorts roughly by write order; the uuid keeps writers apart.
        name = f"{_now().strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex}.parquet"
        final = storage.join(self.uri, name)
        tmp = storage.join(self.uri, f"_{name}.tmp")
        try:
            if storage.is_local(self.uri):
                self._write_local(tmp, final, data)
            else:
                # One PUT is atomic on an object store: readers never see part of the object.
                # Written straight to its final name (a rename there is a copy plus delete).
                fs, path = storage.filesystem(final)
                fs.pipe_file(path, data)
        except OSError as exc:
            raise OutputError(f"reviews table {self.uri!r} is not writable: {exc}") from exc

    @staticmethod
    def _write_local(tmp: str, final: str, data: bytes) -> None:
        folder = os.path.dirname(final)
        os.makedirs(folder, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                # On disk before the rename: a crash cannot leave a named but empty file.
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    # -- reading ---------------------------------------------------------------------------

    def files(self) -> list[str]:
        """The complete files of the table, sorted (temporary and hidden files skipped)."""
        return [f for f in storage.list_files(self.uri, suffix=".parquet")
                if not any(_hidden(part) for part in
                           posixpath.relpath(f.replace(os.sep, "/"),
                                             self.uri.replace(os.sep, "/")).split("/"))]

    def exists(self) -> bool:
        return storage.exists(self.uri)

    def check(self) -> None:
        """Raise OutputError unless the location is absent (no decisions yet) or a folder
        holding only reviews files: a wrong path must not read as "nobody decided anything"."""
        fs, path = storage.filesystem(self.uri)
        if not fs.exists(path):
            return
        if not fs.isdir(path):
            raise OutputError(f"{self.uri} is a file, not a reviews folder")
        for f in storage.list_files(self.uri):
            name = posixpath.basename(f.replace(os.sep, "/"))
            if not _hidden(name) and not name.endswith(".parquet"):
                raise OutputError(f"{self.uri} is not a reviews folder: it holds {name}")
        self.rows()  # every file readable, with the reviews columns

    def rows(self) -> pa.Table:
        """Every row of every complete file."""
        tables = []
        for f in self.files():
            fs, path = storage.filesystem(f)
            try:
                with fs.open(path, "rb") as handle:
                    table = pq.read_table(handle)
            except pa.ArrowInvalid as exc:
                raise OutputError(f"{f} is not a reviews file: {exc}") from exc
            missing = [n for n in REVIEWS_SCHEMA.names if n not in table.column_names]
            if missing:
                raise OutputError(f"{f} is not a reviews file: it lacks columns {missing}")
            tables.append(table.select(REVIEWS_SCHEMA.names).cast(REVIEWS_SCHEMA))
        if not tables:
            return REVIEWS_SCHEMA.empty_table()
        return pa.concat_tables(tables)

    def latest(self) -> pa.Table:
        """The decisions in force: per (product_id, image_version) the newest "decide" row that
        no "undo" row voids. Columns: LATEST_COLUMNS."""
        rows = self.rows()
        if rows.num_rows == 0:
            return LATEST_SCHEMA.empty_table()
        voided = set(rows.filter(pc.equal(rows.column("kind"), KIND_UNDO))
                     .column("undoes").to_pylist())
        decides = rows.filter(pc.equal(rows.column("kind"), KIND_DECIDE)).to_pylist()
        newest: dict[tuple[str, str | None], dict] = {}
        for row in decides:
            if row["decision_id"] in voided:
                continue
            key = (row["product_id"], row["image_version"])
            held = newest.get(key)
            # Ties (one append of the same product twice) go to the later row of the file.
            if held is None or row["decided_at"] >= held["decided_at"]:
                newest[key] = row
        kept = sorted(newest.values(), key=lambda r: (r["product_id"], r["image_version"] or ""))
        return pa.Table.from_pylist([{n: r[n] for n in LATEST_COLUMNS} for r in kept],
                                    schema=LATEST_SCHEMA)


def in_force(table: pa.Table) -> dict[tuple[str, str | None], str]:
    """(product_id, image_version) -> decided category, from a `latest()` table."""
    return {(r["product_id"], r["image_version"]): r["decided_category"]
            for r in table.select(["product_id", "image_version", "decided_category"]).to_pylist()}


def write_in_force(table: pa.Table, uri: str) -> None:
    """Keep a `latest()` table as one Parquet file (the night's snapshot of the decisions)."""
    buf = io.BytesIO()
    pq.write_table(table.select(LATEST_COLUMNS).cast(LATEST_SCHEMA), buf)
    storage.write_bytes(uri, buf.getvalue())


def read_in_force(uri: str) -> dict[tuple[str, str | None], str]:
    """The decisions `write_in_force` kept: (product_id, image_version) -> decided category."""
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        return in_force(pq.read_table(f))
