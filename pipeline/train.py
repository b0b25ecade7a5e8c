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

from pipeline import storage
from pipeline.artifact import ModelMetadata, save_artifact
from pipeline.catalog import open_dataset, validate_manifest
from pipeline.config import TrainConfig
from pipeline.errors import TrainingError
from pipeline.models import create_model, get_spec
from pipeline.preprocess import Preprocessor
from pipeline.transforms import EvalPreset, TrainPreset, norm_tensors, to_model_input

DECODE_MARGIN = 1.15  # training images are decoded this much larger than the crop size


@dataclass
class LabelledData:
    train: pa.Table  # product_id, image_uri, label, coarse_label
    val: pa.Table
    classes: list[str]
    coarse_classes: dict[str, str]
    base_uri: str


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: `val_fraction` of each class (at least one where a class
    has two or more rows), chosen with a seeded permutation."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            continue
        k = max(1, round(len(idx) * val_fraction))
        is_val[rng.permutation(idx)[:k]] = True
    return is_val


def load_data(cfg: TrainConfig) -> LabelledData:
    manifest = validate_manifest(cfg.manifest, training=True)
    cols = ["product_id", "image_uri", "category"] + [
        c for c in ("coarse_category", "split") if manifest.has(c)]
    table = open_dataset(manifest.uri).to_table(columns=cols)
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
    table = table.select(["product_id", "image_uri"]).append_column(
        "label", pa.array(labels)).append_column("coarse_label", pa.array(coarse_labels))

    if manifest.has("split"):
        split = open_dataset(manifest.uri).to_table(columns=["split"]).column("split")
        split = np.asarray(pc.fill_null(split, "train").to_pylist(), dtype=object)
    else:
        split = np.full(table.num_rows, "train", dtype=object)
    is_train, is_val = split == "train", split == "val"
    if not is_val.any():  # no validation rows given: hold out a seeded stratified share
        is_val = np.zeros(table.num_rows, dtype=bool)
        is_val[is_train] = stratified_split(labels[is_train], cfg.val_fraction, cfg.seed)
        is_train &= ~is_val
    rng = np.random.default_rng(cfg.seed)
    train_idx = rng.permutation(np.flatnonzero(is_train))  # shuffled: manifests are class-sorted
    if cfg.max_train_rows:
        train_idx = train_idx[: cfg.max_train_rows]
    train = table.take(pa.array(train_idx))
    val = table.take(pa.array(np.flatnonzero(is_val)))
    if train.num_rows == 0 or val.num_rows == 0:
        raise TrainingError(
            f"manifest {manifest.uri!r} gives {train.num_rows} training and {val.num_rows} "
            "validation rows; both must be non-empty")
    return LabelledData(train, val, classes, coarse_classes, manifest.base_uri)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train_one_epoch(model, criterion, optimizer, scheduler, batches, preset, mean, std,
                    device) -> dict:
    model.train()
    seen, loss_sum, correct, start = 0, 0.0, 0, time.perf_counter()
    for batch in batches:
        images = preset(batch["image"]).to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(to_model_input(images, mean, std))
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = len(labels)
        seen += n
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            "train_images": seen, "train_images_per_s": seen / max(elapsed, 1e-9)}


@torch.inference_mode()
def evaluate(model, batches, mean, std, device, fine_to_coarse: torch.Tensor | None) -> dict:
    """Validation accuracy (fine, top-5, coarse) summed over all workers."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, coarse
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(to_model_input(images, mean, std)).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        pred = top5[:, 0]
        totals[0] += len(labels)
        totals[1] += (pred == labels).sum()
        totals[2] += (top5 == labels[:, None]).any(1).sum()
        if fine_to_coarse is not None:
            totals[3] += (fine_to_coarse[pred] == fine_to_coarse[labels]).sum()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    n = max(totals[0].item(), 1)
    out = {"val_images": int(totals[0].item()), "val_accuracy": totals[1].item() / n,
           "val_top5_accuracy": totals[2].item() / n}
    if fine_to_coarse is not None:
        out["val_coarse_accuracy"] = totals[3].item() / n
    return out


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(folder: str, model, optimizer, scheduler, epoch: int, metrics: dict) -> None:
    """Model and optimizer tensors in safetensors, everything else in JSON: no pickle."""
    save_file({k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {f"{pid}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for pid, state in opt["state"].items() for name, v in state.items()}
    save_file(tensors, os.path.join(folder, "optimizer.safetensors"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"epoch": epoch, "metrics": metrics, "param_groups": opt["param_groups"],
                   "scheduler": scheduler.state_dict()}, f, default=float)


def load_checkpoint(folder: str, model, optimizer, scheduler) -> int:
    """Restore model, optimizer and schedule; returns the next epoch to run."""
    _unwrap(model).load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    spec = get_spec(cfg.model_name)
    mean, std = norm_tensors(spec.mean, spec.std, device)
    fine_to_coarse = (torch.tensor(config["fine_to_coarse"], device=device)
                      if config["fine_to_coarse"] else None)

    model = create_model(cfg.model_name, len(config["classes"]), cfg.weights)
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, config["train_rows"] // (cfg.batch_size * world))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps * cfg.epochs, steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start_epoch = load_checkpoint(folder, model, optimizer, scheduler)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    preset, eval_preset = TrainPreset(cfg.input_size), EvalPreset()
    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, local_shuffle_buffer_size=cfg.batch_size * 8,
            local_shuffle_seed=cfg.seed + epoch)
        metrics = train_one_epoch(model, criterion, optimizer, scheduler, batches, preset,
                                  mean, std, device)
        val_batches = ({**b, "image": eval_preset(b["image"])}
                       for b in val_shard.iter_torch_batches(batch_size=cfg.batch_size))
        metrics.update(evaluate(model, val_batches, mean, std, device, fine_to_coarse))
        metrics.update(epoch=epoch, lr=scheduler.get_last_lr()[0],
                       epoch_time_s=time.perf_counter() - epoch_start)
        if rank == 0:
            done = epoch + 1 - start_epoch
            left = (time.perf_counter() - run_start) / done * (cfg.epochs - epoch - 1)
            coarse = (f" coarse {metrics['val_coarse_accuracy']:.3f}"
                      if "val_coarse_accuracy" in metrics else "")
            print(f"epoch {epoch + 1}/{cfg.epochs} loss {metrics['train_loss']:.3f} "
                  f"train_acc {metrics['train_accuracy']:.3f} val_acc {metrics['val_accuracy']:.3f}"
                  f"{coarse} lr {metrics['lr']:.2e} {metrics['train_images_per_s']:.0f} img/s "
                  f"epoch {metrics['epoch_time_s']:.0f}s left ~{left / 60:.1f} min", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                save_checkpoint(folder, model, optimizer, scheduler, epoch, metrics)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)


def decoded_dataset(table: pa.Table, size: int, base_uri: str):
    """Ray Data: fetch + decode once, drop rows that fail (counted), cache in the object store."""
    import ray.data

    ds = ray.data.from_arrow(table).map_batches(
        Preprocessor(size, base_uri), batch_size=32, batch_format="numpy")
    ds = ds.materialize()
    bad = ds.filter(expr="status != 'ok'").count()
    ok = ds.filter(expr="status == 'ok'").select_columns(["image", "label", "coarse_label"])
    return ok.materialize(), bad


def run(cfg: TrainConfig) -> dict:
    """Train, export the best epoch as an artifact under `<output>/model`, return its summary."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import init_ray

    start = time.perf_counter()
    spec = get_spec(cfg.model_name)
    data = load_data(cfg)
    output = storage.normalize(cfg.output)
    storage.check_writable(output)
    cfg.save(storage.join(output, "config.yaml"))
    init_ray(cfg.ray_address, cfg.num_cpus)

    decode_size = round(cfg.input_size * DECODE_MARGIN)
    train_ds, train_bad = decoded_dataset(data.train, decode_size, data.base_uri)
    val_ds, val_bad = decoded_dataset(data.val, cfg.input_size, data.base_uri)
    print(f"data: {data.train.num_rows} train rows ({train_bad} unreadable), {data.val.num_rows} "
          f"val rows ({val_bad} unreadable), {len(data.classes)} classes", flush=True)
    coarse_names = sorted(set(data.coarse_classes.values()))
    fine_to_coarse = ([coarse_names.index(data.coarse_classes[c]) for c in data.classes]
                      if len(data.coarse_classes) == len(data.classes) else None)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "classes": data.classes,
                           "fine_to_coarse": fine_to_coarse,
                           "train_rows": data.train.num_rows - train_bad},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name="run", storage_path=storage.join(output, "checkpoints"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep,
                                               checkpoint_score_attribute="val_accuracy",
                                               checkpoint_score_order="max")),
        datasets={"train": train_ds, "val": val_ds},
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker failures; keep the cause chained
        raise TrainingError(f"training failed: {exc}") from exc
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])
    frame = result.metrics_dataframe
    history = frame.to_dict(orient="records") if frame is not None else []
    model = create_model(cfg.model_name, len(data.classes))
    with best_ckpt.as_directory() as folder:
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    wall = time.perf_counter() - start
    summary = {
        "manifest": storage.normalize(cfg.manifest), "train_rows": data.train.num_rows - train_bad,
        "val_rows": data.val.num_rows - val_bad, "unreadable_rows": train_bad + val_bad,
        "epochs": cfg.epochs, "best_epoch": int(best_metrics["epoch"]) + 1,
        "val_accuracy": best_metrics["val_accuracy"],
        "val_top5_accuracy": best_metrics["val_top5_accuracy"],
        "val_coarse_accuracy": best_metrics.get("val_coarse_accuracy"),
        "wall_time_s": round(wall, 1), "device": "cuda" if cfg.use_gpu else "cpu",
        "num_workers": cfg.num_workers, "config": cfg.model_dump(mode="json"),
        "history": [{k: v for k, v in row.items() if isinstance(v, int | float | str)}
                    for row in history],
    }
    meta = ModelMetadata(architecture=cfg.model_name, classes=data.classes,
                         input_size=cfg.input_size, mean=list(spec.mean), std=list(spec.std),
                         coarse_classes=data.coarse_classes, training=summary)
    meta = save_artifact(model, meta, storage.join(output, "model"))
    summary["model"] = storage.join(output, "model")
    summary["model_version"] = meta.model_version
    storage.write_json(storage.join(output, "training_summary.json"), summary)
    return summary
