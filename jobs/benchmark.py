"""Throughput benchmark: model ceiling, decode, our pipeline, the Ray Data docs recipe and a plain
PyTorch loop, side by side on the same catalog and cores. Prints one Markdown table."""

from __future__ import annotations

import sys

from jobs._main import run_job
from pipeline.benchmark import run_benchmark
from pipeline.config import BenchmarkConfig, parse_args


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(BenchmarkConfig, argv, __doc__)
    print(run_benchmark(cfg))


if __name__ == "__main__":
    sys.exit(run_job(main))
