"""Settings of `jobs.promote`: a candidate model compared with the current one on held-out
labelled rows, and the models folder's `current` pointer moved only when it is as good.

Imports nothing heavy (pipeline.config's rule): pydantic only.
"""

from __future__ import annotations

import os

from pydantic import Field, field_validator, model_validator

from pipeline.config.options import JobConfig, LabelledImagesOptions, ScoringPoolOptions


def _absolute(value: str | None) -> str | None:
    """A relative local path made absolute (parse_args does this for its own path options,
    which do not include these names); URIs unchanged."""
    if not value or "://" in value:
        return value
    return os.path.abspath(value)


class PromoteConfig(ScoringPoolOptions, LabelledImagesOptions, JobConfig):
    """Settings of `jobs.promote`."""

    candidate: str | None = Field(
        None,
        description="The model artifact folder to promote (e.g. outputs/train/model, made by "
        "jobs.train, jobs.embed or jobs.calibrate). Required.",
    )
    models: str = Field(
        "models",
        description="Models folder: its `current` file points at the model the nightly job runs "
        "(--model MODELS/current) and history.jsonl records every promotion decision.",
    )
    manifest: str = Field(
        "manifests/grocery.parquet",
        description="Labelled manifest holding the held-out rows both models are measured on "
        "(product_id, image_uri, category; optional split). Rows neither model trained on: not "
        "the training split, and not the products of a reviews table the candidate trained on.",
    )
    split: str | None = Field(
        "val",
        description="Measure on the rows with this split value; none: every row of the manifest.",
    )
    change_precision: float = Field(
        0.95, gt=0.0, lt=1.0,
        description="The nightly job's --change-precision: both models' keep / change / review "
        "thresholds are taken at this target and measured on the held-out rows.",
    )

    @field_validator("candidate", "models")
    @classmethod
    def _local_paths_absolute(cls, value: str | None) -> str | None:
        return _absolute(value)

    @model_validator(mode="after")
    def _candidate_given(self) -> PromoteConfig:
        if not self.candidate:
            raise ValueError("--candidate is missing: give --candidate MODEL_FOLDER (the model "
                             "artifact to promote, e.g. outputs/train/model)")
        return self
