"""Settings of the jobs that measure a model or a dataset: evaluation (`jobs.evaluate`), the data
audit (`jobs.audit`), export with its parity check (`jobs.export`) and the benchmarks
(`jobs.benchmark`, `jobs.train_benchmark`)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config.options import (
    BUNDLED_MODEL,
    DEFAULT_DEVICE,
    DEVICE_HELP,
    GROCERY_DATASET,
    GROCERY_DATASET_HELP,
    SAMPLE_MANIFEST,
    Device,
    ExecutorOptions,
    JobConfig,
    LabelledImagesOptions,
    ScoringPoolOptions,
)
from pipeline.config.robustness import (
    CORRUPTIONS,
    PGD_EVAL_STEPS,
    parse_attack_epsilons,
    parse_attacks,
    parse_corruptions,
    parse_severities,
)
from pipeline.config.tolerances import TOLERANCES


class EvaluateConfig(ScoringPoolOptions, LabelledImagesOptions, JobConfig):
    """Settings of `jobs.evaluate`: a model's report on a labelled manifest."""

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
    """Settings of `jobs.audit`: duplicates, label issues and outliers of a manifest."""

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
    """Settings of `jobs.benchmark`: the nightly pipeline's stages timed on one catalog."""

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
PARITY_IMAGES = 300


def _tolerances(name: str) -> str:
    return ", ".join(f"{getattr(t, name):g} {fmt}" for fmt, t in TOLERANCES.items())


class ExportConfig(BaseModel):
    """Settings of `jobs.export`: a torch artifact exported to ONNX and checked against it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(BUNDLED_MODEL, description="Model artifact folder to export (a torch one).")
    format: ExportFormat = Field(
        "onnx",
        description="onnx: fp32 ONNX graph; onnx-int8: static post-training int8 quantization "
        "calibrated on --calibration-source (CPU nodes); onnx-fp16: fp16 weights and activations "
        "(GPU nodes).")
    output: str | None = Field(
        None,
        description="Folder for the new model artifact (model.onnx, model.json, centroids). "
        "Default: the source's exports/<format>/, where the nightly job finds it (--backend).")
    calibration_source: str = Field(
        GROCERY_DATASET,
        description="Images to calibrate int8 ranges on (its train split) and to check every "
        "format against the source model on (its val split, else images the calibration did not "
        "use): the Grocery Store dataset, a folder of class folders, or a labelled .parquet "
        f"manifest with an optional split column. Default: {GROCERY_DATASET_HELP}.")
    calibration_images: int = Field(
        CALIBRATION_IMAGES, ge=1,
        description="How many calibration images (a seeded sample, round-robin over categories).")
    calibration_seed: int = Field(0, description="Seed of the calibration and held-out samples.")
    parity_images: int = Field(
        PARITY_IMAGES, ge=1,
        description="How many held-out images the export is checked on (a seeded sample, "
        "round-robin over categories).")
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1,
        description="Refuse the export when a smaller share of the held-out images keep the "
        "source model's top-1 class. Default: per format, "
        f"{_tolerances('min_top1_agreement')}.")
    max_logit_error: float | None = Field(
        None, gt=0,
        description="Refuse the export when any logit on the held-out images differs from "
        f"the source model's by more than this. Default: {_tolerances('max_logit_error')}.")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1,
        description="Refuse the export when its top-1 accuracy on the labelled held-out images "
        f"is lower than the source's by more than this share. Default: "
        f"{_tolerances('max_accuracy_drop')}.")
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
    """Settings of `jobs.train_benchmark`: training step time per freezing policy and size."""

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

