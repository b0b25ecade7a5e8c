"""The audit's output tables: file names, schemas, and the products they flag.

Kept apart from `pipeline.analysis.audit` (which imports the embedding route, and through it torch) so
that training can read an audit's findings (`jobs.train --exclude`) without an import cycle.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import ConfigError

DUPLICATES_FILE = "duplicates.parquet"
LABEL_ISSUES_FILE = "label_issues.parquet"
OUTLIERS_FILE = "outliers.parquet"
ERRORS_FILE = "errors.parquet"
REPORT_FILE = "report.html"
SUMMARY_FILE = "audit_summary.json"

DUPLICATES_SCHEMA = pa.schema([("product_id", pa.string()), ("duplicate_of", pa.string()),
                               ("kind", pa.string()), ("similarity", pa.float32())])
LABEL_ISSUES_SCHEMA = pa.schema([("product_id", pa.string()), ("given_category", pa.string()),
                                 ("suggested_category", pa.string()), ("score", pa.float32()),
                                 ("flagged", pa.bool_()), ("reason", pa.string())])
OUTLIERS_SCHEMA = pa.schema([("product_id", pa.string()), ("score", pa.float32()),
                             ("flagged", pa.bool_())])
ERRORS_SCHEMA = pa.schema([("product_id", pa.string()), ("image_uri", pa.string()),
                           ("error_type", pa.string()), ("error_message", pa.string())])


def _read(audit_dir: str, name: str, option: str) -> pa.Table:
    uri = storage.join(audit_dir, name)
    try:
        return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    except FileNotFoundError as exc:
        raise ConfigError(f"{option} {audit_dir}: no {name} there; give the --output folder of a "
                          "finished `python -m jobs.audit` run") from exc


def flagged_products(audit_dir: str, option: str = "--exclude") -> dict[str, set[str]]:
    """The product ids an audit flags, by finding: every duplicate except its group's
    representative, the suspected labels, the flagged outliers."""
    duplicates = _read(audit_dir, DUPLICATES_FILE, option)
    labels = _read(audit_dir, LABEL_ISSUES_FILE, option)
    outliers = _read(audit_dir, OUTLIERS_FILE, option)
    return {"duplicates": set(duplicates["product_id"].to_pylist()),
            "label_issues": set(labels.filter(labels["flagged"])["product_id"].to_pylist()),
            "outliers": set(outliers.filter(outliers["flagged"])["product_id"].to_pylist())}
