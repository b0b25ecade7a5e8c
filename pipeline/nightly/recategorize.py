"""The nightly job: plan the night, score what changed in one streaming pass, commit.

1. Check everything that can be checked before work starts (config, manifest, model artifact,
   output, warehouse table), so a bad argument fails fast and writes nothing.
2. Plan (`pipeline.nightly.incremental`): against the output's committed run, carry forward the rows of
   products whose image did not change, when the model and the row-affecting options are the
   same; score the rest. `--full`, a new model or new options score everything.
3. Score (`pipeline.inference.engine`): one Ray Data pass over the rows to score, in deterministic chunks,
   with one actor pool; write tasks put each chunk's rows straight into the run folder
   (`pipeline.sinks.parquet`). A killed run started again with the same arguments finds the run
   folder by its staging key and redoes only the chunks that are not complete.
4. Commit: counts come from the writes; the Iceberg table (if any) commits the night's snapshot,
   then `_SUCCESS` publishes the run folder; the summary and the drift report say what changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import json
import sys
import time
import uuid
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.catalog import Manifest, manifest_files, validate_manifest
from pipeline.config import RecategorizeConfig
from pipeline.errors import ConfigError, ErrorBudgetError, FailFastError
from pipeline.images.security import safe_name
from pipeline.inference import engine, fail_fast
from pipeline.inference.engine import choose_executor, local_device, on_cluster
from pipeline.models import decide
from pipeline.models.artifact import verify_artifact
from pipeline.nightly import budget, drift
from pipeline.nightly.chunks import Chunk, ChunkReader, chunk_items, plan_chunks
from pipeline.nightly.incremental import (
    NightPlan,
    load_or_plan,
    options_key,
    plan_night,
)
from pipeline.nightly.lease import OutputLease
from pipeline.sinks import parquet as run_folder
from pipeline.sinks.rows import KNOWN_ERROR_COLUMN, OUTPUT_SCHEMA

STATS_FILE = "ray_data_stats.txt"
DRIFT_FILE = "drift.html"
RUN_FILE = "run.json"
RUN_SUMMARY_FILE = "_summary.json"
# Write tasks gather at least this many rows (fewer, larger files), and at most a chunk's worth,
# so a chunk's rows land on storage soon after they are scored.
WRITE_BLOCK_ROWS = 32_768
# Reading a chunk and writing files is I/O: a small CPU request keeps them from holding a slot
# that decoding or the model needs.
IO_TASK_CPUS = 0.1
TOP_CATEGORIES = 10
REDACTED = "<redacted>"  # categories listed in the printed summary (summary.json has them all)


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def staging_key(cfg: RecategorizeConfig, manifest_uri: str, model_version: str, opts_key: str,
                previous: dict[str, Any] | None) -> str:
    """Everything that decides the rows of this run: a restart with the same arguments over the
    same manifest files against the same committed run finds its work."""
    fs, _ = storage.filesystem(manifest_uri)
    files = [(f, fs.size(f)) for f in manifest_files(manifest_uri)]
    blob = json.dumps({"manifest": manifest_uri, "files": files, "model": model_version,
                       "options": opts_key, "chunk_rows": cfg.chunk_rows,
                       "run_id": cfg.run_id, "full": cfg.full,
                       "previous": (previous or {}).get("run_id")}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def staged_run_id(output: str, key: str, requested: str | None) -> str:
    """The run id of an interrupted run with this key, else a new one (recorded)."""
    info = storage.join(run_folder.staging_uri(output, key), RUN_FILE)
    if storage.exists(info):
        return storage.read_json(info)["run_id"]
    run_id = safe_name(requested or new_run_id(), "--run-id")
    if storage.exists(run_folder.run_uri(output, run_id)):
        raise ConfigError(f"--run-id {run_id!r} is already used in output {output!r}; choose another")
    storage.write_json(info, {"run_id": run_id})
    return run_id


def load_artifact_checked(cfg: RecategorizeConfig):
    """Metadata of a model artifact whose weights were verified on the driver, so a missing or
    corrupt artifact, or an option its backend does not take, stops the job here rather than
    failing every inference actor."""
    from pipeline.inference.predict import check_backend_options

    meta = verify_artifact(cfg.model)
    check_backend_options(meta, cfg.precision, cfg.compile)
    if not meta.decisions:
        print(
            f"warning: model {meta.model_version} has no fitted decision thresholds ('decisions' in "
            f"model.json): rows are decided with conservative defaults ({decide.FALLBACK}), so "
            "most disagreements go to review. Fit them on held-out labelled rows: python -m "
            f"jobs.calibrate --model {cfg.model} --manifest LABELLED_MANIFEST --output NEW_MODEL",
            file=sys.stderr, flush=True)
    return meta


def iceberg_sink(cfg: RecategorizeConfig):
    """The warehouse table sink, checked (catalog reachable, schema compatible) before work."""
    if not cfg.iceberg_table:
        return None
    from pipeline.sinks.iceberg import IcebergSink, parse_catalog_properties

    sink = IcebergSink(cfg.iceberg_table, parse_catalog_properties(cfg.iceberg_catalog or ""))
    sink.check(OUTPUT_SCHEMA)
    return sink


def table_run_split(warehouse, previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """When the table's current snapshot and `_SUCCESS` name different runs (a run stopped
    between its table commit, which comes first, and `_SUCCESS`), say so: this night's commit
    brings both to the same run. None when they agree."""
    if warehouse is None:
        return None
    table_run = warehouse.current_run_id()
    parquet_run = (previous or {}).get("run_id")
    if table_run == parquet_run or table_run is None:
        return None
    print(f"warning: Iceberg table {warehouse.identifier} is at run {table_run} while the "
          f"output's _SUCCESS names run {parquet_run}: a run stopped between its table commit "
          "and its Parquet commit. This night commits both, which brings them together again",
          file=sys.stderr, flush=True)
    return {"table_run_id": table_run, "parquet_run_id": parquet_run}


def source_columns(uri: str, chunks: list[Chunk]) -> list[str]:
    """The columns the night reads from its source (the manifest or the rows to re-score)."""
    fs, _ = storage.arrow_filesystem(uri)
    with fs.open_input_file(chunks[0].path) as f:
        names = pq.read_schema(f).names
    return ["product_id", "image_uri"] + [c for c in ("current_category", "image_version",
                                                      KNOWN_ERROR_COLUMN) if c in names]


def inference_kwargs(cfg: RecategorizeConfig, place: engine.Placement, run_id: str,
                     rows: int, scorers: int | None = None) -> dict:
    """What each scorer (an actor of the pool, or this process) builds its InferenceActor with;
    `rows` to score in all, over `scorers` (default: the largest actor pool) for the fail-fast
    watch."""
    scorers = scorers or engine.actor_pool_bounds(place)[1]
    return {"model_uri": storage.normalize(cfg.model), "device": place.device, "top_k": cfg.top_k,
            "precision": cfg.precision, "compile": cfg.compile,
            "allow_cpu_fallback": cfg.allow_cpu_fallback, "run_id": run_id,
            "review_threshold": cfg.review_threshold, "change_precision": cfg.change_precision,
            "tta": cfg.tta,
            "fail_fast_rows": fail_fast.fail_fast_rows(rows, scorers) if cfg.max_error_rate < 1
            else 0}


def score_chunks(cfg: RecategorizeConfig, source: str, chunks: list[Chunk],
                 images: engine.ImageSettings, place: engine.Placement, run_id: str,
                 folder: str) -> tuple[list[dict], str]:
    """One streaming pass: chunks -> rows -> the scoring engine -> the run folder. Returns what
    the write tasks wrote (file, chunk, rows, stats) and Ray Data's stats of the pass."""
    import ray.data

    from pipeline.inference.cluster import InferenceActor, surface_job_errors

    ds = ray.data.from_items(chunk_items(chunks), override_num_blocks=len(chunks))
    ds = ds.map_batches(ChunkReader(source, source_columns(source, chunks)), batch_size=1,
                        batch_format="pyarrow", num_cpus=IO_TASK_CPUS,
                        **engine.retry_args(place, actor=False))
    ds = engine.scored(ds, images, place, InferenceActor, inference_kwargs(
        cfg, place, run_id, sum(c.rows for c in chunks)))
    sink = run_folder.ChunkSink(folder, min(WRITE_BLOCK_ROWS, cfg.rows_per_file, cfg.chunk_rows))
    stopped: FailFastError | None = None
    try:
        with surface_job_errors():  # e.g. an inference actor on a GPU node without CUDA
            ds.write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    except FailFastError as exc:
        stopped = FailFastError(*exc.args)
    if stopped is not None:
        # Ray Data frees an aborted pass's actors by reference counting, and the Ray error's
        # traceback holds them in reference cycles: a driver that runs again (a test, a
        # notebook) would wait for their CPUs. Raised unchained, after collecting the cycles.
        del ds
        gc.collect()
        raise stopped
    return sink.written, ds.stats()


def score_local(cfg: RecategorizeConfig, source: str, chunks: list[Chunk],
                images: engine.ImageSettings, place: engine.Placement, run_id: str,
                folder: str) -> list[dict]:
    """The same pass in this process, chunk by chunk into the same run folder files (so resume
    and commit do not know which executor ran). Returns what was written."""
    from pipeline.inference.cluster import InferenceActor

    score = engine.in_process_scorer(images, place, InferenceActor, inference_kwargs(
        cfg, place, run_id, sum(c.rows for c in chunks), scorers=1))
    reader = ChunkReader(source, source_columns(source, chunks))
    sink = run_folder.ChunkSink(folder, cfg.rows_per_file)
    written: list[dict] = []
    for chunk in chunks:
        written += sink.write(score(reader.read(chunk)), None)
    return written


def previous_stats(output: str, previous: dict[str, Any] | None) -> dict | None:
    """Last night's statistics, from its run summary (kept until the night after)."""
    if not previous:
        return None
    uri = storage.join(run_folder.run_uri(output, previous["run_id"]), RUN_SUMMARY_FILE)
    return storage.read_json(uri).get("stats") if storage.exists(uri) else None


class Phases:
    """Wall seconds of each step of the night, in order, for the summary: where a night's
    fixed cost goes (start-up, plan, scoring, commit, report)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        """The time since the previous mark is `name`'s."""
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


def run(cfg: RecategorizeConfig) -> dict:
    """The nightly job. The output's lease, taken once the arguments are checked, is released
    however the night ends."""
    with contextlib.ExitStack() as held:
        return run_night(cfg, held)


def run_night(cfg: RecategorizeConfig, held: contextlib.ExitStack) -> dict:
    start = time.perf_counter()
    phases = Phases()
    from pipeline.inference.cluster import init_ray, resolve_inference_device

    phases.mark("import")
    manifest = validate_manifest(cfg.manifest)
    phases.mark("validate manifest")
    meta = load_artifact_checked(cfg)
    phases.mark("check model")
    output = storage.normalize(cfg.output)
    # The nightly job records each scored image's change signal for the next night's plan.
    images = dataclasses.replace(
        engine.ImageSettings.from_config(cfg, meta.input_size, manifest.base_uri),
        record_signal=True)
    if cfg.run_id:
        safe_name(cfg.run_id, "--run-id")
    previous = run_folder.check_output(output, cfg.overwrite)
    warehouse = iceberg_sink(cfg)
    split = table_run_split(warehouse, previous)
    # One writer per output: a second run stops here (exit 8) before it writes anything.
    lease = held.enter_context(OutputLease(output, cfg.run_id).hold())

    opts = options_key(cfg)
    key = staging_key(cfg, manifest.uri, meta.model_version, opts, previous)
    staging = run_folder.staging_uri(output, key)
    run_id = staged_run_id(output, key, cfg.run_id)
    lease.renew(run_id)  # the lease names the run from here on
    folder = run_folder.run_uri(output, run_id)
    phases.mark("check output")

    @functools.cache
    def on_ray() -> engine.Placement:
        """Start (or join) Ray once, when the night first needs it."""
        init_ray(cfg.ray_address, cfg.num_cpus)
        return engine.Placement.from_config(cfg, resolve_inference_device(cfg))

    plan = load_or_plan(staging, lambda: plan_night(
        manifest, previous, output, model_version=meta.model_version, opts_key=opts,
        full=cfg.full, run_id=run_id, staging=staging, rows_per_file=cfg.rows_per_file,
        probe=lambda src, out: (engine.probe_signals(src, out, images, on_ray())
                                if on_cluster(cfg) or cfg.executor == "ray"
                                else engine.probe_signals_local(src, out, images))))

    chunks = plan_chunks(plan.source, cfg.chunk_rows)
    sizes = [c.rows for c in chunks]
    done = run_folder.finished_chunks(folder, sizes)
    todo = [c for c in chunks if c.index not in done]
    executor, executor_reason = choose_executor(cfg, sum(c.rows for c in todo))
    phases.mark("plan")
    try:
        if executor == "local":
            place = engine.Placement.from_config(cfg, local_device(cfg))
            written, ray_stats = score_local(cfg, plan.source, todo, images, place, run_id,
                                             folder) if todo else [], ""
        else:
            place = on_ray()
            phases.mark("start ray")
            written, ray_stats = score_chunks(cfg, plan.source, todo, images, place, run_id,
                                              folder) if todo else ([], "")
    except ErrorBudgetError:  # failed fast: this attempt's rows are not resumed (see below)
        storage.remove(staging)
        raise
    phases.mark("score")
    listing = run_folder.list_run(folder)
    stats = run_folder.run_stats(folder, listing, written)
    marker = run_folder.commit(output, run_id, listing, sizes, plan.rows_carried,
                               manifest.num_rows, {"manifest": manifest.uri,
                                                   "model_version": meta.model_version,
                                                   "options_key": opts})
    summary = summarize(cfg, manifest, meta, place, plan, marker, stats, len(chunks),
                        len(done), time.perf_counter() - start)
    summary["executor"], summary["executor_reason"] = executor, executor_reason
    if split:
        summary["table_run_split"] = split
    summary["drift"] = drift.drift(previous_stats(output, previous), stats,
                                   plan.new_products, plan.removed_products)
    phases.mark("commit")
    lease.renew()  # a run that stalled past its lease and lost it must not commit
    check_error_budget(cfg, output, folder, staging, listing, marker, previous, summary)
    if warehouse is not None:  # before the Parquet commit: a restart finds this run again
        lease.renew()  # fenced: the table's snapshot is a visible commit too
        summary["iceberg"] = warehouse.commit(run_folder.committed_uris(output, marker), run_id,
                                              {"model_version": meta.model_version})
        # _SUCCESS names the table snapshot it matches: readers (and the next night) can tell
        # whether the table and the Parquet run agree.
        marker["iceberg"] = {"table": summary["iceberg"]["table"],
                             "snapshot_id": summary["iceberg"]["snapshot_id"]}
        phases.mark("iceberg commit")
    storage.write_json(storage.join(folder, RUN_SUMMARY_FILE), summary)
    # Catalog properties can hold credentials: the written config names the table only.
    saved = cfg.model_copy(update={"iceberg_catalog": REDACTED if cfg.iceberg_catalog else None})
    saved.save(storage.join(folder, "_config.yaml"))
    report = drift.render_drift_html(summary["drift"])
    phases.mark("drift report")
    # "_" keeps it out of Parquet readers that read the whole run folder.
    storage.write_text(storage.join(folder, "_" + DRIFT_FILE), report)
    run_folder.publish(output, marker, key, fence=lease.renew)
    saved.save(storage.join(output, "config.yaml"))
    storage.write_text(storage.join(output, DRIFT_FILE), report)
    # Per-operator wall/CPU time and memory from Ray Data: where this run's time went.
    storage.write_text(storage.join(output, STATS_FILE),
                       ray_stats or f"No Ray Data pass: {executor} executor ({executor_reason}).\n")
    phases.mark("publish")
    summary["phases_s"] = phases.seconds
    storage.write_json(storage.join(output, run_folder.SUMMARY_FILE), summary)
    return summary


def check_error_budget(cfg: RecategorizeConfig, output: str, folder: str, staging: str,
                       listing: run_folder.Listing, marker: dict, previous: dict[str, Any] | None,
                       summary: dict[str, Any]) -> None:
    """Before any commit: refuse a night whose new error rows exceed --max-error-rate of the
    rows it scored. A refused night keeps its rows, `_summary.json` and an error sample in its
    run folder, and drops its staging, so started again it scores afresh under a new run id
    rather than resuming into the same refusal (or, once the cause is fixed, publishing the
    failed rows)."""
    scored = [storage.join(folder, n) for files in listing.chunks.values() for n, _ in files]
    found = budget.night_errors(scored, run_folder.committed_uris(output, previous)
                                if previous else None) if summary["errors"] else budget.NightErrors()
    check = budget.check_budget(marker["rows_rescored"], summary["errors"], found,
                                cfg.max_error_rate)
    summary["error_budget"] = check.to_json()
    if not check.over:
        return
    summary["error_budget"]["new_errors_by_type"] = found.new_by_type
    storage.write_json(storage.join(folder, budget.ERROR_SAMPLE_FILE), found.sample)
    storage.write_json(storage.join(folder, RUN_SUMMARY_FILE), summary)
    storage.remove(staging)
    raise ErrorBudgetError(budget.refusal(check, found, folder))


def summarize(cfg: RecategorizeConfig, manifest: Manifest, meta, place: engine.Placement,
              plan: NightPlan, marker: dict, stats: dict, chunks: int, resumed: int,
              wall_time_s: float) -> dict[str, Any]:
    """The run summary: counts from the writes (never read back), the plan, where it ran."""
    rows = marker["rows"]
    return {
        "run_id": marker["run_id"], "rows": rows, "ok": stats["ok"], "errors": stats["errors"],
        "errors_by_type": stats["errors_by_type"], "category_changed": stats["category_changed"],
        "needs_review": stats["needs_review"],
        "actions": stats.get("actions", {}), "action_reasons": stats.get("action_reasons", {}),
        "decisions": decide.policy_for(meta.decisions, cfg.change_precision).to_json(),
        "top_categories": dict(list(stats["categories"].items())[:TOP_CATEGORIES]),
        "rows_rescored": marker["rows_rescored"], "rows_carried": marker["rows_carried"],
        "new_products": plan.new_products, "removed_products": plan.removed_products,
        "mode": plan.mode, "mode_reason": plan.reason, "previous_run_id": plan.previous_run_id,
        "wall_time_s": round(wall_time_s, 2),
        "images_per_s": round(rows / wall_time_s, 1) if wall_time_s > 0 else None,
        "manifest": manifest.uri, "model": storage.normalize(cfg.model),
        "model_name": meta.architecture, "model_version": meta.model_version,
        "device": place.device, "output": run_folder.run_uri(storage.normalize(cfg.output),
                                                             marker["run_id"]),
        "chunks": chunks, "chunks_resumed": resumed, "stats": stats,
    }



def format_summary(summary: dict) -> str:
    shown = {k: v for k, v in summary.items() if k not in ("stats", "drift")}
    return json.dumps(shown, indent=2)
