"""The nightly job's Ray Data plan: manifest -> preprocess (CPU tasks) -> predict (actor pool)
-> format -> Parquet (staged, then committed) -> run summary.

Everything that can be checked before work starts is checked first (config, manifest, model
artifact, output location), so a bad argument fails fast and writes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

from pipeline import storage
from pipeline.artifact import load_metadata
from pipeline.catalog import validate_manifest
from pipeline.config import RecategorizeConfig
from pipeline.outputs import (
    SUMMARY_FILE,
    check_output,
    commit,
    staging_uri,
    summarize,
)
from pipeline.preprocess import Preprocessor

STATS_FILE = "ray_data_stats.txt"
# Decoding a large upload needs a few hundred MB. Declaring it also keeps Ray from fusing the
# decode tasks into the inference actors (fusion needs equal remote args), so decode runs in
# parallel CPU tasks instead of serially inside each model replica.
DECODE_TASK_MEMORY = 256 * 1024**2


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def inference_device(cfg: RecategorizeConfig) -> str:
    from pipeline.cluster import resolve_inference_device

    return resolve_inference_device(cfg)


def inference_threads(cfg: RecategorizeConfig, device: str) -> int:
    """Ray pins OMP_NUM_THREADS to an actor's CPU reservation; a CPU-only model wants more."""
    if cfg.inference_threads:
        return cfg.inference_threads
    if device == "cuda":
        return max(1, int(cfg.cpus_per_actor))
    from pipeline.cluster import cpu_count

    return max(1, cpu_count() // cfg.num_actors)


def run(cfg: RecategorizeConfig) -> dict:
    import ray.data

    from pipeline.cluster import (
        InferenceActor,
        decode_placement,
        inference_placement,
        init_ray,
        surface_job_errors,
    )

    start = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    manifest = validate_manifest(cfg.manifest)
    meta = load_metadata(cfg.model)
    model_uri = storage.normalize(cfg.model)
    output = storage.normalize(cfg.output)
    check_output(output, manifest.uri, meta.model_version, cfg.overwrite)

    init_ray(cfg.ray_address, cfg.num_cpus)
    device = inference_device(cfg)
    fs, path = storage.arrow_filesystem(manifest.uri)
    columns = ["product_id", "image_uri"] + (
        ["current_category"] if manifest.has("current_category") else [])
    ds = ray.data.read_parquet(path, filesystem=fs, columns=columns)
    # A manifest file arrives as a few big blocks, and a decode task handles a whole block:
    # split them (streaming, no shuffle) so decoding fans out over all CPU slots.
    ds = ds.repartition(target_num_rows_per_block=cfg.preprocess_batch_size)
    ds = ds.map_batches(
        Preprocessor(meta.input_size, manifest.base_uri, cfg.max_image_bytes, cfg.max_image_pixels),
        batch_size=cfg.preprocess_batch_size, batch_format="numpy",
        **decode_placement(cfg, DECODE_TASK_MEMORY, device))
    ds = ds.map_batches(
        InferenceActor,
        fn_constructor_kwargs={"model_uri": model_uri, "device": device, "top_k": cfg.top_k,
                               "num_threads": inference_threads(cfg, device),
                               "precision": cfg.precision, "compile": cfg.compile,
                               "allow_cpu_fallback": cfg.allow_cpu_fallback, "run_id": run_id,
                               "review_threshold": cfg.review_threshold},
        batch_size=cfg.batch_size, batch_format="numpy", zero_copy_batch=True,
        **inference_placement(cfg, device))
    staging = staging_uri(output, run_id)
    out_fs, out_path = storage.arrow_filesystem(staging)
    with surface_job_errors():  # e.g. an inference actor on a GPU node without CUDA
        # Writing is I/O: a small CPU request keeps the write from holding a decode slot.
        ds.write_parquet(out_path, filesystem=out_fs, min_rows_per_file=cfg.rows_per_file,
                         ray_remote_args={"num_cpus": 0.1})

    commit(output, run_id, manifest.uri, meta.model_version, manifest.num_rows)
    cfg.save(storage.join(output, "config.yaml"))
    summary = summarize(output, run_id, time.perf_counter() - start, {
        "manifest": manifest.uri, "model": model_uri, "model_name": meta.architecture,
        "model_version": meta.model_version, "device": device,
        "output": storage.join(output, "predictions"),
    })
    storage.write_json(storage.join(output, SUMMARY_FILE), summary)
    # Per-operator wall/CPU time and memory from Ray Data: where this run's time went.
    storage.write_text(storage.join(output, STATS_FILE), ds.stats())
    return summary


def format_summary(summary: dict) -> str:
    return json.dumps(summary, indent=2)
