"""Promotion: a retrained model replaces the one the nightly job runs only when it is as good.

`python -m jobs.promote --candidate MODEL --models MODELS --manifest HELD_OUT` scores the
candidate and the current model (the folder `MODELS/current` names) on the same held-out rows
through the scoring engine (the nightly job's preprocessing, temperature and backend), and
measures each with the decision metrics of `jobs.evaluate` (pipeline.models.decide.measure: the
rows made into a catalog with simulated wrong categories, decided at --change-precision with
each model's own fitted thresholds).

The rule (`compare`). Measured on the rows both models read and both know the category of, the
candidate is promoted when it is at least as good as the current model on all three:

1. top-1 accuracy not lower;
2. change precision not lower. A model that proposes no change on these rows has no measured
   precision: a candidate without one is refused against a current model with one; against a
   current model without one, the candidate's must reach --change-precision;
3. review load not higher.

Ties promote. With no current model yet, the candidate is promoted (and measured, for the
history). A refused candidate leaves `current` as it was and the job exits with
PromotionRefusedError's code (9) and a one-line reason.

Promotion moves an atomic pointer: `MODELS/current` is a small JSON file naming the model folder
(relative to MODELS when it lies inside it) and its model_version, written under a temporary
name and renamed over the old one (storage.write_json; on an object store one PUT), so a job
that opens it sees the old pointer or the new one. Jobs follow it
(pipeline.models.artifact.resolve_model_uri). Every decision, promoted or refused, appends one
JSON line to `MODELS/history.jsonl` with both metric sets and the reason. The models folder's
lease (pipeline.nightly.lease) keeps two promotions from overwriting each other's decision.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import EvaluateConfig
from pipeline.config.promote import PromoteConfig
from pipeline.errors import ConfigError, ModelError, OutputError, PromotionRefusedError
from pipeline.models.artifact import (
    POINTER_KIND,
    ModelMetadata,
    read_pointer,
    resolve_model_uri,
    verify_artifact,
)

POINTER_FILE = "current"
HISTORY_FILE = "history.jsonl"
PROMOTED, REFUSED = "promoted", "refused"
# Both models are scored identically on the same rows, so equal models measure equal to the
# last bit; the margin only absorbs float summation order.
TOLERANCE = 1e-9
RULE = ("top-1 accuracy not lower, change precision not lower and review load not higher than "
        "the current model's on the same held-out rows")


def pointer_uri(models: str) -> str:
    return storage.join(storage.normalize(models), POINTER_FILE)


def history_uri(models: str) -> str:
    return storage.join(storage.normalize(models), HISTORY_FILE)


def current_model(models: str) -> tuple[str, dict[str, Any]] | None:
    """(folder, pointer record) of the model `MODELS/current` names, or None before the first
    promotion. A `current` that is not a pointer, or names a missing or replaced folder, stops
    the job: comparing against it would be meaningless."""
    uri = pointer_uri(models)
    if not storage.exists(uri):
        return None
    pointer = read_pointer(uri)
    if pointer is None:
        raise ConfigError(f"--models {models}: {uri} exists but is not a model pointer (written "
                          "by python -m jobs.promote); move it away, or give another --models")
    try:
        return resolve_model_uri(uri), pointer
    except ModelError as exc:
        raise ModelError(f"{exc}; to promote without a comparison, remove {uri}") from exc


def evaluate_config(cfg: PromoteConfig, model: str) -> EvaluateConfig:
    """The evaluation settings of one model on the held-out rows: the image access, executor
    and scoring options are the promotion's own, so both models are scored the same way."""
    shared = {k: getattr(cfg, k) for k in cfg.model_fields if k in EvaluateConfig.model_fields}
    return EvaluateConfig(**shared, model=model)


def measure_model(cfg: PromoteConfig, model: str, table: pa.Table, base_uri: str):
    """(metadata, per-row Scored) of `model` on the held-out rows."""
    from pipeline.analysis.evaluate import score
    from pipeline.models.artifact import load_metadata

    meta = load_metadata(model)
    return meta, score(evaluate_config(cfg, model), table, base_uri, meta.classes)


def metrics(scored: Any, meta: ModelMetadata, model: str, use: np.ndarray,
            cfg: PromoteConfig) -> dict[str, Any]:
    """Top-1 accuracy and the decision metrics at --change-precision on rows `use`."""
    from pipeline.analysis.evaluate import decisions_section

    # decisions_section measures the readable rows of known categories: `use` narrows them to
    # the rows both models are measured on.
    section = decisions_section(dataclasses.replace(scored, ok=use), meta, cfg.change_precision,
                                cfg.split)
    at = section["at_target"]
    accuracy = float((scored.top_index[use, 0] == scored.labels[use]).mean())
    out = {"model": model, "model_version": meta.model_version, "rows": int(use.sum()),
           "accuracy": accuracy, "precision": at["precision"], "catch": at["catch"],
           "review_load": at["review_load"], "change_rate": at["change_rate"],
           "thresholds_fitted": at["fitted"]}
    if "warning" in section:
        out["warning"] = section["warning"]
    return out


def compare(candidate: dict[str, Any], current: dict[str, Any] | None,
            change_precision: float) -> tuple[bool, str]:
    """(promote, reason) by the module's rule."""
    if current is None:
        return True, "no current model yet"
    problems, held = [], []
    a, b = candidate["accuracy"], current["accuracy"]
    (problems if a < b - TOLERANCE else held).append(f"top-1 accuracy {a:.4f} vs {b:.4f}")
    p, q = candidate["precision"], current["precision"]
    if p is None and q is not None:
        problems.append(f"the candidate proposes no change on these rows (current change "
                        f"precision {q:.4f})")
    elif p is not None and q is None:
        line = (f"change precision {p:.4f} vs the target {change_precision} (the current model "
                "proposes no change)")
        (problems if p < change_precision - TOLERANCE else held).append(line)
    elif p is not None and q is not None:
        (problems if p < q - TOLERANCE else held).append(f"change precision {p:.4f} vs {q:.4f}")
    r, s = candidate["review_load"], current["review_load"]
    (problems if r > s + TOLERANCE else held).append(f"review load {r:.4f} vs {s:.4f}")
    if problems:
        return False, "worse on " + "; ".join(problems)
    return True, "at least as good: " + "; ".join(held)


def pointer_name(models: str, folder: str) -> str:
    """How the pointer names `folder`: relative to the models folder when it lies inside it
    (the folder can then be copied or synced whole), else its full URI."""
    models = storage.normalize(models)
    if storage.is_local(models) and storage.is_local(folder):
        rel = os.path.relpath(folder, models)
        return folder if rel.startswith("..") else rel
    prefix = models.rstrip("/") + "/"
    return folder[len(prefix):] if folder.startswith(prefix) else folder


def append_history(models: str, record: dict[str, Any]) -> None:
    """One JSON line at the end of MODELS/history.jsonl. Locally an append of one write,
    flushed to disk; an object store has no append, so the file is read and written back
    whole (one PUT), under the models folder's lease."""
    line = (json.dumps(record, default=str, sort_keys=False) + "\n").encode()
    uri = history_uri(models)
    if storage.is_local(uri):
        with open(storage.local_path(uri), "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return
    fs, path = storage.filesystem(uri)
    old = b""
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            old = f.read()
    storage.write_bytes(uri, old + line)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def run(cfg: PromoteConfig) -> dict[str, Any]:
    """Measure, decide, record; move the pointer when the candidate is promoted. Raises
    PromotionRefusedError (after recording the decision) when it is not."""
    from pipeline.analysis.evaluate import labelled_rows
    from pipeline.nightly.lease import OutputLease

    start = time.perf_counter()
    models = storage.normalize(cfg.models)
    # Every check before any work or write: a bad argument writes nothing.
    candidate = resolve_model_uri(cfg.candidate)
    verify_artifact(candidate)  # a missing or corrupt candidate stops the job here
    current = current_model(models)
    table, base_uri = labelled_rows(evaluate_config(cfg, candidate))
    storage.check_writable(models)
    with OutputLease(models).hold():
        cand_meta, cand_scored = measure_model(cfg, candidate, table, base_uri)
        use = cand_scored.ok & (cand_scored.labels >= 0)
        cur_scored = cur_meta = None
        if current is not None:
            cur_meta, cur_scored = measure_model(cfg, current[0], table, base_uri)
            if not np.array_equal(cand_scored.product_id, cur_scored.product_id):
                raise OutputError("the two models' scored rows came back in different orders; "
                                  "run the same command again")
            use &= cur_scored.ok & (cur_scored.labels >= 0)
        if not use.any():
            raise ConfigError(
                f"--manifest {cfg.manifest}: none of its {table.num_rows} held-out rows is a "
                "readable image of a category both models know; give labelled rows of their "
                "categories")
        cand = metrics(cand_scored, cand_meta, candidate, use, cfg)
        cur = metrics(cur_scored, cur_meta, current[0], use, cfg) if current is not None else None
        promote, reason = compare(cand, cur, cfg.change_precision)
        record = {"decided_at": _now(), "decision": PROMOTED if promote else REFUSED,
                  "reason": reason, "rule": RULE, "manifest": storage.normalize(cfg.manifest),
                  "split": cfg.split, "change_precision": cfg.change_precision,
                  "candidate": cand, "current": cur}
        if promote:
            if current_model(models) != current:
                raise OutputError(f"{pointer_uri(models)} changed while the models were measured; "
                                  "run the same command again")
            storage.write_json(pointer_uri(models), {
                "kind": POINTER_KIND, "model": pointer_name(models, candidate),
                "model_version": cand_meta.model_version, "promoted_at": record["decided_at"],
                "reason": reason,
                "previous": ({"model": current[1]["model"],
                              "model_version": current[1].get("model_version")}
                             if current is not None else None)})
        append_history(models, record)
    summary = {**record, "pointer": pointer_uri(models), "history": history_uri(models),
               "wall_time_s": round(time.perf_counter() - start, 1)}
    if not promote:
        raise PromotionRefusedError(
            f"candidate {cand_meta.model_version} not promoted: {reason}; the rule: {RULE} "
            f"({cur_meta.model_version}); {pointer_uri(models)} is unchanged")
    return summary
