"""What every job's config shares: the checkout's bundled examples, the default device, and
the option groups (mixins) that several jobs take with the same names, defaults and help.

Imports nothing heavy (pipeline.config's rule): pydantic and yaml only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

# This file is pipeline/config/options.py: the checkout is three levels up.
REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples"
SAMPLE_MANIFEST = str(EXAMPLES_DIR / "sample-catalog" / "manifest.parquet")
BUNDLED_MODEL = str(EXAMPLES_DIR / "model")
# The Grocery Store dataset (the training recipe's images) lies wherever a machine keeps its
# data, so its folder comes from the environment; without the variable, the shared-data layout
# of the project's workstations (shared/datasets beside the checkout) is assumed.
GROCERY_STORE_ENV = "GROCERY_STORE_DIR"
DEFAULT_GROCERY_DATASET = str(REPO_ROOT.parent / "shared" / "datasets" / "grocery-store")
# Made absolute here, so that a relative value means the same folder wherever it is used.
GROCERY_DATASET = os.path.abspath(os.environ.get(GROCERY_STORE_ENV) or DEFAULT_GROCERY_DATASET)
# How --help states that default: no path of this machine, <checkout> as config.cli.display_path
# names the checkout.
GROCERY_DATASET_HELP = f"${GROCERY_STORE_ENV} when set, else <checkout>/../shared/datasets/grocery-store"
# Up to this many rows to score, a night without a Ray cluster scores in its own process: starting
# a private Ray and an actor pool is fixed seconds, and on one machine one process decodes and
# runs the model on the same cores faster than a one-actor Ray pass, whose own tasks and daemons
# share those cores (BENCHMARKS.md, "The default night at 6,000 rows"). Beyond it, Ray's
# isolation (a worker that dies on an image is restarted, not the night) and back-pressure are
# kept for the long nights where they matter most.
LOCAL_MAX_ROWS = 20_000

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
        f"dataset that the default manifest is made from ({GROCERY_DATASET_HELP}).",
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


class ScoringPoolOptions(ExecutorOptions):
    """Jobs that score a labelled manifest with a model artifact through the scoring engine
    (in their own process, or on its actor pool)."""

    batch_size: int = Field(64, ge=1, description="Images per inference batch.")
    num_actors: int = Field(1, ge=1, description="Inference actor pool size.")
    device: Device = Field(DEFAULT_DEVICE, description=DEVICE_HELP.format(what="Inference device"))
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per inference actor.")
    tta: Literal["none", "flip"] = Field(
        "none", description="Test-time augmentation, as the nightly job's --tta.")
