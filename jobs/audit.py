"""Audit a manifest before training or before trusting a night: duplicate products (exact and
near), suspected wrong categories and outlier images, as Parquet tables and one HTML report."""

from __future__ import annotations

import json
import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import AuditConfig, parse_args

PROG = "python -m jobs.audit"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(AuditConfig, argv, __doc__, PROG)
    # torch, Ray, scikit-learn and cleanlab load only once the arguments are good
    from pipeline.analysis.audit import run

    result = run(cfg)
    logs.summary(result, json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main))
