"""The nightly re-categorization job's settings (`jobs.recategorize`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.options import (
    BUNDLED_MODEL,
    SAMPLE_MANIFEST,
    ExecutorOptions,
    ImageAccessOptions,
    JobConfig,
)
from pipeline.errors import ConfigError


def review_threshold_from_report(uri: str) -> float:
    """The auto-accept threshold of an evaluation report's metrics.json, for the nightly job's
    needs_review rule. Problems raise ConfigError naming --review-threshold-from."""
    # Imported here: storage loads fsspec and pyarrow, which parsing the other options never needs.
    from pipeline import storage

    where = f"--review-threshold-from {uri!r}"
    try:
        metrics = storage.read_json(uri)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: file not found") from exc
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
    accept = metrics.get("auto_accept") if isinstance(metrics, dict) else None
    if not isinstance(accept, dict) or "threshold" not in accept:
        raise ConfigError(f"{where}: not an evaluation metrics.json (no auto_accept.threshold)")
    if accept["threshold"] is None:
        raise ConfigError(
            f"{where}: no confidence threshold reached the target accuracy "
            f"{accept.get('target_accuracy')}; set --review-threshold instead")
    return float(accept["threshold"])


class RecategorizeConfig(ImageAccessOptions, ExecutorOptions, JobConfig):
    """Settings of `jobs.recategorize`: one night's scoring of a catalog manifest."""

    manifest: str = Field(
        SAMPLE_MANIFEST,
        description="Catalog manifest: Parquet file or folder, local path or URI (s3://...).",
    )
    model: str = Field(BUNDLED_MODEL, description="Model artifact folder (local path or URI).")
    backend: Literal["auto", "torch", "onnx", "onnx-int8", "onnx-fp16"] = Field(
        "auto",
        description="Which form of --model runs. 'auto': on cpu its int8 export (exports/onnx-int8, "
        "made by jobs.export) when it is there and within its parity tolerance, else the torch "
        "weights, with a warning when an export was there but unusable; on cuda the torch weights "
        "(bf16). An export format runs that export or stops the job before it writes. The "
        "summary's 'backend' says which ran and why.")
    output: str = Field(
        "outputs/recategorize",
        description="Output folder (local path or URI): predictions/*.parquet, summary.json, "
        "config.yaml, _SUCCESS.",
    )
    change_precision: float = Field(
        0.95, gt=0.0, lt=1.0,
        description="Target precision of the proposed changes (action 'change'): the job uses "
        "the model's thresholds fitted for this precision on held-out rows (model.json "
        "'decisions'); products it cannot decide at that precision go to review.",
    )
    review_threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Optional floor on the confidence of any change: a row that would change "
        "below it goes to review instead. Default: the model's fitted thresholds alone.",
    )
    review_threshold_from: str | None = Field(
        None,
        description="An evaluation report's metrics.json (python -m jobs.evaluate): use its "
        "auto-accept threshold as --review-threshold (it replaces that option's value).",
    )
    reviews: str | None = Field(
        None,
        description="Reviews table (folder, local path or URI) whose decisions the night "
        "honours: a product decided for its current image is kept with the decided category "
        "(action 'keep', reason 'reviewed'). Default: the output's own reviews/ folder. A path "
        "that does not exist yet means no decisions.",
    )
    top_k: int = Field(5, ge=1, le=100, description="How many ranked categories to keep per row.")
    batch_size: int = Field(64, ge=1, description="Images per inference batch.")
    preprocess_batch_size: int = Field(32, ge=1, description="Images per fetch/decode task batch.")
    num_actors: int = Field(1, ge=1, description="Inference actor pool size (one model replica each).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Inference device. 'auto': cuda when the cluster has GPUs, else cpu."
    )
    gpus_per_actor: float = Field(1.0, gt=0, description="GPUs per inference actor on cuda.")
    inference_threads: int | None = Field(
        None, ge=1,
        description="Intra-op threads of the model in each inference actor. Default: on cpu, an "
        "actor that decodes its own input times its first batches with its cores (this "
        "machine's cores divided by --num-actors) split half and half and with all of them for "
        "both, and keeps the faster (the summary's thread_split); an actor that does not decode "
        "takes all its cores; on cuda, --cpus-per-actor. Giving it fixes the split.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Inference precision. 'auto': bf16 autocast on cuda, fp32 on cpu.")
    compile: bool = Field(False, description="torch.compile the model in each actor (GPU runs).")
    tta: Literal["none", "flip"] = Field(
        "none", description="Test-time augmentation: flip averages each image with its mirror "
        "image (twice the model cost).")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per inference actor.")
    run_id: str | None = Field(None, description="Run identifier. Default: UTC time + random suffix.")
    overwrite: bool = Field(
        False, description="Replace a completed run already in the output folder."
    )
    max_error_rate: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Error budget: the largest share of the rows scored tonight that may be "
        "error rows before the run is refused (exit code 7, nothing published, the previous run "
        "stays current). Rows that were already errors in the committed run at the same "
        "image_uri do not count. 0.05 sits well above the 1 in 100 broken images a real catalog "
        "has (counted in full on a first night or a full re-score) and well below what an "
        "outage, expired credentials or a URI-policy refusal produce. 1 turns the budget off.",
    )
    allow_cpu_fallback: bool = Field(
        False,
        description="When an inference actor lands on a node that Ray says has a GPU but CUDA is "
        "not available there, run it on that node's CPUs (with a warning) instead of failing "
        "the job.",
    )
    min_actors: int | None = Field(
        None, ge=1,
        description="Autoscaling inference pool: smallest size (set with --max-actors). Default: "
        "a fixed pool of --num-actors, because an autoscaling GPU pool grows one actor at a time "
        "as work queues up, each waiting for a GPU node and a model load.",
    )
    max_actors: int | None = Field(
        None, ge=1, description="Autoscaling inference pool: largest size (set with --min-actors)."
    )
    decode_cpus_per_actor: int | None = Field(
        None, ge=1,
        description="CPU cores (fetch/decode tasks) feeding each inference actor: caps concurrent "
        "decode tasks at this times the largest pool size, so decoding keeps the GPUs busy "
        "without flooding the object store. Default: no cap (Ray Data's backpressure).",
    )
    decode_in: Literal["auto", "tasks", "actor"] = Field(
        "auto",
        description="Where images are fetched and decoded: 'tasks' (separate CPU tasks that scale "
        "out over CPU nodes, feeding GPU actors) or 'actor' (inside each inference actor on a "
        "thread pool, for CPU-only inference). 'auto': 'actor' when inference runs on CPU, else "
        "'tasks'.",
    )
    decode_task_cpus: float | None = Field(
        None, gt=0,
        description="CPUs each fetch/decode task reserves. Default: 1 with GPU inference; 0.5 with "
        "CPU inference, where decode tasks share cores with the model actor's threads.",
    )
    rows_per_file: int = Field(
        250_000, ge=1,
        description="Target rows per output Parquet file (fewer, larger files for warehouses).",
    )
    decode_resource: str | None = Field(
        None,
        description="Custom Ray node resource that fetch/decode tasks require (0.01 each), to pin "
        "decoding to the nodes advertising it, e.g. 'decode' on the CPU pool in cluster.yaml. "
        "Default: any node with a free CPU.",
    )
    gpu_wait_s: float = Field(
        0.0, ge=0,
        description="With --device cuda on an autoscaling cluster: ask the autoscaler for the "
        "pool's GPUs before starting and wait up to this many seconds for them. 0: no wait.",
    )
    chunk_rows: int = Field(
        100_000, ge=1,
        description="Rows per resumable chunk: the run writes each chunk's rows straight into its "
        "folder, so a killed run restarted with the same arguments redoes only the chunks in "
        "flight.",
    )
    full: bool = Field(
        False,
        description="Score every product, even where the output's committed run could carry it "
        "forward (same model, same options, same image).",
    )
    iceberg_table: str | None = Field(
        None,
        description="Also commit the night to this Iceberg table (NAMESPACE.TABLE): one snapshot "
        "per night holding exactly the night's products. Needs --iceberg-catalog.",
    )
    iceberg_catalog: str | None = Field(
        None,
        description="pyiceberg catalog properties KEY=VALUE,... as load_catalog takes them, e.g. "
        "type=sql,uri=sqlite:////abs/cat.db,warehouse=file:///abs/warehouse.",
    )
    max_worker_retries: int = Field(
        5, ge=0,
        description="Restarts of a lost inference actor and retries of a lost preprocess task "
        "before the run fails.",
    )

    @model_validator(mode="before")
    @classmethod
    def _threshold_from_report(cls, values: Any) -> Any:
        """Read the threshold up front, so a bad report stops the job before it writes."""
        if isinstance(values, dict) and values.get("review_threshold_from"):
            values = {**values,
                      "review_threshold": review_threshold_from_report(values["review_threshold_from"])}
        return values

    @model_validator(mode="after")
    def _pool_bounds(self) -> RecategorizeConfig:
        if (self.min_actors is None) != (self.max_actors is None):
            raise ValueError("--min-actors and --max-actors must be set together")
        if self.min_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"--min-actors {self.min_actors} is above --max-actors {self.max_actors}")
        if (self.iceberg_table is None) != (self.iceberg_catalog is None):
            raise ValueError("--iceberg-table and --iceberg-catalog must be set together")
        return self
