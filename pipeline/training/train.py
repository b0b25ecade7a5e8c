"""Training on Ray Train, the driver: `run(cfg)` from the manifest to a model artifact.

The recipe follows torchvision's references/classification, one concern a module: the data
(`training.data`: labels and splits read on the driver, images fetched and decoded once by Ray
Data CPU tasks and cached in the object store; every epoch re-augments the cached uint8 images
on the worker), the recipe (`training.recipe`: schedule, loss,
early stopping, adversarial training, starting model), the worker's loop (`training.loop`:
`train_one_epoch`, `evaluate`, `train_loop_per_worker`), checkpoints (`training.checkpoint`), and
what follows training (`training.finalize`). The best checkpoint by the monitored metric becomes
a model artifact (safetensors + JSON).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow.compute as pc
from safetensors.torch import load_file
from torch import nn

from pipeline import logs, storage
from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.inference import console
from pipeline.models.registry import create_model, get_spec
from pipeline.training.checkpoint import RUN_NAME, check_resume, checkpoint_root, pick_best
from pipeline.training.data import (
    DECODE_MARGIN,
    LabelledData,
    decoded_dataset,
    fine_to_coarse_map,
    load_data,
)
from pipeline.training.finalize import Decoded, fit_calibration, training_summary, write_artifact
from pipeline.training.loop import train_loop_per_worker
from pipeline.training.progress import EpochLines
from pipeline.training.recipe import monitor_mode, start_record

# Ray Train settings the driver passes on to the controller and workers (Ray Train reads them
# from the driver's environment). The print patch sends every print of a worker to its logger
# and, as Ray wraps the worker's stdout, to stdout as well: each epoch line came out twice. The
# preemption watcher guards cloud nodes that can be taken away; a private local Ray has none.
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def start_ray(cfg: TrainConfig) -> str:
    """Ray Train's environment, then Ray itself; returns the resolved device."""
    from pipeline.inference.cluster import cluster_device, init_ray

    on_cluster = bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    for name, value in (TRAIN_ENV if on_cluster else TRAIN_ENV | LOCAL_TRAIN_ENV).items():
        os.environ.setdefault(name, value)  # a value the user set wins
    init_ray(cfg.ray_address, cfg.num_cpus)
    return cluster_device(cfg.device)


def prepare_output(cfg: TrainConfig, output: str) -> str:
    """Check the checkpoint folder (resume only when asked) and the output, save the config;
    returns the checkpoint root."""
    ckpt_root = checkpoint_root(cfg, output)
    check_resume(cfg, ckpt_root)
    storage.check_writable(output)
    cfg.save(storage.join(output, "config.yaml"))
    return ckpt_root


def decode_splits(cfg: TrainConfig, data: LabelledData) -> Decoded:
    """Every split decoded once (training images with a margin for random crops); prints what
    was read."""
    from ray.util.debug import log_once

    # Ray Data warns once that "the cluster does not have any available CPUs; the Dataset job
    # will hang" when a split's decode starts while the previous one's tasks still hold the
    # cores: they free them a moment later, nothing hangs and there is nothing to act on.
    log_once("cpu_warning")
    decode_size = round(cfg.input_size * DECODE_MARGIN)
    train_ds, train_bad = decoded_dataset(cfg, data.train, decode_size, data.base_uri)
    val_ds, val_bad = decoded_dataset(cfg, data.val, cfg.input_size, data.base_uri)
    cal_ds, cal_bad = (decoded_dataset(cfg, data.calibration, cfg.input_size, data.base_uri)
                       if data.calibration is not None else (None, 0))
    val_classes = len(pc.unique(data.val.column("label")))
    cal_rows = data.calibration.num_rows if data.calibration is not None else 0
    logs.event("data", f"data: {data.train.num_rows} train rows ({train_bad} unreadable), "
               f"{data.val.num_rows} val rows ({val_bad} unreadable), {cal_rows} calibration rows "
               f"({cal_bad} unreadable), {len(data.classes)} classes ({val_classes} of them in "
               "val)", train_rows=data.train.num_rows, train_unreadable=train_bad,
               val_rows=data.val.num_rows, val_unreadable=val_bad, calibration_rows=cal_rows,
               calibration_unreadable=cal_bad, classes=len(data.classes), val_classes=val_classes)
    return Decoded(train_ds, val_ds, cal_ds, train_bad, val_bad, cal_bad)


def fit(cfg: TrainConfig, data: LabelledData, decoded: Decoded, fine_to_coarse: list[int] | None,
        num_coarse: int, device: str, ckpt_root: str):
    """Run `train_loop_per_worker` on Ray Train's workers; returns Ray Train's result."""
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    lines = EpochLines()
    counts = np.bincount(data.train.column("label").to_numpy(), minlength=len(data.classes))
    ckpt_fs, ckpt_path = storage.arrow_filesystem(ckpt_root)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "classes": data.classes,
                           "fine_to_coarse": fine_to_coarse, "num_coarse": num_coarse,
                           "class_counts": counts.tolist(),
                           "train_rows": data.train.num_rows - decoded.train_bad,
                           "progress": lines.queue},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=device == "cuda",
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=ckpt_path, storage_filesystem=ckpt_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep,
                                               checkpoint_score_attribute=cfg.monitor,
                                               checkpoint_score_order=monitor_mode(cfg.monitor)),
            # Off a terminal, Ray Train's own INFO lines (worker group start-up, each checkpoint
            # and report) say nothing a scheduler's log needs; its warnings stay.
            logging_config=LoggingConfig(log_level="WARNING" if console.plain() else "INFO")),
        datasets={"train": decoded.train, "val": decoded.val},
    )
    try:
        return trainer.fit()
    except Exception as exc:  # Ray wraps worker failures; keep the cause chained
        raise TrainingError(f"training failed: {exc}") from exc
    finally:
        lines.close()


def load_best(cfg: TrainConfig, num_classes: int, checkpoint) -> nn.Module:
    """The plain classifier of a checkpoint (a coarse head, if any, stays out of the artifact)."""
    model = create_model(cfg.model_name, num_classes)
    with checkpoint.as_directory() as folder:
        model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model


def run(cfg: TrainConfig) -> dict:
    """Train, export the best epoch as an artifact under `<output>/model`, return its summary."""
    start = time.perf_counter()
    spec = get_spec(cfg.model_name)  # an unknown architecture stops the job before any work
    if cfg.input_size is None:
        cfg = cfg.model_copy(update={"input_size": spec.input_size})
    data = load_data(cfg)
    fine_to_coarse, coarse_names = fine_to_coarse_map(data)
    if cfg.coarse_head and fine_to_coarse is None:
        raise ConfigError("--coarse-head needs a coarse_category for every class in the manifest")
    start_info = start_record(cfg, data.classes)
    output = storage.normalize(cfg.output)
    ckpt_root = prepare_output(cfg, output)
    device = start_ray(cfg)
    decoded = decode_splits(cfg, data)
    result = fit(cfg, data, decoded, fine_to_coarse, len(coarse_names), device, ckpt_root)
    best_ckpt, best_metrics = pick_best(result, cfg.monitor)
    model = load_best(cfg, len(data.classes), best_ckpt)
    fitted = fit_calibration(cfg, model, data, decoded, fine_to_coarse)
    run_info = {"start": start_info, "checkpoints": storage.join(ckpt_root, RUN_NAME),
                "wall_time_s": time.perf_counter() - start, "device": device}
    summary = training_summary(cfg, data, decoded, result, best_metrics, fitted, run_info)
    return write_artifact(cfg, model, data, fitted, summary, output)
