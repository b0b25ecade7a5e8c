"""Feature-extraction route: embed images with a fixed backbone on Ray Data, fit a logistic
regression on the embeddings, and export it as a model artifact the nightly job runs."""

from __future__ import annotations

import json
import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import EmbedConfig, parse_args

PROG = "python -m jobs.embed"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(EmbedConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.training.embeddings import run

    summary = run(cfg)
    summary.pop("config", None)
    logs.summary(summary, json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main))
