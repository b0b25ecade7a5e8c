"""Evaluation report: how good a model artifact is on a labelled manifest, per category, and which
of its answers can be accepted without a person.

Ray Data scores the manifest with the same preprocess and inference stages as the nightly job
(so the numbers describe what the batch job will do, temperature included); the driver computes
the metrics and writes `metrics.json`, CSV tables, PNG plots and one self-contained HTML report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.artifact import load_metadata
from pipeline.calibration import ECE_BINS, expected_calibration_error, reliability_bins
from pipeline.catalog import open_dataset, validate_manifest
from pipeline.config import EvaluateConfig
from pipeline.errors import ConfigError, ManifestError

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


@dataclass
class Scored:
    """Per-row results on the driver: true class index (-1 when the model does not know the
    category), top-k class indices and scores (best first), and each row's status."""

    labels: np.ndarray
    top_index: np.ndarray
    top_scores: np.ndarray
    ok: np.ndarray
    unknown_categories: dict[str, int]


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


def score(cfg: EvaluateConfig, table: pa.Table, base_uri: str, classes: list[str]) -> Scored:
    """Run preprocess + Classifier over the rows on Ray Data; collect top-k on the driver."""
    import ray.data

    from pipeline.cluster import init_ray
    from pipeline.predict import Classifier
    from pipeline.preprocess import Preprocessor
    from pipeline.recategorize import DECODE_TASK_MEMORY
    from pipeline.train import row_blocks

    init_ray(cfg.ray_address, cfg.num_cpus)
    meta = load_metadata(cfg.model)
    ds = ray.data.from_arrow(row_blocks(table)).map_batches(
        Preprocessor(meta.input_size, base_uri), batch_size=32, batch_format="numpy",
        num_cpus=1, memory=DECODE_TASK_MEMORY)  # unfused: decode runs in parallel tasks
    ds = ds.map_batches(
        Classifier, fn_constructor_kwargs={"model_uri": storage.normalize(cfg.model),
                                           "device": cfg.device, "top_k": 5,
                                           "num_threads": max(1, int(cfg.cpus_per_actor))},
        batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.device == "cuda" else 0)
    parts = list(ds.select_columns(["category", "status", "top_k_index", "top_k_scores"])
                 .iter_batches(batch_format="numpy", batch_size=None))
    category = np.concatenate([p["category"] for p in parts])
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index.get(c, -1) for c in category], dtype=np.int64)
    unknown: dict[str, int] = {}
    for c in category[labels < 0]:
        unknown[c] = unknown.get(c, 0) + 1
    return Scored(labels, np.concatenate([np.stack(p["top_k_index"]) for p in parts]),
                  np.concatenate([np.stack(p["top_k_scores"]) for p in parts]),
                  np.concatenate([p["status"] for p in parts]) == "ok", unknown)


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
                       "f1": float(f1[i]), "support": int(support[i])}
                      for i, c in enumerate(classes) if support[i] or (pred == i).any()],
        "reliability": reliability_bins(conf, correct, bins),
        "coverage_curve": {k: v.tolist() for k, v in curve.items()},
        "confusion_matrix": confusion_matrix(y, pred, labels=np.arange(len(classes))),
    }
    if len(coarse_classes) == len(classes):
        coarse = np.array([coarse_classes[c] for c in classes], dtype=object)
        out["coarse_accuracy"] = float((coarse[pred] == coarse[y]).mean())
    return out


# ---- plots and report ---------------------------------------------------------------------

def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_png(matrix: np.ndarray, classes: list[str]) -> bytes:
    """Row-normalized confusion matrix (true class per row) of the classes that occur."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = np.flatnonzero(matrix.sum(0) + matrix.sum(1))
    m = matrix[np.ix_(keep, keep)].astype(np.float64)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = max(5.0, 0.16 * len(keep) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    names = [classes[i] for i in keep]
    font = 9 if len(keep) <= 20 else 5
    ax.set_xticks(range(len(keep)), names, rotation=90, fontsize=font)
    ax.set_yticks(range(len(keep)), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (share of each true class)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png(fig)


def reliability_png(bins: list[dict], ece: float) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["high"] - bins[0]["low"]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar([b["low"] for b in filled], [b["confidence"] - b["accuracy"] for b in filled],
           bottom=[b["accuracy"] for b in filled], width=width, align="edge", color="#dd8452",
           alpha=0.5, edgecolor="black", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    ax_n.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge",
             color="gray", edgecolor="black")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("rows")
    ax_n.set_xlim(0, 1)
    return _png(fig)


def coverage_png(curve: dict, accept: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(curve["coverage"], curve["accuracy"], color="#4c72b0", label="accepted above threshold")
    ax.axhline(accept["target_accuracy"], color="#c44e52", linestyle="--",
               label=f"target {accept['target_accuracy']:.0%}")
    if accept["threshold"] is not None:
        ax.plot([accept["coverage"]], [accept["accuracy"]], "o", color="#c44e52",
                label=f"threshold {accept['threshold']:.3f}: {accept['coverage']:.0%} covered")
    ax.set_xlabel("coverage (share of scored products auto-accepted)")
    ax.set_ylabel("accuracy of auto-accepted")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title("Accuracy vs coverage")
    ax.legend(loc="lower left")
    return _png(fig)


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def report_html(metrics: dict, model: dict, manifest: str, pngs: dict[str, bytes]) -> str:
    """One self-contained HTML page: summary, plots (embedded PNGs), per-category table."""
    accept = metrics["auto_accept"]
    summary = [("manifest", manifest), ("model", f"{model['architecture']} {model['version']}"),
               ("temperature", model["temperature"]), ("rows", metrics["rows"]),
               ("scored rows", metrics["scored_rows"]), ("error rows", metrics["error_rows"]),
               ("rows with categories the model does not know", metrics["unknown_category_rows"]),
               ("those categories", ", ".join(f"{c} ({n})" for c, n in
                                              sorted(metrics["unknown_categories"].items())) or "none"),
               ("accuracy", metrics["accuracy"]), ("top-5 accuracy", metrics["top5_accuracy"]),
               ("coarse accuracy", metrics.get("coarse_accuracy")), ("macro-F1", metrics["macro_f1"]),
               ("expected calibration error", metrics["ece"]),
               (f"threshold for {accept['target_accuracy']:.0%} auto-accept accuracy", accept["threshold"]),
               ("share of the catalog auto-accepted at that threshold", accept["catalog_share"])]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary)
    per_class = "".join(
        f"<tr><td>{html.escape(r['category'])}</td><td>{r['precision']:.3f}</td>"
        f"<td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td><td>{r['support']}</td></tr>"
        for r in sorted(metrics["per_class"], key=lambda r: r["f1"]))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Model evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>Model evaluation</h1>
<table>{rows}</table>
<h2>Accuracy vs coverage</h2>
<p>Predictions with confidence at or above the threshold are accepted without review.</p>
{_img(pngs["coverage"], "accuracy-coverage curve")}
<h2>Calibration</h2>{_img(pngs["reliability"], "reliability diagram")}
<h2>Confusion matrix</h2>{_img(pngs["confusion"], "confusion matrix")}
<h2>Per category (worst F1 first)</h2>
<table><tr><th>category</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{per_class}</table></body></html>
"""


def write_report(output: str, metrics: dict, classes: list[str], model: dict, manifest: str) -> None:
    matrix = metrics.pop("confusion_matrix")
    pngs = {"confusion": confusion_png(matrix, classes),
            "reliability": reliability_png(metrics["reliability"], metrics["ece"]),
            "coverage": coverage_png(metrics["coverage_curve"], metrics["auto_accept"])}
    for name, png in pngs.items():
        file = "confusion_matrix.png" if name == "confusion" else f"{name}.png"
        storage.write_bytes(storage.join(output, file), png)
    storage.write_text(storage.join(output, "confusion_matrix.csv"),
                       _csv([["true \\ predicted", *classes]]
                            + [[c, *map(int, matrix[i])] for i, c in enumerate(classes)]))
    storage.write_text(storage.join(output, "per_class.csv"), _csv(
        [["category", "precision", "recall", "f1", "support"]]
        + [[r["category"], r["precision"], r["recall"], r["f1"], r["support"]]
           for r in metrics["per_class"]]))
    storage.write_text(storage.join(output, REPORT_FILE), report_html(metrics, model, manifest, pngs))
    storage.write_json(storage.join(output, METRICS_FILE), metrics)


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.manifest`; write the report to `cfg.output`; return metrics."""
    start = time.perf_counter()
    table, base_uri = labelled_rows(cfg)
    meta = load_metadata(cfg.model)
    output = storage.normalize(cfg.output)
    storage.check_writable(output)
    scored = score(cfg, table, base_uri, meta.classes)
    if not (scored.ok & (scored.labels >= 0)).any():
        raise ConfigError(
            f"nothing to evaluate: of {len(scored.labels)} rows, {int((~scored.ok).sum())} could not be "
            f"read and {int((scored.labels < 0).sum())} have categories the model does not know")
    metrics = compute_metrics(scored, meta.classes, meta.coarse_classes, cfg.target_accuracy,
                              cfg.ece_bins)
    model = {"uri": storage.normalize(cfg.model), "architecture": meta.architecture,
             "version": meta.model_version, "temperature": meta.temperature}
    metrics = {"manifest": storage.normalize(cfg.manifest), "split": cfg.split, "model": model,
               **metrics, "wall_time_s": round(time.perf_counter() - start, 1)}
    write_report(output, metrics, meta.classes, model, storage.normalize(cfg.manifest))
    cfg.save(storage.join(output, "config.yaml"))
    return metrics


def review_threshold_from_report(uri: str) -> float:
    """The auto-accept threshold of an evaluation report's metrics.json, for the nightly job's
    needs_review rule. Problems raise ConfigError naming --review-threshold-from."""
    where = f"--review-threshold-from {uri!r}"
    try:
        metrics = storage.read_json(uri)
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: file not found") from exc
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})") from exc
    accept = metrics.get("auto_accept") if isinstance(metrics, dict) else None
    if not isinstance(accept, dict) or "threshold" not in accept:
        raise ConfigError(f"{where}: not an evaluation metrics.json (no auto_accept.threshold)")
    if accept["threshold"] is None:
        raise ConfigError(
            f"{where}: no confidence threshold reached the target accuracy "
            f"{accept.get('target_accuracy')}; set --review-threshold instead")
    return float(accept["threshold"])
