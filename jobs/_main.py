"""Shared entry-point wrapper: a PipelineError becomes a one-line message and its exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from pipeline.errors import ExitCode, PipelineError

# A storage failure that outlived its retries (pipeline.storage) is worth retrying as a whole:
# the exit code of "anything else" (README, "Scheduling it nightly").
STORAGE_EXIT_CODE = ExitCode.OTHER


def _last_line(exc: BaseException) -> str:
    """The message of an error, one line (a Ray task error carries the remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def run_job(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except OSError as exc:
        print(f"error: storage failed after its retries ({type(exc).__name__}: {_last_line(exc)}); "
              "run the same command again: an interrupted night resumes its finished chunks",
              file=sys.stderr)
        return int(STORAGE_EXIT_CODE)
    return int(ExitCode.SUCCESS)
