"""Shared entry-point wrapper: a PipelineError becomes a one-line message and its exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.errors import PipelineError


def run_job(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
