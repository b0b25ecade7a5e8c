"""Set-up that every worker of a job's private local Ray runs at start (Ray's
`worker_process_setup_hook`). It imports nothing heavy: every worker pays for it."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

# Ray Train 2.60 starts a PlacementGroupCleaner actor that asks the State API, every few
# seconds, whether the training controller is alive. The State API is served by the dashboard,
# which a job's private local Ray does not start, so every query fails with a warning ("Failed
# to query Ray Train Controller actor state"), dozens per run. The cleaner guards against a
# controller that dies while its cluster lives on; a private Ray dies with the job, so there is
# nothing to guard and its warnings are noise.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# Ray Train's own DatasetManager sets `ExecutionOptions.exclude_resources`, which Ray Data 2.60
# deprecates: a warning about Ray's code that no user of this project can act on.
EXCLUDE_RESOURCES_WARNING = r".*ExecutionOptions\.exclude_resources.*"


# Ray Train 2.60's worker logs "Reporting training result N: TrainingReport(...)" at INFO for
# every epoch, on a logger named after its source file (so RunConfig's LoggingConfig, which
# filters `ray.train` loggers, misses it). The job prints its own line per epoch, with the numbers.
TRAIN_REPORT_MODULE = ("train", "v2", "_internal", "execution", "context.py")


def train_report_logger() -> str:
    """The file-named logger of Ray Train's per-report line, without importing Ray Train."""
    spec = importlib.util.find_spec("ray")
    return os.path.join(os.path.dirname(spec.origin), *TRAIN_REPORT_MODULE) if spec else ""


def quiet_local_worker() -> None:
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    if name := train_report_logger():
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=EXCLUDE_RESOURCES_WARNING)
