"""One writer per output: a lease taken atomically before a run writes anything.

The lease is one small JSON file, `<output>/_LEASE.json`, naming its holder (run id, host, pid,
a random token), when it was taken and when it expires. It is

- taken by an atomic exclusive create: locally a hard link of a complete temporary file (the
  link fails when the name exists, and a reader never sees a half-written lease); on S3 a PUT
  with `If-None-Match: *`, which only one of any number of concurrent writers wins;
- renewed by a heartbeat thread, each renewal conditional on the lease still being the one this
  holder last wrote (S3: `If-Match` its ETag; locally: its content, compared under an
  advisory lock on the file, then replaced by a rename), so a holder never overwrites a lease
  someone else has taken over;
- taken over once it has expired (the holder crashed or stalled for a whole TTL), or at once
  when its holder ran on this host and its process is gone (a killed night restarted on the same
  machine, as cron or the head node of a cluster does it), with the same conditional write, so
  of two takers exactly one wins;
- deleted, conditionally again, when the run ends, successfully or not.

Expiry is judged on the reader's clock against the time the holder wrote, so hosts' clocks must
agree to well within `LEASE_TTL_S - HEARTBEAT_S`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Protocol

from pipeline import storage
from pipeline.errors import OutputBusyError, OutputError
from pipeline.nightly.lease_record import LeaseRecord, busy_message, iso, lost_message, utc_now

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"  # "_": Parquet readers of the output folder skip it
# How long a lease outlives its last renewal: the longest a crashed run keeps the output locked.
LEASE_TTL_S = 300.0
# How often the holder renews: a few renewals can fail (a slow or throttled store) before the
# lease expires under a live run.
HEARTBEAT_S = 60.0
# Attempts at taking the lease when it changes between reading and writing it (released,
# renewed or taken over by someone else meanwhile).
ACQUIRE_ATTEMPTS = 3
# S3 error codes of a conditional write whose condition did not hold (409: two conditional
# writes to one key at once; S3 asks to read again and retry).
CONDITION_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")


class LeaseConflict(Exception):
    """The lease file is not the version the caller read (changed or removed meanwhile)."""


class LeaseStore(Protocol):
    """Atomic operations on one lease file; a version identifies one write of it."""

    uri: str

    def create(self, data: bytes) -> str:
        """Write the file if it does not exist (raises FileExistsError); returns its version."""

    def read(self) -> tuple[bytes, str] | None:
        """The file's content and version, or None when there is none."""

    def replace(self, data: bytes, version: str) -> str:
        """Overwrite the file if it is still at `version` (else LeaseConflict)."""

    def delete(self, version: str) -> None:
        """Remove the file if it is still at `version` (else LeaseConflict)."""


class LocalLeaseStore:
    """A lease file on a local (or NFS) filesystem. Version: the SHA-256 of its content, which
    holds a fresh renewal time on every write."""

    def __init__(self, uri: str):
        self.uri = uri
        self.path = storage.local_path(uri)

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def _temp(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._temp(data)
        try:
            os.link(tmp, self.path)  # atomic, and fails if the name exists (O_EXCL semantics)
        finally:
            os.unlink(tmp)
        return self._version(data)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, self._version(data)

    @contextlib.contextmanager
    def _locked(self, version: str) -> Iterator[None]:
        """Hold an exclusive lock on the lease file, if it is still at `version` (else
        LeaseConflict). Every write is a rename of a new file over the name, so the lock is on
        one version's inode: a waiter that gets it after the name moved on sees the change."""
        with contextlib.ExitStack() as stack:
            try:  # write mode: NFS emulates flock with write locks
                f = stack.enter_context(open(self.path, "rb+"))
            except FileNotFoundError:
                raise LeaseConflict(self.uri) from None
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                raise LeaseConflict(self.uri) from None
            held = os.fstat(f.fileno())
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino) or \
                    self._version(f.read()) != version:
                raise LeaseConflict(self.uri)
            yield

    def replace(self, data: bytes, version: str) -> str:
        with self._locked(version):
            os.replace(self._temp(data), self.path)
        return self._version(data)

    def delete(self, version: str) -> None:
        with self._locked(version):
            os.unlink(self.path)


class S3LeaseStore:
    """A lease object in S3 (or an S3-compatible store that honours conditional writes), through
    the same s3fs client as the rest of the job. Version: the object's ETag."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, path = storage.filesystem(uri)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> dict:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except FileExistsError:  # s3fs's name for a failed If-None-Match
            raise
        except OSError as exc:
            code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
            if code in CONDITION_CODES or isinstance(exc, FileNotFoundError):
                raise LeaseConflict(self.uri) from exc
            raise
        finally:
            self.fs.invalidate_cache(f"{self.bucket}/{self.key}")

    def create(self, data: bytes) -> str:
        try:
            return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]
        except LeaseConflict as exc:  # 409: another conditional write at the same moment
            raise FileExistsError(self.uri) from exc

    def read(self) -> tuple[bytes, str] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            # One GET gives content and ETag together (a HEAD then a GET could mix versions).
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, version: str) -> str:
        return self._call("put_object", Body=data, IfMatch=version)["ETag"]

    def delete(self, version: str) -> None:
        self._call("delete_object", IfMatch=version)


class UnleasedStore:
    """Stores without a lease implementation here (gs://, ...): every operation succeeds, so
    runs on them behave as before leases existed; a warning says so."""

    def __init__(self, uri: str):
        self.uri = uri
        log.warning("no lease for %s: one writer per output is enforced on local disk and S3 "
                    "only; make sure no two runs write this output at once", uri)

    def create(self, data: bytes) -> str:
        return ""

    def read(self) -> tuple[bytes, str] | None:
        return None

    def replace(self, data: bytes, version: str) -> str:
        return ""

    def delete(self, version: str) -> None:
        return None


def lease_store(output: str) -> LeaseStore:
    uri = storage.join(output, LEASE_FILE)
    if storage.is_local(uri):
        return LocalLeaseStore(uri)
    if uri.startswith("s3://"):
        return S3LeaseStore(uri)
    return UnleasedStore(uri)


class OutputLease:
    """The lease on one output for one run. `hold()` is the usual way in: acquire, renew in
    the background, release at the end."""

    def __init__(self, output: str, run_id: str | None = None, ttl_s: float = LEASE_TTL_S,
                 heartbeat_s: float = HEARTBEAT_S):
        if ttl_s < 0 or heartbeat_s <= 0:
            raise ValueError(f"lease TTL {ttl_s}s and heartbeat {heartbeat_s}s must be positive")
        self.output = output
        self.store = lease_store(output)
        self.ttl = dt.timedelta(seconds=ttl_s)
        self.heartbeat_s = heartbeat_s
        self.record = LeaseRecord(token=uuid.uuid4().hex, run_id=run_id,
                                  host=socket.gethostname(), pid=os.getpid(), acquired_at="",
                                  renewed_at="", expires_at="", heartbeat_s=heartbeat_s,
                                  writes=0)
        self.version: str | None = None  # of the lease file this holder last wrote
        self.lost: LeaseRecord | None = None  # who took the lease over, if the heartbeat saw it
        self._mutex = threading.Lock()  # the heartbeat and the run both renew
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _stamped(self, **changes: Any) -> bytes:
        now = utc_now()
        self.record = LeaseRecord(**{**asdict(self.record), "renewed_at": iso(now),
                                     "expires_at": iso(now + self.ttl),
                                     "writes": self.record.writes + 1, **changes})
        return self.record.to_bytes()

    def _mine(self, current: tuple[bytes, str] | None) -> bool:
        """Whether the lease file is this holder's (say, a write whose reply was lost and that
        the client retried, which then failed its own condition)."""
        if current is None:
            return False
        if LeaseRecord.from_bytes(current[0], self.store.uri).token == self.record.token:
            self.version = current[1]
            return True
        return False

    def acquire(self) -> OutputLease:
        """Take the lease, or raise OutputBusyError naming its live holder."""
        with self._mutex:
            for _ in range(ACQUIRE_ATTEMPTS):
                now = iso(utc_now())
                try:
                    self.version = self.store.create(self._stamped(acquired_at=now))
                    return self
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise OutputError(f"output {self.output!r}: cannot write its lease "
                                      f"{self.store.uri}: {exc}") from exc
                current = self.store.read()
                if current is None:
                    continue  # released meanwhile: try the exclusive create again
                if self._mine(current):
                    return self
                holder = LeaseRecord.from_bytes(current[0], self.store.uri)
                if not holder.expired() and not holder.holder_gone():
                    raise OutputBusyError(busy_message(self.output, self.store.uri, holder))
                try:  # expired: take it over, if it is still the lease just read
                    self.version = self.store.replace(self._stamped(acquired_at=now), current[1])
                    return self
                except LeaseConflict:
                    if self._mine(self.store.read()):
                        return self
            raise OutputBusyError(f"output {self.output!r}: its lease {self.store.uri} changed "
                                  f"{ACQUIRE_ATTEMPTS} times while this run tried to take it; "
                                  "another run is starting on it. Try again later")

    def renew(self, run_id: str | None = None) -> None:
        """Push the expiry out (recording `run_id` once it is known); raise OutputBusyError
        when another run has taken the lease over or it was removed."""
        with self._mutex:
            if self.lost is None:
                changes = {"run_id": run_id} if run_id else {}
                try:
                    self.version = self.store.replace(self._stamped(**changes),
                                                      self.version or "")
                    return
                except LeaseConflict:
                    current = self.store.read()
                if self._mine(current):  # our own write whose reply was lost: write again
                    self.version = self.store.replace(self._stamped(**changes), self.version)
                    return
                self.lost = (LeaseRecord.from_bytes(current[0], self.store.uri) if current
                             else None)
                self.version = None
            if self.lost is None:
                raise OutputBusyError(f"output {self.output!r}: this run's lease "
                                      f"{self.store.uri} was removed while it ran; another run "
                                      "may be writing the output. This run stops without "
                                      "committing; start it again once no other run is active")
            raise OutputBusyError(lost_message(self.output, self.store.uri, self.lost))

    def release(self) -> None:
        """Delete the lease if it is still this holder's (never someone else's)."""
        with self._mutex:
            if self.version is None:
                return
            try:
                self.store.delete(self.version)
            except LeaseConflict:
                current = self.store.read()
                if self._mine(current):
                    self.store.delete(self.version)
            self.version = None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except OutputBusyError:
                return  # the run renews once more before it commits, and stops there
            except (OSError, LeaseConflict) as exc:
                # A store hiccup: the next beat tries again, well inside the TTL.
                log.warning("renewing the lease on %s failed, retrying in %.0f s: %s",
                            self.output, self.heartbeat_s, exc)

    @contextlib.contextmanager
    def hold(self) -> Iterator[OutputLease]:
        """Acquire, renew every `heartbeat_s` in a daemon thread, release on the way out."""
        if self.heartbeat_s >= self.ttl.total_seconds():
            raise ValueError(f"heartbeat {self.heartbeat_s}s must be shorter than the lease TTL "
                             f"{self.ttl.total_seconds()}s")
        self.acquire()
        self._beat = threading.Thread(target=self._heartbeat, name="output-lease",
                                      daemon=True)
        self._beat.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._beat.join()
            try:
                self.release()
            except OSError as exc:  # must not hide the run's own outcome
                log.warning("could not release the lease %s (it expires by itself at %s): %s",
                            self.store.uri, self.record.expires_at, exc)
