"""The nightly job: plan the night, score what changed in one streaming pass, commit.

1. Check everything that can be checked before work starts (config, manifest, model artifact,
   output, warehouse table), so a bad argument fails fast and writes nothing.
2. Plan (`pipeline.nightly.incremental`): against the output's committed run, carry forward the rows of
   products whose image did not change, when the model and the row-affecting options are the
   same; score the rest. `--full`, a new model or new options score everything. People's
   decisions in force (`--reviews`, `pipeline.sinks.reviews`) are kept for the night in the
   plan folder; their products are scored, never carried, and their rows keep the decided
   category (`sinks.rows.OutputFormatter`, in the inference actors).
3. Score (`pipeline.inference.engine`): one Ray Data pass over the rows to score, in deterministic chunks,
   with one actor pool (`pipeline.nightly.scoring`); write tasks put each chunk's rows straight
   into the run folder (`pipeline.sinks.parquet.RunFolderSink`). A killed run started again
   with the same arguments finds the run folder by its staging key and redoes only the chunks
   that are not complete.
4. Commit: counts come from the writes; then the sinks (`pipeline.sinks.base.Sink`) commit in
   order, each fenced by the lease: the Iceberg table (if any) commits the night's snapshot,
   then `_SUCCESS` publishes the run folder; the summary and the drift report say what changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import logs, storage
from pipeline.catalog import Manifest, manifest_files, validate_manifest
from pipeline.config import RecategorizeConfig
from pipeline.errors import ConfigError, ErrorBudgetError, OutputError
from pipeline.images.security import safe_name
from pipeline.inference import engine
from pipeline.inference.engine import choose_executor, on_cluster
from pipeline.inference.probe import probe_signals, probe_signals_local
from pipeline.models import decide
from pipeline.models.artifact import resolve_model_uri, verify_artifact
from pipeline.models.backends import BackendChoice
from pipeline.nightly import budget, drift
from pipeline.nightly.backend import night_backend
from pipeline.nightly.chunks import Chunk, plan_chunks
from pipeline.nightly.incremental import NightPlan, load_or_plan, options_key, plan_night
from pipeline.nightly.lease import OutputLease
from pipeline.nightly.scoring import score_chunks, score_local, thread_split
from pipeline.sinks.base import NightRun, Sink, commit_in_order
from pipeline.sinks.parquet import NightDocuments, RunFolderSink, SealedRun
from pipeline.sinks.reviews import REVIEWS_DIR, ReviewsTable, write_in_force

# Categories listed in the printed summary (summary.json has them all).
TOP_CATEGORIES = 10
# Catalog properties can hold credentials: the saved config says only that there were some.
REDACTED = "<redacted>"
# The night's snapshot of the decisions in force, in its plan folder: the plan and every actor
# (and a restart of a killed run) see the same decisions, however the table grows meanwhile.
REVIEWED_FILE = "reviewed.parquet"


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def staging_key(cfg: RecategorizeConfig, manifest_uri: str, model_version: str, opts_key: str,
                previous: dict[str, Any] | None) -> str:
    """Everything that decides the rows of this run: a restart with the same arguments over the
    same manifest files against the same committed run finds its work."""
    fs, _ = storage.filesystem(manifest_uri)
    files = [(f, fs.size(f)) for f in manifest_files(manifest_uri)]
    blob = json.dumps({"manifest": manifest_uri, "files": files, "model": model_version,
                       "options": opts_key, "chunk_rows": cfg.chunk_rows,
                       "run_id": cfg.run_id, "full": cfg.full,
                       "previous": (previous or {}).get("run_id"),
                       # only when given: runs without it keep the keys they always had
                       **({"reviews": storage.normalize(cfg.reviews)} if cfg.reviews else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_artifact_checked(cfg: RecategorizeConfig):
    """Metadata of a model artifact whose weights were verified on the driver, so a missing or
    corrupt artifact, or an option its backend does not take, stops the job here rather than
    failing every inference actor."""
    from pipeline.inference.predict import check_backend_options

    meta = verify_artifact(cfg.model)
    check_backend_options(meta, cfg.precision, cfg.compile)
    if not meta.decisions:
        logs.warning(
            f"model {meta.model_version} has no fitted decision thresholds ('decisions' in "
            f"model.json): rows are decided with conservative defaults ({decide.FALLBACK}), so "
            "most disagreements go to review. Fit them on held-out labelled rows: python -m "
            f"jobs.calibrate --model {cfg.model} --manifest LABELLED_MANIFEST --output NEW_MODEL")
    return meta


def iceberg_sink(cfg: RecategorizeConfig) -> Sink | None:
    """The warehouse table sink when --iceberg-table is set (checked by `check_night`)."""
    if not cfg.iceberg_table:
        return None
    from pipeline.sinks.iceberg import IcebergSink
    from pipeline.sinks.iceberg_options import parse_catalog_properties

    return IcebergSink(cfg.iceberg_table, parse_catalog_properties(cfg.iceberg_catalog or ""))


def table_run_split(held: dict[str, Any] | None,
                    previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """When the table's current snapshot (`held`, from the table sink's check) and `_SUCCESS`
    name different runs (a run stopped between its table commit, which comes first, and
    `_SUCCESS`), say so: this night's commit brings both to the same run. None when they
    agree."""
    if held is None:
        return None
    table_run = held.get("run_id")
    parquet_run = (previous or {}).get("run_id")
    if table_run == parquet_run or table_run is None:
        return None
    logs.warning(f"Iceberg table {held['table']} is at run {table_run} while the output's "
                 f"_SUCCESS names run {parquet_run}: a run stopped between its table commit and "
                 "its Parquet commit. This night commits both, which brings them together again")
    return {"table_run_id": table_run, "parquet_run_id": parquet_run}


class Phases:
    """Wall seconds of each step of the night, in order, for the summary: where a night's
    fixed cost goes (start-up, plan, scoring, commit, report)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        """The time since the previous mark is `name`'s."""
        now = time.perf_counter()
        took = now - self._last
        self.seconds[name] = round(self.seconds.get(name, 0.0) + took, 3)
        self._last = now
        logs.event("phase", f"{name}: {took:.1f} s", phase=name, seconds=round(took, 3))


def run(cfg: RecategorizeConfig) -> dict:
    """The nightly job. The output's lease, taken once the arguments are checked, is released
    however the night ends."""
    # Every module the night needs is loaded before Ray starts (the backend choice may join a
    # cluster): under `ray job submit --working-dir`, another node's agent may unpack the
    # package again into the folder this driver runs from, and a module imported then would
    # not be found.
    from pipeline.inference import actor, cluster, device  # noqa: F401
    from pipeline.models import pretrained  # noqa: F401  (loading the torch weights)

    if cfg.iceberg_table:
        from pipeline.sinks import iceberg, iceberg_options  # noqa: F401

    # A model pointer (MODELS/current) is followed once, here: the checks, every inference
    # actor and the summary then use the same folder even if a promotion moves the pointer
    # during the night.
    cfg = cfg.model_copy(update={"model": resolve_model_uri(cfg.model)})
    # The form of the model that runs is chosen once, here, so the checks, the plan (which
    # carries rows by model_version), every actor and the summary agree on it.
    choice = night_backend(cfg)
    cfg = cfg.model_copy(update={"model": choice.uri})
    with contextlib.ExitStack() as held:
        return run_night(cfg, held, choice)


@dataclass
class Checked:
    """What the checks before any work found: the inputs, the sinks, what they hold now."""

    manifest: Manifest
    meta: Any
    images: engine.ImageSettings
    folder: RunFolderSink
    warehouse: Sink | None  # the Iceberg table, when --iceberg-table is set
    previous: dict[str, Any] | None  # the output's committed run (its _SUCCESS)
    split: dict[str, Any] | None  # the table and _SUCCESS at different runs (table_run_split)
    reviews: str  # the reviews table the night honours (--reviews, default <output>/reviews)
    decisions: pa.Table  # its decisions in force (ReviewsTable.latest)

    @property
    def sinks(self) -> list[Sink]:
        """In commit order: the table first, so a run stopped between the two commits is found
        again by its restart (_SUCCESS still names the previous run)."""
        return [s for s in (self.warehouse, self.folder) if s is not None]


def check_night(cfg: RecategorizeConfig, phases: Phases) -> Checked:
    """Everything that can be checked before work starts, so a bad argument fails fast and
    writes nothing."""
    manifest = validate_manifest(cfg.manifest)
    phases.mark("validate manifest")
    meta = load_artifact_checked(cfg)
    phases.mark("check model")
    # The nightly job records each scored image's change signal for the next night's plan.
    images = dataclasses.replace(
        engine.ImageSettings.from_config(cfg, meta.input_size, manifest.base_uri),
        record_signal=True)
    if cfg.run_id:
        safe_name(cfg.run_id, "--run-id")
    reviews, decisions = check_reviews(cfg)
    folder = RunFolderSink(storage.normalize(cfg.output), cfg.overwrite)
    previous = folder.check()
    warehouse = iceberg_sink(cfg)
    split = table_run_split(warehouse.check() if warehouse else None, previous)
    return Checked(manifest, meta, images, folder, warehouse, previous, split, reviews, decisions)


def check_reviews(cfg: RecategorizeConfig) -> tuple[str, pa.Table]:
    """The reviews table the night honours and its decisions in force. A location that does
    not exist holds none; one that is not a reviews table stops the job (ConfigError)."""
    uri = (storage.normalize(cfg.reviews) if cfg.reviews
           else storage.join(storage.normalize(cfg.output), REVIEWS_DIR))
    table = ReviewsTable(uri)
    try:
        table.check()
        return uri, table.latest()
    except OutputError as exc:  # a storage failure is not a bad argument: it is retried
        raise ConfigError(f"--reviews {uri}: {exc}; pass the folder that python -m jobs.review "
                          "writes decisions to, or a path that does not exist yet") from exc


def keep_decisions(decisions: pa.Table, folder: str) -> tuple[str | None, int]:
    """(the night's snapshot of the decisions in force in the plan `folder`, or None when there
    are none; how many). A killed run started again keeps the snapshot its first attempt took."""
    uri = storage.join(folder, REVIEWED_FILE)
    if not storage.exists(uri):
        write_in_force(decisions, uri)
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    return (uri if rows else None), rows


def run_night(cfg: RecategorizeConfig, held: contextlib.ExitStack, choice: BackendChoice) -> dict:
    """Check, take the lease, stage, plan, score, seal, check the error budget, commit."""
    start = time.perf_counter()
    phases = Phases()
    phases.mark("import")
    night = check_night(cfg, phases)
    # One writer per output: a second run stops here (exit 8) before it writes anything.
    lease = held.enter_context(OutputLease(night.folder.output, cfg.run_id).hold())
    opts = options_key(cfg)
    run_id = night.folder.stage(staging_key(cfg, night.manifest.uri, night.meta.model_version,
                                            opts, night.previous), cfg.run_id or new_run_id())
    lease.renew(run_id)  # the lease names the run from here on
    logs.bind(run_id=run_id)
    reviewed, in_force = keep_decisions(night.decisions, night.folder.plan_folder())
    phases.mark("check output")

    @functools.cache
    def on_ray() -> engine.Placement:
        """Start (or join) Ray once, when the night first needs it."""
        return engine.start(cfg, 0, executor="ray").place

    plan = load_or_plan(night.folder.plan_folder(), lambda: plan_night(
        night.manifest, night.previous, night.folder, model_version=night.meta.model_version,
        opts_key=opts, full=cfg.full, run_id=run_id, rows_per_file=cfg.rows_per_file,
        probe=lambda src, out: (probe_signals(src, out, night.images, on_ray())
                                if on_cluster(cfg) or cfg.executor == "ray"
                                else probe_signals_local(src, out, night.images)),
        reviewed=reviewed))
    chunks = plan_chunks(plan.source, cfg.chunk_rows)
    done = night.folder.finished_chunks(run_id, [c.rows for c in chunks])
    todo = [c for c in chunks if c.index not in done]
    executor, executor_reason = choose_executor(cfg, sum(c.rows for c in todo))
    phases.mark("plan")
    try:
        place, written, ray_stats = score_night(cfg, night, plan.source, todo, run_id,
                                                executor == "local", on_ray, phases, reviewed)
    except ErrorBudgetError:  # failed fast: this attempt's rows are not resumed (see below)
        abort_night(night.sinks, run_id)
        raise
    phases.mark("score")
    sealed = night.folder.seal(run_id, [c.rows for c in chunks], plan.rows_carried,
                               night.manifest.num_rows,
                               written, {"manifest": night.manifest.uri,
                                         "model_version": night.meta.model_version,
                                         "options_key": opts})
    summary = summarize(cfg, night, place, plan, sealed, len(chunks), len(done),
                        time.perf_counter() - start, (executor, executor_reason))
    summary["reviews"], summary["decisions_in_force"] = night.reviews, in_force
    summary["backend"] = choice.record()
    summary["thread_split"] = thread_split(written)
    phases.mark("commit")
    lease.renew()  # a run that stalled past its lease and lost it must not commit
    check_error_budget(cfg, night, sealed, summary)
    ray_stats = ray_stats or f"No Ray Data pass: {executor} executor ({executor_reason}).\n"
    return commit_night(cfg, night, sealed, summary, ray_stats, lease.renew, phases)


def score_night(cfg: RecategorizeConfig, night: Checked, source: str, todo: list[Chunk],
                run_id: str, local: bool, on_ray: Callable[[], engine.Placement],
                phases: Phases, reviewed: str | None = None
                ) -> tuple[engine.Placement, list[dict], str]:
    """Score the chunks still to do, in this process or on Ray: (where it ran, what the
    writes wrote, Ray Data's stats of the pass or ""). `reviewed`: the decisions snapshot."""
    if local:
        place = engine.start(cfg, 0, executor="local").place
        written = score_local(cfg, source, todo, night.images, place, run_id,
                              night.folder, reviewed) if todo else []
        return place, written, ""
    place = on_ray()
    phases.mark("start ray")
    written, ray_stats = score_chunks(cfg, source, todo, night.images, place, run_id,
                                      night.folder, reviewed) if todo else ([], "")
    return place, written, ray_stats


def abort_night(sinks: list[Sink], run_id: str) -> None:
    """Drop what the run staged in every sink: started again, it scores afresh."""
    for sink in sinks:
        sink.abort(NightRun(run_id))


def commit_night(cfg: RecategorizeConfig, night: Checked, sealed: SealedRun, summary: dict,
                 ray_stats: str, fence: Callable[[], None], phases: Phases) -> dict:
    """Commit the night to every sink in order, each commit fenced by the lease; returns the
    summary, with what each sink committed."""
    # Catalog properties can hold credentials: the written config names the table only.
    saved = cfg.model_copy(update={"iceberg_catalog": REDACTED if cfg.iceberg_catalog else None})
    report = drift.render_drift_html(summary["drift"])
    phases.mark("drift report")
    night.folder.attach(NightDocuments(summary, saved.to_yaml(), report, ray_stats))
    run_id = sealed.marker["run_id"]
    run = NightRun(run_id, tuple(night.folder.run_files(sealed.marker)),
                   {"model_version": night.meta.model_version}, fence=fence)
    commits = commit_in_order(night.sinks, run, after=lambda sink: phases.mark(
        "publish" if sink is night.folder else f"{sink.name} commit"))
    summary.update((name, c) for name, c in commits.items() if name != night.folder.name)
    summary["phases_s"] = phases.seconds
    night.folder.write_summary(summary)
    return summary


def check_error_budget(cfg: RecategorizeConfig, night: Checked, sealed: SealedRun,
                       summary: dict[str, Any]) -> None:
    """Before any commit: refuse a night whose new error rows exceed --max-error-rate of the
    rows it scored. A refused night keeps its rows, its summary and an error sample in its
    run folder, and drops its staging, so started again it scores afresh under a new run id
    rather than resuming into the same refusal (or, once the cause is fixed, publishing the
    failed rows)."""
    previous = night.folder.run_files(night.previous) if night.previous else None
    found = (budget.night_errors(list(sealed.scored_files), previous) if summary["errors"]
             else budget.NightErrors())
    check = budget.check_budget(sealed.marker["rows_rescored"], summary["errors"], found,
                                cfg.max_error_rate)
    summary["error_budget"] = check.to_json()
    if not check.over:
        return
    summary["error_budget"]["new_errors_by_type"] = found.new_by_type
    run_id = sealed.marker["run_id"]
    folder = night.folder.keep_refused(run_id, summary, found.sample)
    abort_night(night.sinks, run_id)
    raise ErrorBudgetError(budget.refusal(check, found, folder))


def summarize(cfg: RecategorizeConfig, night: Checked, place: engine.Placement, plan: NightPlan,
              sealed: SealedRun, chunks: int, resumed: int, wall_time_s: float,
              executor: tuple[str, str]) -> dict[str, Any]:
    """The run summary: counts from the writes (never read back), the plan, where it ran
    (`executor`: which and why), and the drift against the committed run."""
    marker, stats, meta = sealed.marker, sealed.stats, night.meta
    rows = marker["rows"]
    summary = {
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
        "manifest": night.manifest.uri, "model": storage.normalize(cfg.model),
        "model_name": meta.architecture, "model_version": meta.model_version,
        "device": place.device, "output": night.folder.run_uri(marker["run_id"]),
        "chunks": chunks, "chunks_resumed": resumed, "stats": stats,
    }
    summary["executor"], summary["executor_reason"] = executor
    if night.split:
        summary["table_run_split"] = night.split
    summary["drift"] = drift.drift(night.folder.run_statistics(night.previous), stats,
                                   plan.new_products, plan.removed_products)
    return summary


def format_summary(summary: dict) -> str:
    shown = {k: v for k, v in summary.items() if k not in ("stats", "drift")}
    return json.dumps(shown, indent=2)
