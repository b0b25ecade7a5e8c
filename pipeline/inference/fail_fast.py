"""Fail fast: an inference actor whose first rows all fail the same way stops the night.

A night whose images are all unreachable (wrong credentials, a moved bucket, a URI policy that
refuses them) would otherwise fetch, retry and time out on every row before the error budget
refuses it. Each actor watches its own first rows; the hints name the likely fix.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import FailFastError
from pipeline.sinks.rows import KNOWN_ERROR_COLUMN

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
