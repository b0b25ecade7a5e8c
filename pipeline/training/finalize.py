"""After training: the best epoch's model scored on the driver, its temperature, open-set
threshold and decision thresholds fitted on the calibration rows (never on the rows that report
them), its validation metrics, and the artifact (safetensors + JSON) with the run's summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.catalog import CALIBRATION_SPLIT
from pipeline.config import TrainConfig
from pipeline.models import decide, openset
from pipeline.models.artifact import TORCH_BACKEND, ModelMetadata, save_artifact, weights_provenance
from pipeline.models.calibration import expected_calibration_error, fit_temperature
from pipeline.models.registry import get_spec
from pipeline.models.transforms import norm_tensors, resize_batch, to_model_input
from pipeline.training.data import LabelledData


@dataclass
class Decoded:
    """The decoded Ray datasets of each split and how many of its rows could not be read."""

    train: Any
    val: Any
    calibration: Any | None
    train_bad: int
    val_bad: int
    calibration_bad: int


@dataclass
class Fitted:
    """What the artifact records beside the weights, fitted after training."""

    temperature: float
    final: dict
    centroids: torch.Tensor
    open_set: dict
    decisions: dict


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


def fit_calibration(cfg: TrainConfig, model: nn.Module, data: LabelledData, decoded: Decoded,
                    fine_to_coarse: list[int] | None) -> Fitted:
    """Temperature, class centroids, open-set threshold and decision thresholds of the trained
    model, fitted on the calibration rows (on val when there are none), and its val metrics."""
    logits, labels, val_embeddings = predict_logits(model, decoded.val, cfg)
    # Fitted on the calibration rows, never on the rows that report them (val).
    cal_logits, cal_labels, cal_embeddings = (
        predict_logits(model, decoded.calibration, cfg) if decoded.calibration is not None
        else (logits, labels, val_embeddings))
    temperature = fit_temperature(cal_logits, cal_labels) if cfg.calibrate else 1.0
    final = final_metrics(logits, labels, temperature, fine_to_coarse)
    _, train_labels, train_embeddings = predict_logits(model, decoded.train, cfg)
    centroids = openset.class_centroids(train_embeddings, train_labels, len(data.classes))
    open_set = openset.calibrate(cal_logits, temperature, cal_embeddings, centroids)
    decisions = decide.fit_policy(
        torch.softmax(cal_logits / temperature, 1).numpy(), cal_labels.numpy(), data.classes,
        data.coarse_classes, fitted_on={
            "split": CALIBRATION_SPLIT if decoded.calibration is not None else "val",
            "rows": len(cal_labels), "backend": TORCH_BACKEND}) if cfg.calibrate else {}
    return Fitted(temperature, final, centroids, open_set, decisions)


def training_summary(cfg: TrainConfig, data: LabelledData, decoded: Decoded, result,
                     best_metrics: dict, fitted: Fitted, run_info: dict) -> dict:
    """training_summary.json (also the artifact's `training` record). `run_info` holds the
    run's start record, checkpoints folder, wall time and device."""
    last = result.metrics or {}
    frame = result.metrics_dataframe
    history = frame.to_dict(orient="records") if frame is not None else []
    has_cal = decoded.calibration is not None
    cal_rows = data.calibration.num_rows if data.calibration is not None else 0
    final = fitted.final
    return {
        "manifest": storage.normalize(cfg.manifest),
        "train_rows": data.train.num_rows - decoded.train_bad,
        "val_rows": data.val.num_rows - decoded.val_bad,
        "unreadable_rows": decoded.train_bad + decoded.val_bad + decoded.calibration_bad,
        "calibration_rows": cal_rows - decoded.calibration_bad if has_cal else 0,
        "calibration_split": CALIBRATION_SPLIT if has_cal else "val",
        "excluded_rows": data.excluded,
        "reviews": data.reviews,  # --reviews: the table and how many training rows came from it
        "epochs": cfg.epochs, "epochs_run": int(last.get("epoch", -1)) + 1,
        "early_stopped": bool(last.get("early_stopped", False)),
        "best_epoch": int(best_metrics["epoch"]) + 1,
        "val_accuracy": best_metrics["val_accuracy"],
        "val_top5_accuracy": best_metrics["val_top5_accuracy"],
        "val_coarse_accuracy": best_metrics.get("val_coarse_accuracy"),
        "val_coarse_head_accuracy": best_metrics.get("val_coarse_head_accuracy"),
        "val_macro_f1": final["val_macro_f1"], "val_ece": final["val_ece"],
        "val_ece_uncalibrated": final["val_ece_uncalibrated"], "temperature": fitted.temperature,
        "start": run_info["start"], "checkpoints": run_info["checkpoints"],
        "wall_time_s": round(run_info["wall_time_s"], 1), "device": run_info["device"],
        "num_workers": cfg.num_workers, "config": cfg.model_dump(mode="json"),
        "history": [{k: v for k, v in row.items() if isinstance(v, int | float | str)}
                    for row in history],
    }


def write_artifact(cfg: TrainConfig, model: nn.Module, data: LabelledData, fitted: Fitted,
                   summary: dict, output: str) -> dict:
    """Save the model artifact under `<output>/model` and training_summary.json; return the
    summary with the model's location and version."""
    spec = get_spec(cfg.model_name)
    meta = ModelMetadata(architecture=cfg.model_name, classes=data.classes,
                         input_size=cfg.input_size, mean=list(spec.mean), std=list(spec.std),
                         temperature=fitted.temperature, coarse_classes=data.coarse_classes,
                         training=summary, provenance=weights_provenance(summary["start"]),
                         weights_dtype=cfg.weights_dtype, open_set=fitted.open_set,
                         decisions=fitted.decisions)
    meta = save_artifact(model, meta, storage.join(output, "model"), fitted.centroids)
    summary["model"] = storage.join(output, "model")
    summary["model_version"] = meta.model_version
    storage.write_json(storage.join(output, "training_summary.json"), summary)
    return summary
