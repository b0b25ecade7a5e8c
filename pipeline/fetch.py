"""Bytes from an image URI through fsspec, with bounded retries for transient failures."""

from __future__ import annotations

import time

from pipeline import storage
from pipeline.errors import ImageError

RETRIES = 3
BACKOFF_S = 0.2


def fetch_bytes(uri: str, max_bytes: int, retries: int = RETRIES) -> bytes:
    """Read a whole image; missing files and oversized files are not retried."""
    for attempt in range(retries + 1):
        try:
            fs, path = storage.filesystem(uri)
            with fs.open(path, "rb") as f:
                size = getattr(f, "size", None)
                if size is not None and size > max_bytes:
                    raise ImageError("too_large", f"{size} bytes exceeds the {max_bytes}-byte limit")
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise ImageError("too_large", f"more than the {max_bytes}-byte limit")
            return data
        except ImageError:
            raise
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ImageError("fetch_not_found", f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            if attempt == retries:
                raise ImageError("fetch_timeout", f"timed out after {retries + 1} tries: {exc}") from exc
        except (ValueError, ImportError) as exc:  # unknown protocol, missing backend: not transient
            raise ImageError("fetch_failed", f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # network and server errors: retry with backoff
            if attempt == retries:
                raise ImageError(
                    "fetch_failed", f"{type(exc).__name__} after {retries + 1} tries: {exc}"
                ) from exc
        time.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")
