"""The one device resolver: what a job's `--device` (auto, cpu, cuda) means where it runs.

The rule is the same everywhere: 'auto' is cuda when GPUs are there, else cpu; 'cuda' without a
GPU is an error that names the way out. Only the count of GPUs differs: the Ray cluster's
resources for a job on Ray (`cluster.cluster_device`), this machine's CUDA devices for a job in
one process (`local_device`). Imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import os

from pipeline.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str, gpus: float, where: str, hint: str = "") -> str:
    """'cuda' or 'cpu' for `requested` given `gpus` available `where` ('the Ray cluster',
    'this machine'). `cuda:N` names one device of this machine and is kept as given."""
    kind = requested.split(":")[0]
    if kind not in DEVICES:
        raise ConfigError(f"--device {requested!r} is not a device; valid choices: "
                          f"{', '.join(DEVICES)}")
    if kind == "cuda" and gpus == 0:
        raise ConfigError(f"--device {requested} was requested but {where} has no GPUs"
                          f"{hint}; use --device auto (cuda only when there are GPUs) or "
                          "--device cpu")
    if kind == "cuda":
        return requested
    return "cuda" if requested == "auto" and gpus > 0 else "cpu"


def local_gpus() -> int:
    """CUDA devices this process can use."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_device(requested: str) -> str:
    """`requested` resolved against this machine's GPUs (a job scoring in its own process)."""
    return resolve_device(requested, local_gpus(), "this machine")


def cpu_count() -> int:
    """Cores this process may run on (respects affinity and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
