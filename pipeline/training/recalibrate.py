"""`jobs.calibrate`: refit an artifact's temperature, open-set threshold and keep / change /
review thresholds on held-out labelled rows, scored by the backend that will run them (an int8
export's scores are not the torch model's), and write the result as a new artifact (same
weights, new model_version).

The rows are the calibration split that the model's training held out (recomputed from the
manifest and the training config recorded in model.json), or a named split. Never the split a
report is measured on.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.catalog import CALIBRATION_SPLIT
from pipeline.config import CalibrateConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.models import decide, openset
from pipeline.models.artifact import check_output, load_metadata, rewrite_artifact
from pipeline.models.calibration import expected_calibration_error, fit_temperature


def calibration_rows(cfg: CalibrateConfig, training: dict[str, Any]) -> tuple[pa.Table, str, str]:
    """(product_id, image_uri, category) of the rows to fit on, their base URI, and which split
    they are."""
    from pipeline.analysis.evaluate import labelled_rows

    if cfg.split:
        table, base_uri = labelled_rows(cfg)
        return table, base_uri, cfg.split
    from pipeline.training.data import load_data

    recorded = training.get("config")
    if not recorded:
        raise ConfigError(f"model {cfg.model!r} records no training config, so its calibration "
                          "split cannot be recomputed; give --split with held-out labelled rows")
    data = load_data(TrainConfig(**{**recorded, "manifest": cfg.manifest}))
    if data.calibration is None:
        raise ConfigError(f"model {cfg.model!r} was trained without a calibration split "
                          "(--calibration-fraction 0); give --split with held-out labelled rows "
                          "(not the split you report on)")
    table = data.calibration
    category = pa.array(data.classes).take(table.column("label"))
    return (pa.table({"product_id": table.column("product_id"),
                      "image_uri": table.column("image_uri"), "category": category}),
            data.base_uri, CALIBRATION_SPLIT)


def refit_open_set(record: dict[str, Any], logits: torch.Tensor, temperature: float,
                   scores: np.ndarray) -> dict[str, Any]:
    """The open-set record with its threshold refitted on these rows (products of learned
    categories, so `known_keep_share` of them stay below it). The centroid score does not
    depend on the temperature; the logit scores are recomputed at the new one."""
    if not record:
        return record
    kind = record.get("score", openset.LOGIT_SCORE)
    if kind != "centroid":
        scores = openset.unfamiliarity(logits, temperature, kind).numpy()
    share = record.get("known_keep_share", openset.KNOWN_KEEP_SHARE)
    return {**record, "threshold": openset.threshold_for(scores, share)}


def run(cfg: CalibrateConfig) -> dict[str, Any]:
    start = time.perf_counter()
    from pipeline.analysis.evaluate import score

    meta = load_metadata(cfg.model)
    output = storage.normalize(cfg.output)
    check_output(output, cfg.overwrite)
    table, base_uri, split = calibration_rows(cfg, meta.training)
    storage.check_writable(output)
    scored = score(cfg, table, base_uri, meta.classes)
    use = scored.ok & (scored.labels >= 0)
    if use.sum() < len(meta.classes):
        raise ConfigError(
            f"only {int(use.sum())} of {len(scored.labels)} calibration rows are readable rows of "
            f"categories the model knows; fitting thresholds for {len(meta.classes)} categories "
            "needs more held-out rows")
    logits = torch.from_numpy(scored.logits[use]).float()
    labels = torch.from_numpy(scored.labels[use])
    temperature = fit_temperature(logits, labels) if cfg.refit_temperature else meta.temperature
    probs = torch.softmax(logits / temperature, 1).numpy()
    correct = probs.argmax(1) == labels.numpy()
    decisions = decide.fit_policy(
        probs, labels.numpy(), meta.classes, meta.coarse_classes,
        fitted_on={"split": split, "manifest": storage.normalize(cfg.manifest),
                   "backend": meta.format, "tta": cfg.tta, "source_model_version": meta.model_version},
        error_rate=cfg.catalog_error_rate, catch_target=cfg.catch_target)
    open_set = refit_open_set(meta.open_set, logits, temperature, scored.unfamiliarity[use])
    new = rewrite_artifact(cfg.model, output, temperature=temperature, decisions=decisions,
                           open_set=open_set)
    point = decide.policy_for(decisions, decide.DEFAULT_CHANGE_PRECISION)
    return {"model": output, "model_version": new.model_version,
            "source_model_version": meta.model_version, "backend": meta.format,
            "split": split, "rows": int(use.sum()), "unreadable_rows": int((~scored.ok).sum()),
            "accuracy": float(correct.mean()), "temperature": temperature,
            "ece": expected_calibration_error(probs.max(1), correct),
            "confusable_pairs": len(decisions["confusable_pairs"]),
            "open_set_threshold": open_set.get("threshold"),
            f"policy_at_{decide.DEFAULT_CHANGE_PRECISION}": point.to_json(),
            "wall_time_s": round(time.perf_counter() - start, 1)}
