"""Presets as small callables on uint8 NHWC batches (what the preprocess stage emits).

Augmentation runs on the training worker, on tensors, after decode: the decoded dataset is
cached once and every epoch sees fresh crops and flips.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (on the target device) -> normalized float NCHW in channels_last memory."""
    x = images.permute(0, 3, 1, 2).float().sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last)


def norm_tensors(mean: Sequence[float], std: Sequence[float], device) -> tuple[torch.Tensor, ...]:
    shape = (1, 3, 1, 1)
    return (torch.tensor(mean, device=device).view(shape) * 255.0,
            torch.tensor(std, device=device).view(shape) * 255.0)


class TrainPreset:
    """Random resized crop + horizontal flip (+ optional color jitter), per image."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.25, 1.0), color_jitter: float = 0.0):
        ops: list = [v2.RandomResizedCrop(size, scale=scale, antialias=True),
                     v2.RandomHorizontalFlip()]
        if color_jitter > 0:
            ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
        self.transform = v2.Compose(ops)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        chw = images.permute(0, 3, 1, 2)
        out = torch.stack([self.transform(img) for img in chw])
        return out.permute(0, 2, 3, 1)


class EvalPreset:
    """Images are already resized and center-cropped by the preprocess stage."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images
