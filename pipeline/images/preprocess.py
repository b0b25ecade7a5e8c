"""Preprocess stage: image_uri -> uint8 image array, or an error row with a typed reason.

A batch in, the same rows out (never fewer): failed rows keep a zero image and status='error'
so they flow through inference untouched and reach the output.

With `record_signal`, a batch without an `image_version` column gets one: the image's change
signal from the store (`fetch.image_signal`, taken before the read), which the nightly job's
next incremental night compares. Other jobs do not pay for the extra stat or HEAD.

With `record_digest`, every row gets `content_hash`: the SHA-256 of the bytes as fetched (the
audit's exact duplicates; null on an error row). Hashing reuses the bytes already read.

With `threads` > 1 the images of a batch are fetched and decoded on a thread pool: Pillow
releases the GIL while it decodes and resizes, so threads scale over cores (BENCHMARKS.md has the
measurement). That is what lets the inference actor decode its own input on CPU-only nodes.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline import storage
from pipeline.errors import ImageError
from pipeline.images.decode import decode_image
from pipeline.images.fetch import RETRIES, TIMEOUT_S, fetch_bytes, image_signal
from pipeline.images.security import UriPolicy

REMOTE_FETCH_THREADS = 16


class Preprocessor:
    """Callable for `Dataset.map_batches` (numpy batches); holds only plain settings."""

    def __init__(self, size: int, base_uri: str, max_bytes: int = 50_000_000,
                 max_pixels: int = 100_000_000, policy: UriPolicy | None = None,
                 fetch_timeout_s: float = TIMEOUT_S, fetch_retries: int = RETRIES, threads: int = 1,
                 record_signal: bool = False, record_digest: bool = False):
        self.size = size
        self.threads = threads
        self.base_uri = base_uri
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.policy = policy or UriPolicy()
        self.fetch_timeout_s = fetch_timeout_s
        self.fetch_retries = fetch_retries
        self.record_signal = record_signal
        self.record_digest = record_digest

    def _load(self, uri: str | None, signal: bool) -> tuple[np.ndarray, str | None, str | None]:
        if not uri:
            raise ImageError("fetch_not_found", "image_uri is empty")
        resolved = storage.resolve(uri, self.base_uri)
        version = image_signal(resolved, self.policy) if signal else None
        data = fetch_bytes(resolved, self.max_bytes, retries=self.fetch_retries,
                           policy=self.policy, timeout=self.fetch_timeout_s)
        digest = hashlib.sha256(data).hexdigest() if self.record_digest else None
        return decode_image(data, self.size, self.max_pixels), version, digest

    def _fetch_all(self, uris: np.ndarray, signal: bool
                   ) -> list[tuple[np.ndarray, str | None, str | None] | ImageError]:
        def one(uri):
            try:
                return self._load(uri, signal)
            except ImageError as exc:
                return exc
            except Exception as exc:  # a row nothing foresaw is that row's error, not the night's
                return ImageError("fetch_failed", f"unexpected {type(exc).__name__}: {exc}")

        remote = any(u and storage.has_scheme(u) and not u.startswith("file://") for u in uris)
        # Object-store and HTTP reads are latency-bound: overlap many. Local decoding is
        # CPU-bound: one thread per core this stage may use.
        threads = min(max(self.threads, REMOTE_FETCH_THREADS if remote else 1), len(uris))
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(one, uris))
        return [one(u) for u in uris]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        uris = batch["image_uri"]
        n = len(uris)
        images = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        status = np.full(n, "ok", dtype=object)
        error_type = np.full(n, None, dtype=object)
        error_message = np.full(n, None, dtype=object)
        signal = self.record_signal and "image_version" not in batch
        versions = np.full(n, None, dtype=object)
        digests = np.full(n, None, dtype=object)
        for i, result in enumerate(self._fetch_all(uris, signal)):
            if isinstance(result, ImageError):
                status[i], error_type[i], error_message[i] = "error", result.error_type, result.message
            else:
                images[i], versions[i], digests[i] = result
        extra = {"image_version": versions} if signal else {}
        if self.record_digest:
            extra["content_hash"] = digests
        return {**batch, **extra, "image": images, "status": status, "error_type": error_type,
                "error_message": error_message}
