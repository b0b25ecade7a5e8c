"""Model registry: `create_model(name, num_classes, weights)` over torchvision backbones.

Preprocessing metadata (input size, mean, std) travels with each entry so an artifact can
record it and inference never guesses. No Ray imports: this runs anywhere torch runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from pipeline import storage
from pipeline.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    head: str  # dotted attribute path of the final Linear layer
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("resnet18", "fc"),
        ModelSpec("resnet34", "fc"),
        ModelSpec("resnet50", "fc"),
        ModelSpec("mobilenet_v3_small", "classifier.3"),
        ModelSpec("mobilenet_v3_large", "classifier.3"),
        ModelSpec("efficientnet_b0", "classifier.1"),
        ModelSpec("efficientnet_b1", "classifier.1", input_size=240),
        ModelSpec("convnext_tiny", "classifier.2"),
    )
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; valid: {', '.join(list_models())}") from None


def _get_head(model: nn.Module, path: str) -> nn.Linear:
    return model.get_submodule(path)  # type: ignore[return-value]


def _set_head(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if attr.isdigit():
        parent[int(attr)] = layer  # type: ignore[index]
    else:
        setattr(parent, attr, layer)


def replace_head(model: nn.Module, name: str, num_classes: int) -> nn.Module:
    """Swap the final Linear layer for a new one with `num_classes` outputs (transfer learning)."""
    path = get_spec(name).head
    old = _get_head(model, path)
    _set_head(model, path, nn.Linear(old.in_features, num_classes))
    return model


def head_parameter_names(name: str) -> tuple[str, str]:
    path = get_spec(name).head
    return f"{path}.weight", f"{path}.bias"


def _torchvision_weights(name: str, weights: str):
    """Resolve 'IMAGENET1K_V1', 'DEFAULT' or 'ResNet50_Weights.IMAGENET1K_V2' for `name`."""
    try:
        return torchvision.models.get_model_weights(name)[weights.rsplit(".", 1)[-1]]
    except KeyError:
        valid = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
        raise ModelError(
            f"unknown weights {weights!r} for {name}; valid torchvision names: {', '.join(valid)}, "
            "or a .safetensors file path/URI"
        ) from None


def load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file (local or URI). Pickle formats are refused."""
    from safetensors.torch import load as load_safetensors

    if not uri.endswith(".safetensors"):
        raise ModelError(
            f"weights file {uri!r} must be .safetensors (pickled .pt/.pth files are refused; convert "
            "with safetensors.torch.save_file on a trusted machine)"
        )
    try:
        return load_safetensors(storage.read_bytes(uri))
    except FileNotFoundError as exc:
        raise ModelError(f"weights file {uri!r} not found") from exc
    except Exception as exc:
        raise ModelError(f"weights file {uri!r} is not valid safetensors: {exc}") from exc


def create_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """A torchvision backbone with a `num_classes` head.

    weights: None (random init), a torchvision weights name (downloads; needs internet), or a
    .safetensors file path/URI. Head tensors whose shape does not match are left freshly
    initialised, so a backbone trained on other classes transfers.
    """
    get_spec(name)
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights.endswith(".safetensors") or "/" in weights or weights.endswith((".pt", ".pth")):
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        state = load_state_dict_file(weights)
        own = model.state_dict()
        kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = set(own) - set(kept)
        head = set(head_parameter_names(name))
        if missing - head:
            sample = ", ".join(sorted(missing - head)[:5])
            raise ModelError(
                f"weights file {weights!r} does not fit {name}: {len(missing - head)} backbone "
                f"tensors missing or mis-shaped (e.g. {sample})"
            )
        model.load_state_dict(kept, strict=False)
        return model
    model = torchvision.models.get_model(name, weights=_torchvision_weights(name, weights))
    return replace_head(model, name, num_classes)
