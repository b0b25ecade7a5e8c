"""Throughput benchmark: model ceiling, decode, our pipeline, the Ray Data docs recipe and a plain
PyTorch loop, side by side on the same catalog and cores. Prints one Markdown table."""

from __future__ import annotations

import sys

from jobs._main import run_job
from pipeline.config import BenchmarkConfig, parse_args

PROG = "python -m jobs.benchmark"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(BenchmarkConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.analysis.benchmark import run_benchmark

    print(run_benchmark(cfg))


if __name__ == "__main__":
    sys.exit(run_job(main))
