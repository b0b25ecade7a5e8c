"""Training speed per freezing policy and input size (images/s of one optimizer step), side by
side in one run. Prints one Markdown table."""

from __future__ import annotations

import sys

from jobs._main import run_job
from pipeline.config import TrainBenchmarkConfig, parse_args

PROG = "python -m jobs.train_benchmark"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(TrainBenchmarkConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.training.train_benchmark import run_train_benchmark

    policies = [p.strip() for p in cfg.policies.split(",") if p.strip()]
    sizes = [int(s) for s in cfg.sizes.split(",") if s.strip()]
    print(run_train_benchmark(cfg.model_name, policies, sizes, cfg.batch_size, cfg.steps, cfg.device))


if __name__ == "__main__":
    sys.exit(run_job(main))
