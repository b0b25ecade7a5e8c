"""One interface over local disk and object storage: callers pass URIs, fsspec does the rest.

Local paths, file://, s3://, gs:// and https:// differ only in the URI. S3 credentials and
endpoint come from the standard AWS chain (environment, profile, instance role), including
AWS_ENDPOINT_URL for S3-compatible servers.

Every S3 call (manifest, images, model, output files, markers) is retried a bounded number of
times with backoff, on two levels: botocore retries each request (S3_RETRY_MODE,
S3_MAX_ATTEMPTS: jittered exponential backoff, throttling such as 503 SlowDown backed off
harder), and s3fs repeats a whole call that still failed with throttling or a dropped
connection (S3FS_RETRIES, its own backoff). One operation makes at most
S3_MAX_ATTEMPTS x S3FS_RETRIES requests; then its error reaches the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from pipeline.errors import OutputError

# botocore's "standard" retry mode: 500/502/503/504, throttling codes and connection errors are
# retried with delay rand(0, 1) x min(scale x 2^attempt, 20 s), scale 1 for throttling and
# 0.05 otherwise; its retry quota stops retrying when most requests of a client fail. Explicit
# here because the default ("legacy", or AWS_RETRY_MODE/AWS_MAX_ATTEMPTS) varies by machine.
S3_RETRY_MODE = "standard"
S3_MAX_ATTEMPTS = 5  # per request, the first try included
S3FS_RETRIES = 3  # tries of a whole s3fs call (after botocore's) on throttling or a lost connection
S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 60.0  # per socket read, not per object
# Listings are never cached: the run folder is written by other processes (Ray's write tasks),
# and a listing cached before they wrote would say their files do not exist.
S3_OPTIONS: dict[str, Any] = {
    "use_listings_cache": False,
    "config_kwargs": {
        "retries": {"mode": S3_RETRY_MODE, "total_max_attempts": S3_MAX_ATTEMPTS},
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "read_timeout": S3_READ_TIMEOUT_S,
    },
}


def has_scheme(uri: str) -> bool:
    return "://" in uri


def is_local(uri: str) -> bool:
    return not has_scheme(uri) or uri.startswith("file://")


def local_path(uri: str) -> str:
    """Absolute local path of a local URI (plain path or file://)."""
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def normalize(uri: str) -> str:
    """Absolute local path for local URIs; object-store URIs unchanged (minus a trailing slash)."""
    return local_path(uri) if is_local(uri) else uri.rstrip("/")


def join(base: str, *parts: str) -> str:
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def parent(uri: str) -> str:
    if is_local(uri):
        return os.path.dirname(local_path(uri))
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def resolve(uri: str, base: str) -> str:
    """Resolve a possibly relative URI against `base` (a folder URI), as manifests require."""
    if has_scheme(uri) or os.path.isabs(uri):
        return uri
    return join(base, uri)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for a URI (S3 with S3_OPTIONS)."""
    uri = normalize(uri)
    if not uri.startswith(("s3://", "s3a://")):
        return url_to_fs(uri)
    fs, path = url_to_fs(uri, **S3_OPTIONS)
    fs.retries = S3FS_RETRIES  # an attribute of the class, not an option of s3fs's constructor
    return fs, path


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem (wrapping fsspec) for Ray Data and pyarrow readers and writers."""
    fs, path = filesystem(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a part:
    locally through a temporary file and rename; an object-store PUT is atomic already."""
    fs, path = filesystem(uri)
    if is_local(uri):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    # One PUT call (retried as a whole), not a file object whose failed close is tried again
    # when the object is collected.
    fs.pipe_file(path, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = True) -> None:
    if is_local(uri):
        # Not fsspec's LocalFileSystem.rm: it compares every folder it removes with
        # os.getcwd(), which raises once the process's current folder is deleted, as a Ray
        # job's unpacked --working-dir can be under it (docs/guarantees.md).
        path = local_path(uri)
        if os.path.isdir(path) and not os.path.islink(path):
            if not recursive:
                raise IsADirectoryError(f"{path} is a folder; pass recursive=True")
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def remove_if_empty(uri: str) -> None:
    """Remove a local folder that holds nothing (object stores have no empty folders). A
    folder another run has just written into stays: rmdir refuses a non-empty folder."""
    if is_local(uri):
        with contextlib.suppress(OSError):  # not empty, or already gone
            os.rmdir(local_path(uri))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files under a folder URI (recursively), as full URIs, sorted."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    found = sorted(p for p in fs.find(path) if p.endswith(suffix))
    if is_local(uri):
        return found
    scheme = uri.split("://", 1)[0]
    return [f"{scheme}://{p}" for p in found]


def move(src: str, dst: str) -> None:
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if is_local(src):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
    fs.mv(src_path, dst_path)


def point_link(link: str, target: str) -> None:
    """Atomically make local `link` a symlink to `target` (relative to the link's folder)."""
    link = local_path(link)
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)  # a real folder from an older layout: replaced once
    tmp = f"{link}.{uuid.uuid4().hex[:8]}.tmp"
    os.symlink(target, tmp)
    os.replace(tmp, link)


def list_dirs(uri: str) -> list[str]:
    """Names of the sub-folders of a folder URI (empty when it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)
                  if fs.isdir(p))


def check_writable(uri: str) -> None:
    """Fail early, before any work, when the output location cannot be written."""
    # A name of its own: two runs probing one output at once must not remove each other's probe.
    probe = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(uri)
        write_bytes(probe, b"ok")
        remove(probe, recursive=False)
    except Exception as exc:  # any backend error means the same thing to the user
        raise OutputError(f"output location {uri!r} is not writable: {exc}") from exc
