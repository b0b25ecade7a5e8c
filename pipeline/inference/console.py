"""Output fit for a scheduler's log: colours and progress bars only on a terminal.

Off a terminal (stderr redirected, as a scheduler captures it) or with `NO_COLOR` set, Ray's
worker-line colours, Ray Data's progress bars and its per-operator progress lines are turned
off, for the driver and for the workers of a job's private Ray; the job's own lines (its
phases, its summary, one line per training epoch) stay. Imports neither Ray nor torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RAY_DATA_LOGGING = Path(__file__).resolve().parent / "ray_data_logging.yaml"


def plain() -> bool:
    """No colours and no progress bars: stderr is not a terminal, or NO_COLOR is set."""
    return bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty()


def plain_env() -> dict[str, str]:
    """Environment for the driver and a private Ray's workers when `plain()`, else none."""
    if not plain():
        return {}
    return {"RAY_COLOR_PREFIX": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING)}


def quiet_ray_data() -> None:
    """After `import ray.data` in the driver: its context and console logging, when plain."""
    if not plain():
        return
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and \
                not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
