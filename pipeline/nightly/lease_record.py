"""What a lease file holds (`LeaseRecord`), and the messages that name its holder."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import asdict, dataclass

from pipeline.errors import OutputError


def utc_now() -> dt.datetime:
    """Now, in UTC (the lease's times are compared across hosts)."""
    return dt.datetime.now(dt.UTC)


def iso(t: dt.datetime) -> str:
    """A lease time as written in the file."""
    return t.isoformat(timespec="seconds")


@dataclass
class LeaseRecord:
    """What the lease file holds."""

    token: str
    run_id: str | None
    host: str
    pid: int
    acquired_at: str
    renewed_at: str
    expires_at: str
    heartbeat_s: float
    # Counts this holder's writes, so every write has new content (hence a new version) even
    # when two fall in the same second.
    writes: int

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or utc_now()) >= dt.datetime.fromisoformat(self.expires_at)

    def holder_gone(self) -> bool:
        """The holder ran on this host and its process no longer exists. (A reused pid reads
        as alive: the lease then waits for its expiry, never the other way round.)"""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, uri: str) -> LeaseRecord:
        try:
            fields = json.loads(data)
            record = cls(**{k: fields[k] for k in cls.__dataclass_fields__})
            record.expired()
        except (ValueError, KeyError, TypeError) as exc:
            raise OutputError(f"{uri} is not a lease this job wrote ({exc!r}); if no run is "
                              "writing the output, remove it and start again") from exc
        return record


def busy_message(output: str, uri: str, holder: LeaseRecord) -> str:
    who = f"run {holder.run_id}" if holder.run_id else "a run (its run id not yet chosen)"
    return (f"output {output!r} is being written by another run: {who} on host {holder.host} "
            f"(pid {holder.pid}), since {holder.acquired_at}. Its lease {uri} expires at "
            f"{holder.expires_at} unless that run renews it (every {holder.heartbeat_s:.0f} s "
            "while it lives); once expired, the next run takes it over by itself. Wait for that "
            "run to finish, or, if that process is known to be dead, remove the lease file and "
            "start again")


def lost_message(output: str, uri: str, taker: LeaseRecord) -> str:
    who = f"run {taker.run_id}" if taker.run_id else "another run"
    return (f"output {output!r}: this run's lease {uri} expired and was taken over by {who} on "
            f"host {taker.host} (pid {taker.pid}) at {taker.acquired_at}; this run stalled past "
            "its lease and stops without committing. Its rows stay staged; start it again once "
            "the other run is done")
