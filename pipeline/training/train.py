"""Training on Ray Train: `train_loop_per_worker` built from `train_one_epoch` and `evaluate`.

Data: the training manifest's labels are read on the driver (a few columns), images are fetched
and decoded by Ray Data CPU tasks once and cached in the object store; every epoch re-augments
the cached uint8 images on the worker. The best checkpoint by validation accuracy becomes a model
artifact (safetensors + JSON).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from pipeline import storage
from pipeline.catalog import CALIBRATION_SPLIT, open_dataset, stratified_split, validate_manifest
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.inference.fail_fast import FAILURE_SAMPLE_ROWS, mass_failure
from pipeline.models import decide, openset
from pipeline.models.artifact import (
    TORCH_BACKEND,
    ModelMetadata,
    artifact_start_record,
    is_artifact,
    load_metadata,
    save_artifact,
    transfer_from_artifact,
    weights_provenance,
)
from pipeline.models.calibration import expected_calibration_error, fit_temperature
from pipeline.models.registry import (
    CoarseHeadModel,
    create_model,
    describe_weights,
    freeze_backbone,
    freeze_batchnorm_stats,
    get_spec,
    param_groups,
)
from pipeline.models.transforms import EvalPreset, TrainPreset, norm_tensors, resize_batch, to_model_input

DECODE_MARGIN = 1.15  # training images are decoded this much larger than the crop size
# Ray Train settings the driver passes on to the controller and workers (Ray Train reads them
# from the driver's environment). The print patch sends every print of a worker to its logger
# and, as Ray wraps the worker's stdout, to stdout as well: each epoch line came out twice. The
# preemption watcher guards cloud nodes that can be taken away; a private local Ray has none.
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass
class LabelledData:
    train: pa.Table  # product_id, image_uri, label, coarse_label
    val: pa.Table
    classes: list[str]
    coarse_classes: dict[str, str]
    base_uri: str
    excluded: dict[str, int] | None = None  # training rows left out per audit finding (--exclude)
    # Held out of training and of the reported metrics: the temperature, the open-set threshold
    # and the decision thresholds are fitted here, so val reports them honestly. None: fitted on
    # val (--calibration-fraction 0), and the artifact says so.
    calibration: pa.Table | None = None


def load_data(cfg: TrainConfig) -> LabelledData:
    manifest = validate_manifest(cfg.manifest, training=True)
    cols = ["product_id", "image_uri", "category"] + [
        c for c in ("coarse_category", "split") if manifest.has(c)]
    table = open_dataset(manifest.uri).to_table(columns=cols)
    excluded = None
    if cfg.exclude:
        table, excluded = exclude_flagged(table, cfg.exclude)
    classes = sorted(set(table.column("category").to_pylist()))
    index = {c: i for i, c in enumerate(classes)}
    coarse_classes: dict[str, str] = {}
    if manifest.has("coarse_category"):
        for fine, coarse in zip(table.column("category").to_pylist(),
                                table.column("coarse_category").to_pylist(), strict=True):
            if coarse is not None:
                coarse_classes[fine] = coarse
    labels = np.array([index[c] for c in table.column("category").to_pylist()], dtype=np.int64)
    coarse_names = sorted(set(coarse_classes.values()))
    coarse_index = {c: i for i, c in enumerate(coarse_names)}
    coarse_labels = np.array([coarse_index.get(coarse_classes.get(c), -1)
                              for c in table.column("category").to_pylist()], dtype=np.int64)
    split_column = table.column("split") if manifest.has("split") else None
    table = table.select(["product_id", "image_uri"]).append_column(
        "label", pa.array(labels)).append_column("coarse_label", pa.array(coarse_labels))

    if manifest.has("split"):
        split = np.asarray(pc.fill_null(split_column, "train").to_pylist(), dtype=object)
    else:
        split = np.full(table.num_rows, "train", dtype=object)
    is_train, is_val = split == "train", split == "val"
    is_calibration = split == CALIBRATION_SPLIT
    if not is_val.any():  # no validation rows given: hold out a seeded stratified share
        is_val = np.zeros(table.num_rows, dtype=bool)
        is_val[is_train] = stratified_split(labels[is_train], cfg.val_fraction, cfg.seed)
        is_train &= ~is_val
    if not is_calibration.any() and cfg.calibration_fraction > 0:
        # a seed of its own, so a random share does not depend on the validation split's
        is_calibration[is_train] = stratified_split(
            labels[is_train], cfg.calibration_fraction, cfg.seed + 1,
            block=cfg.calibration_sampling == "block")
        is_train &= ~is_calibration
    rng = np.random.default_rng(cfg.seed)
    train_idx = rng.permutation(np.flatnonzero(is_train))  # shuffled: manifests are class-sorted
    if cfg.max_train_rows:
        train_idx = train_idx[: cfg.max_train_rows]
    train = table.take(pa.array(train_idx))
    val = table.take(pa.array(np.flatnonzero(is_val)))
    calibration = (table.take(pa.array(np.flatnonzero(is_calibration)))
                   if is_calibration.any() else None)
    if train.num_rows == 0 or val.num_rows == 0:
        raise TrainingError(
            f"manifest {manifest.uri!r} gives {train.num_rows} training and {val.num_rows} "
            "validation rows; both must be non-empty")
    return LabelledData(train, val, classes, coarse_classes, manifest.base_uri, excluded,
                        calibration)


def exclude_flagged(table: pa.Table, audit_dir: str) -> tuple[pa.Table, dict[str, int]]:
    """The manifest rows without the training rows an audit flagged (`jobs.audit`), and how many
    each finding removed. Validation rows stay, so accuracy is measured on the same rows with
    and without the cleaning."""
    from pipeline.analysis.findings import flagged_products

    flagged = flagged_products(audit_dir)
    ids = table.column("product_id").to_pylist()
    train = (np.asarray(pc.fill_null(table.column("split"), "train").to_pylist()) == "train"
             if "split" in table.column_names else np.ones(len(ids), dtype=bool))
    drop = np.zeros(len(ids), dtype=bool)
    counts = {}
    for finding, products in flagged.items():
        hit = train & np.array([p in products for p in ids], dtype=bool)
        counts[finding] = int(hit.sum())
        drop |= hit
    counts["rows"] = int(drop.sum())
    return table.filter(pa.array(~drop)), counts


def cosine_with_warmup(total_steps: int, warmup_steps: int):
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
    return "min" if metric.endswith("loss") else "max"


def _forward(model, images, mean, std, device, mixed_precision: bool):
    """(fine logits, coarse logits or None) in float32."""
    with torch.autocast(device.type, dtype=torch.bfloat16,
                        enabled=device.type == "cuda" and mixed_precision):
        out = model(to_model_input(images, mean, std))
    fine, coarse = out if isinstance(out, tuple) else (out, None)
    return fine.float(), None if coarse is None else coarse.float()


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


def _set_train_mode(model, bn_frozen: bool) -> None:
    model.train()
    freeze_batchnorm_stats(model, every_layer=bn_frozen)


def attacked_copies(model, adversarial: Adversarial, images, labels, mean, std, device,
                    mixed_precision: bool, bn_frozen: bool) -> torch.Tensor:
    """Adversarial copies of a training batch (float NHWC, 0..255). The attack runs the model in
    eval mode, so its forwards leave the BatchNorm statistics alone, and on the module inside
    DDP, so they wait for no gradient sync (only the input gets gradients)."""
    from pipeline.analysis.robustness import adversarial_batch

    net = getattr(model, "module", model)
    net.eval()
    try:
        return adversarial_batch(
            adversarial.kind, lambda x: _forward(net, x, mean, std, device, mixed_precision)[0],
            images, labels, adversarial.epsilon, adversarial.steps)
    finally:
        _set_train_mode(model, bn_frozen)


def train_one_epoch(model, criterion, optimizer, scheduler, batches, preset, mean, std,
                    device, mixed_precision: bool = True, coarse_weight: float = 0.0,
                    bn_frozen: bool = False, adversarial: Adversarial | None = None) -> dict:
    _set_train_mode(model, bn_frozen)
    seen, loss_sum, correct, start = 0, 0.0, 0, time.perf_counter()
    for batch in batches:
        images = preset(batch["image"]).to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        coarse_labels = batch.get("coarse_label")  # only a coarse head needs them
        n = len(labels)
        if adversarial is not None:
            # One forward over clean and attacked images together: DDP expects one forward
            # per backward, and BatchNorm sees both kinds.
            adv = attacked_copies(model, adversarial, images, labels, mean, std, device,
                                  mixed_precision, bn_frozen)
            images = torch.cat([images.float(), adv])
            if coarse_labels is not None:
                coarse_labels = torch.cat([coarse_labels, coarse_labels])
        logits, coarse = _forward(model, images, mean, std, device, mixed_precision)
        if adversarial is None:
            loss = criterion(logits, labels)
        else:
            loss = ((1 - adversarial.weight) * criterion(logits[:n], labels)
                    + adversarial.weight * criterion(logits[n:], labels))
            logits = logits[:n]  # training accuracy is the clean images'
        if coarse is not None:
            loss = loss + coarse_weight * F.cross_entropy(
                coarse, coarse_labels.to(device, non_blocking=True), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += n
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_images": seen, "train_images_per_s": seen / max(elapsed, 1e-9)}


@torch.inference_mode()
def evaluate(model, batches, mean, std, device, fine_to_coarse: torch.Tensor | None,
             mixed_precision: bool = True) -> dict:
    """Validation loss and accuracy (fine, top-5, coarse via the fine -> coarse map, and the
    coarse head's own accuracy when there is one) summed over all workers."""
    model.eval()
    totals = torch.zeros(6, dtype=torch.float64, device=device)  # n, top1, top5, coarse, nll, head
    has_coarse_head = False
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device)
        logits, coarse = _forward(model, images, mean, std, device, mixed_precision)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        pred = top5[:, 0]
        totals[0] += len(labels)
        totals[1] += (pred == labels).sum()
        totals[2] += (top5 == labels[:, None]).any(1).sum()
        if fine_to_coarse is not None:
            totals[3] += (fine_to_coarse[pred] == fine_to_coarse[labels]).sum()
        totals[4] += F.cross_entropy(logits, labels, reduction="sum")
        if coarse is not None:
            has_coarse_head = True
            totals[5] += (coarse.argmax(1) == batch["coarse_label"].to(device)).sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    n = max(totals[0].item(), 1)
    out = {"val_images": int(totals[0].item()), "val_accuracy": totals[1].item() / n,
           "val_top5_accuracy": totals[2].item() / n, "val_loss": totals[4].item() / n}
    if fine_to_coarse is not None:
        out["val_coarse_accuracy"] = totals[3].item() / n
    if has_coarse_head:
        out["val_coarse_head_accuracy"] = totals[5].item() / n
    return out


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain classifier inside DDP and the coarse-head wrapper."""
    model = model.module if hasattr(model, "module") else model
    return model.model if isinstance(model, CoarseHeadModel) else model


def _coarse_head(model: nn.Module) -> nn.Module | None:
    model = model.module if hasattr(model, "module") else model
    return model.coarse_head if isinstance(model, CoarseHeadModel) else None


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(folder: str, model, optimizer, scheduler, epoch: int, metrics: dict,
                    early_stopping: dict | None = None) -> None:
    """Model and optimizer tensors in safetensors, everything else in JSON: no pickle.

    model.safetensors holds the plain classifier (loadable by create_model); a coarse head, when
    trained, goes to coarse_head.safetensors."""
    save_file(_tensors(_unwrap(model)), os.path.join(folder, "model.safetensors"))
    coarse = _coarse_head(model)
    if coarse is not None:
        save_file(_tensors(coarse), os.path.join(folder, "coarse_head.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for pid, state in opt["state"].items() for name, v in state.items()}
    save_file(tensors, os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"epoch": epoch, "metrics": metrics, "param_groups": opt["param_groups"],
                   "scheduler": scheduler.state_dict(), "early_stopping": early_stopping or {}},
                  f, default=float)


def load_checkpoint(folder: str, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer and schedule; returns the next epoch to run and the early
    stopping state."""
    _unwrap(model).load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    coarse = _coarse_head(model)
    if coarse is not None:
        coarse.load_state_dict(load_file(os.path.join(folder, "coarse_head.safetensors")))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1, state.get("early_stopping", {})


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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation and dropout randomness per (epoch, worker): a resumed run draws the same
    numbers as an uninterrupted one."""
    return seed * 1_000_003 + epoch * 1009 + rank


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    spec = get_spec(cfg.model_name)
    mean, std = norm_tensors(spec.mean, spec.std, device)
    fine_to_coarse = (torch.tensor(config["fine_to_coarse"], device=device)
                      if config["fine_to_coarse"] else None)

    model = build_model(cfg, config["classes"], config["num_coarse"])
    groups = param_groups(model, cfg.model_name, cfg.lr, cfg.backbone_lr_scale, cfg.layer_decay)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, config["train_rows"] // (cfg.batch_size * world))
    plans = group_plans(groups, steps, cfg)
    plan = plans[0]  # the head's: the epoch count every group follows
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plans)
    criterion = build_criterion(cfg, np.asarray(config["class_counts"])).to(device)
    stopper = EarlyStopping(cfg.early_stopping_patience, monitor_mode(cfg.monitor),
                            cfg.early_stopping_min_delta)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start_epoch, stop_state = load_checkpoint(folder, model, optimizer, scheduler)
        stopper.best, stopper.bad_epochs = stop_state.get("best"), stop_state.get("bad_epochs", 0)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    preset, eval_preset = TrainPreset(cfg.input_size, cfg.augment), EvalPreset()
    run_start = time.perf_counter()
    epoch = start_epoch
    while epoch < min(plan.epochs, cfg.stop_at_epoch or plan.epochs):
        epoch_start = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, rank))
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, local_shuffle_buffer_size=cfg.batch_size * 8,
            local_shuffle_seed=cfg.seed + epoch)
        metrics = train_one_epoch(model, criterion, optimizer, scheduler, batches, preset,
                                  mean, std, device, cfg.mixed_precision,
                                  cfg.coarse_loss_weight if cfg.coarse_head else 0.0,
                                  cfg.bn_mode == "frozen", Adversarial.from_config(cfg))
        val_batches = ({**b, "image": eval_preset(b["image"])}
                       for b in val_shard.iter_torch_batches(batch_size=cfg.batch_size))
        metrics.update(evaluate(model, val_batches, mean, std, device, fine_to_coarse,
                                cfg.mixed_precision))
        stop = stopper.update(metrics[cfg.monitor])
        elapsed = time.perf_counter() - run_start
        if cfg.time_budget_min:
            fit = budget_epochs(epoch + 1, epoch + 1 - start_epoch, elapsed,
                                cfg.time_budget_min * 60, cfg.epochs)
            for p in plans:
                p.epochs = fit
        metrics.update(epoch=epoch, lr=scheduler.get_last_lr()[0], planned_epochs=plan.epochs,
                       epoch_time_s=time.perf_counter() - epoch_start, early_stopped=stop)
        if rank == 0:
            print_progress(metrics, plan.epochs,
                           elapsed / (epoch + 1 - start_epoch) * (plan.epochs - epoch - 1))
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(folder, model, optimizer, scheduler, epoch, metrics, stopper.state())
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)
        if stop:
            if rank == 0:
                print(f"early stopping: {cfg.monitor} did not improve for "
                      f"{cfg.early_stopping_patience} epochs (best {stopper.best:.4f})", flush=True)
            break
        epoch += 1


def print_progress(metrics: dict, epochs: int, left_s: float) -> None:
    """One line per epoch a person can follow: loss, accuracy, learning rate, speed, time left."""
    coarse = (f" coarse {metrics['val_coarse_accuracy']:.3f}"
              if "val_coarse_accuracy" in metrics else "")
    print(f"epoch {metrics['epoch'] + 1}/{epochs} loss {metrics['train_loss']:.3f} "
          f"train_acc {metrics['train_accuracy']:.3f} val_acc {metrics['val_accuracy']:.3f}"
          f"{coarse} val_loss {metrics['val_loss']:.3f} lr {metrics['lr']:.2e} "
          f"{metrics['train_images_per_s']:.0f} img/s epoch {metrics['epoch_time_s']:.0f}s "
          f"left ~{left_s / 60:.1f} min", flush=True)


def decoded_dataset(cfg: TrainConfig, table: pa.Table, size: int, base_uri: str):
    """Ray Data: fetch + decode once with the scoring engine (the nightly job's URI policy and
    fetch limits), drop rows that fail (counted), cache in the object store."""
    from pipeline.inference import engine

    images = engine.ImageSettings.from_config(cfg, size, base_uri)
    ds = engine.decoded(engine.table_dataset(table), images, engine.Placement.from_config(cfg, "cpu"))
    ds.context.execution_options.preserve_order = True  # same row order every run: resumable
    ds = ds.materialize()
    failed = ds.filter(expr="status != 'ok'")
    bad = failed.count()
    if bad * 2 > table.num_rows:
        sample = failed.select_columns(["error_type", "error_message"]).take(FAILURE_SAMPLE_ROWS)
        failure = mass_failure([r["error_type"] for r in sample],
                               [r["error_message"] for r in sample], table.num_rows, "images",
                               failed_rows=bad)
        raise TrainingError(f"most training images could not be read: {failure}")
    ok = ds.filter(expr="status == 'ok'").select_columns(["image", "label", "coarse_label"])
    return ok.materialize(), bad


RUN_NAME = "run"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def checkpoint_root(cfg: TrainConfig, output: str) -> str:
    return storage.normalize(cfg.checkpoint_path) if cfg.checkpoint_path else storage.join(
        output, "checkpoints")


def check_resume(cfg: TrainConfig, root: str) -> None:
    """Ray Train restores a run whose RunConfig(name, storage_path) already holds a checkpoint
    snapshot. Make that explicit: resume only when asked, and only what exists."""
    snapshot = storage.join(root, RUN_NAME, SNAPSHOT_FILE)
    found = storage.exists(snapshot)
    if found and not cfg.resume:
        raise ConfigError(
            f"checkpoint path {root!r} already holds a training run ({snapshot} exists); pass "
            "--resume to continue it, or choose another --output or --checkpoint-path")
    if cfg.resume and not found:
        raise ConfigError(f"--resume: no run to resume in {root!r} (no {SNAPSHOT_FILE})")


def fine_to_coarse_map(data: LabelledData) -> tuple[list[int] | None, list[str]]:
    """Coarse index of each fine class, when every class has a coarse category."""
    coarse_names = sorted(set(data.coarse_classes.values()))
    if len(data.coarse_classes) != len(data.classes):
        return None, coarse_names
    return [coarse_names.index(data.coarse_classes[c]) for c in data.classes], coarse_names


@torch.no_grad()
def predict_logits(model: nn.Module, dataset, cfg: TrainConfig
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, labels and embeddings (the head's input) of a decoded Ray dataset, computed on
    the driver (CPU). Images larger than the input size (the training copies, decoded with a
    margin for random crops) are resized to it, as inference sees a whole photo."""
    spec = get_spec(cfg.model_name)
    device = torch.device("cpu")
    mean, std = norm_tensors(spec.mean, spec.std, device)
    model.eval()
    logits, labels, embeddings = [], [], []
    hook = model.get_submodule(spec.head).register_forward_pre_hook(
        lambda _, args: embeddings.append(args[0].float()))
    try:
        for batch in dataset.iter_torch_batches(batch_size=cfg.batch_size):
            images = resize_batch(batch["image"], cfg.input_size)
            logits.append(model(to_model_input(images, mean, std)).float())
            labels.append(batch["label"])
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(labels), torch.cat(embeddings)


def final_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                  fine_to_coarse: list[int] | None) -> dict:
    """Validation metrics of the exported model: accuracy, coarse accuracy, macro-F1, ECE with
    and without its temperature."""
    from sklearn.metrics import f1_score

    pred = logits.argmax(1)
    correct = (pred == labels).numpy()
    conf_raw = torch.softmax(logits, 1).max(1).values.numpy()
    conf = torch.softmax(logits / temperature, 1).max(1).values.numpy()
    y = labels.numpy()
    out = {"val_accuracy": float(correct.mean()),
           "val_macro_f1": float(f1_score(y, pred.numpy(), labels=np.unique(y), average="macro",
                                          zero_division=0)),
           "val_ece_uncalibrated": expected_calibration_error(conf_raw, correct),
           "val_ece": expected_calibration_error(conf, correct), "temperature": temperature}
    if fine_to_coarse is not None:
        f2c = np.asarray(fine_to_coarse)
        out["val_coarse_accuracy"] = float((f2c[pred.numpy()] == f2c[y]).mean())
    return out


def pick_best(result, monitor: str):
    """(checkpoint, metrics) of the best reported epoch by `monitor`."""
    sign = -1.0 if monitor_mode(monitor) == "min" else 1.0
    return max(result.best_checkpoints, key=lambda cm: sign * cm[1][monitor])


def run(cfg: TrainConfig) -> dict:
    """Train, export the best epoch as an artifact under `<output>/model`, return its summary."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.inference.cluster import init_ray, resolve_device

    start = time.perf_counter()
    spec = get_spec(cfg.model_name)
    if cfg.input_size is None:
        cfg = cfg.model_copy(update={"input_size": spec.input_size})
    data = load_data(cfg)
    fine_to_coarse, coarse_names = fine_to_coarse_map(data)
    if cfg.coarse_head and fine_to_coarse is None:
        raise ConfigError("--coarse-head needs a coarse_category for every class in the manifest")
    start_info = start_record(cfg, data.classes)
    output = storage.normalize(cfg.output)
    ckpt_root = checkpoint_root(cfg, output)
    check_resume(cfg, ckpt_root)
    storage.check_writable(output)
    cfg.save(storage.join(output, "config.yaml"))
    on_cluster = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    for name, value in (TRAIN_ENV if on_cluster else TRAIN_ENV | LOCAL_TRAIN_ENV).items():
        os.environ.setdefault(name, value)  # a value the user set wins
    init_ray(cfg.ray_address, cfg.num_cpus)
    device = resolve_device(cfg.device)

    decode_size = round(cfg.input_size * DECODE_MARGIN)
    train_ds, train_bad = decoded_dataset(cfg, data.train, decode_size, data.base_uri)
    val_ds, val_bad = decoded_dataset(cfg, data.val, cfg.input_size, data.base_uri)
    cal_ds, cal_bad = (decoded_dataset(cfg, data.calibration, cfg.input_size, data.base_uri)
                       if data.calibration is not None else (None, 0))
    val_classes = len(pc.unique(data.val.column("label")))
    cal_rows = data.calibration.num_rows if data.calibration is not None else 0
    print(f"data: {data.train.num_rows} train rows ({train_bad} unreadable), {data.val.num_rows} "
          f"val rows ({val_bad} unreadable), {cal_rows} calibration rows ({cal_bad} unreadable), "
          f"{len(data.classes)} classes ({val_classes} of them in val)", flush=True)
    counts = np.bincount(data.train.column("label").to_numpy(), minlength=len(data.classes))

    ckpt_fs, ckpt_path = storage.arrow_filesystem(ckpt_root)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "classes": data.classes,
                           "fine_to_coarse": fine_to_coarse, "num_coarse": len(coarse_names),
                           "class_counts": counts.tolist(),
                           "train_rows": data.train.num_rows - train_bad},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=device == "cuda",
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=ckpt_path, storage_filesystem=ckpt_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep,
                                               checkpoint_score_attribute=cfg.monitor,
                                               checkpoint_score_order=monitor_mode(cfg.monitor))),
        datasets={"train": train_ds, "val": val_ds},
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker failures; keep the cause chained
        raise TrainingError(f"training failed: {exc}") from exc
    best_ckpt, best_metrics = pick_best(result, cfg.monitor)
    frame = result.metrics_dataframe
    history = frame.to_dict(orient="records") if frame is not None else []
    model = create_model(cfg.model_name, len(data.classes))
    with best_ckpt.as_directory() as folder:
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    logits, labels, val_embeddings = predict_logits(model, val_ds, cfg)
    # Fitted on the calibration rows, never on the rows that report them (val).
    cal_logits, cal_labels, cal_embeddings = (predict_logits(model, cal_ds, cfg) if cal_ds is not None
                                              else (logits, labels, val_embeddings))
    temperature = fit_temperature(cal_logits, cal_labels) if cfg.calibrate else 1.0
    final = final_metrics(logits, labels, temperature, fine_to_coarse)
    _, train_labels, train_embeddings = predict_logits(model, train_ds, cfg)
    centroids = openset.class_centroids(train_embeddings, train_labels, len(data.classes))
    open_set = openset.calibrate(cal_logits, temperature, cal_embeddings, centroids)
    decisions = decide.fit_policy(
        torch.softmax(cal_logits / temperature, 1).numpy(), cal_labels.numpy(), data.classes,
        data.coarse_classes, fitted_on={
            "split": CALIBRATION_SPLIT if cal_ds is not None else "val",
            "rows": len(cal_labels), "backend": TORCH_BACKEND}) if cfg.calibrate else {}
    last = result.metrics or {}
    wall = time.perf_counter() - start
    summary = {
        "manifest": storage.normalize(cfg.manifest), "train_rows": data.train.num_rows - train_bad,
        "val_rows": data.val.num_rows - val_bad, "unreadable_rows": train_bad + val_bad + cal_bad,
        "calibration_rows": cal_rows - cal_bad if cal_ds is not None else 0,
        "calibration_split": CALIBRATION_SPLIT if cal_ds is not None else "val",
        "excluded_rows": data.excluded,
        "epochs": cfg.epochs, "epochs_run": int(last.get("epoch", -1)) + 1,
        "early_stopped": bool(last.get("early_stopped", False)),
        "best_epoch": int(best_metrics["epoch"]) + 1,
        "val_accuracy": best_metrics["val_accuracy"],
        "val_top5_accuracy": best_metrics["val_top5_accuracy"],
        "val_coarse_accuracy": best_metrics.get("val_coarse_accuracy"),
        "val_coarse_head_accuracy": best_metrics.get("val_coarse_head_accuracy"),
        "val_macro_f1": final["val_macro_f1"], "val_ece": final["val_ece"],
        "val_ece_uncalibrated": final["val_ece_uncalibrated"], "temperature": temperature,
        "start": start_info, "checkpoints": storage.join(ckpt_root, RUN_NAME),
        "wall_time_s": round(wall, 1), "device": device,
        "num_workers": cfg.num_workers, "config": cfg.model_dump(mode="json"),
        "history": [{k: v for k, v in row.items() if isinstance(v, int | float | str)}
                    for row in history],
    }
    meta = ModelMetadata(architecture=cfg.model_name, classes=data.classes,
                         input_size=cfg.input_size, mean=list(spec.mean), std=list(spec.std),
                         temperature=temperature, coarse_classes=data.coarse_classes,
                         training=summary, provenance=weights_provenance(start_info),
                         weights_dtype=cfg.weights_dtype, open_set=open_set,
                         decisions=decisions)
    meta = save_artifact(model, meta, storage.join(output, "model"), centroids)
    summary["model"] = storage.join(output, "model")
    summary["model_version"] = meta.model_version
    storage.write_json(storage.join(output, "training_summary.json"), summary)
    return summary
