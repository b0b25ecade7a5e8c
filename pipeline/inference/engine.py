"""The scoring engine: the one Ray Data plan every job that reads images runs.

rows (product_id, image_uri, ...) -> fetch + decode (CPU tasks, or inside the actors) ->
a model on an actor pool -> rows out. The nightly job, the evaluation report, the embedding
route and training data preparation all build their plan here, so they share the URI policy,
the fetch limits and retries, the batch sizes and the placement on the cluster.

The front door is `start` (choose local or Ray, resolve the device once) and `score` (a table
through the predictors); the nightly job, which writes as it scores, uses `scored` and
`in_process_scorer` directly. Settings are small frozen dataclasses built from any job config
that has the fields (`ImageSettings.from_config`, `Placement.from_config`), and each predictor
comes with its own typed settings (`Predictor`). Imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import LOCAL_MAX_ROWS
from pipeline.images.fetch import fetch_bytes
from pipeline.images.preprocess import Preprocessor
from pipeline.images.security import UriPolicy
from pipeline.inference import device as devices
from pipeline.inference.device import cpu_count
from pipeline.inference.threads import Split, SplitTuner, actor_threads, split_tuner
from pipeline.sinks.rows import REPORT_KEY

# Decoding a large upload needs a few hundred MB. Declaring it also keeps Ray from fusing the
# decode tasks into the inference actors (fusion needs equal remote args), so decode runs in
# parallel CPU tasks instead of serially inside each model replica.
DECODE_TASK_MEMORY = 256 * 1024**2
# Each decode task takes this much of --decode-resource; a node advertising N of it runs at
# most 100*N decode tasks at once, so in practice its CPUs stay the limit.
DECODE_RESOURCE_PER_TASK = 0.01
# Calls an inference actor runs at once when it decodes its own input: one batch decodes
# while the other is in the model (BENCHMARKS.md has the measurement).
CALLS_IN_FLIGHT = 2


def ignore_remote_args_warning() -> None:
    """Plain Ray remote args for retries: Ray 2.60 warns that they move to named options in
    2.64, a change for this code, not for its users. Called where a plan is built, after
    `import ray.data`: Ray installs its own filters at import, in front of any set before."""
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated",
                            category=DeprecationWarning)


@dataclass(frozen=True)
class ImageSettings:
    """How images are fetched and decoded: size, where relative URIs resolve, the URI policy,
    the limits and the retries."""

    input_size: int
    base_uri: str
    policy: UriPolicy
    max_bytes: int = 50_000_000
    max_pixels: int = 100_000_000
    fetch_timeout_s: float = 20.0
    fetch_retries: int = 3
    record_signal: bool = False  # add each image's change signal (the nightly job's plan uses it)
    record_digest: bool = False  # add each image's content_hash (the audit's exact duplicates)

    @classmethod
    def from_config(cls, cfg: Any, input_size: int, base_uri: str) -> ImageSettings:
        """From a job config with the image-access options (`config.ImageAccessOptions`)."""
        policy = UriPolicy.from_options(cfg.allowed_uri_schemes, cfg.allowed_uri_prefixes,
                                        cfg.allowed_networks, base_uri,
                                        getattr(cfg, "dataset_root", None))
        return cls(input_size, base_uri, policy, cfg.max_image_bytes, cfg.max_image_pixels,
                   cfg.fetch_timeout_s, cfg.fetch_retries)

    def fetch(self, uri: str) -> bytes:
        """One image's bytes through the guarded fetch path (the policy, its redirects, the
        limits, the retries): what every byte a job reads from a manifest URI goes through,
        report thumbnails included. Raises ImageError."""
        return fetch_bytes(storage.resolve(uri, self.base_uri), self.max_bytes,
                           retries=self.fetch_retries, policy=self.policy,
                           timeout=self.fetch_timeout_s)

    def preprocessor(self, threads: int = 1) -> Preprocessor:
        return Preprocessor(self.input_size, self.base_uri, self.max_bytes, self.max_pixels,
                            self.policy, self.fetch_timeout_s, self.fetch_retries, threads=threads,
                            record_signal=self.record_signal, record_digest=self.record_digest)


@dataclass(frozen=True)
class Placement:
    """Where and how wide the plan runs: device, actor pool, decode tasks, batches, retries."""

    device: str = "cpu"  # resolved: 'cpu' or 'cuda'
    num_actors: int = 1
    min_actors: int | None = None
    max_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 1.0
    decode_in: str = "tasks"  # resolved: 'tasks' or 'actor'
    decode_task_cpus: float | None = None
    decode_resource: str | None = None
    decode_cpus_per_actor: int | None = None
    batch_size: int = 64
    preprocess_batch_size: int = 32
    max_worker_retries: int = 5
    inference_threads: int | None = None

    @classmethod
    def from_config(cls, cfg: Any, device: str) -> Placement:
        """The fields `cfg` has (jobs differ in how much they let a user tune), on `device`.
        decode_in 'auto' resolves here: inside the actors on CPU, separate tasks with a GPU."""
        names = {f.name for f in dataclasses.fields(cls)} - {"device", "decode_in"}
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        mode = getattr(cfg, "decode_in", "auto")
        decode_in = ("actor" if device == "cpu" else "tasks") if mode == "auto" else mode
        return cls(device=device, decode_in=decode_in, **values)

    @property
    def in_actor(self) -> bool:
        return self.decode_in == "actor"


def actor_pool_bounds(place: Placement) -> tuple[int, int]:
    """(min, max) inference actors: a fixed pool of num_actors unless min/max are set."""
    if place.min_actors is not None and place.max_actors is not None:
        return place.min_actors, place.max_actors
    return place.num_actors, place.num_actors


def decode_task_cpus(place: Placement) -> float:
    """CPUs each decode task reserves. With a GPU, a decode task owns a core. With inference on
    the CPU, the model actor's threads and the decoders share the cores: half-CPU decode tasks put
    two decoders beside the actor on each core it does not reserve, so no core waits idle while
    Ray holds a whole CPU for a task that is blocked on its input."""
    if place.decode_task_cpus is not None:
        return place.decode_task_cpus
    return 1.0 if place.device == "cuda" else 0.5


def retry_args(place: Placement, actor: bool) -> dict[str, int]:
    """Bounded fault tolerance. Ray Data's defaults retry a lost task and restart a lost actor
    without limit, so an image that crashes its worker every time would hang the run forever."""
    n = place.max_worker_retries
    return {"max_restarts": n, "max_task_retries": n} if actor else {"max_retries": n}


def decode_placement(place: Placement, memory: int = DECODE_TASK_MEMORY) -> dict[str, Any]:
    """Ray Data arguments for the fetch/decode stage: CPU only, optionally pinned and capped."""
    import ray.data

    args: dict[str, Any] = {"num_cpus": decode_task_cpus(place), "memory": memory}
    if place.decode_resource:
        args["resources"] = {place.decode_resource: DECODE_RESOURCE_PER_TASK}
    if place.decode_cpus_per_actor:
        _, high = actor_pool_bounds(place)
        args["compute"] = ray.data.TaskPoolStrategy(size=place.decode_cpus_per_actor * high)
    return args


def inference_placement(place: Placement) -> dict[str, Any]:
    """Ray Data arguments for the inference stage: an actor pool, a GPU each on cuda. An actor
    that decodes its own input runs CALLS_IN_FLIGHT calls at once (see ScoringActor)."""
    import ray.data

    low, high = actor_pool_bounds(place)
    calls = {"max_concurrent_calls_per_actor": CALLS_IN_FLIGHT,
             "enable_true_multi_threading": True} if place.in_actor else {}
    pool = (ray.data.ActorPoolStrategy(size=low, **calls) if low == high
            else ray.data.ActorPoolStrategy(min_size=low, max_size=high, **calls))
    return {"compute": pool, "num_cpus": place.cpus_per_actor,
            "num_gpus": place.gpus_per_actor if place.device == "cuda" else 0}


@dataclass(frozen=True)
class Predictor:
    """A batch-dict -> batch-dict callable class and its settings: a frozen dataclass whose
    fields are the class's keyword arguments. The engine adds `device` (resolved once, for the
    whole job) and `num_threads` (from the placement), so no caller passes either."""

    cls: type
    settings: Any

    def build(self, device: str, num_threads: int) -> Any:
        return self.cls(**dataclasses.asdict(self.settings), device=device,
                        num_threads=num_threads)


class ScoringActor:
    """Predictors as the actor pool runs them: one decoded batch through each, their columns
    merged (the first predictor's rows, plus any column a later one adds). Several predictors
    share one fetch and one decode per image.

    With `preprocess`, the actor also fetches and decodes its own batches: the CPU-only layout,
    where separate decode tasks would only add an object-store hop and a share of the
    scheduler's CPU budget. Ray Data then runs CALLS_IN_FLIGHT calls at once, so one batch
    decodes while another is in the model; the models run one batch at a time, on all their
    threads."""

    def __init__(self, predictors: tuple[Predictor, ...], device: str, num_threads: int,
                 preprocess: Preprocessor | None = None, split: SplitTuner | None = None):
        self.split = split
        if split is not None:
            num_threads = split.current().model
        self.predictors = [p.build(device, num_threads) for p in predictors]
        self.preprocess = preprocess
        self.model_lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        if self.preprocess is not None:
            batch = self.preprocess(batch)
        with self.model_lock:
            first, *rest = self.predictors
            out = first(batch if not rest else dict(batch))
            for predictor in rest:
                more = predictor(dict(batch))
                out.update({k: v for k, v in more.items() if k not in out})
            if self.split is not None:
                out = self.tune(out)
            return out

    def tune(self, out: Any) -> Any:
        """Report the batch to the thread-split tuner, apply the split it returns, and tag an
        output table with the split (the writer passes it back to the driver's summary)."""
        rows = out.num_rows if isinstance(out, pa.Table) else len(next(iter(out.values()), []))
        before = self.split.current()
        split = self.split.observe(rows)
        if split != before:
            if self.preprocess is not None:
                self.preprocess.threads = split.decode
            for predictor in self.predictors:
                if hasattr(predictor, "set_threads"):
                    predictor.set_threads(split.model)
        if isinstance(out, pa.Table):
            out = out.replace_schema_metadata({**(out.schema.metadata or {}),
                                               REPORT_KEY: self.split.metadata()})
        return out


def table_dataset(table: pa.Table):
    """An in-memory table as a Ray Dataset (`decoded` and `scored` split it into batches)."""
    import ray.data

    return ray.data.from_arrow(table)


def decoded(ds, images: ImageSettings, place: Placement):
    """rows -> rows + image (uint8 NHWC) + status / error columns, in parallel CPU tasks."""
    ignore_remote_args_warning()
    ds = ds.repartition(target_num_rows_per_block=place.preprocess_batch_size)
    return ds.map_batches(images.preprocessor(), batch_size=place.preprocess_batch_size,
                          batch_format="numpy", **decode_placement(place),
                          **retry_args(place, actor=False))


def scored(ds, images: ImageSettings, place: Placement, *predictors: Predictor):
    """rows -> fetch + decode -> the predictors on the actor pool -> whatever they return per
    batch. Error rows flow through with their reason (a predictor passes rows whose status is
    not 'ok' through)."""
    ignore_remote_args_warning()
    threads, decode_threads = actor_threads(place)
    split = None
    if place.in_actor:
        # A manifest file arrives as a few big blocks and a map task handles a whole block:
        # split them (streaming, no shuffle) so the work fans out over all actors.
        ds = ds.repartition(target_num_rows_per_block=place.batch_size)
        preprocess = images.preprocessor(threads=decode_threads)
        split = split_tuner(place)
    else:
        ds = decoded(ds, images, place)
        preprocess = None
    return ds.map_batches(
        ScoringActor,
        fn_constructor_args=(predictors, place.device, threads, preprocess, split),
        batch_size=place.batch_size, batch_format="numpy", zero_copy_batch=True,
        **inference_placement(place), **retry_args(place, actor=True))


def numpy_batch(batch: pa.Table | pa.RecordBatch) -> dict[str, np.ndarray]:
    """Rows as the column -> ndarray batch Ray Data hands a `batch_format="numpy"` callable
    (strings as object arrays, nulls as None)."""
    return {name: col.to_numpy(zero_copy_only=False)
            for name, col in zip(batch.column_names, batch.columns, strict=True)}


def in_process_scorer(images: ImageSettings, place: Placement, *predictors: Predictor):
    """`scored` without Ray: the same ScoringActor, built once in this process, fetching,
    decoding and running the models on all this process's cores. Returns table -> list of the
    per-batch outputs. For runs too small to repay starting Ray and an actor pool."""
    cores = cpu_count()
    # Decoding and the model take turns on every core here: nothing to split.
    model = place.inference_threads or cores
    split = SplitTuner.fixed(Split(model, cores), "in process: the model and decoding take turns")
    actor = ScoringActor(predictors, place.device, model, images.preprocessor(threads=cores), split)

    def score(rows: pa.Table) -> list[Any]:
        return [actor(numpy_batch(b)) for b in rows.to_batches(max_chunksize=place.batch_size)]

    return score


@dataclass(frozen=True)
class Session:
    """Where a job scores: in this process or on Ray (joined once), and the placement there,
    its device resolved once for the whole job."""

    executor: str  # 'local' or 'ray'
    reason: str
    place: Placement


def start(cfg: Any, rows_to_score: int, executor: str | None = None) -> Session:
    """Choose the executor for a job config with the executor options (`choose_executor`),
    join Ray when it is needed, and resolve the device there (`device.resolve_device`)."""
    if executor is None:
        executor, reason = choose_executor(cfg, rows_to_score)
    else:
        reason = f"{executor} executor"
    if executor == "local":
        return Session(executor, reason, Placement.from_config(cfg, devices.local_device(cfg.device)))
    from pipeline.inference.cluster import cluster_device, init_ray

    init_ray(cfg.ray_address, cfg.num_cpus)
    low = getattr(cfg, "min_actors", None)
    low = low if low is not None else getattr(cfg, "num_actors", 1)
    device = cluster_device(cfg.device, low * getattr(cfg, "gpus_per_actor", 1.0),
                            getattr(cfg, "gpu_wait_s", 0.0))
    return Session(executor, reason, Placement.from_config(cfg, device))


def score(session: Session, images: ImageSettings, rows: pa.Table, *predictors: Predictor,
          columns: list[str] | None = None) -> list[dict[str, np.ndarray]]:
    """The front door for jobs that score a table: rows -> fetch + decode -> the predictors,
    in this process or on Ray as `session` says. Returns the scored batches as column ->
    ndarray dicts, in row order, restricted to `columns` when given."""
    if session.executor == "local":
        parts = in_process_scorer(images, session.place, *predictors)(rows)
        parts = [numpy_batch(p) if isinstance(p, (pa.Table, pa.RecordBatch)) else p
                 for p in parts]
        return [{c: p[c] for c in columns} if columns else p for p in parts]
    from pipeline.inference.cluster import surface_job_errors

    ds = scored(table_dataset(rows), images, session.place, *predictors)
    if columns:
        ds = ds.select_columns(columns)
    with surface_job_errors():
        return list(ds.iter_batches(batch_format="numpy", batch_size=None))


def decode_rows(images: ImageSettings, rows: pa.Table, batch_rows: int = 64
                ) -> list[dict[str, np.ndarray]]:
    """rows -> image (uint8 NHWC) + status columns in this process, through the same guarded
    fetch path and decoder as every job: for work too small for a Ray pass (an export's
    calibration images)."""
    preprocess = images.preprocessor(threads=cpu_count())
    return [preprocess(numpy_batch(b)) for b in rows.to_batches(max_chunksize=batch_rows)]


def on_cluster(cfg: Any) -> bool:
    """A Ray cluster was given (`ray job submit` sets RAY_ADDRESS for its driver)."""
    return bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def choose_executor(cfg: Any, rows_to_score: int) -> tuple[str, str]:
    """('ray' | 'local', why) for a job config with `executor`, `device` and `ray_address`
    (`config.ExecutorOptions`): --executor, else local for a small run without a cluster."""
    if cfg.executor != "auto":
        return cfg.executor, f"--executor {cfg.executor}"
    if on_cluster(cfg):
        return "ray", "a Ray cluster was given"
    if cfg.device == "cuda":
        return "ray", "--device cuda"
    if rows_to_score > LOCAL_MAX_ROWS:
        return "ray", f"{rows_to_score:,} rows to score (local up to {LOCAL_MAX_ROWS:,})"
    return "local", f"{rows_to_score:,} rows to score (local up to {LOCAL_MAX_ROWS:,})"
