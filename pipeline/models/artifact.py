"""Model artifact: a folder with `model.json` and the weights, `model.safetensors` (backend
`torch`) or `model.onnx` (backend `onnxruntime`, written by pipeline.inference.export); loading never
unpickles (an ONNX file is a protobuf: data, not code).

`model_version` is a content hash of the weights (or ONNX file) and of everything that changes
predictions (architecture, classes, preprocessing, temperature, backend and format), so two runs
with the same version give the same answers, and a corrupted or edited artifact is detected at
load time.

A model URI may also name a *pointer*: a small JSON file (`MODELS/current`, written by
`python -m jobs.promote`) that names an artifact folder. `resolve_model_uri` follows it, and every
loader here calls it, so `--model MODELS/current` works wherever a job takes --model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline import storage
from pipeline.errors import ConfigError, ModelError
from pipeline.models.registry import create_model, get_spec

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
CENTROIDS_FILE = "open_set.safetensors"  # class centroids of the open-set score, when it uses them
CENTROIDS_KEY = "centroids"
ONNX_FILE = "model.onnx"  # the exported graph of an onnxruntime artifact
NOTICE_FILE = "NOTICE.md"  # licence notes of a source artifact travel with its copies
FORMAT_VERSION = 1
TORCH_BACKEND = "torch"
ONNX_BACKEND = "onnxruntime"
BACKENDS = (TORCH_BACKEND, ONNX_BACKEND)
POINTER_KIND = "model-pointer"  # the `kind` of a pointer file (pipeline.review.promote writes them)
MAX_POINTER_BYTES = 64 * 1024  # a pointer is a few lines: a larger file is not one


@dataclass
class ModelMetadata:
    architecture: str
    classes: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    temperature: float = 1.0
    coarse_classes: dict[str, str] = field(default_factory=dict)  # fine class -> coarse class
    training: dict[str, Any] = field(default_factory=dict)
    # Where the starting weights came from (package, version, SHA-256, licence), for audits.
    provenance: dict[str, Any] = field(default_factory=dict)
    weights_dtype: str = "float32"  # storage precision of the weight matrices
    # Open-set score kind and review threshold (pipeline.models.openset); empty: no open-set review.
    open_set: dict[str, Any] = field(default_factory=dict)
    # What runs the artifact: torch (model.safetensors) or onnxruntime (model.onnx).
    backend: str = TORCH_BACKEND
    # An exported artifact's record (pipeline.inference.export): format, source model_version, parity.
    export: dict[str, Any] = field(default_factory=dict)
    # The keep / change / review thresholds (pipeline.models.decide), fitted on held-out rows; empty in
    # an older artifact, which the nightly job runs with a warning and conservative defaults.
    decisions: dict[str, Any] = field(default_factory=dict)
    model_version: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def weights_file(self) -> str:
        return ONNX_FILE if self.backend == ONNX_BACKEND else WEIGHTS_FILE

    @property
    def format(self) -> str:
        """torch-<weights dtype> or the export format (onnx, onnx-int8, onnx-fp16)."""
        return self.export.get("format") or f"{self.backend}-{self.weights_dtype}"

    def prediction_fields(self) -> dict[str, Any]:
        """What determines predictions; hashed into model_version."""
        fields = {
            "architecture": self.architecture,
            "classes": self.classes,
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "temperature": self.temperature,
            "coarse_classes": self.coarse_classes,
        }
        if self.open_set:  # it changes needs_review; older artifacts without it keep their hash
            fields["open_set"] = self.open_set
        if self.decisions:  # it changes every row's action; older artifacts keep their hash
            fields["decisions"] = self.decisions
        if self.backend != TORCH_BACKEND:  # torch artifacts keep their hash
            fields["backend"] = self.backend
            fields["format"] = self.format
        return fields


def content_hash(weights: bytes, meta: ModelMetadata, centroids: bytes = b"") -> str:
    h = hashlib.sha256(weights)
    h.update(json.dumps(meta.prediction_fields(), sort_keys=True).encode())
    h.update(centroids)  # empty for artifacts without them: older versions keep their hash
    return h.hexdigest()[:16]


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weight matrices and kernels in the storage dtype; vectors (biases, BatchNorm statistics)
    stay float32, where half precision could flush small variances to zero."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.to(dtype) if tensor.is_floating_point() and tensor.dim() >= 2 else tensor


def save_artifact(model: nn.Module, meta: ModelMetadata, uri: str,
                  centroids: torch.Tensor | None = None) -> ModelMetadata:
    """Write weights and metadata (and the open-set centroids, when given) under `uri`;
    returns metadata with model_version set.

    meta.weights_dtype float16 halves the file; the model is loaded back in float32."""
    if meta.weights_dtype not in STORAGE_DTYPES:
        raise ModelError(f"unknown weights_dtype {meta.weights_dtype!r}; valid: {', '.join(STORAGE_DTYPES)}")
    dtype = STORAGE_DTYPES[meta.weights_dtype]
    state = {k: _stored(v, dtype) for k, v in model.state_dict().items()}
    weights = save_safetensors(state, metadata={"architecture": meta.architecture})
    extra = b"" if centroids is None else save_safetensors(
        {CENTROIDS_KEY: centroids.detach().float().cpu().contiguous()})
    meta.model_version = content_hash(weights, meta, extra)
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    if extra:
        storage.write_bytes(storage.join(uri, CENTROIDS_FILE), extra)
    storage.write_json(storage.join(uri, METADATA_FILE), asdict(meta))
    return meta


def read_pointer(uri: str) -> dict[str, Any] | None:
    """The pointer record in file `uri`, or None when `uri` is no pointer file (a folder, a
    missing path, or a file of another kind)."""
    if storage.is_local(uri):
        path = storage.local_path(uri)
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_POINTER_BYTES:
            return None
    elif storage.exists(storage.join(uri, METADATA_FILE)):
        return None  # an artifact folder: the common case costs one existence check
    try:
        record = storage.read_json(uri)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, json.JSONDecodeError,
            UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("kind") != POINTER_KIND:
        return None
    return record


def resolve_model_uri(uri: str) -> str:
    """The artifact folder that model URI `uri` names: `uri` itself (normalized), or, when it is
    a pointer file (`MODELS/current`), the folder the pointer names (a relative name resolves
    against the pointer's folder). The pointer's model_version must match the folder's, so a
    folder replaced after its promotion is refused rather than silently run.

    Resolve once per job on the driver and hand the folder to workers: a pointer may move while
    the job runs (a promotion), and every worker must load the same model."""
    uri = storage.normalize(uri)
    pointer = read_pointer(uri)
    if pointer is None:
        return uri
    target = pointer.get("model")
    if not isinstance(target, str) or not target:
        raise ModelError(f"model pointer {uri!r} names no model folder ('model' key); promote a "
                         "model with python -m jobs.promote")
    folder = storage.normalize(storage.resolve(target, storage.parent(uri)))
    if read_pointer(folder) is not None:
        raise ModelError(f"model pointer {uri!r} names another pointer ({folder!r}); a pointer "
                         "must name a model artifact folder")
    expected = pointer.get("model_version")
    if expected:
        found = _read_metadata(folder).model_version
        if found != expected:
            raise ModelError(
                f"model pointer {uri!r} names {folder!r} at model_version {expected}, but that "
                f"folder now holds {found}: it was replaced after its promotion; promote it "
                "again (python -m jobs.promote) or point at the intended folder")
    return folder


def load_metadata(uri: str) -> ModelMetadata:
    """The metadata of the artifact `uri` names (a folder, or a pointer to one)."""
    return _read_metadata(resolve_model_uri(uri))


def _read_metadata(uri: str) -> ModelMetadata:
    meta_uri = storage.join(uri, METADATA_FILE)
    try:
        raw = storage.read_json(meta_uri)
    except FileNotFoundError as exc:
        raise ModelError(
            f"model artifact {uri!r} has no {METADATA_FILE} (expected a folder with "
            f"{WEIGHTS_FILE} and {METADATA_FILE})"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{meta_uri!r} is not valid JSON: {exc}") from exc
    try:
        meta = ModelMetadata(**raw)
    except TypeError as exc:
        raise ModelError(f"{meta_uri!r} does not match the artifact format: {exc}") from exc
    if meta.backend not in BACKENDS:
        raise ModelError(f"{meta_uri!r}: unknown backend {meta.backend!r}; valid: {', '.join(BACKENDS)}")
    get_spec(meta.architecture)
    return meta


def read_weights(uri: str, meta: ModelMetadata) -> bytes:
    """The weights file's bytes (model.safetensors or model.onnx), checked against the
    artifact's content hash."""
    uri = resolve_model_uri(uri)
    weights_uri = storage.join(uri, meta.weights_file)
    try:
        weights = storage.read_bytes(weights_uri)
    except FileNotFoundError as exc:
        raise ModelError(f"model artifact {uri!r} has no {meta.weights_file}") from exc
    extra = _centroid_bytes(uri, meta)
    if not meta.model_version.strip():
        # Versions compare models (an incremental night carries rows of the same version), so
        # one the artifact leaves blank would make any two such models look the same.
        raise ModelError(
            f"model artifact {uri!r} has no model_version in {METADATA_FILE}, so its content "
            "cannot be verified; write it with the jobs that make artifacts (jobs.train, "
            "jobs.embed, jobs.export, jobs.calibrate), which set it to the content hash")
    if content_hash(weights, meta, extra) != meta.model_version:
        raise ModelError(
            f"model artifact {uri!r} is corrupt or was edited: content hash "
            f"{content_hash(weights, meta, extra)} != model_version {meta.model_version}"
        )
    return weights


def verify_artifact(uri: str) -> ModelMetadata:
    """The metadata of an artifact whose weights (or ONNX file) match its content hash and, for
    torch, fit its architecture; whatever its backend."""
    uri = resolve_model_uri(uri)
    meta = _read_metadata(uri)
    if meta.backend == TORCH_BACKEND:
        load_artifact(uri, "cpu")
    else:
        read_weights(uri, meta)
    return meta


def load_artifact(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMetadata]:
    """The torch model in eval mode on `device` and its metadata; verifies the content hash.
    An exported (onnxruntime) artifact has no torch weights: training and embedding need its
    source artifact."""
    uri = resolve_model_uri(uri)  # once: the metadata and the weights come from one folder
    meta = _read_metadata(uri)
    if meta.backend != TORCH_BACKEND:
        raise ModelError(
            f"model artifact {uri!r} is a {meta.format} export for ONNX Runtime: the scoring jobs "
            "(recategorize, evaluate, benchmark) run it, but this step needs torch weights; give "
            f"its source artifact (model_version {meta.export.get('source_model_version')})")
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    weights = read_weights(uri, meta)
    try:
        state = load_safetensors(weights)
    except Exception as exc:
        raise ModelError(f"{weights_uri!r} is not valid safetensors: {exc}") from exc
    model = create_model(meta.architecture, num_classes=len(meta.classes))
    try:
        model.load_state_dict(state)  # copies into the float32 parameters, whatever was stored
    except RuntimeError as exc:
        raise ModelError(f"{weights_uri!r} does not fit {meta.architecture}: {exc}") from exc
    return model.eval().to(device), meta


def _centroid_bytes(uri: str, meta: ModelMetadata) -> bytes:
    if meta.open_set.get("score") != "centroid":
        return b""
    try:
        return storage.read_bytes(storage.join(uri, CENTROIDS_FILE))
    except FileNotFoundError as exc:
        raise ModelError(f"model artifact {uri!r} uses the centroid open-set score but has no "
                         f"{CENTROIDS_FILE}") from exc


def load_centroids(uri: str, meta: ModelMetadata) -> torch.Tensor | None:
    """The open-set class centroids of artifact `uri` (already verified by load_artifact's
    content hash), or None when its score does not use them."""
    extra = _centroid_bytes(resolve_model_uri(uri), meta)
    return load_safetensors(extra)[CENTROIDS_KEY] if extra else None


def is_artifact(uri: str) -> bool:
    """True when `uri` is a model artifact folder (holds model.json)."""
    if uri.endswith((".safetensors", ".pt", ".pth")):
        return False
    try:
        return storage.exists(storage.join(resolve_model_uri(uri), METADATA_FILE))
    except ModelError:  # a pointer that names no usable folder: say so, not "unknown weights"
        raise
    except Exception:  # not a path any backend understands, e.g. a torchvision weights name
        return False


def artifact_start_record(uri: str, parent: ModelMetadata, classes: list[str]) -> dict[str, Any]:
    """How a model started from artifact `parent` relates to it: `label_mapping` maps each new
    class to its index in the parent's classes (None for a class the parent did not know)."""
    parent_index = {c: i for i, c in enumerate(parent.classes)}
    mapping = {c: parent_index.get(c) for c in classes}
    return {"kind": "artifact", "uri": resolve_model_uri(uri), "architecture": parent.architecture,
            "model_version": parent.model_version, "parent_classes": parent.classes,
            "label_mapping": mapping,
            "new_classes": sorted(c for c, i in mapping.items() if i is None)}


def transfer_from_artifact(uri: str, classes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """One of our artifacts as a starting point for a new label set.

    The backbone is kept and the head is replaced by one with a row per class in `classes`.
    Rows of classes the artifact already knew are copied from its head, so they start from what
    it learned; new classes start fresh. Returns the model (in train mode) and its start record.
    """
    from pipeline.models.registry import replace_head

    model, meta = load_artifact(uri)
    start = artifact_start_record(uri, meta, classes)
    head_path = get_spec(meta.architecture).head
    old_head = model.get_submodule(head_path)
    replace_head(model, meta.architecture, len(classes))
    new_head = model.get_submodule(head_path)
    with torch.no_grad():
        for i, cls in enumerate(classes):
            parent_row = start["label_mapping"][cls]
            if parent_row is not None:
                new_head.weight[i] = old_head.weight[parent_row]
                new_head.bias[i] = old_head.bias[parent_row]
    return model.train(), start


def weights_provenance(start: dict[str, Any]) -> dict[str, Any]:
    """The starting weights' origin for an artifact, from a start record (describe_weights or
    artifact_start_record): a pinned package's name, version, checksum and licence, without the
    local install path; a parent artifact's provenance is inherited."""
    if start.get("kind") == "artifact":
        return {"parent_model_version": start["model_version"],
                **load_metadata(start["uri"]).provenance}
    return {k: v for k, v in start.items() if k != "weights" or start.get("kind") != "package"}


def rewrite_artifact(uri: str, output: str, **changes: Any) -> ModelMetadata:
    """A copy of artifact `uri` under `output` with metadata fields changed (a refitted
    temperature or decisions): the same verified weights file, centroids and notice, and a new
    content hash, since the changed fields change the answers."""
    uri = resolve_model_uri(uri)
    meta = _read_metadata(uri)
    weights = read_weights(uri, meta)
    extra = _centroid_bytes(uri, meta)
    new = replace(meta, **changes, model_version="")
    new.model_version = content_hash(weights, new, extra)
    storage.write_bytes(storage.join(output, new.weights_file), weights)
    if extra:
        storage.write_bytes(storage.join(output, CENTROIDS_FILE), extra)
    notice = storage.join(uri, NOTICE_FILE)
    if storage.exists(notice):
        storage.write_bytes(storage.join(output, NOTICE_FILE), storage.read_bytes(notice))
    storage.write_json(storage.join(output, METADATA_FILE), asdict(new))
    return new


def check_output(output: str, overwrite: bool) -> None:
    """Refuse to replace an artifact in --output without --overwrite (before any work)."""
    if storage.exists(storage.join(output, METADATA_FILE)) and not overwrite:
        raise ConfigError(f"--output {output} already holds a model artifact; choose another "
                          "folder or pass --overwrite")
    # Not writable is exit 5 now, before any work; a folder made for the probe goes again, so
    # a refused export leaves nothing behind.
    made = not storage.exists(output)
    storage.check_writable(output)
    if made and storage.is_local(output):
        storage.remove(output, recursive=True)
