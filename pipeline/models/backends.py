"""One artifact, several backends: which form of a model artifact a night runs.

A torch artifact may carry its exported forms under `exports/<format>/`, each a whole artifact
of its own (`jobs.export` writes there by default), with the parity record its export measured
and the decision thresholds fitted for its own scores (`jobs.calibrate`). The nightly job asks
`choose_backend` once, on the driver:

- `--backend auto`: an export given as `--model` runs as it is; on cpu the int8 export runs
  when it is there, was made from these weights and its recorded parity is within the int8
  tolerance (else torch, with a warning that says why); on cuda the torch weights run (bf16
  autocast).
- `--backend torch|onnx|onnx-int8|onnx-fp16`: that form, or an error naming how to make it.

No torch or Ray imports: the choice reads model.json files only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.config.tolerances import TOLERANCES
from pipeline.errors import ConfigError
from pipeline.models.artifact import (
    METADATA_FILE,
    TORCH_BACKEND,
    ModelMetadata,
    load_metadata,
    read_weights,
)

EXPORTS_DIR = "exports"
EXPORT_FORMATS = ("onnx", "onnx-int8", "onnx-fp16")
BACKENDS = ("auto", "torch", *EXPORT_FORMATS)
CPU_DEFAULT_FORMAT = "onnx-int8"


@dataclass(frozen=True)
class BackendChoice:
    """The artifact a night runs, which form it is, and why."""

    uri: str
    backend: str  # 'torch' or an export format
    reason: str
    warning: str = ""  # set when the default could not be followed

    def record(self) -> dict[str, Any]:
        """The summary's `backend` entry."""
        return {"name": self.backend, "reason": self.reason, "model": self.uri,
                **({"warning": self.warning} if self.warning else {})}


def export_uri(model: str, fmt: str) -> str:
    """Where the `fmt` export of the torch artifact `model` lives."""
    return storage.join(storage.normalize(model), EXPORTS_DIR, fmt)


def parity_problems(meta: ModelMetadata) -> list[str]:
    """Why an export's recorded parity does not meet its format's default tolerance."""
    parity = meta.export.get("parity") or {}
    if "top1_agreement" not in parity:
        return ["it records no parity check"]
    tolerance = TOLERANCES[meta.format]
    return tolerance.misses(parity["top1_agreement"], parity.get("max_logit_error", 0.0),
                            parity.get("accuracy_drop"))


def usable_export(model: str, source: ModelMetadata,
                  fmt: str) -> tuple[ModelMetadata | None, str, bool]:
    """(the `fmt` export's metadata or None, why it cannot stand in for `source`, whether an
    export is there at all)."""
    uri = export_uri(model, fmt)
    if not storage.exists(storage.join(uri, METADATA_FILE)):
        return None, f"it has no {fmt} export ({uri})", False
    meta = load_metadata(uri)
    why = ""
    if meta.export.get("source_model_version") != source.model_version:
        why = (f"its {fmt} export was made from model "
               f"{meta.export.get('source_model_version')}, not these weights")
    elif meta.format != fmt:
        why = f"{uri} holds a {meta.format} artifact, not {fmt}"
    elif problems := parity_problems(meta):
        why = f"its {fmt} export misses the parity tolerance ({'; '.join(problems)})"
    return (None if why else meta), why, True


def stand_in(model: str, source: ModelMetadata, fmt: str, reason: str) -> BackendChoice:
    """The `fmt` export runs for `model`. The artifact is one unit: its torch weights are
    hash-checked too, so a damaged folder stops the night even though they do not run (when
    torch runs, the night's own check loads them)."""
    read_weights(model, source)
    return BackendChoice(export_uri(model, fmt), fmt, reason)


def remake_hint(model: str, fmt: str) -> str:
    """The two commands that make the `fmt` export of `model`, with its own thresholds."""
    return (f"python -m jobs.export --model {model} --format {fmt} --output TMP, then python -m "
            f"jobs.calibrate --model TMP --manifest LABELLED_MANIFEST --output "
            f"{export_uri(model, fmt)} to fit its decisions on its own scores")


def choose_backend(model: str, requested: str, device: str,
                   torch_options: list[str] | None = None) -> BackendChoice:
    """The form of `model` the night runs on `device` ('cpu' or 'cuda'). `torch_options`:
    torch-only options the user gave (--precision, --compile), which keep auto on torch."""
    if requested not in BACKENDS:
        raise ConfigError(f"--backend {requested!r} is not a backend; valid choices: "
                          f"{', '.join(BACKENDS)}")
    source = load_metadata(model)
    own = TORCH_BACKEND if source.backend == TORCH_BACKEND else source.format
    if source.backend != TORCH_BACKEND:
        if requested not in ("auto", own):
            raise ConfigError(f"--backend {requested}: --model {model} is a {own} export; give "
                              f"--backend auto, or its source artifact "
                              f"({source.export.get('source')})")
        return BackendChoice(model, own, "--model is an export")
    if requested == "torch":
        return BackendChoice(model, TORCH_BACKEND, "--backend torch")
    if requested != "auto":
        meta, why, _ = usable_export(model, source, requested)
        if meta is None:
            raise ConfigError(f"--backend {requested}: model {source.model_version} cannot run "
                              f"it: {why}. Make it: {remake_hint(model, requested)}")
        return stand_in(model, source, requested, f"--backend {requested}")
    if device != "cpu":
        return BackendChoice(model, TORCH_BACKEND, f"{device}: the torch weights (bf16 autocast)")
    if torch_options:
        return BackendChoice(model, TORCH_BACKEND,
                             f"{', '.join(torch_options)} given: torch-only options")
    meta, why, present = usable_export(model, source, CPU_DEFAULT_FORMAT)
    if meta is None:
        warning = (f"model {source.model_version} runs in torch fp32 on cpu because {why}; "
                   f"remake it: {remake_hint(model, CPU_DEFAULT_FORMAT)}") if present else ""
        return BackendChoice(model, TORCH_BACKEND, f"cpu: {why}", warning)
    parity = meta.export["parity"]
    return stand_in(model, source, CPU_DEFAULT_FORMAT,
                    f"cpu: int8 export within its parity tolerance (top-1 agreement "
                    f"{parity['top1_agreement']:.3f} on {parity['images']} held-out photos)")
