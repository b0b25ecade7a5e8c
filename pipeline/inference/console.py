"""Output fit for a scheduler's log: colours and progress bars only on a terminal.

Off a terminal (stderr redirected, as a scheduler captures it) or with `NO_COLOR` set, Ray's
worker-line colours, Ray Data's progress bars and its per-operator progress lines are turned
off, for the driver and for the workers of a job's private Ray; the job's own lines (its
phases, its summary, one line per training epoch) stay. Imports neither Ray nor torch.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

RAY_DATA_LOGGING = Path(__file__).resolve().parent / "ray_data_logging.yaml"


def plain() -> bool:
    """No colours and no progress bars: stderr is not a terminal, or NO_COLOR is set."""
    return bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty()


def logging_config_copy() -> str:
    """The logging config, copied out of the package to this machine's temporary folder: Ray
    Data reads it whenever a process first imports it, and under `ray job submit --working-dir`
    the package folder can be unpacked again (briefly gone) under a running driver."""
    data = RAY_DATA_LOGGING.read_bytes()
    path = Path(tempfile.gettempdir()) / f"catalog-recategorizer-ray-data-logging-" \
        f"{hashlib.sha256(data).hexdigest()[:12]}.yaml"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def plain_env() -> dict[str, str]:
    """Environment for the driver and a private Ray's workers when `plain()`, else none."""
    if not plain():
        return {}
    return {"RAY_COLOR_PREFIX": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_DATA_LOGGING_CONFIG": logging_config_copy()}


def quiet_ray_data() -> None:
    """After `import ray.data` in the driver: its context and console logging, when plain."""
    if not plain():
        return
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # Its "Progress bars disabled" warning: they were disabled here, on purpose.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and \
                not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
