"""Change signals: each candidate row's image version (ETag, generation, mtime and size) from
a HEAD or stat request, without reading the image. The nightly plan uses them to tell which
products' images changed since the last night (`pipeline.nightly.incremental`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.images.fetch import image_signal
from pipeline.inference.engine import (
    ImageSettings,
    Placement,
    decode_task_cpus,
    numpy_batch,
    retry_args,
)

# Change-signal probes (HEAD / stat) per task and in flight per task: latency-bound requests.
PROBE_BATCH_ROWS = 1024
REMOTE_PROBE_THREADS = 16
# In one process (no Ray), the probe's requests all come from here: more of them in flight.
LOCAL_PROBE_THREADS = 64


class SignalProbe:
    """Ray Data callable: rows with image_uri -> the same rows with `image_version`, the
    store's change signal of each image (no image is read; `fetch.image_signal`)."""

    def __init__(self, images: ImageSettings, threads: int = REMOTE_PROBE_THREADS):
        self.images = images
        self.threads = threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def one(uri: str | None) -> str | None:
            if not uri:
                return None
            return image_signal(storage.resolve(uri, self.images.base_uri), self.images.policy)

        with ThreadPoolExecutor(self.threads) as pool:  # HEAD requests are latency-bound
            versions = list(pool.map(one, batch["image_uri"]))
        return {"product_id": batch["product_id"], "image_version": np.array(versions, dtype=object)}


def probe_signals_local(candidates_uri: str, out_uri: str, images: ImageSettings) -> None:
    """`probe_signals` in this process: the same SignalProbe over the candidates in batches,
    LOCAL_PROBE_THREADS requests in flight, streamed into one Parquet file under out_uri."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(candidates_uri)
    probe = SignalProbe(images, LOCAL_PROBE_THREADS)
    out_fs, out_path = storage.arrow_filesystem(out_uri)
    out_fs.create_dir(out_path, recursive=True)
    writer = None
    try:
        for batch in pads.dataset(path, filesystem=fs, format="parquet").to_batches(
                columns=["product_id", "image_uri"], batch_size=PROBE_BATCH_ROWS):
            table = pa.table(probe(numpy_batch(batch)))
            table = table.cast(pa.schema([("product_id", batch.schema.field("product_id").type),
                                          ("image_version", pa.string())]))
            if writer is None:
                writer = pq.ParquetWriter(f"{out_path}/probed.parquet", table.schema,
                                          filesystem=out_fs)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def probe_signals(candidates_uri: str, out_uri: str, images: ImageSettings,
                  place: Placement) -> None:
    """Write the change signal of every candidate row's image into Parquet under out_uri."""
    import ray.data

    fs, path = storage.arrow_filesystem(candidates_uri)
    ds = ray.data.read_parquet(path, filesystem=fs)
    ds = ds.map_batches(SignalProbe(images), batch_size=PROBE_BATCH_ROWS, batch_format="numpy",
                        num_cpus=decode_task_cpus(place), **retry_args(place, actor=False))
    out_fs, out_path = storage.arrow_filesystem(out_uri)
    ds.write_parquet(out_path, filesystem=out_fs)
