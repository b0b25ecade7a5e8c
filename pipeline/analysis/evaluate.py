"""Evaluation report: how good a model artifact is on a labelled manifest, per category, and which
of its answers can be accepted without a person.

Ray Data scores the manifest with the same preprocess and inference stages as the nightly job
(so the numbers describe what the batch job will do, temperature included); the driver computes
the metrics and writes `metrics.json`, CSV tables, PNG plots and one self-contained HTML report.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import storage
from pipeline.analysis import plots, report
from pipeline.catalog import open_dataset, validate_manifest
from pipeline.config import EvaluateConfig
from pipeline.errors import ConfigError, ManifestError
from pipeline.models import decide, openset
from pipeline.models.artifact import TORCH_BACKEND, ModelMetadata, load_metadata
from pipeline.models.calibration import ECE_BINS, expected_calibration_error, reliability_bins

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
ROBUSTNESS_FILE = "robustness.csv"


@dataclass
class Scored:
    """Per-row results on the driver: true class index (-1 when the model does not know the
    category), top-k class indices and scores (best first), each row's status, and its
    product_id and image_uri (so the report can show pictures of the mistakes). All per-row
    arrays come from the same Ray Data batches, so row i is the same product in each."""

    labels: np.ndarray
    top_index: np.ndarray
    top_scores: np.ndarray
    ok: np.ndarray
    unknown_categories: dict[str, int]
    product_id: np.ndarray
    image_uri: np.ndarray
    unfamiliarity: np.ndarray  # the model's open-set score (pipeline.models.openset); NaN on error rows
    logits: np.ndarray | None = None  # raw logits (rows x classes); NaN on error rows
    error_type: np.ndarray | None = None  # per row; None where ok
    error_message: np.ndarray | None = None
    robust_correct: np.ndarray | None = None  # rows x robustness conditions (--corruptions)


CONFUSED_PAIRS_SHOWN = 15
EXAMPLES_PER_PAIR = 3
TOP_K = 5


def labelled_rows(cfg: EvaluateConfig) -> tuple[pa.Table, str]:
    """product_id, image_uri, category of the rows to evaluate (one split if asked)."""
    manifest = validate_manifest(cfg.manifest, training=True)
    columns = ["product_id", "image_uri", "category"] + (["split"] if manifest.has("split") else [])
    table = open_dataset(manifest.uri).to_table(columns=columns)
    if cfg.split:
        if not manifest.has("split"):
            raise ManifestError(f"--split {cfg.split}: manifest {manifest.uri!r} has no split column")
        table = table.filter(pc.equal(table["split"], cfg.split))
        if table.num_rows == 0:
            raise ManifestError(f"manifest {manifest.uri!r} has no rows with split == {cfg.split!r}")
    return table.select(["product_id", "image_uri", "category"]), manifest.base_uri


SCORED_COLUMNS = ["product_id", "image_uri", "category", "status", "top_k_index",
                  "top_k_scores", "unfamiliarity", "logits", "error_type", "error_message"]


def score(cfg: EvaluateConfig, table: pa.Table, base_uri: str, classes: list[str]) -> Scored:
    """Score the rows through the scoring engine (the nightly job's URI policy, fetch limits
    and placement, in this process or on Ray); collect top-k and the logits on the driver.
    With --corruptions, the robustness scorer runs in the same pass, on the same decoded
    images: one fetch and one decode per image."""
    from pipeline.inference import engine
    from pipeline.inference.predict import Classifier, ClassifierSettings

    meta = load_metadata(cfg.model)
    model_uri = storage.normalize(cfg.model)
    predictors = [engine.Predictor(Classifier, ClassifierSettings(
        model_uri, top_k=TOP_K, tta=cfg.tta, with_logits=True))]
    columns = list(SCORED_COLUMNS)
    if getattr(cfg, "corruptions", ""):
        from pipeline.analysis.robustness import RobustnessScorer, RobustnessSettings

        predictors.append(engine.Predictor(RobustnessScorer, RobustnessSettings(
            model_uri, cfg.corruptions, cfg.severities, cfg.attack_epsilons, cfg.tta,
            cfg.attacks)))
        columns.append("robust_correct")
    images = engine.ImageSettings.from_config(cfg, meta.input_size, base_uri)
    parts = engine.score(engine.start(cfg, table.num_rows), images, table, *predictors,
                         columns=columns)
    return scored_rows(parts, classes)


def scored_rows(parts: list[dict[str, np.ndarray]], classes: list[str]) -> Scored:
    """The engine's batches as per-row arrays, in row order."""
    def cat(name: str, stack: bool = False) -> np.ndarray:
        return np.concatenate([np.stack(p[name]) if stack else p[name] for p in parts])

    category = cat("category")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(c, -1) for c in category], dtype=np.int64)
    unknown: dict[str, int] = {}
    for c in category[labels < 0]:
        unknown[c] = unknown.get(c, 0) + 1
    return Scored(labels=labels, top_index=cat("top_k_index", True),
                  top_scores=cat("top_k_scores", True), ok=cat("status") == "ok",
                  unknown_categories=unknown, product_id=cat("product_id").astype(str),
                  image_uri=cat("image_uri"), unfamiliarity=cat("unfamiliarity"),
                  logits=cat("logits", True), error_type=cat("error_type"),
                  error_message=cat("error_message"),
                  robust_correct=cat("robust_correct", True) if "robust_correct" in parts[0]
                  else None)


def coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Accept the k most confident predictions, k = 1..n: threshold, coverage, accuracy.

    Only cut points between distinct confidences are kept, so every point is reachable with a
    `confidence >= threshold` rule."""
    order = np.argsort(-confidence, kind="stable")
    conf, hit = confidence[order], correct[order].astype(np.float64)
    k = np.arange(1, len(conf) + 1)
    accuracy = np.cumsum(hit) / k
    cut = np.append(conf[1:] < conf[:-1], True)
    return {"threshold": conf[cut], "coverage": k[cut] / len(conf), "accuracy": accuracy[cut]}


def auto_accept(curve: dict[str, np.ndarray], target: float, catalog_rows: int,
                scored_rows: int) -> dict:
    """The lowest threshold whose accepted predictions reach `target` accuracy (the largest
    coverage); None when no threshold does."""
    ok = np.flatnonzero(curve["accuracy"] >= target)
    if len(ok) == 0:
        return {"target_accuracy": target, "threshold": None, "coverage": 0.0, "catalog_share": 0.0,
                "accuracy": None}
    best = ok[np.argmax(curve["coverage"][ok])]
    coverage = float(curve["coverage"][best])
    return {"target_accuracy": target, "threshold": float(curve["threshold"][best]),
            "coverage": coverage, "catalog_share": coverage * scored_rows / max(catalog_rows, 1),
            "accuracy": float(curve["accuracy"][best])}


def confused_pairs(labels: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                   limit: int = CONFUSED_PAIRS_SHOWN, examples: int = EXAMPLES_PER_PAIR) -> list[dict]:
    """The most frequent (true, predicted) mistakes as class indices, most rows first (ties by
    index, so the order is stable), each with the share of the true class's rows and the row
    positions of its `examples` most confident mistakes: a confident mistake is the likeliest
    sign of a wrongly given category or of two products that look alike."""
    wrong = labels != predicted
    if not wrong.any():
        return []
    pairs, counts = np.unique(np.stack([labels[wrong], predicted[wrong]], 1), axis=0,
                              return_counts=True)
    support = np.bincount(labels)
    out = []
    for k in np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:limit]:
        true, pred = int(pairs[k, 0]), int(pairs[k, 1])
        rows = np.flatnonzero((labels == true) & (predicted == pred))
        rows = rows[np.argsort(-confidence[rows], kind="stable")][:examples]
        out.append({"true": true, "predicted": pred, "count": int(counts[k]),
                    "share_of_true": float(counts[k] / support[true]), "rows": rows.tolist()})
    return out


def named_pairs(pairs: list[dict], classes: list[str], product_id: np.ndarray, image_uri: np.ndarray,
                confidence: np.ndarray) -> list[dict]:
    """confused_pairs with category names and each example's product_id, image_uri, confidence:
    the JSON form, which the report and other tools read."""
    return [{"true_category": classes[p["true"]], "predicted_category": classes[p["predicted"]],
             "count": p["count"], "share_of_true": p["share_of_true"],
             "examples": [{"product_id": str(product_id[i]), "image_uri": str(image_uri[i]),
                           "confidence": float(confidence[i])} for i in p["rows"]]}
            for p in pairs]


def robustness_section(cfg: EvaluateConfig, scored: Scored, meta: ModelMetadata) -> dict:
    """Accuracy on the clean images, under each corruption and severity, and under each attack
    at each epsilon (pipeline.analysis.robustness), from the main pass's robustness columns."""
    from pipeline.analysis import robustness
    from pipeline.config import (
        parse_attack_epsilons,
        parse_attacks,
        parse_corruptions,
        parse_severities,
    )

    attackable = meta.backend == TORCH_BACKEND
    epsilons = parse_attack_epsilons(cfg.attack_epsilons)
    names = robustness.conditions(parse_corruptions(cfg.corruptions),
                                  parse_severities(cfg.severities), epsilons if attackable else [],
                                  parse_attacks(cfg.attacks))
    out = robustness.summarize(names, scored.robust_correct)
    if epsilons and not attackable:
        out["attack_skipped"] = (f"the attacks need the model's gradients; {meta.format} exports have "
                                 "none: evaluate the torch artifact it was exported from")
    return out


def compute_metrics(scored: Scored, classes: list[str], coarse_classes: dict[str, str],
                    target_accuracy: float, bins: int = ECE_BINS) -> dict:
    """Every number of the report, as plain JSON-able values (plus the confusion matrix)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    use = scored.ok & (scored.labels >= 0)
    y, top, scores = scored.labels[use], scored.top_index[use], scored.top_scores[use]
    pred, conf = top[:, 0], scores[:, 0].astype(np.float64)
    correct = pred == y
    present = np.unique(y)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=np.arange(len(classes)), zero_division=0)
    matrix = confusion_matrix(y, pred, labels=np.arange(len(classes)))
    false_positives = matrix.sum(0) - np.diag(matrix)
    curve = coverage_curve(conf, correct)
    out = {
        "rows": len(scored.labels), "scored_rows": int(use.sum()),
        "error_rows": int((~scored.ok).sum()), "unknown_category_rows": int((scored.labels < 0).sum()),
        "unknown_categories": scored.unknown_categories,
        "accuracy": float(correct.mean()), "top5_accuracy": float((top == y[:, None]).any(1).mean()),
        "macro_f1": float(f1[present].mean()), "ece": expected_calibration_error(conf, correct, bins),
        "mean_confidence": float(conf.mean()),
        "auto_accept": auto_accept(curve, target_accuracy, len(scored.labels), int(use.sum())),
        "per_class": [{"category": c, "precision": float(precision[i]), "recall": float(recall[i]),
                       "f1": float(f1[i]), "support": int(support[i]),
                       "false_positives": int(false_positives[i])}
                      for i, c in enumerate(classes) if support[i] or (pred == i).any()],
        "confused_pairs": named_pairs(confused_pairs(y, pred, conf), classes, scored.product_id[use],
                                      scored.image_uri[use], conf),
        "reliability": reliability_bins(conf, correct, bins),
        "coverage_curve": {k: v.tolist() for k, v in curve.items()},
        "confusion_matrix": matrix,
    }
    if len(coarse_classes) == len(classes):
        coarse = np.array([coarse_classes[c] for c in classes], dtype=object)
        out["coarse_accuracy"] = float((coarse[pred] == coarse[y]).mean())
    return out


# ---- files ---------------------------------------------------------------------------------

def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def write_report(output: str, metrics: dict, meta: ModelMetadata, model: dict, manifest: str,
                 fetch: Callable[[str], bytes]) -> None:
    """metrics.json, the CSV tables, the PNG plots and report.html under `output`."""
    matrix = metrics.pop("confusion_matrix")
    classes = meta.classes
    pngs = {"confusion": plots.confusion_png(matrix, classes),
            "reliability": plots.reliability_png(metrics["reliability"], metrics["ece"]),
            "coverage": plots.coverage_png(metrics["coverage_curve"], metrics["auto_accept"])}
    for name, png in pngs.items():
        file = "confusion_matrix.png" if name == "confusion" else f"{name}.png"
        storage.write_bytes(storage.join(output, file), png)
    storage.write_text(storage.join(output, "confusion_matrix.csv"),
                       _csv([["true \\ predicted", *classes]]
                            + [[c, *map(int, matrix[i])] for i, c in enumerate(classes)]))
    if "robustness" in metrics:
        storage.write_text(storage.join(output, ROBUSTNESS_FILE), _csv(
            [["condition", "kind", "corruption", "severity", "epsilon", "accuracy"]]
            + [[r["condition"], r["kind"], r["name"], r.get("severity", ""),
                r.get("epsilon", ""), r["accuracy"]] for r in metrics["robustness"]["conditions"]]))
    storage.write_text(storage.join(output, "per_class.csv"), _csv(
        [["category", "precision", "recall", "f1", "support", "false_positives"]]
        + [[r["category"], r["precision"], r["recall"], r["f1"], r["support"], r["false_positives"]]
           for r in metrics["per_class"]]))
    page = report.report_html(metrics, model, manifest, pngs,
                              report.coarse_groups(matrix, classes, meta.coarse_classes),
                              report.pair_thumbnails(metrics["confused_pairs"], fetch))
    storage.write_text(storage.join(output, REPORT_FILE), page)
    storage.write_json(storage.join(output, METRICS_FILE), metrics)


def open_set_section(scored: Scored, meta: ModelMetadata) -> dict:
    """Known-versus-unfamiliar separation over the readable rows: rows whose category the model
    never learned are the unfamiliar ones (a model trained with categories held out meets
    them here)."""
    ok = scored.ok
    return openset.open_set_metrics(scored.unfamiliarity[ok].astype(np.float64),
                                    scored.top_scores[ok, 0].astype(np.float64),
                                    scored.labels[ok] < 0, meta.open_set)


def decisions_section(scored: Scored, meta: ModelMetadata, change_precision: float,
                      split: str | None) -> dict:
    """The keep / change / review rule measured on the evaluated rows (pipeline.models.decide.measure):
    change precision, wrong categories caught, review load, at each target precision the
    artifact holds a fitted point for, and at `change_precision` (the job's default)."""
    use = scored.ok & (scored.labels >= 0)
    probs = torch.softmax(torch.from_numpy(scored.logits[use]).float() / meta.temperature, 1).numpy()
    threshold = meta.open_set.get("threshold")
    unfamiliar = (~(scored.unfamiliarity[use] <= threshold) if threshold is not None
                  else np.zeros(int(use.sum()), dtype=bool))
    targets = sorted({p["target_precision"] for p in meta.decisions.get("operating_points", [])}
                     | {change_precision})
    curve = []
    for target in targets:
        policy = decide.policy_for(meta.decisions, target)
        curve.append({**policy.to_json(), "target_precision": target,
                      **decide.measure(probs, scored.labels[use], meta.classes, meta.coarse_classes,
                                       policy, unfamiliar)})
    fitted_on = meta.decisions.get("fitted_on")
    out = {"catalog_error_rate": decide.DEFAULT_CATALOG_ERROR_RATE, "fitted_on": fitted_on,
           "change_precision": change_precision,
           "at_target": next(r for r in curve if r["target_precision"] == change_precision),
           "curve": curve}
    if fitted_on and split and fitted_on.get("split") == split:
        out["warning"] = (f"the thresholds were fitted on split {split!r}, the split measured "
                          "here: these figures are optimistic")
    return out


def unreadable_reason(scored: Scored) -> str | None:
    """The mass-failure line (pipeline.nightly.budget.mass_failure) when most rows could not be read."""
    if scored.error_type is None:
        return None
    from pipeline.inference.fail_fast import mass_failure

    return mass_failure(scored.error_type, scored.error_message, len(scored.ok), "rows")


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.manifest`; write the report to `cfg.output`; return metrics."""
    start = time.perf_counter()
    table, base_uri = labelled_rows(cfg)
    meta = load_metadata(cfg.model)
    output = storage.normalize(cfg.output)
    storage.check_writable(output)
    scored = score(cfg, table, base_uri, meta.classes)
    failure = unreadable_reason(scored)
    if not (scored.ok & (scored.labels >= 0)).any():
        raise ConfigError(
            f"nothing to evaluate: of {len(scored.labels)} rows, {int((~scored.ok).sum())} could not be "
            f"read and {int((scored.labels < 0).sum())} have categories the model does not know"
            + (f"; {failure}" if failure else ""))
    if failure:
        print(f"warning: {failure}", file=sys.stderr, flush=True)
    metrics = compute_metrics(scored, meta.classes, meta.coarse_classes, cfg.target_accuracy,
                              cfg.ece_bins)
    metrics["open_set"] = open_set_section(scored, meta)
    metrics["decisions"] = decisions_section(scored, meta, cfg.change_precision, cfg.split)
    if cfg.corruptions:
        metrics["robustness"] = robustness_section(cfg, scored, meta)
    model = {"uri": storage.normalize(cfg.model), "architecture": meta.architecture,
             "version": meta.model_version, "temperature": meta.temperature, "tta": cfg.tta}
    metrics = {"manifest": storage.normalize(cfg.manifest), "split": cfg.split, "model": model,
               **metrics, "wall_time_s": round(time.perf_counter() - start, 1)}
    from pipeline.inference import engine

    # thumbnails through the job's guarded fetch path: its URI policy, redirects and limits
    fetch = engine.ImageSettings.from_config(cfg, meta.input_size, base_uri).fetch
    write_report(output, metrics, meta, model, storage.normalize(cfg.manifest), fetch)
    cfg.save(storage.join(output, "config.yaml"))
    return metrics
