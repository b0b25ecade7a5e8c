"""Robustness: common image corruptions, gradient attacks (FGSM, PGD), and the scorer that measures
accuracy under each.

Corruptions follow ImageNet-C's recipes and severity scale (Hendrycks & Dietterich, 2019) for the
five a catalog photo meets most (sensor noise, focus blur, heavy JPEG, over-exposure, flat
light), written on uint8 NHWC batches with torchvision's ops, so they run on what the preprocess
stage emits and feed either backend.

Attacks work in pixel space: `epsilon` is in pixel levels (of 255) and the adversarial images
stay in [0, 255], so one epsilon means the same change for every model whatever its
normalization. Adversarial images stay float (not rounded to uint8): the attack is measured as
the model sees it.

No Ray imports: training (adversarial batches), evaluation (the engine's actor pool) and a plain
script share these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from pipeline.config import (
    ATTACK_NAMES,
    CORRUPTIONS,
    PGD_EVAL_STEPS,
    parse_attack_epsilons,
    parse_attacks,
    parse_corruptions,
    parse_severities,
)

# Per severity 1..5, ImageNet-C's parameter for each corruption (its imagenet_c recipes).
NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # Gaussian noise std, share of full range
BLUR_SIGMA = (1.0, 2.0, 3.0, 4.0, 6.0)  # Gaussian blur sigma in pixels (224 px inputs)
JPEG_QUALITY = (25, 18, 15, 10, 7)
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to every channel, share of full range
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)  # blend factor towards the image's mean grey
BLUR_KERNEL_SIGMAS = 3  # the blur kernel reaches this many sigmas each side
NOISE_SEED = 0  # noise is seeded: the same images get the same noise on every run
# PGD's step size as a multiple of epsilon / steps (Madry et al.): steps can reach the boundary
# from the random start and move along it.
PGD_STEP_SCALE = 2.5
FGSM, PGD = ATTACKS = ATTACK_NAMES
CLEAN = "clean"
PGD_EVAL_SEED = 0  # the random starts: the same on every run


def corrupt(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """uint8 NHWC -> the same images under corruption `name` at `severity` (1..5), uint8 NHWC."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= len(NOISE_STD):
        raise ValueError(f"severity {severity} is outside 1..{len(NOISE_STD)}")
    level = severity - 1
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # uint8 NCHW
    if name == "gaussian_noise":
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
        out = (x.float() + noise * NOISE_STD[level] * 255).round_().clamp_(0, 255).to(torch.uint8)
    elif name == "gaussian_blur":
        sigma = BLUR_SIGMA[level]
        kernel = 2 * math.ceil(BLUR_KERNEL_SIGMAS * sigma) + 1
        out = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    elif name == "jpeg":
        out = TF.jpeg(x, JPEG_QUALITY[level])
    elif name == "brightness":
        out = (x.float() + BRIGHTNESS_SHIFT[level] * 255).clamp_(0, 255).to(torch.uint8)
    else:  # contrast
        out = TF.adjust_contrast(x, CONTRAST_FACTOR[level])
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def attack(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
           labels: torch.Tensor, epsilon: float, steps: int = 1, random_start: bool = False,
           step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial copies of `images` (NHWC, pixel values 0..255, any dtype) against
    `logits_fn` (float NHWC 0..255 -> logits): each pixel moves at most `epsilon` levels.

    steps=1 without a random start is FGSM (one step of `epsilon` along the loss gradient's
    sign); more steps from a random start is PGD. Only the input gets gradients: the model's
    own gradients are left as they were."""
    x0 = images.detach().float()
    step = epsilon if step_size is None else step_size
    if random_start:
        delta = (torch.rand(x0.shape, generator=generator, device="cpu").to(x0.device) * 2 - 1) * epsilon
        delta = (x0 + delta).clamp(0, 255) - x0
    else:
        delta = torch.zeros_like(x0)
    with torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(logits_fn(x0 + delta), labels)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + step * grad.sign()).clamp(-epsilon, epsilon)
            delta = (x0 + delta).clamp(0, 255) - x0  # stay a valid image
    return (x0 + delta).detach()


def adversarial_batch(kind: str, logits_fn: Callable[[torch.Tensor], torch.Tensor],
                      images: torch.Tensor, labels: torch.Tensor, epsilon: float, steps: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The training recipe's adversarial copies: FGSM, or PGD with `steps` steps from a random
    start."""
    if kind == FGSM:
        return attack(logits_fn, images, labels, epsilon)
    if kind == PGD:
        return attack(logits_fn, images, labels, epsilon, steps, random_start=True,
                      step_size=PGD_STEP_SCALE * epsilon / steps, generator=generator)
    raise ValueError(f"unknown attack {kind!r}; valid: {', '.join(ATTACKS)}")


def conditions(corruptions: Sequence[str], severities: Sequence[int],
               epsilons: Sequence[float], attacks: Sequence[str] = (FGSM,)) -> list[str]:
    """The measured conditions in report order: clean, each corruption at each severity, each
    attack at each epsilon (named `fgsm@<epsilon>/255`, `pgd@<epsilon>/255`)."""
    return ([CLEAN] + [f"{c}@{s}" for c in corruptions for s in severities]
            + [f"{a}@{e:g}/255" for a in attacks for e in epsilons])


def describe(condition: str) -> dict:
    """{'condition', 'kind' (clean | corruption | attack), 'name', 'severity' or 'epsilon'}."""
    if condition == CLEAN:
        return {"condition": condition, "kind": "clean", "name": CLEAN}
    name, level = condition.split("@")
    if name in ATTACKS:
        return {"condition": condition, "kind": "attack", "name": name,
                "epsilon": float(level.removesuffix("/255"))}
    return {"condition": condition, "kind": "corruption", "name": name, "severity": int(level)}


@dataclass(frozen=True)
class RobustnessSettings:
    """A RobustnessScorer's settings as the engine passes them (it adds device and threads)."""

    model_uri: str
    corruptions: str = "all"
    severities: str = "1,3,5"
    attack_epsilons: str = ""
    tta: str = "none"
    attacks: str = FGSM


class RobustnessScorer:
    """Callable for the scoring engine's actor pool: maps a decoded batch (with `category`) to
    `robust_correct`, int8 per row and condition (1 right, 0 wrong, -1 not judged: an error row
    or a category the model does not know), in the order of `conditions(...)`.

    Corruptions run through the artifact's own backend (torch or ONNX Runtime), with the
    evaluation's test-time augmentation; the FGSM attack needs gradients, so it runs only on a
    torch artifact (`attackable`), on the plain model."""

    def __init__(self, model_uri: str, device: str = "auto", corruptions: str = "all",
                 severities: str = "1,3,5", attack_epsilons: str = "", tta: str = "none",
                 attacks: str = FGSM, num_threads: int | None = None):
        from pipeline.inference.predict import Classifier, TorchBackend
        from pipeline.models.transforms import to_model_input

        self.classifier = Classifier(model_uri, device, num_threads=num_threads, tta=tta)
        backend = self.classifier.backend
        self.attackable = isinstance(backend, TorchBackend)
        self.corruptions = parse_corruptions(corruptions)
        self.severities = parse_severities(severities)
        self.epsilons = parse_attack_epsilons(attack_epsilons) if self.attackable else []
        self.conditions = conditions(self.corruptions, self.severities, self.epsilons,
                                     parse_attacks(attacks))
        self.index = {c: i for i, c in enumerate(self.classifier.meta.classes)}
        if self.attackable:
            self._logits = lambda x: backend.model(to_model_input(x, backend.mean, backend.std)).float()
            self.device = backend.device

    def _predict(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.logits(images).argmax(1).cpu().numpy()

    def _attacked(self, images: np.ndarray, labels: np.ndarray, kind: str,
                  epsilon: float) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        y = torch.from_numpy(labels).to(self.device)
        adv = adversarial_batch(kind, self._logits, x, y, epsilon, PGD_EVAL_STEPS,
                                torch.Generator().manual_seed(PGD_EVAL_SEED))
        with torch.no_grad():
            return self._logits(adv).argmax(1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        labels = np.array([self.index.get(c, -1) for c in batch["category"]], dtype=np.int64)
        use = (np.asarray(batch["status"]) == "ok") & (labels >= 0)
        correct = np.full((len(labels), len(self.conditions)), -1, dtype=np.int8)
        if use.any():
            x, y = images[use], labels[use]
            for j, condition in enumerate(self.conditions):
                spec = describe(condition)
                if spec["kind"] == "clean":
                    pred = self._predict(x)
                elif spec["kind"] == "corruption":
                    pred = self._predict(corrupt(x, spec["name"], spec["severity"]))
                else:
                    pred = self._attacked(x, y, spec["name"], spec["epsilon"])
                correct[use, j] = pred == y
        return {**batch, "robust_correct": correct}


def summarize(names: list[str], correct: np.ndarray) -> dict:
    """Accuracy per condition over the judged rows, the mean over the corruptions and the share
    of clean accuracy it keeps."""
    judged = correct[:, 0] >= 0
    rows = []
    for j, name in enumerate(names):
        col = correct[judged, j]
        rows.append({**describe(name), "accuracy": float(col.mean()) if len(col) else None})
    clean = rows[0]["accuracy"]
    corrupted = [r["accuracy"] for r in rows if r["kind"] == "corruption"]
    mean = float(np.mean(corrupted)) if corrupted else None
    return {"rows": int(judged.sum()), "clean_accuracy": clean, "mean_corruption_accuracy": mean,
            "relative_corruption_accuracy": mean / clean if mean is not None and clean else None,
            "conditions": rows}
