"""Set-up that every worker of a job's private local Ray runs at start (Ray's
`worker_process_setup_hook`). It imports nothing heavy: every worker pays for it."""

from __future__ import annotations

import logging
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


def quiet_local_worker() -> None:
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=EXCLUDE_RESOURCES_WARNING)
