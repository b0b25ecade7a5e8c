"""The feature-extraction route: embed images with a fixed backbone (a Ray Data job), fit a
scikit-learn logistic regression on the embeddings, and export it as an ordinary model artifact.

The embedding is the input of the backbone's final Linear layer, so a multinomial logistic
regression on it (with the feature standardization folded into its weights) *is* a Linear head:
the exported artifact is the backbone with that head, in safetensors, and the nightly job runs it
like any trained model. Nothing is pickled. A k-NN classifier is fitted too, for comparison only.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline import storage
from pipeline.config import EmbedConfig, TrainConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.inference.fail_fast import mass_failure
from pipeline.models import openset
from pipeline.models.artifact import (
    ModelMetadata,
    is_artifact,
    load_artifact,
    load_metadata,
    save_artifact,
    weights_provenance,
)
from pipeline.models.calibration import expected_calibration_error, fit_temperature
from pipeline.models.registry import create_model, describe_weights, get_spec, remove_head, replace_head
from pipeline.models.transforms import norm_tensors, to_model_input

NO_TRAINING_ROWS_BIAS = -30.0  # logit bias for a class without training rows: never predicted


def load_backbone(cfg: EmbedConfig) -> tuple[nn.Module, str, int, list[float], list[float]]:
    """The classifier the embeddings come from, with its architecture, input size, mean, std."""
    if cfg.backbone and is_artifact(cfg.backbone):
        model, meta = load_artifact(cfg.backbone)
        return model, meta.architecture, meta.input_size, meta.mean, meta.std
    spec = get_spec(cfg.model_name)
    model = create_model(cfg.model_name, 1, cfg.backbone).eval()
    return model, cfg.model_name, cfg.input_size or spec.input_size, list(spec.mean), list(spec.std)


def backbone_provenance(cfg: EmbedConfig) -> dict:
    """Where the backbone's weights came from (artifact.weights_provenance)."""
    if cfg.backbone and is_artifact(cfg.backbone):
        start = {"kind": "artifact", "uri": cfg.backbone,
                 "model_version": load_metadata(cfg.backbone).model_version}
    else:
        start = describe_weights(cfg.model_name, cfg.backbone)
    return weights_provenance(start)


@dataclass(frozen=True)
class EmbedderSettings:
    """An Embedder's settings as the engine passes them (it adds device and threads)."""

    cfg: EmbedConfig


class Embedder:
    """Ray Data callable: uint8 NHWC images -> the pooled features the head would see."""

    def __init__(self, cfg: EmbedConfig, num_threads: int = 1, device: str = "cpu"):
        torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.device = torch.device(device)
        model, arch, _, mean, std = load_backbone(self.cfg)
        remove_head(model, arch)
        self.model = model.eval().to(self.device)
        self.mean, self.std = norm_tensors(mean, std, self.device)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = np.asarray(batch["status"]) == "ok"
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(images[ok])).to(self.device)
            found = self.model(to_model_input(x, self.mean, self.std)).float().cpu().numpy()
            features = np.zeros((len(images), found.shape[1]), dtype=np.float32)
            features[ok] = found
        else:
            features = np.zeros((len(images), 1), dtype=np.float32)
        return {**batch, "features": features}


def embed(cfg: EmbedConfig, table: pa.Table, base_uri: str, input_size: int) -> dict[str, np.ndarray]:
    """Features, labels and split of every readable row (unreadable rows are counted)."""
    from pipeline.inference import engine

    images = engine.ImageSettings.from_config(cfg, input_size, base_uri)
    parts = engine.score(engine.start(cfg, table.num_rows), images, table,
                         engine.Predictor(Embedder, EmbedderSettings(cfg)),
                         columns=["label", "is_val", "status", "features", "error_type",
                                  "error_message"])
    ok = np.concatenate([p["status"] for p in parts]) == "ok"
    failure = mass_failure(np.concatenate([p["error_type"] for p in parts]),
                           np.concatenate([p["error_message"] for p in parts]), len(ok), "rows")
    if failure and not ok.any():
        raise ConfigError(f"no image could be read: {failure}")
    if failure:
        print(f"warning: {failure}", file=sys.stderr, flush=True)
    return {"features": np.concatenate([np.stack(p["features"]) for p in parts])[ok],
            "label": np.concatenate([p["label"] for p in parts])[ok],
            "is_val": np.concatenate([p["is_val"] for p in parts])[ok],
            "unreadable": int((~ok).sum())}


def linear_head(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                fitted_classes: np.ndarray, num_classes: int) -> nn.Linear:
    """The Linear layer computing the logistic regression's logits on raw features.

    sklearn sees (x - mean) / scale, so W' = W / scale and b' = b - W' . mean. Classes without
    training rows get a zero row and a very negative bias."""
    if coef.shape[0] == 1:  # binary problems come back as one row: logits (-z/2, z/2) give the same softmax
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, coef.shape[1]), dtype=np.float64)
    bias = np.full(num_classes, NO_TRAINING_ROWS_BIAS, dtype=np.float64)
    w = coef / scale
    weight[fitted_classes] = w
    bias[fitted_classes] = intercept - w @ mean
    head = nn.Linear(coef.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return head


def fit_classifiers(feats: dict[str, np.ndarray], num_classes: int, cfg: EmbedConfig) -> dict:
    """Logistic regression (exported) and k-NN (compared) on the training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    train, val = ~feats["is_val"], feats["is_val"]
    x, y = feats["features"], feats["label"]
    scaler = StandardScaler().fit(x[train])
    logreg = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(scaler.transform(x[train]), y[train])
    knn = KNeighborsClassifier(n_neighbors=cfg.knn_k, metric="cosine").fit(x[train], y[train])
    head = linear_head(logreg.coef_, logreg.intercept_, scaler.mean_, scaler.scale_, logreg.classes_,
                       num_classes)
    return {"head": head, "knn_val_accuracy": float((knn.predict(x[val]) == y[val]).mean()),
            "logreg": logreg, "scaler": scaler}


def run(cfg: EmbedConfig) -> dict:
    """Embed, fit, export `<output>/model`; return the summary (also in embedding_summary.json)."""
    from sklearn.metrics import f1_score

    from pipeline.training.data import load_data

    start = time.perf_counter()
    # The probe fits its temperature on its validation rows; it holds out no calibration rows.
    data = load_data(TrainConfig(manifest=cfg.manifest, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                 max_train_rows=cfg.max_train_rows, calibration_fraction=0))
    model, arch, input_size, mean, std = load_backbone(cfg)
    output = storage.normalize(cfg.output)
    storage.check_writable(output)
    table = pa.concat_tables([
        data.train.append_column("is_val", pa.array(np.zeros(data.train.num_rows, dtype=bool))),
        data.val.append_column("is_val", pa.array(np.ones(data.val.num_rows, dtype=bool)))])
    feats = embed(cfg, table, data.base_uri, input_size)
    if not (~feats["is_val"]).any() or not feats["is_val"].any():
        raise TrainingError("feature route: no readable training or validation rows")
    fitted = fit_classifiers(feats, len(data.classes), cfg)
    replace_head(model, arch, len(data.classes))
    _set_head(model, arch, fitted["head"])
    model.eval()

    val = feats["is_val"]
    with torch.no_grad():
        logits = fitted["head"](torch.from_numpy(feats["features"][val]))
    y_val = torch.from_numpy(feats["label"][val])
    val_features = torch.from_numpy(feats["features"][val])
    centroids = openset.class_centroids(torch.from_numpy(feats["features"][~val]),
                                        torch.from_numpy(feats["label"][~val]), len(data.classes))
    temperature = fit_temperature(logits, y_val) if cfg.calibrate else 1.0
    probs = torch.softmax(logits / temperature, 1)
    pred = probs.argmax(1).numpy()
    correct = pred == y_val.numpy()
    summary = {
        "route": "features", "manifest": storage.normalize(cfg.manifest),
        "backbone": cfg.backbone or cfg.model_name, "architecture": arch, "input_size": input_size,
        "classifier": "logistic_regression", "C": cfg.C,
        "train_rows": int((~val).sum()), "val_rows": int(val.sum()), "unreadable_rows": feats["unreadable"],
        "feature_dim": int(feats["features"].shape[1]),
        "val_accuracy": float(correct.mean()),
        "val_macro_f1": float(f1_score(y_val.numpy(), pred, labels=np.unique(y_val.numpy()),
                                       average="macro", zero_division=0)),
        "val_ece": expected_calibration_error(probs.max(1).values.numpy(), correct),
        "knn_val_accuracy": fitted["knn_val_accuracy"], "knn_k": cfg.knn_k, "temperature": temperature,
        "wall_time_s": round(time.perf_counter() - start, 1), "config": cfg.model_dump(mode="json"),
    }
    meta = ModelMetadata(architecture=arch, classes=data.classes, input_size=input_size, mean=list(mean),
                         std=list(std), temperature=temperature, coarse_classes=data.coarse_classes,
                         training=summary, provenance=backbone_provenance(cfg),
                         weights_dtype=cfg.weights_dtype,
                         open_set=openset.calibrate(logits, temperature, val_features, centroids))
    meta = save_artifact(model, meta, storage.join(output, "model"), centroids)
    summary["model"] = storage.join(output, "model")
    summary["model_version"] = meta.model_version
    storage.write_json(storage.join(output, "embedding_summary.json"), summary)
    cfg.save(storage.join(output, "config.yaml"))
    return summary


def _set_head(model: nn.Module, arch: str, head: nn.Linear) -> None:
    target = model.get_submodule(get_spec(arch).head)
    with torch.no_grad():
        target.weight.copy_(head.weight)
        target.bias.copy_(head.bias)
