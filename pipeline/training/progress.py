"""A training run's epoch lines, printed by the driver in the job's log format.

Rank 0 puts each epoch's line and numbers on a Ray queue; a thread of the driver prints them
(`pipeline.logs`). A worker's own prints reach the driver prefixed with its actor and pid,
which would break one-JSON-object-per-line, and a scheduler's log reads better with one voice.
"""

from __future__ import annotations

import contextlib
import threading
from queue import Empty
from typing import Any

from pipeline import logs


class EpochLines:
    """The driver's end: `queue` goes to the workers; `close()` prints what is left."""

    def __init__(self) -> None:
        from ray.util.queue import Queue

        # no CPU: it must not take a core from the training workers' placement group
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._print, name="epoch-lines", daemon=True)
        self._thread.start()

    def _print(self) -> None:
        while not self._done.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float | None) -> None:
        try:
            item = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except Empty:
            return
        except Exception:  # the queue's actor gone with Ray: nothing left to print
            self._done.set()
            return
        logs.event(item["event"], item["text"], **item["fields"])

    def close(self) -> None:
        """Stop the printing thread and print the lines still queued."""
        self._done.set()
        self._thread.join()
        while True:
            try:
                item = self.queue.get_nowait()
            except Exception:  # Empty, or the queue's actor already gone
                break
            logs.event(item["event"], item["text"], **item["fields"])
        with contextlib.suppress(Exception):  # Ray already stopped: the actor is gone with it
            self.queue.shutdown()


def send(queue: Any | None, event: str, text: str, **fields: Any) -> None:
    """From a worker: one line for the driver to print, or printed here when there is no queue
    (the training loop run outside a Ray Train job)."""
    if queue is None:
        logs.event(event, text, **fields)
        return
    queue.put({"event": event, "text": text, "fields": fields})
