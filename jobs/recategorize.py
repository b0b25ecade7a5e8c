"""Re-categorize a catalog: predicted category, confidence and top-k for every product image.

With no arguments it runs the bundled sample catalog through the bundled model. A small night
scores in this process; a larger one, or any night given a cluster (--ray-address or
RAY_ADDRESS, as `ray job submit` sets), runs on Ray.
"""

from __future__ import annotations

import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import RecategorizeConfig, parse_args

PROG = "python -m jobs.recategorize"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(RecategorizeConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.nightly.recategorize import format_summary, run

    summary = run(cfg)
    logs.summary(summary, format_summary(summary))


if __name__ == "__main__":
    sys.exit(run_job(main))
