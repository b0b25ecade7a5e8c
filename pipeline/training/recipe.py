"""The training recipe, after torchvision's references/classification: learning-rate schedule
(cosine with warm-up, staged unfreezing, a time budget), loss (label smoothing, class weights,
focal term), early stopping, adversarial training and the starting model with its freezing."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.models.artifact import (
    artifact_start_record,
    is_artifact,
    load_metadata,
    transfer_from_artifact,
)
from pipeline.models.registry import (
    CoarseHeadModel,
    create_model,
    describe_weights,
    freeze_backbone,
    param_groups,
)
from pipeline.models.transforms import EvalPreset, TrainPreset


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over `warmup_steps`, then a cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class CosinePlan:
    """Cosine with warm-up over `epochs`, as a LambdaLR factor. An object rather than a closure:
    a time budget can shorten `epochs` mid-run, and LambdaLR saves its fields in the checkpoint.

    `delay_steps` holds the factor at 0 first (staged unfreezing: a backbone group waits while
    the fresh head learns), then warms up and decays over what is left."""

    def __init__(self, steps_per_epoch: int, epochs: int, warmup_steps: int, delay_steps: int = 0):
        self.steps_per_epoch, self.epochs, self.warmup_steps = steps_per_epoch, epochs, warmup_steps
        self.delay_steps = delay_steps

    def __call__(self, step: int) -> float:
        if step < self.delay_steps:
            return 0.0
        total = self.steps_per_epoch * self.epochs - self.delay_steps
        return cosine_with_warmup(total, self.warmup_steps)(step - self.delay_steps)


def group_plans(groups: list[dict], steps_per_epoch: int, cfg: TrainConfig) -> list[CosinePlan]:
    """One schedule per optimizer group: the head starts at once, backbone groups after
    `cfg.unfreeze_epochs`."""
    warmup = round(steps_per_epoch * cfg.warmup_epochs)
    delay = round(steps_per_epoch * cfg.unfreeze_epochs)
    return [CosinePlan(steps_per_epoch, cfg.epochs, warmup, 0 if g["name"] == "head" else delay)
            for g in groups]


def budget_epochs(epochs_done: int, epochs_timed: int, elapsed_s: float, budget_s: float,
                  max_epochs: int) -> int:
    """How many epochs fit the time budget at the pace so far (at least those done, at most
    `max_epochs`), so the schedule decays to zero when the budget runs out rather than
    being cut off at a high learning rate. The pace is re-measured after every epoch, which
    follows a machine whose load changes."""
    per_epoch = elapsed_s / max(epochs_timed, 1)
    fit = epochs_done + int(max(0.0, budget_s - elapsed_s) // max(per_epoch, 1e-9))
    return max(epochs_done, min(max_epochs, fit))


def class_weights(counts: np.ndarray, mode: str) -> torch.Tensor | None:
    """Loss weight per class from training counts: inverse frequency (n / (K * count_c)), its
    square root (a milder correction), or None. Classes without rows get weight 0."""
    if mode == "none":
        return None
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    if mode == "sqrt_inverse":
        weights = np.sqrt(weights)
    elif mode != "inverse":
        raise ConfigError(f"unknown class_weighting {mode!r}; valid: none, inverse, sqrt_inverse")
    return torch.tensor(weights, dtype=torch.float32)


class ClassificationLoss(nn.Module):
    """Cross-entropy with label smoothing, optional per-class weights and an optional focal term.

    Per example: w[y] * (1 - p_y) ** gamma * CE_smoothed; the batch loss divides by the sum of
    w[y] (PyTorch's weighted-mean convention), so weights shift emphasis between classes without
    changing the loss scale. gamma = 0 is plain (weighted) cross-entropy.
    """

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 focal_gamma: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
        if self.focal_gamma > 0:
            p_true = torch.softmax(logits.detach(), 1).gather(1, labels[:, None]).squeeze(1)
            loss = (1 - p_true).pow(self.focal_gamma) * loss
        if self.weight is None:
            return loss.mean()
        w = self.weight[labels]
        return (w * loss).sum() / w.sum().clamp_min(1e-12)


def build_criterion(cfg: TrainConfig, counts: np.ndarray) -> ClassificationLoss:
    """The configured loss, class weights from the training rows' class `counts`."""
    return ClassificationLoss(class_weights(counts, cfg.class_weighting), cfg.label_smoothing,
                              cfg.focal_gamma if cfg.loss == "focal" else 0.0)


@dataclass
class EarlyStopping:
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs."""

    patience: int | None
    mode: str = "max"
    min_delta: float = 0.0
    best: float | None = None
    bad_epochs: int = 0

    def update(self, value: float) -> bool:
        """Record an epoch's value; True when training should stop."""
        better = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta)
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}


def monitor_mode(metric: str) -> str:
    """'min' for a loss, 'max' for anything else (accuracy, F1)."""
    return "min" if metric.endswith("loss") else "max"


@dataclass
class Adversarial:
    """Adversarial training (--adversarial): each batch also trains on copies attacked against
    the current model, FGSM or PGD within `epsilon` pixel levels; `weight` is their share of
    the loss."""

    kind: str
    epsilon: float
    steps: int
    weight: float

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Adversarial | None:
        if cfg.adversarial == "none":
            return None
        return cls(cfg.adversarial, cfg.adversarial_epsilon, cfg.adversarial_steps,
                   cfg.adversarial_weight)


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum of every BatchNorm layer."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def start_record(cfg: TrainConfig, classes: list[str]) -> dict:
    """Where training starts, checked on the driver before any work: the resolved torchvision
    weights, the weights file, or the parent artifact with its label mapping."""
    if cfg.weights and is_artifact(cfg.weights):
        parent = load_metadata(cfg.weights)
        if parent.architecture != cfg.model_name:
            raise ConfigError(
                f"--weights {cfg.weights!r} is a {parent.architecture} artifact but --model-name "
                f"is {cfg.model_name}; set --model-name {parent.architecture}")
        return artifact_start_record(cfg.weights, parent, classes)
    return describe_weights(cfg.model_name, cfg.weights)


def build_model(cfg: TrainConfig, classes: list[str], num_coarse: int) -> nn.Module:
    """The starting model for `classes` (see TrainConfig.weights) with its freezing policy
    applied, wrapped with a coarse head when asked."""
    if cfg.weights and is_artifact(cfg.weights):
        model, _ = transfer_from_artifact(cfg.weights, classes)
    else:
        model = create_model(cfg.model_name, len(classes), cfg.weights)
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    freeze_backbone(model, cfg.model_name, cfg.train_stages)
    if cfg.coarse_head:
        model = CoarseHeadModel(model, cfg.model_name, num_coarse)
    return model


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the model's learning-rate groups (`optimizer_groups`)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimizer_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Optimizer groups: the head at `cfg.lr`, the backbone scaled down (layer-wise decay)."""
    return param_groups(model, cfg.model_name, cfg.lr, cfg.backbone_lr_scale, cfg.layer_decay)


def presets(cfg: TrainConfig) -> tuple[TrainPreset, EvalPreset]:
    """The training augmentation and the evaluation transform of the cached uint8 images."""
    return TrainPreset(cfg.input_size, cfg.augment), EvalPreset()
