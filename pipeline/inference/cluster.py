"""Joining Ray and placing work on a heterogeneous cluster.

A local in-process Ray by default, a cluster when RAY_ADDRESS or --ray-address says so: the same
job code runs on a laptop and under `ray job submit`. On a cluster, fetch/decode tasks ask only
for CPUs (optionally a custom resource that pins them to the CPU pool) and inference actors ask
for a GPU plus their CPUs, so decode spreads over cheap CPU nodes while GPU nodes run the model.
Whether a GPU node really has CUDA is only known on that node, so the inference actor checks it
there and either falls back to CPU (when allowed) or fails the job with a message naming the node.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from pipeline import errors
from pipeline.errors import PipelineError
from pipeline.inference import console
from pipeline.inference.device import resolve_device

GPU_POLL_S = 5.0
WORKER_SETUP_HOOK = "pipeline.inference.worker_setup.quiet_local_worker"
ACTOR_ERROR_LINE = re.compile(r"^pipeline\.errors\.(\w+): (.+)$", re.MULTILINE)


# Ray 2.60 turns token authentication on for a new local cluster and logs a warning saying so
# (with how to opt out). The private in-process Ray of a job keeps that secure default; the
# warning is all we drop.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray's workers (reads, repartitions, writes) allocate many small Arrow buffers; Arrow's default
# jemalloc pool kept their high-water mark, so peak memory grew with the catalog (BENCHMARKS.md,
# "Memory"). cluster.yaml sets the same variable on every node.
WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}

# Ray keeps a task's return value in its owner's (the driver's) own heap when it is smaller than
# `max_direct_call_object_size` (100 KiB by default). Ray Data's scored blocks are that small at
# the usual batch sizes, so each one passed through the driver's heap and its native memory grew
# with the catalog (BENCHMARKS.md, "Catalog scale"). Below this bound only block metadata and
# write results stay inline; blocks go to the object store. NODE_ENV sets the same on a cluster.
INLINE_OBJECT_MAX_BYTES = 8 * 1024
# What every node of a cluster gets before `ray start` (cluster.yaml, deploy/rayjob.yaml).
NODE_ENV = {**WORKER_ENV, "RAY_max_direct_call_object_size": str(INLINE_OBJECT_MAX_BYTES)}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    quiet = console.plain_env()  # off a terminal: no colours, no progress bars (console.py)
    for name, value in quiet.items():
        os.environ.setdefault(name, value)  # what the user set wins
    console.quiet_ray_data()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        leave_working_dir()
    else:
        # "local" always starts a private Ray: a bare ray.init() would attach to any cluster a
        # `ray start` left running on this machine.
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING,
                 include_dashboard=False,
                 _system_config={"max_direct_call_object_size": INLINE_OBJECT_MAX_BYTES},
                 runtime_env={"env_vars": {**WORKER_ENV, **quiet},
                              "worker_process_setup_hook": WORKER_SETUP_HOOK})


def leave_working_dir() -> None:
    """Move a driver that runs in its job's unpacked --working-dir to a folder Ray leaves alone.

    Ray unpacks a working_dir package into the session's runtime_resources folder and, when a
    node's runtime-env agent does not have it cached, removes that folder and unpacks it again
    (`download_and_unpack_package(..., overwrite=True)`). Two nodes on one machine share that
    folder, so the second node's first worker replaces the folder the driver runs in: its
    current directory is then deleted, and os.getcwd() (fsspec's local rm, relative paths)
    raises FileNotFoundError. Paths are absolute from parsing on; this keeps the rest of the
    process (libraries included) away from the deleted folder."""
    if ray.get_runtime_context().runtime_env.working_dir():
        os.chdir(tempfile.gettempdir())


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def wait_for_gpus(needed: float, timeout_s: float) -> float:
    """Ask the autoscaler for `needed` GPUs up front and wait until the cluster has them.

    An autoscaling cluster has no GPU nodes until something asks for one; requesting the whole
    pool at once starts every GPU node together instead of one actor's worth at a time. The
    request is withdrawn once the GPUs are there, so the idle timeout can reclaim them after
    the job. Returns the cluster's GPU count (possibly still short after the timeout).
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * max(1, round(needed)))
    deadline = time.monotonic() + timeout_s
    try:
        while (gpus := cluster_gpus()) < needed and time.monotonic() < deadline:
            time.sleep(GPU_POLL_S)
    finally:
        request_resources(bundles=[])
    return gpus


def cluster_device(requested: str, needed_gpus: float = 0.0, wait_s: float = 0.0) -> str:
    """'cuda' or 'cpu' for a job on Ray, from the cluster's GPUs (`device.resolve_device`).
    With `wait_s`, a job that asks for cuda first asks the autoscaler for `needed_gpus`."""
    gpus = cluster_gpus()
    if requested == "cuda" and gpus < needed_gpus and wait_s > 0:
        gpus = wait_for_gpus(needed_gpus, wait_s)
    hint = (f" after waiting {wait_s:g}s for the autoscaler" if wait_s else
            "; on an autoscaling cluster pass --gpu-wait-s so the job asks for GPU nodes first")
    return resolve_device(requested, gpus, "the Ray cluster", hint)


def _error_in_actor_text(text: str) -> PipelineError | None:
    """A dead actor keeps its creation-task exception only as traceback text (so does a map
    function's exception wrapped by Ray Data); its line `pipeline.errors.<Class>: <message>`
    names one of our errors."""
    found = None
    for match in ACTOR_ERROR_LINE.finditer(text):
        cls = getattr(errors, match.group(1), None)
        if isinstance(cls, type) and issubclass(cls, PipelineError):
            found = cls(match.group(2).strip())
    return found


def job_error(exc: BaseException) -> PipelineError | None:
    """The PipelineError a Ray task or actor raised, dug out of Ray's wrappers, if any."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    texts: list[str] = []
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, PipelineError) and not isinstance(err, ray.exceptions.RayError):
            return err
        if isinstance(err, ray.exceptions.RayActorError) and err.actor_init_failed:
            found = _error_in_actor_text(err.error_msg)
            if found is not None:
                return found
        if isinstance(err, ray.exceptions.RayTaskError):
            texts.append(str(err))
        todo += [err.__cause__, err.__context__, getattr(err, "cause", None)]
    # Ray Data wraps an exception raised by a map function in a UserCodeException, and the
    # original (its __cause__ on the worker) reaches the driver only as traceback text.
    for text in texts:
        if (found := _error_in_actor_text(text)) is not None:
            return found
    return None


@contextmanager
def surface_job_errors() -> Iterator[None]:
    """Re-raise a job-level error raised inside a Ray worker as itself (message, exit code)
    instead of a Ray traceback, chained to the original."""
    try:
        yield
    except Exception as exc:
        found = job_error(exc)
        if found is None or found is exc:
            raise
        raise type(found)(*found.args) from exc
