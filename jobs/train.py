"""Train a category classifier on Ray Train and export the best epoch as a model artifact."""

from __future__ import annotations

import json
import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import TrainConfig, parse_args

PROG = "python -m jobs.train"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(TrainConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.training.train import run

    summary = run(cfg)
    summary.pop("history", None)
    summary.pop("config", None)
    logs.summary(summary, json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main))
