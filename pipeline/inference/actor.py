"""The nightly job's predictor: the Classifier as its actor pool (or its own process) runs it.

The device is checked on the node Ray placed the actor on, predictions leave the actor already in
the output schema (one stage and one object-store hop fewer than a separate formatting stage),
and the actor's first rows are watched for a night that fails the same way on every image.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from pipeline.errors import ConfigError
from pipeline.inference.fail_fast import FailFast, known_error_flags
from pipeline.inference.predict import Classifier
from pipeline.models import decide
from pipeline.sinks.reviews import read_in_force
from pipeline.sinks.rows import OutputFormatter


@dataclass(frozen=True)
class NightlyScoring:
    """What every scorer of a night builds its InferenceActor with (the engine adds the device
    and the thread count): the typed form of the nightly options that reach the actors."""

    model_uri: str
    top_k: int = 5
    precision: str = "auto"
    compile: bool = False
    allow_cpu_fallback: bool = False
    run_id: str = ""
    review_threshold: float | None = None
    change_precision: float = decide.DEFAULT_CHANGE_PRECISION
    tta: str = "none"
    fail_fast_rows: int = 0  # rows each scorer watches before failing fast (0: never)
    # The night's snapshot of the decisions in force (sinks.reviews.write_in_force); None: none.
    reviewed_uri: str | None = None

    @classmethod
    def from_config(cls, cfg: Any, model_uri: str, run_id: str, fail_fast_rows: int,
                    reviewed_uri: str | None = None) -> NightlyScoring:
        """From a RecategorizeConfig: its fields of the same names."""
        names = {f.name for f in dataclasses.fields(cls)} - {"model_uri", "run_id",
                                                                  "fail_fast_rows", "reviewed_uri"}
        return cls(model_uri=model_uri, run_id=run_id, fail_fast_rows=fail_fast_rows,
                   reviewed_uri=reviewed_uri, **{n: getattr(cfg, n) for n in names})


def actor_device(requested: str, allow_cpu_fallback: bool) -> str:
    """The device an inference actor can use on the node Ray placed it on.

    Ray schedules on declared resources: a node can advertise a GPU whose driver is missing or
    broken, or run a CPU-only torch build. Running there silently on CPU would make the nightly
    job many times slower without anyone noticing, so it is an error unless fallback is allowed.
    """
    if requested != "cuda" or torch.cuda.is_available():
        return requested
    import ray

    where = (f"node {ray.get_runtime_context().get_node_id()} "
             f"(Ray assigned GPU ids {ray.get_gpu_ids()})")
    if allow_cpu_fallback:
        print(f"warning: inference actor on {where}: CUDA is not available; running on CPU "
              "(--allow-cpu-fallback)", file=sys.stderr, flush=True)
        return "cpu"
    raise ConfigError(
        f"--device cuda: Ray placed an inference actor on {where}, but CUDA is not available "
        "there (torch.cuda.is_available() is False: no NVIDIA driver or a CPU-only torch build). "
        "Fix the GPU node image, or pass --allow-cpu-fallback to run inference on its CPUs")


class InferenceActor(Classifier):
    """The Classifier, formatting its rows (`sinks.rows.OutputFormatter`, which also applies
    people's decisions) and failing fast."""

    def __init__(self, model_uri: str, device: str = "auto", top_k: int = 5,
                 num_threads: int | None = None, precision: str = "auto", compile: bool = False,
                 allow_cpu_fallback: bool = False, run_id: str = "",
                 review_threshold: float | None = None,
                 change_precision: float = decide.DEFAULT_CHANGE_PRECISION,
                 tta: str = "none", fail_fast_rows: int = 0, reviewed_uri: str | None = None):
        super().__init__(model_uri, actor_device(device, allow_cpu_fallback), top_k, num_threads,
                         precision, compile, tta)
        # One row per reviewed product: small enough for every actor to hold, read once here.
        reviewed = read_in_force(reviewed_uri) if reviewed_uri else None
        self.format = OutputFormatter(self.meta.classes, self.meta.architecture,
                                      self.meta.model_version, run_id,
                                      decide.policy_for(self.meta.decisions, change_precision),
                                      self.meta.open_set.get("threshold"), review_threshold,
                                      reviewed)
        # Raises FailFastError when this actor's first rows all fail the same way (0: never).
        self.fail_fast = FailFast(fail_fast_rows) if fail_fast_rows else None

    def __call__(self, batch: dict) -> pa.Table:  # type: ignore[override]
        known = known_error_flags(batch)
        # Decided categories go in before the model, so p_current is the decided category's.
        table = self.format(super().__call__(self.format.prepare(batch)))
        if self.fail_fast is not None:
            self.fail_fast.observe(table, known)
        return table
