"""Typed job configs: defaults in code, then a YAML file, then command-line flags.

Each job has one pydantic model. `parse_args` builds an argparse parser from the model's fields
(every field has a default and a description, which becomes its --help), so a flag, a YAML key and
a Python attribute are the same name. The effective config is written next to the job's outputs.

This package is what a job imports before its arguments are parsed, so it imports nothing heavy
(no torch, Ray or pyarrow): `--help` and a bad option answer at once.

Modules: `options` (shared option groups and constants), `nightly`, `training` and `analysis`
(each job's settings), `robustness` (the corruption and attack names and parsers), `cli` (the
command-line machinery). Everything public is re-exported here: import from `pipeline.config`.
"""

from pipeline.config.analysis import (
    AUDIT_LABEL_FOLDS,
    AUDIT_NEAR_MIN_COSINE,
    AUDIT_OUTLIER_MADS,
    AUDIT_OUTLIER_NEIGHBOURS,
    AUDIT_PHASH_MAX_DISTANCE,
    AUDIT_REPORT_ITEMS,
    CALIBRATION_IMAGES,
    AuditConfig,
    BenchmarkConfig,
    EvaluateConfig,
    ExportConfig,
    ExportFormat,
    TrainBenchmarkConfig,
)
from pipeline.config.cli import (
    CHECKOUT,
    PATH_FIELDS,
    PATH_LIST_FIELDS,
    PATH_OR_NAME_FIELDS,
    absolute_paths,
    build_parser,
    display_path,
    parse_args,
    shown_default,
    validate,
)
from pipeline.config.nightly import RecategorizeConfig, review_threshold_from_report
from pipeline.config.options import (
    BUNDLED_MODEL,
    DEFAULT_DEVICE,
    DEFAULT_GROCERY_DATASET,
    DEVICE_HELP,
    EXAMPLES_DIR,
    GROCERY_DATASET,
    GROCERY_DATASET_HELP,
    GROCERY_STORE_ENV,
    LOCAL_MAX_ROWS,
    REPO_ROOT,
    SAMPLE_MANIFEST,
    Device,
    ExecutorOptions,
    ImageAccessOptions,
    JobConfig,
    LabelledImagesOptions,
    ScoringPoolOptions,
)
from pipeline.config.promote import PromoteConfig
from pipeline.config.review import ReviewConfig
from pipeline.config.robustness import (
    ATTACK_NAMES,
    CORRUPTIONS,
    MAX_EPSILON,
    MAX_SEVERITY,
    PGD_EVAL_STEPS,
    parse_attack_epsilons,
    parse_attacks,
    parse_corruptions,
    parse_severities,
)
from pipeline.config.training import CalibrateConfig, EmbedConfig, MakeManifestConfig, TrainConfig

__all__ = [
    "ATTACK_NAMES",
    "AUDIT_LABEL_FOLDS",
    "AUDIT_NEAR_MIN_COSINE",
    "AUDIT_OUTLIER_MADS",
    "AUDIT_OUTLIER_NEIGHBOURS",
    "AUDIT_PHASH_MAX_DISTANCE",
    "AUDIT_REPORT_ITEMS",
    "BUNDLED_MODEL",
    "CALIBRATION_IMAGES",
    "CHECKOUT",
    "CORRUPTIONS",
    "DEFAULT_DEVICE",
    "DEFAULT_GROCERY_DATASET",
    "DEVICE_HELP",
    "EXAMPLES_DIR",
    "GROCERY_DATASET",
    "GROCERY_DATASET_HELP",
    "GROCERY_STORE_ENV",
    "LOCAL_MAX_ROWS",
    "MAX_EPSILON",
    "MAX_SEVERITY",
    "PATH_FIELDS",
    "PATH_LIST_FIELDS",
    "PATH_OR_NAME_FIELDS",
    "PGD_EVAL_STEPS",
    "REPO_ROOT",
    "SAMPLE_MANIFEST",
    "AuditConfig",
    "BenchmarkConfig",
    "CalibrateConfig",
    "Device",
    "EmbedConfig",
    "EvaluateConfig",
    "ExecutorOptions",
    "ExportConfig",
    "ExportFormat",
    "ImageAccessOptions",
    "JobConfig",
    "LabelledImagesOptions",
    "MakeManifestConfig",
    "PromoteConfig",
    "RecategorizeConfig",
    "ReviewConfig",
    "ScoringPoolOptions",
    "TrainBenchmarkConfig",
    "TrainConfig",
    "absolute_paths",
    "build_parser",
    "display_path",
    "parse_args",
    "parse_attack_epsilons",
    "parse_attacks",
    "parse_corruptions",
    "parse_severities",
    "review_threshold_from_report",
    "shown_default",
    "validate",
]
