"""Promote a retrained model: compare it with the current one (MODELS/current) on held-out
labelled rows, and move the pointer only when it is at least as good (top-1 accuracy not lower,
change precision not lower, review load not higher). Every decision is appended to
MODELS/history.jsonl; a refused candidate exits 9 and leaves the pointer as it was."""

from __future__ import annotations

import json
import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import parse_args
from pipeline.config.promote import PromoteConfig

PROG = "python -m jobs.promote"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(PromoteConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.review.promote import run

    result = run(cfg)
    logs.summary(result, json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(run_job(main))
