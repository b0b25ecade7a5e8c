"""The sink interface: what the nightly job asks of every place a night's rows go.

A night walks its sinks in order (`commit_in_order`): each commit makes the night's rows the
sink's current state at once, or fails and leaves the previous night current. A sink committed
later sees what the earlier ones committed (`NightRun.earlier`), so the run folder's `_SUCCESS`
can name the table snapshot it matches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


def no_fence() -> None:
    """The fence of a run that holds no lease (tests, one-off tools): never refuses."""


@dataclass(frozen=True)
class NightRun:
    """One night as its sinks see it at commit time."""

    run_id: str
    # The night's data files (URIs, in the output schema), once written and checked complete.
    files: tuple[str, ...] = ()
    # Recorded with each commit (e.g. the model version in the table's snapshot summary).
    properties: Mapping[str, str] = field(default_factory=dict)
    # Raises when this run no longer holds the output; a sink calls it right before each
    # write that readers can see, so a run that stalled past its lease changes nothing.
    fence: Callable[[], None] = no_fence
    # What the sinks committed before this one, by sink name.
    earlier: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@runtime_checkable
class Sink(Protocol):
    """A place a night's rows become visible to readers."""

    name: str

    def check(self) -> dict[str, Any] | None:
        """Before any work: fail when the sink cannot take this night (unreachable, not
        writable, an incompatible schema). Returns the run it holds now ({"run_id": ...}, at
        least), or None when it holds none."""
        ...

    def commit(self, run: NightRun) -> dict[str, Any]:
        """Make `run`'s rows the current state, in one atomic step; idempotent per run id.
        Returns what was committed (for the run summary)."""
        ...

    def abort(self, run: NightRun) -> None:
        """Drop what this run staged so that, started again, it does not resume; nothing
        committed changes."""
        ...

    def committed_files(self) -> list[str]:
        """URIs of the data files of the current state (what readers read)."""
        ...


def commit_in_order(sinks: list[Sink], run: NightRun,
                    after: Callable[[Sink], None] | None = None) -> dict[str, dict[str, Any]]:
    """Commit each sink in turn; each sees the commits of the sinks before it, and `after`
    (if given) runs once each has committed. A failure stops the walk, so a sink later in the
    list never names a commit that did not land."""
    commits: dict[str, dict[str, Any]] = {}
    for sink in sinks:
        commits[sink.name] = sink.commit(dataclasses.replace(run, earlier=dict(commits)))
        if after is not None:
            after(sink)
    return commits
