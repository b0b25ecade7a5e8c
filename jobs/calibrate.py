"""Calibrate a model artifact for decisions: refit its softmax temperature and its keep / change /
review thresholds on held-out labelled rows, scored by the artifact's own backend, and write the
result as a new artifact (same weights, new model_version)."""

from __future__ import annotations

import json
import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import CalibrateConfig, parse_args

PROG = "python -m jobs.calibrate"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(CalibrateConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.training.recalibrate import run

    result = run(cfg)
    logs.summary(result, json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main))
