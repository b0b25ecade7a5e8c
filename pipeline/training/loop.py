"""One Ray Train worker's loop, after torchvision's references/classification: `train_one_epoch`
and `evaluate`, run by `train_loop_per_worker` from its setup to a checkpoint per epoch."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import TrainConfig
from pipeline.models.registry import freeze_batchnorm_stats, get_spec
from pipeline.models.transforms import EvalPreset, TrainPreset, norm_tensors, to_model_input
from pipeline.training import progress
from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
from pipeline.training.recipe import (
    Adversarial,
    CosinePlan,
    EarlyStopping,
    budget_epochs,
    build_criterion,
    build_model,
    build_optimizer,
    group_plans,
    monitor_mode,
    optimizer_groups,
    presets,
)


def _forward(model, images, mean, std, device, mixed_precision: bool):
    """(fine logits, coarse logits or None) in float32."""
    with torch.autocast(device.type, dtype=torch.bfloat16,
                        enabled=device.type == "cuda" and mixed_precision):
        out = model(to_model_input(images, mean, std))
    fine, coarse = out if isinstance(out, tuple) else (out, None)
    return fine.float(), None if coarse is None else coarse.float()


def _set_train_mode(model, bn_frozen: bool) -> None:
    """Training mode, with the BatchNorm statistics the recipe keeps frozen left alone."""
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
    """One pass over `batches` (uint8 images augmented by `preset`): loss, accuracy and speed
    on this worker's share."""
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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Augmentation and dropout randomness per (epoch, worker): a resumed run draws the same
    numbers as an uninterrupted one."""
    return seed * 1_000_003 + epoch * 1009 + rank


@dataclass
class Worker:
    """What one worker trains with, set up by `setup_worker`."""

    cfg: TrainConfig
    rank: int
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    fine_to_coarse: torch.Tensor | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plans: list[CosinePlan]
    criterion: nn.Module
    stopper: EarlyStopping
    start_epoch: int = 0

    @property
    def plan(self) -> CosinePlan:
        """The head's schedule: the epoch count every group follows."""
        return self.plans[0]


def setup_worker(config: dict[str, Any]) -> Worker:
    """Seeded model, optimizer, schedule, loss and early stopping on this worker's device,
    restored from the run's latest checkpoint when there is one."""
    import ray.train
    import ray.train.torch

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
    groups = optimizer_groups(model, cfg)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = build_optimizer(groups, cfg)
    steps = max(1, config["train_rows"] // (cfg.batch_size * world))
    plans = group_plans(groups, steps, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plans)
    criterion = build_criterion(cfg, np.asarray(config["class_counts"])).to(device)
    stopper = EarlyStopping(cfg.early_stopping_patience, monitor_mode(cfg.monitor),
                            cfg.early_stopping_min_delta)
    worker = Worker(cfg, rank, device, mean, std, fine_to_coarse, model, optimizer, scheduler,
                    plans, criterion, stopper)
    resume(worker)
    return worker


def resume(worker: Worker) -> None:
    """Restore model, optimizer, schedule and early stopping from the run's latest checkpoint."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            worker.start_epoch, stop_state = load_checkpoint(
                folder, worker.model, worker.optimizer, worker.scheduler)
        worker.stopper.best = stop_state.get("best")
        worker.stopper.bad_epochs = stop_state.get("bad_epochs", 0)


def run_epoch(w: Worker, epoch: int, train_shard, val_shard,
              preset: TrainPreset, eval_preset: EvalPreset) -> dict:
    """Train one epoch on this worker's shard, then evaluate on the validation shard."""
    cfg = w.cfg
    torch.manual_seed(epoch_seed(cfg.seed, epoch, w.rank))
    batches = train_shard.iter_torch_batches(
        batch_size=cfg.batch_size, drop_last=True, local_shuffle_buffer_size=cfg.batch_size * 8,
        local_shuffle_seed=cfg.seed + epoch)
    metrics = train_one_epoch(w.model, w.criterion, w.optimizer, w.scheduler, batches, preset,
                              w.mean, w.std, w.device, cfg.mixed_precision,
                              cfg.coarse_loss_weight if cfg.coarse_head else 0.0,
                              cfg.bn_mode == "frozen", Adversarial.from_config(cfg))
    val_batches = ({**b, "image": eval_preset(b["image"])}
                   for b in val_shard.iter_torch_batches(batch_size=cfg.batch_size))
    metrics.update(evaluate(w.model, val_batches, w.mean, w.std, w.device, w.fine_to_coarse,
                            cfg.mixed_precision))
    return metrics


def fit_budget(w: Worker, epoch: int, elapsed: float) -> None:
    """Shorten (or keep) every group's schedule to the epochs the time budget still holds."""
    if w.cfg.time_budget_min:
        fit = budget_epochs(epoch + 1, epoch + 1 - w.start_epoch, elapsed,
                            w.cfg.time_budget_min * 60, w.cfg.epochs)
        for p in w.plans:
            p.epochs = fit


def report_epoch(w: Worker, metrics: dict, epoch: int) -> None:
    """Report the epoch's metrics to Ray Train, with a checkpoint from the first worker."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        if w.rank == 0:
            save_checkpoint(folder, w.model, w.optimizer, w.scheduler, epoch, metrics,
                            w.stopper.state())
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if w.rank == 0 else None)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function: epochs until the schedule, --stop-at-epoch or early
    stopping ends the run; every epoch is reported with a checkpoint."""
    import ray.train

    w = setup_worker(config)
    cfg = w.cfg
    lines = config.get("progress")  # the driver's queue (pipeline.training.progress)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    preset, eval_preset = presets(cfg)
    run_start = time.perf_counter()
    epoch = w.start_epoch
    while epoch < min(w.plan.epochs, cfg.stop_at_epoch or w.plan.epochs):
        epoch_start = time.perf_counter()
        metrics = run_epoch(w, epoch, train_shard, val_shard, preset, eval_preset)
        stop = w.stopper.update(metrics[cfg.monitor])
        elapsed = time.perf_counter() - run_start
        fit_budget(w, epoch, elapsed)
        metrics.update(epoch=epoch, lr=w.scheduler.get_last_lr()[0], planned_epochs=w.plan.epochs,
                       epoch_time_s=time.perf_counter() - epoch_start, early_stopped=stop)
        if w.rank == 0:
            print_progress(lines, metrics, w.plan.epochs,
                           elapsed / (epoch + 1 - w.start_epoch) * (w.plan.epochs - epoch - 1))
        report_epoch(w, metrics, epoch)
        if stop:
            if w.rank == 0:
                progress.send(lines, "early_stop", f"early stopping: {cfg.monitor} did not improve "
                              f"for {cfg.early_stopping_patience} epochs (best "
                              f"{w.stopper.best:.4f})", monitor=cfg.monitor, best=w.stopper.best,
                              patience=cfg.early_stopping_patience)
            break
        epoch += 1


EPOCH_FIELDS = ("train_loss", "train_accuracy", "val_accuracy", "val_coarse_accuracy", "val_loss",
                "lr", "train_images_per_s", "epoch_time_s")


def print_progress(lines: Any, metrics: dict, epochs: int, left_s: float) -> None:
    """One line per epoch a person can follow: loss, accuracy, learning rate, speed, time left
    (printed by the driver, through `lines`)."""
    coarse = (f" coarse {metrics['val_coarse_accuracy']:.3f}"
              if "val_coarse_accuracy" in metrics else "")
    text = (f"epoch {metrics['epoch'] + 1}/{epochs} loss {metrics['train_loss']:.3f} "
            f"train_acc {metrics['train_accuracy']:.3f} val_acc {metrics['val_accuracy']:.3f}"
            f"{coarse} val_loss {metrics['val_loss']:.3f} lr {metrics['lr']:.2e} "
            f"{metrics['train_images_per_s']:.0f} img/s epoch {metrics['epoch_time_s']:.0f}s "
            f"left ~{left_s / 60:.1f} min")
    numbers = {k: float(metrics[k]) for k in EPOCH_FIELDS if k in metrics}
    progress.send(lines, "epoch", text, epoch=metrics["epoch"] + 1, epochs=epochs,
                  left_s=round(left_s, 1), **numbers)
