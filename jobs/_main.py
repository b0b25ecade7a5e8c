"""Shared entry-point wrapper: a job's error becomes one line (in the chosen log format) and its
exit code; `--debug` adds the traceback."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from pipeline import logs
from pipeline.errors import ExitCode, PipelineError

# A storage failure that outlived its retries (pipeline.storage) is worth retrying as a whole:
# the exit code of "anything else" (docs/reference.md, "Exit codes").
STORAGE_EXIT_CODE = ExitCode.OTHER


def _last_line(exc: BaseException) -> str:
    """The message of an error, one line (a Ray task error carries the remote traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _fail(code: ExitCode, message: str, exc: BaseException) -> int:
    logs.event("error", f"error: {message}", exit_code=int(code), error=type(exc).__name__,
               message=message)
    if logs.debug():
        traceback.print_exception(exc, file=sys.stderr)
    return int(code)


def job_name(main: Callable) -> str:
    """`jobs.<name>` of a job's main, also when it runs as `python -m jobs.<name>`."""
    module = sys.modules.get(main.__module__)
    spec = getattr(module, "__spec__", None)
    return spec.name if spec is not None else main.__module__


def run_job(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    logs.configure(sys.argv[1:] if argv is None else list(argv), job_name(main))
    try:
        main(argv)
    except PipelineError as exc:
        return _fail(exc.exit_code, str(exc), exc)
    except OSError as exc:
        return _fail(STORAGE_EXIT_CODE, f"storage failed after its retries ({type(exc).__name__}: "
                     f"{_last_line(exc)}); run the same command again: an interrupted night "
                     "resumes its finished chunks", exc)
    except Exception as exc:  # one line, not a library's traceback: --debug shows it
        return _fail(ExitCode.OTHER, f"unexpected {type(exc).__name__}: {_last_line(exc)} (run again "
                     "with --debug for the traceback)", exc)
    return int(ExitCode.SUCCESS)
