"""The nightly job's Ray Data plan: manifest -> preprocess (CPU tasks) -> predict (actor pool)
-> format -> Parquet (staged, then committed) -> run summary. With CPU inference the actors
run the preprocess step themselves (`cluster.decode_in_actor`).

The manifest is processed in deterministic partitions (crc32 of product_id), one Ray Data
pipeline each; a finished partition is recorded in staging under a key of the run's arguments,
so a killed run started again with the same arguments skips it.

Everything that can be checked before work starts is checked first (config, manifest, model
artifact, output location), so a bad argument fails fast and writes nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
import uuid
import warnings
import zlib

import numpy as np
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.artifact import load_artifact, load_metadata
from pipeline.catalog import Manifest, validate_manifest
from pipeline.config import RecategorizeConfig
from pipeline.errors import ConfigError
from pipeline.outputs import (
    SUMMARY_FILE,
    check_output,
    commit,
    finish_partition,
    partition_done,
    partition_uri,
    publish,
    run_uri,
    staging_uri,
    summarize,
)
from pipeline.preprocess import Preprocessor
from pipeline.security import UriPolicy, safe_name

STATS_FILE = "ray_data_stats.txt"
# Decoding a large upload needs a few hundred MB. Declaring it also keeps Ray from fusing the
# decode tasks into the inference actors (fusion needs equal remote args), so decode runs in
# parallel CPU tasks instead of serially inside each model replica.
DECODE_TASK_MEMORY = 256 * 1024**2
RUN_FILE = "run.json"
# Inference emits one small table per batch. Compacted into blocks of this many rows before the
# write, a write task holds a few large blocks instead of thousands of small ones (Arrow and
# object overhead per block made the writer's memory grow with the catalog).
WRITE_BLOCK_ROWS = 32_768


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def actor_threads(cfg: RecategorizeConfig, device: str, decodes: bool) -> tuple[int, int]:
    """(model threads, decode threads) in each inference actor.

    Ray pins OMP_NUM_THREADS to an actor's CPU reservation, which is too few for a CPU model.
    An actor that decodes its own input splits its cores: half run the model on one batch while
    the other half decode the next. On 2 cores (348 px catalog, 3,000 rows) one model thread
    beside one decode thread gave 677 images/s, two model threads beside it 660 and two beside
    two 596: oversubscribed OpenMP threads wait on each other.
    """
    if device == "cuda":
        return cfg.inference_threads or max(1, int(cfg.cpus_per_actor)), 1
    from pipeline.cluster import cpu_count

    cores = max(1, cpu_count() // cfg.num_actors)
    if not decodes:
        return cfg.inference_threads or cores, 1
    model = cfg.inference_threads or max(1, cores // 2)
    return model, max(1, cores - model)


def partition_of(ids, count: int) -> np.ndarray:
    """A product's partition: crc32(product_id) mod count (stable across processes and
    machines, unlike Python's hash)."""
    return np.fromiter((zlib.crc32(str(p).encode()) % count for p in ids), dtype=np.int64,
                       count=len(ids))


def manifest_partitions(manifest_uri: str, count: int) -> np.ndarray:
    """Rows per partition, streaming product_id in batches (the driver never holds the column)."""
    fs, path = storage.arrow_filesystem(manifest_uri)
    sizes = np.zeros(count, dtype=np.int64)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    for batch in dataset.to_batches(columns=["product_id"], batch_size=1 << 20):
        sizes += np.bincount(partition_of(batch.column(0).to_pylist(), count), minlength=count)
    return sizes


class PartitionFilter:
    """Keeps the rows of one partition (fused into the read tasks by Ray Data)."""

    def __init__(self, partition: int, count: int):
        self.partition, self.count = partition, count

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = partition_of(batch["product_id"], self.count) == self.partition
        return {k: v[keep] for k, v in batch.items()}


def retry_args(cfg: RecategorizeConfig, actor: bool) -> dict:
    """Bounded fault tolerance. Ray Data's defaults retry a lost task and restart a lost actor
    without limit, so an image that crashes its worker every time would hang the run forever.
    These are plain Ray remote args; Ray 2.60 warns they move to named options in 2.64."""
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated",
                            category=DeprecationWarning)
    n = cfg.max_worker_retries
    return {"max_restarts": n, "max_task_retries": n} if actor else {"max_retries": n}


def run_identity(cfg: RecategorizeConfig, manifest_uri: str, model_version: str) -> str:
    """Key of the staging folder: everything that changes the rows of the output. A restart
    with the same arguments over the same manifest files finds its finished partitions."""
    fs, path = storage.filesystem(manifest_uri)
    files = sorted((f, fs.size(f)) for f in (fs.find(path) if fs.isdir(path) else [path]))
    options = cfg.model_dump(include={
        "top_k", "review_threshold", "max_image_bytes", "max_image_pixels", "allowed_uri_schemes",
        "allowed_uri_prefixes", "allowed_networks", "partition_rows", "run_id", "fetch_timeout_s",
        "fetch_retries", "tta"})
    blob = json.dumps({"manifest": manifest_uri, "files": files, "model": model_version,
                       "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def staged_run_id(output: str, identity: str, requested: str | None) -> str:
    """The run id of an interrupted run with this identity, else a new one (recorded)."""
    info = storage.join(staging_uri(output, identity), RUN_FILE)
    if storage.exists(info):
        return storage.read_json(info)["run_id"]
    run_id = safe_name(requested or new_run_id(), "--run-id")
    if storage.exists(run_uri(output, run_id)):
        raise ConfigError(f"--run-id {run_id!r} is already used in output {output!r}; choose another")
    storage.write_json(info, {"run_id": run_id})
    return run_id


def uri_policy(cfg: RecategorizeConfig, manifest_base: str) -> UriPolicy:
    return UriPolicy.from_options(cfg.allowed_uri_schemes, cfg.allowed_uri_prefixes,
                                  cfg.allowed_networks, manifest_base)


def read_manifest(uri: str, columns: list[str]):
    """The manifest as a streaming Ray Dataset.

    Ray 2.60's default Parquet reader (datasource V2) lists files in a separate ListFiles task
    before the read; on a small cluster that task waits for a worker while the inference actors
    start, which put 1.4 s on every run (a 64-row run: 5.2 s -> 3.8 s). The V1 reader lists files
    on the driver and reads in parallel tasks all the same; it is chosen for this read only.
    """
    import ray.data

    fs, path = storage.arrow_filesystem(uri)
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(path, filesystem=fs, columns=columns)
    finally:
        context.use_datasource_v2 = previous


def process_partition(cfg: RecategorizeConfig, manifest: Manifest, meta, device: str, run_id: str,
                      policy: UriPolicy, partition: int, count: int, out_uri: str) -> str:
    """Manifest rows of one partition -> preprocess -> predict -> format -> Parquet in out_uri.
    Returns Ray Data's stats for it."""
    from pipeline.cluster import (
        InferenceActor,
        decode_in_actor,
        decode_placement,
        inference_placement,
        surface_job_errors,
    )

    columns = ["product_id", "image_uri"] + (
        ["current_category"] if manifest.has("current_category") else [])
    ds = read_manifest(manifest.uri, columns)
    if count > 1:
        ds = ds.map_batches(PartitionFilter(partition, count), batch_format="numpy")
    in_actor = decode_in_actor(cfg, device)
    threads, decode_threads = actor_threads(cfg, device, in_actor)
    preprocess = Preprocessor(meta.input_size, manifest.base_uri, cfg.max_image_bytes,
                              cfg.max_image_pixels, policy, cfg.fetch_timeout_s, cfg.fetch_retries,
                              threads=decode_threads)
    # A manifest file arrives as a few big blocks, and a map task handles a whole block: split
    # them (streaming, no shuffle) so the work fans out over all decode tasks or actors.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size if in_actor
                        else cfg.preprocess_batch_size)
    if not in_actor:
        ds = ds.map_batches(
            preprocess, batch_size=cfg.preprocess_batch_size, batch_format="numpy",
            **decode_placement(cfg, DECODE_TASK_MEMORY, device), **retry_args(cfg, actor=False))
    ds = ds.map_batches(
        InferenceActor,
        fn_constructor_kwargs={"model_uri": storage.normalize(cfg.model), "device": device,
                               "top_k": cfg.top_k, "num_threads": threads,
                               "precision": cfg.precision, "compile": cfg.compile,
                               "allow_cpu_fallback": cfg.allow_cpu_fallback, "run_id": run_id,
                               "review_threshold": cfg.review_threshold, "tta": cfg.tta,
                               "preprocess": preprocess if in_actor else None},
        batch_size=cfg.batch_size, batch_format="numpy", zero_copy_batch=True,
        **inference_placement(cfg, device, decodes=in_actor), **retry_args(cfg, actor=True))
    ds = ds.repartition(target_num_rows_per_block=min(WRITE_BLOCK_ROWS, cfg.rows_per_file))
    storage.remove(out_uri)  # what a killed attempt left of this partition
    out_fs, out_path = storage.arrow_filesystem(out_uri)
    with surface_job_errors():  # e.g. an inference actor on a GPU node without CUDA
        # Writing is I/O: a small CPU request keeps the write from holding a decode slot.
        ds.write_parquet(out_path, filesystem=out_fs, min_rows_per_file=cfg.rows_per_file,
                         ray_remote_args={"num_cpus": 0.1})
    return ds.stats()


def run(cfg: RecategorizeConfig) -> dict:
    from pipeline.cluster import init_ray, resolve_inference_device

    start = time.perf_counter()
    manifest = validate_manifest(cfg.manifest)
    meta = load_artifact_checked(cfg.model)
    model_uri = storage.normalize(cfg.model)
    output = storage.normalize(cfg.output)
    policy = uri_policy(cfg, manifest.base_uri)
    if cfg.run_id:
        safe_name(cfg.run_id, "--run-id")
    check_output(output, manifest.uri, meta.model_version, cfg.overwrite)

    identity = run_identity(cfg, manifest.uri, meta.model_version)
    run_id = staged_run_id(output, identity, cfg.run_id)
    count = max(1, math.ceil(manifest.num_rows / cfg.partition_rows))
    sizes = manifest_partitions(manifest.uri, count) if count > 1 else [manifest.num_rows]
    todo = [p for p in range(count) if not partition_done(output, identity, p)]
    device = "cpu"
    if todo:
        init_ray(cfg.ray_address, cfg.num_cpus)
        device = resolve_inference_device(cfg)
    stats = []
    for p in todo:
        stats.append(f"partition {p} of {count}\n" + process_partition(
            cfg, manifest, meta, device, run_id, policy, p, count, partition_uri(output, identity, p)))
        finish_partition(output, identity, p, int(sizes[p]))

    marker = commit(output, identity, run_id, manifest.uri, meta.model_version, manifest.num_rows)
    folder = run_uri(output, run_id)
    cfg.save(storage.join(folder, "_config.yaml"))
    summary = summarize(output, run_id, time.perf_counter() - start, {
        "manifest": manifest.uri, "model": model_uri, "model_name": meta.architecture,
        "model_version": meta.model_version, "device": device,
        "output": folder, "partitions": count, "partitions_resumed": count - len(todo),
    })
    storage.write_json(storage.join(folder, "_summary.json"), summary)
    publish(output, marker)
    cfg.save(storage.join(output, "config.yaml"))
    storage.write_json(storage.join(output, SUMMARY_FILE), summary)
    # Per-operator wall/CPU time and memory from Ray Data: where this run's time went.
    storage.write_text(storage.join(output, STATS_FILE), "\n\n".join(stats))
    return summary


def load_artifact_checked(model: str):
    """Metadata of a model artifact whose weights were verified on the driver, so a missing or
    corrupt artifact stops the job here rather than failing every inference actor."""
    meta = load_metadata(model)
    load_artifact(model, "cpu")
    return meta


def format_summary(summary: dict) -> str:
    return json.dumps(summary, indent=2)
