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

from dataclasses import dataclass, field
from typing import Any

from pipeline.inference.fail_fast import fix_hint
from pipeline.nightly import tables

# A night may always have this many new error rows, whatever its size: one broken image among
# three re-scored rows is a broken image, not an outage.
BUDGET_FREE_ERRORS = 3
# Examples kept per error type in the error sample (kept with a refused night's rows).
SAMPLE_PER_TYPE = 5


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
    con = tables.connect()
    con.register("t", tables.dataset(scored))
    if previous_files:
        con.register("p", tables.dataset(previous_files))
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
