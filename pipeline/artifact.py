"""Model artifact: a folder with `model.safetensors` and `model.json`; loading never unpickles.

`model_version` is a content hash of the weights and of everything that changes predictions
(architecture, classes, preprocessing, temperature), so two runs with the same version give the
same answers, and a corrupted or edited artifact is detected at load time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline import storage
from pipeline.errors import ModelError
from pipeline.models import create_model, get_spec

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
FORMAT_VERSION = 1


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
    model_version: str = ""
    format_version: int = FORMAT_VERSION

    def prediction_fields(self) -> dict[str, Any]:
        """What determines predictions; hashed into model_version."""
        return {
            "architecture": self.architecture,
            "classes": self.classes,
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "temperature": self.temperature,
            "coarse_classes": self.coarse_classes,
        }


def content_hash(weights: bytes, meta: ModelMetadata) -> str:
    h = hashlib.sha256(weights)
    h.update(json.dumps(meta.prediction_fields(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def save_artifact(model: nn.Module, meta: ModelMetadata, uri: str) -> ModelMetadata:
    """Write weights and metadata under `uri`; returns metadata with model_version set."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save_safetensors(state, metadata={"architecture": meta.architecture})
    meta.model_version = content_hash(weights, meta)
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights)
    storage.write_json(storage.join(uri, METADATA_FILE), asdict(meta))
    return meta


def load_metadata(uri: str) -> ModelMetadata:
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
    get_spec(meta.architecture)
    return meta


def load_artifact(uri: str, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMetadata]:
    """The model in eval mode on `device` and its metadata; verifies the content hash."""
    meta = load_metadata(uri)
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    try:
        weights = storage.read_bytes(weights_uri)
    except FileNotFoundError as exc:
        raise ModelError(f"model artifact {uri!r} has no {WEIGHTS_FILE}") from exc
    if meta.model_version and content_hash(weights, meta) != meta.model_version:
        raise ModelError(
            f"model artifact {uri!r} is corrupt or was edited: content hash "
            f"{content_hash(weights, meta)} != model_version {meta.model_version}"
        )
    try:
        state = load_safetensors(weights)
    except Exception as exc:
        raise ModelError(f"{weights_uri!r} is not valid safetensors: {exc}") from exc
    model = create_model(meta.architecture, num_classes=len(meta.classes))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{weights_uri!r} does not fit {meta.architecture}: {exc}") from exc
    return model.eval().to(device), meta


def is_artifact(uri: str) -> bool:
    """True when `uri` is a model artifact folder (holds model.json)."""
    if uri.endswith((".safetensors", ".pt", ".pth")):
        return False
    try:
        return storage.exists(storage.join(uri, METADATA_FILE))
    except Exception:  # not a path any backend understands, e.g. a torchvision weights name
        return False


def artifact_start_record(uri: str, parent: ModelMetadata, classes: list[str]) -> dict[str, Any]:
    """How a model started from artifact `parent` relates to it: `label_mapping` maps each new
    class to its index in the parent's classes (None for a class the parent did not know)."""
    parent_index = {c: i for i, c in enumerate(parent.classes)}
    mapping = {c: parent_index.get(c) for c in classes}
    return {"kind": "artifact", "uri": storage.normalize(uri), "architecture": parent.architecture,
            "model_version": parent.model_version, "parent_classes": parent.classes,
            "label_mapping": mapping,
            "new_classes": sorted(c for c, i in mapping.items() if i is None)}


def transfer_from_artifact(uri: str, classes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """One of our artifacts as a starting point for a new label set.

    The backbone is kept and the head is replaced by one with a row per class in `classes`.
    Rows of classes the artifact already knew are copied from its head, so they start from what
    it learned; new classes start fresh. Returns the model (in train mode) and its start record.
    """
    from pipeline.models import replace_head

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
