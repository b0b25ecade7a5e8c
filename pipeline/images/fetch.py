"""Bytes from an image URI, with bounded retries and backoff for transient failures.

Object stores and local files go through fsspec. http(s) goes through a small client of our own
so that every connection is made to an address the URI policy checked (see pipeline.images.security),
redirects are re-checked hop by hop, and the byte limit holds while reading.
"""

from __future__ import annotations

import http.client
import os
import socket
import stat
import time
from urllib.parse import urljoin, urlsplit

from pipeline import storage
from pipeline.errors import ImageError
from pipeline.images.security import Resolver, UriPolicy, scheme_of

RETRIES = 3
BACKOFF_S = 0.2
TIMEOUT_S = 20.0
MAX_REDIRECTS = 3
NOT_FOUND_STATUS = (404, 410)
TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


class TransientError(Exception):
    """A failure worth retrying (5xx, throttling, dropped connection)."""


def _guarded_connection(scheme: str, host: str, port: int, timeout: float, policy: UriPolicy,
                        resolver: Resolver | None) -> http.client.HTTPConnection:
    """A connection whose connect() goes to the address the policy approved."""
    base = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection

    class Guarded(base):  # type: ignore[valid-type, misc]
        def connect(self) -> None:
            address = policy.safe_address(host, port, resolver)
            sock = socket.create_connection((address, port), self.timeout)
            if scheme == "https":
                sock = self._context.wrap_socket(sock, server_hostname=host)
            self.sock = sock

    return Guarded(host, port, timeout=timeout)


def _http_once(uri: str, max_bytes: int, timeout: float, policy: UriPolicy,
               resolver: Resolver | None) -> tuple[int, str | None, bytes]:
    """One GET: (status, redirect location, body). The body is read only on 200."""
    parts = urlsplit(uri)
    if not parts.hostname:
        raise ImageError("fetch_failed", f"URL has no host: {uri}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    conn = _guarded_connection(parts.scheme, parts.hostname, port, timeout, policy, resolver)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"User-Agent": "catalog-recategorizer"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise ImageError("too_large", f"{length} bytes exceeds the {max_bytes}-byte limit")
        body = response.read(max_bytes + 1)
        if length and length.isdigit() and len(body) < int(length):
            raise TransientError(f"connection closed after {len(body)} of {length} bytes")
        return 200, None, body
    except (ConnectionError, http.client.HTTPException) as exc:
        raise TransientError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def _http_get(uri: str, max_bytes: int, timeout: float, policy: UriPolicy,
              resolver: Resolver | None) -> bytes:
    """GET following up to MAX_REDIRECTS redirects, each hop checked against the policy."""
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _http_once(uri, max_bytes, timeout, policy, resolver)
        if status == 200:
            return body
        if status in NOT_FOUND_STATUS:
            raise ImageError("fetch_not_found", f"HTTP {status}")
        if status in TRANSIENT_STATUS:
            raise TransientError(f"HTTP {status}")
        if status in (301, 302, 303, 307, 308) and location:
            uri = urljoin(uri, location)
            if scheme_of(uri) not in ("http", "https"):
                # An object-store URL here would be fetched over plain HTTP: never follow one.
                raise ImageError("fetch_failed", f"not allowed: redirect to a {scheme_of(uri)!r} "
                                 "URL (only http(s) redirects are followed)")
            policy.check_uri(uri)  # schemes (so https -> http only when http is allowed), prefixes
            continue
        raise ImageError("fetch_failed", f"HTTP {status}")
    raise ImageError("fetch_failed", f"more than {MAX_REDIRECTS} redirects")


def _storage_get(uri: str, max_bytes: int) -> bytes:
    if storage.is_local(uri):  # the common case on a local run: skip fsspec's per-file overhead
        # Non-blocking open: a FIFO would otherwise wait for a writer forever, past any timeout.
        fd = os.open(storage.local_path(uri), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("fetch_failed", "not a regular file (a FIFO, device or socket "
                                 "is never read)")
            if st.st_size > max_bytes:
                raise ImageError("too_large", f"{st.st_size} bytes exceeds the {max_bytes}-byte limit")
            return f.read(max_bytes + 1)
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        size = getattr(f, "size", None)
        if size is not None and size > max_bytes:
            raise ImageError("too_large", f"{size} bytes exceeds the {max_bytes}-byte limit")
        data = f.read(max_bytes + 1)
    return data


def _get_once(uri: str, max_bytes: int, timeout: float, policy: UriPolicy,
              resolver: Resolver | None) -> bytes:
    if scheme_of(uri) in ("http", "https"):
        data = _http_get(uri, max_bytes, timeout, policy, resolver)
    else:
        data = _storage_get(uri, max_bytes)
    if len(data) > max_bytes:
        raise ImageError("too_large", f"more than the {max_bytes}-byte limit")
    return data


def fetch_bytes(uri: str, max_bytes: int, retries: int = RETRIES, policy: UriPolicy | None = None,
                resolver: Resolver | None = None, timeout: float = TIMEOUT_S) -> bytes:
    """Read a whole image. The policy is checked first; missing, refused and oversized images
    fail at once, timeouts and transient errors are retried with exponential backoff."""
    policy = policy or UriPolicy()
    policy.check_uri(uri)
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            return _get_once(uri, max_bytes, timeout, policy, resolver)
        except ImageError:
            raise
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ImageError("fetch_not_found", f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:  # socket.timeout too
            if last:
                raise ImageError("fetch_timeout", f"timed out after {retries + 1} tries: {exc}") from exc
        except (ValueError, ImportError, PermissionError) as exc:  # not transient
            raise ImageError("fetch_failed", f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # network, server and throttling errors: retry with backoff
            if last:
                raise ImageError(
                    "fetch_failed", f"{type(exc).__name__} after {retries + 1} tries: {exc}"
                ) from exc
        time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def image_signal(uri: str, policy: UriPolicy | None = None) -> str | None:
    """A cheap change signal of the image at `uri` without reading it: the object store's ETag
    (or size and modification time), a local file's size and modification time. None when the
    store gives none (http(s)), the URI is refused or the image is unreadable: such a row is
    always re-scored, never carried forward on a guess."""
    try:
        (policy or UriPolicy()).check_uri(uri)
        if scheme_of(uri) in ("http", "https"):
            return None
        if storage.is_local(uri):
            st = os.stat(storage.local_path(uri))
            return f"stat:{st.st_size}:{st.st_mtime_ns}"
        fs, path = storage.filesystem(uri)
        info = fs.info(path)
    except (ImageError, OSError, ValueError):
        return None
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    return f"stat:{info.get('size')}:{modified}" if modified is not None else None
