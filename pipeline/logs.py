"""The jobs' own lines: text for a person, or one JSON object per line for a log store.

`--log-format json` (or `CATALOG_LOG_FORMAT=json` for every job a scheduler starts) makes every
line a job prints one JSON object: the events on stderr (`phase`, `epoch`, `warning`, `error`),
the summary on stdout (`summary`). Each carries `ts`, `event`, `job` and, once known, `run_id`.
The format travels in the environment so Ray workers (a training run's epoch line) use it too.
Imports nothing heavy.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from typing import Any, TextIO

FORMATS = ("text", "json")
FORMAT_ENV = "CATALOG_LOG_FORMAT"
DEBUG_ENV = "CATALOG_DEBUG"
_bound: dict[str, Any] = {}


def configure(argv: list[str], job: str) -> None:
    """Read `--log-format` and `--debug` from a job's arguments before anything else, so even an
    error in the arguments is printed in the chosen format (the parser validates them again)."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--log-format=") else \
            argv[i + 1] if arg == "--log-format" and i + 1 < len(argv) else None
        if value in FORMATS:
            os.environ[FORMAT_ENV] = value
        if arg == "--debug":
            os.environ[DEBUG_ENV] = "1"
    _bound.clear()
    _bound["job"] = job


def json_lines() -> bool:
    """Whether lines are JSON objects (`--log-format json`)."""
    return os.environ.get(FORMAT_ENV) == "json"


def debug() -> bool:
    """Whether `--debug` was given: errors show their traceback."""
    return os.environ.get(DEBUG_ENV) == "1"


def bind(**fields: Any) -> None:
    """Fields every later line of this process carries (the run id, once it is chosen)."""
    _bound.update(fields)


def _write(stream: TextIO, event: str, text: str, fields: dict[str, Any]) -> None:
    if json_lines():
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        line = json.dumps({"ts": now, "event": event, **_bound, **fields}, default=str,
                          separators=(",", ":"))
    else:
        line = text
    print(line, file=stream, flush=True)


def event(name: str, text: str, **fields: Any) -> None:
    """One line on stderr: `text` for a person, or `{"event": name, **fields}`."""
    _write(sys.stderr, name, text, fields)


def warning(message: str, **fields: Any) -> None:
    """A warning the user can act on, once, on stderr."""
    _write(sys.stderr, "warning", f"warning: {message}", {"message": message, **fields})


def summary(result: dict[str, Any], text: str) -> None:
    """The job's result on stdout: `text` (usually indented JSON), or one `summary` line."""
    _write(sys.stdout, "summary", text, result)
