"""Joining Ray: a local in-process Ray by default, a cluster when RAY_ADDRESS or --ray-address
says so. The same job code runs on a laptop and under `ray job submit`."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local" always starts a private Ray: a bare ray.init() would attach to any cluster a
        # `ray start` left running on this machine.
        ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING,
                 include_dashboard=False)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def cpu_count() -> int:
    """Cores this process may run on (respects affinity and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
