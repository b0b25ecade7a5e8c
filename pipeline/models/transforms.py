"""Presets as small callables on uint8 NHWC batches (what the preprocess stage emits).

Augmentation runs on the training worker, on tensors, after decode: the decoded dataset is
cached once and every epoch sees fresh crops, flips and photometric changes. Every op works on
uint8 images, so the auto-augment policies see the value range they were designed for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from pipeline.errors import ConfigError

# Named augmentation presets, weakest to strongest. "none" only center-crops to the input size.
AUGMENT_PRESETS = ("none", "basic", "color", "trivial", "randaugment")


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) NHWC on the target device -> normalized float NCHW in
    channels_last memory. A float input is left as it was (an attack differentiates through it)."""
    x = images.permute(0, 3, 1, 2)
    x = x.float().sub_(mean).div_(std) if x.dtype == torch.uint8 else (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def norm_tensors(mean: Sequence[float], std: Sequence[float], device) -> tuple[torch.Tensor, ...]:
    shape = (1, 3, 1, 1)
    return (torch.tensor(mean, device=device).view(shape) * 255.0,
            torch.tensor(std, device=device).view(shape) * 255.0)


def augment_ops(name: str, size: int, scale: tuple[float, float] = (0.25, 1.0)) -> list:
    """The torchvision v2 ops of preset `name` (see AUGMENT_PRESETS)."""
    if name not in AUGMENT_PRESETS:
        raise ConfigError(f"unknown augmentation preset {name!r}; valid: {', '.join(AUGMENT_PRESETS)}")
    if name == "none":
        return [v2.CenterCrop(size)]
    ops: list = [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()]
    if name == "color":
        ops += [v2.RandomRotation(15), v2.ColorJitter(0.3, 0.3, 0.3)]
    elif name == "trivial":
        ops.append(v2.TrivialAugmentWide())
    elif name == "randaugment":
        ops.append(v2.RandAugment(num_ops=2, magnitude=9))
    return ops


class TrainPreset:
    """An augmentation preset applied per image (each image draws its own random parameters)."""

    def __init__(self, size: int, augment: str = "basic", scale: tuple[float, float] = (0.25, 1.0)):
        self.augment = augment
        self.transform = v2.Compose(augment_ops(augment, size, scale))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        chw = images.permute(0, 3, 1, 2)
        out = torch.stack([self.transform(img) for img in chw])
        return out.permute(0, 2, 3, 1)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 NHWC square images -> the same at `size` px (antialiased), as decode would give."""
    if images.shape[1] == size:
        return images
    chw = v2.functional.resize(images.permute(0, 3, 1, 2), [size, size], antialias=True)
    return chw.permute(0, 2, 3, 1)


class EvalPreset:
    """Images are already resized and center-cropped by the preprocess stage."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images
