"""Timing a benchmark stage: images, seconds and the peak memory of the whole process tree.

Peak memory is the largest total proportional set size (PSS) of this process and all its
descendants (Ray's raylet, object store and workers included), sampled every 500 ms while a
stage runs, minus the total before it. PSS splits each shared page between the processes that
map it, so torch's libraries and Ray's shared-memory object store count once, not once per
worker as a resident-set (RSS) total would count them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass
class Measurement:
    """One timed stage: images done, seconds, peak memory above the start, throughput units."""

    name: str
    images: int
    seconds: float
    peak_memory_bytes: int
    units: int  # cores (or GPUs) the throughput is divided by
    model: str = ""  # label of the artifact it ran (its format), when several are compared

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def per_unit(self) -> float:
        return self.images_per_s / self.units


class PeakMemory:
    """Samples the PSS total of this process tree in a thread while the block runs."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def tree_pss() -> int:
        """PSS of this process and all its descendants, in bytes."""
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker may exit while we look
                total += proc.memory_full_info().pss  # /proc/<pid>/smaps_rollup
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.tree_pss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.base = self.tree_pss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def measure(name: str, units: int, fn: Callable[[], int], model: str = "") -> Measurement:
    """Run `fn` (it returns the images it did) under a peak-memory sampler and time it."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        images = fn()
        seconds = time.perf_counter() - start
    return Measurement(name + (f" [{model}]" if model else ""), images, seconds, memory.delta,
                       units, model)
