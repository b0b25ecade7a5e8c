"""The nightly job's error budget: a night with too many error rows is not published.

Two checks, both exit code 7 (`ErrorBudgetError`), both leave the previous run current:

- Fail fast, inside the single streaming pass: each inference actor counts the rows it formats
  (`FailFast`). When its first rows are all errors of one type (every row refused by the URI
  policy, every fetch denied because credentials expired) it raises `FailFastError`, and the job
  stops before scoring the rest. Rows that were already errors in the committed run are not
  counted, so a quiet night that only re-tries the catalog's known broken images goes on.
- The budget, after the pass and before any commit (`check_budget`): the night's new error rows
  against `--max-error-rate` of the rows it scored. Carried rows are never errors, and rows that
  were errors in the committed run at the same image_uri (they are re-scored every night) do not
  count on either side, so a catalog's steady share of broken images does not trip it every
  night, while a night whose few re-scored rows all fail does.

Each refusal names the rate, the budget, the main error type with an example, and the option or
credential that fixes it (`fix_hint`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import FailFastError
from pipeline.nightly.incremental import KNOWN_ERROR_COLUMN, _connect, _dataset

# A night may always have this many new error rows, whatever its size: one broken image among
# three re-scored rows is a broken image, not an outage.
BUDGET_FREE_ERRORS = 3
# Examples kept per error type in the run folder's error sample.
SAMPLE_PER_TYPE = 5
ERROR_SAMPLE_FILE = "_errors.json"
# Fail fast once the first FAIL_FAST_ROWS rows (or FAIL_FAST_SHARE of the night, if fewer) are
# all errors of one type, split over the actors; never judged on fewer than FAIL_FAST_MIN_ROWS
# rows per actor, so a handful of broken images at the start of a night is not an outage.
FAIL_FAST_ROWS = 2000
FAIL_FAST_SHARE = 0.01
FAIL_FAST_MIN_ROWS = 20

# What fixes each kind of mass failure, most specific first: (error type or None, words in the
# message, fix).
HINTS: tuple[tuple[str | None, tuple[str, ...], str], ...] = (
    ("fetch_failed", ("outside the allowed prefixes",),
     "if the images live elsewhere on purpose, name that place with --allowed-uri-prefixes "
     "(e.g. --allowed-uri-prefixes s3://bucket/images/,/data/images/)"),
    ("fetch_failed", ("not in the allowed schemes", "scheme"),
     "add the scheme with --allowed-uri-schemes"),
    ("fetch_failed", ("non-public",),
     "if the image host is internal on purpose, add its network with --allowed-networks"),
    (None, ("403", "AccessDenied", "Forbidden", "ExpiredToken", "InvalidAccessKeyId",
            "SignatureDoesNotMatch", "credential", "401", "NoCredentials"),
     "check the image store's credentials (AWS_* environment, ~/.aws, instance role): they may "
     "be missing or expired"),
    ("fetch_timeout", (), "the image store is slow or unreachable from the workers: check it, or "
     "raise --fetch-timeout-s / --fetch-retries"),
    ("fetch_not_found", (), "check that image_uri values point at existing images: relative "
     "URIs resolve against the manifest's folder"),
    ("too_large", (), "raise --max-image-bytes or --max-image-pixels if such images are expected"),
    ("fetch_failed", (), "check that the image store is up and reachable from the workers, and "
     "its credentials"),
)
DEFAULT_HINT = "check the manifest's image_uri values and the images they point at"


def fix_hint(error_type: str | None, message: str | None) -> str:
    """The option or credential most likely to fix a mass failure of this kind."""
    text = (message or "").lower()
    for kind, words, hint in HINTS:
        if kind not in (None, error_type):
            continue
        if not words or any(w.lower() in text for w in words):
            return hint
    return DEFAULT_HINT


# The most failed rows a job lists to name the dominant error type (a sample is enough).
FAILURE_SAMPLE_ROWS = 10_000


def mass_failure(error_types, messages, rows: int, what: str,
                 failed_rows: int | None = None) -> str | None:
    """When more than half of `rows` could not be read: one line naming how many, the dominant
    error type with an example and the fix, as the nightly job's fail-fast does. `error_types`
    and `messages` are the failed rows' (ok rows' are None), or a sample of them with
    `failed_rows` the count; None when most rows were read."""
    failed = [(str(t), str(m)) for t, m in zip(error_types, messages, strict=True)
              if isinstance(t, str)]
    count = len(failed) if failed_rows is None else failed_rows
    if not rows or not failed or count * 2 <= rows:
        return None
    counts: dict[str, int] = {}
    for kind, _ in failed:
        counts[kind] = counts.get(kind, 0) + 1
    kind = max(counts, key=lambda k: counts[k])
    example = next(m for t, m in failed if t == kind)
    return (f"{count} of {rows} {what} could not be read; most failed as {kind} (e.g. "
            f"{example}): {fix_hint(kind, example)}")


def fail_fast_rows(rows_to_score: int, actors: int) -> int:
    """Rows each actor looks at before it may fail fast (see FAIL_FAST_*)."""
    night = min(FAIL_FAST_ROWS, math.ceil(FAIL_FAST_SHARE * rows_to_score))
    return max(FAIL_FAST_MIN_ROWS, math.ceil(night / max(1, actors)))


@dataclass
class FailFast:
    """Counts an actor's first rows; raises FailFastError once `window` of them (known errors
    left out) are all errors of one type. Any other row ends the watch. Thread-safe: an actor
    that decodes its own input runs two calls at once."""

    window: int
    seen: int = 0
    error_type: str | None = None
    example: dict[str, Any] | None = None
    watching: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, table: pa.Table, known: Any = None) -> None:
        if not self.watching:
            return
        if known is not None:  # rows the committed run already had as errors
            table = table.filter(pc.invert(pa.array(known, pa.bool_())))
        if not table.num_rows:
            return
        types = pc.unique(table.column("error_type")).to_pylist()
        with self.lock:
            if not self.watching:
                return
            one = (len(types) == 1 and types[0] is not None
                   and types[0] == (self.error_type or types[0]))
            if not one:
                self.watching = False
                return
            self.error_type = types[0]
            self.example = self.example or table.slice(0, 1).select(
                ["product_id", "image_uri", "error_message"]).to_pylist()[0]
            self.seen += table.num_rows
            if self.seen < self.window:
                return
            self.watching = False
        ex = self.example
        raise FailFastError(
            f"stopped early: the first {self.seen} rows scored were all {self.error_type} errors "
            f"({ex['error_message']!r}, e.g. product {ex['product_id']!r} at {ex['image_uri']!r}); "
            f"fix: {fix_hint(self.error_type, ex['error_message'])}. Nothing was published; the "
            "previous run stays current")


def known_error_flags(batch: dict[str, Any]) -> Any:
    """The batch's known-error flags, or None when the night's source has no such column."""
    return batch.get(KNOWN_ERROR_COLUMN)


@dataclass
class BudgetCheck:
    """The night's error count against its budget."""

    rows_scored: int
    errors: int
    known_errors: int  # rows scored tonight that were errors in the committed run (same image)
    still_broken: int  # of those, errors again tonight
    max_error_rate: float

    @property
    def judged_rows(self) -> int:
        return self.rows_scored - self.known_errors

    @property
    def new_errors(self) -> int:
        return self.errors - self.still_broken

    @property
    def rate(self) -> float:
        return self.new_errors / self.judged_rows if self.judged_rows else 0.0

    @property
    def allowed(self) -> float:
        return max(self.max_error_rate * self.judged_rows, BUDGET_FREE_ERRORS)

    @property
    def over(self) -> bool:
        return self.max_error_rate < 1 and self.new_errors > self.allowed

    def to_json(self) -> dict[str, Any]:
        return {"rows_scored": self.rows_scored, "errors": self.errors,
                "known_errors": self.known_errors, "still_broken": self.still_broken,
                "new_errors": self.new_errors, "rate": round(self.rate, 6),
                "max_error_rate": self.max_error_rate, "over_budget": self.over}


@dataclass
class NightErrors:
    """Tonight's error rows, split into new ones and ones the committed run already had."""

    known_errors: int = 0  # rows scored tonight that were errors in the committed run
    still_broken: int = 0  # of those, errors again tonight
    new_by_type: dict[str, int] = field(default_factory=dict)
    sample: dict[str, list[dict]] = field(default_factory=dict)  # new errors first


def night_errors(scored: list[str], previous_files: list[str] | None,
                 per_type: int = SAMPLE_PER_TYPE) -> NightErrors:
    """Read tonight's scored files (the run folder's chunk files) against the committed run's
    error rows (same product_id and image_uri): counts and a sample of a few rows per type."""
    if not scored:
        return NightErrors()
    con = _connect()
    con.register("t", _dataset(scored))
    if previous_files:
        con.register("p", _dataset(previous_files))
        con.execute(
            "CREATE TEMP VIEW e AS SELECT t.product_id, t.image_uri, t.status, t.error_type, "
            "t.error_message, coalesce(k.known, false) AS known FROM t LEFT JOIN (SELECT "
            "product_id, image_uri, true AS known FROM p WHERE status <> 'ok') k "
            "USING (product_id, image_uri)")
    else:
        con.execute("CREATE TEMP VIEW e AS SELECT product_id, image_uri, status, error_type, "
                    "error_message, false AS known FROM t")
    counts = con.execute("SELECT count(*) FILTER (WHERE known), "
                         "count(*) FILTER (WHERE known AND status <> 'ok') FROM e").fetchall()[0]
    by_type = dict(con.execute(
        "SELECT coalesce(error_type, 'unknown'), count(*) FROM e WHERE status <> 'ok' AND NOT known "
        "GROUP BY 1 ORDER BY 2 DESC").fetchall())
    rows = con.execute(
        "SELECT error_type, product_id, image_uri, error_message FROM (SELECT *, row_number() "
        "OVER (PARTITION BY error_type ORDER BY known, product_id) AS n FROM e "
        f"WHERE status <> 'ok') WHERE n <= {int(per_type)} ORDER BY error_type, known, product_id"
    ).fetchall()
    sample: dict[str, list[dict]] = {}
    for error_type, product_id, image_uri, message in rows:
        sample.setdefault(error_type or "unknown", []).append(
            {"product_id": product_id, "image_uri": image_uri, "error_message": message})
    return NightErrors(int(counts[0]), int(counts[1]), {str(k): int(v) for k, v in by_type.items()},
                       sample)


def check_budget(rows_scored: int, errors: int, found: NightErrors,
                 max_error_rate: float) -> BudgetCheck:
    return BudgetCheck(rows_scored, errors, found.known_errors, found.still_broken, max_error_rate)


def refusal(check: BudgetCheck, found: NightErrors, folder: str) -> str:
    """The one-line message of a night over budget."""
    by_type = found.new_by_type
    top = max(by_type, key=lambda k: by_type[k]) if by_type else None
    ex = (found.sample.get(top) or [{}])[0] if top else {}
    known = (f" ({check.still_broken} more were already errors in the committed run and are not "
             "counted)" if check.still_broken else "")
    return (f"error budget exceeded: {check.new_errors} of {check.judged_rows} rows scored "
            f"tonight are new errors ({check.rate:.1%}), over --max-error-rate "
            f"{check.max_error_rate:g}{known}; most are {top} ({by_type.get(top, 0)} rows), e.g. "
            f"{ex.get('error_message')!r} for product {ex.get('product_id')!r} at "
            f"{ex.get('image_uri')!r}; fix: {fix_hint(top, ex.get('error_message'))}, or raise "
            f"--max-error-rate if these errors are expected. Nothing was published; the previous "
            f"run stays current; the rows, summary and error sample are kept in {folder}")
