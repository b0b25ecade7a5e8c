"""The evaluation report: metrics that agree with an independent computation, plots that are
real PNGs, an HTML page that embeds them, and a threshold the nightly job can take."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from pipeline.artifact import load_metadata
from pipeline.config import EvaluateConfig, RecategorizeConfig
from pipeline.decode import decode_image
from pipeline.errors import ConfigError
from pipeline.evaluate import auto_accept, coverage_curve
from pipeline.predict import Classifier
from tests.test_training_recipe import small_training_manifest


def test_coverage_curve_cuts_only_between_distinct_confidences():
    conf = np.array([0.5, 0.99, 0.9, 0.95, 0.9])
    correct = np.array([1, 1, 1, 1, 0])
    curve = coverage_curve(conf, correct)
    assert curve["threshold"].tolist() == [0.99, 0.95, 0.9, 0.5]
    assert curve["coverage"].tolist() == [0.2, 0.4, 0.8, 1.0]
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 1.0, 0.75, 0.8])
    accept = auto_accept(curve, 0.98, catalog_rows=10, scored_rows=5)
    assert accept["threshold"] == 0.95 and accept["coverage"] == 0.4
    assert accept["catalog_share"] == pytest.approx(0.2)  # 2 of the 10 catalog rows
    assert auto_accept(curve, 0.8, 10, 5)["threshold"] == 0.5  # largest coverage that reaches it
    assert auto_accept(coverage_curve(conf, np.zeros(5)), 0.98, 5, 5)["threshold"] is None


def _metrics_file(tmp_path: Path, threshold) -> Path:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"auto_accept": {"target_accuracy": 0.98, "threshold": threshold}}))
    return path


def test_nightly_job_takes_its_review_threshold_from_the_report(tmp_path):
    cfg = RecategorizeConfig(review_threshold_from=str(_metrics_file(tmp_path, 0.8125)))
    assert cfg.review_threshold == 0.8125
    with pytest.raises(ConfigError, match=r"--review-threshold-from .*no confidence threshold"):
        RecategorizeConfig(review_threshold_from=str(_metrics_file(tmp_path, None)))
    with pytest.raises(ConfigError, match=r"--review-threshold-from .*not found"):
        RecategorizeConfig(review_threshold_from=str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text("{\"accuracy\": 0.9}")
    with pytest.raises(ConfigError, match=r"no auto_accept\.threshold"):
        RecategorizeConfig(review_threshold_from=str(tmp_path / "other.json"))


@pytest.mark.slow
def test_new_jobs_have_help_for_every_option():
    for job, option in (("jobs.evaluate", "--target-accuracy"), ("jobs.embed", "--knn-k"),
                        ("jobs.train", "--time-budget-min")):
        proc = subprocess.run([sys.executable, "-m", job, "--help"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and option in proc.stdout and "(default:" in proc.stdout


@pytest.mark.slow
def test_bad_report_stops_the_nightly_job_before_it_writes(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "jobs.recategorize", "--review-threshold-from",
                           str(tmp_path / "nope.json"), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nope.json" in proc.stderr and not out.exists()


@pytest.fixture
def eval_manifest(grocery_root, tmp_path) -> Path:
    """Real val images of 6 classes, plus a corrupt image and a category the model lacks."""
    path = small_training_manifest(grocery_root, tmp_path / "src.parquet", train_per_class=0,
                                   val_per_class=3)
    rows = pq.read_table(path).to_pylist()
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 then garbage")
    rows.append({**rows[0], "product_id": "bad", "image_uri": str(tmp_path / "corrupt.jpg")})
    rows.append({**rows[1], "product_id": "new-kind", "category": "Dragon-Fruit"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "eval.parquet")
    return tmp_path / "eval.parquet"


@pytest.mark.slow
def test_evaluation_report_matches_an_independent_computation(ray_local, eval_manifest, tmp_path,
                                                              bundled_model):
    from pipeline.evaluate import run

    out = tmp_path / "report"
    metrics = run(EvaluateConfig(manifest=str(eval_manifest), model=bundled_model, output=str(out),
                                 split="val", num_cpus=2))
    assert metrics["rows"] == 20 and metrics["scored_rows"] == 18
    assert metrics["error_rows"] == 1 and metrics["unknown_categories"] == {"Dragon-Fruit": 1}

    # independent: the Classifier in this process on the same images
    rows = [r for r in pq.read_table(eval_manifest).to_pylist()
            if r["product_id"] not in ("bad", "new-kind")]
    meta = load_metadata(bundled_model)
    clf = Classifier(bundled_model, device="cpu", top_k=5)
    probs = clf.probabilities(np.stack([decode_image(Path(r["image_uri"]).read_bytes(), meta.input_size)
                                        for r in rows])).numpy()
    y = np.array([meta.classes.index(r["category"]) for r in rows])
    pred, conf = probs.argmax(1), probs.max(1)
    top5 = np.argsort(-probs, 1)[:, :5]
    assert metrics["accuracy"] == pytest.approx((pred == y).mean())
    assert metrics["top5_accuracy"] == pytest.approx((top5 == y[:, None]).any(1).mean())
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0))
    assert metrics["mean_confidence"] == pytest.approx(conf.mean(), rel=1e-5)
    assert sum(r["support"] for r in metrics["per_class"]) == 18
    assert {r["category"] for r in metrics["per_class"] if r["support"]} == {r["category"] for r in rows}

    confusion = (out / "confusion_matrix.csv").read_text().splitlines()
    assert len(confusion) == 1 + len(meta.classes)
    assert sum(sum(map(int, line.split(",")[1:])) for line in confusion[1:]) == 18
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["accuracy"] == metrics["accuracy"] and "auto_accept" in on_disk
    page = (out / "report.html").read_text()
    for name in ("confusion_matrix.png", "reliability.png", "coverage.png"):
        png = (out / name).read_bytes()
        assert Image.open(io.BytesIO(png)).size[0] > 300
        assert base64.b64encode(png).decode() in page  # embedded: the page stands alone
    assert "Dragon-Fruit (1)" in page and "<img" in page


@pytest.mark.slow
def test_evaluate_job_rejects_a_missing_split_before_writing(eval_manifest, tmp_path):
    pq.write_table(pq.read_table(eval_manifest).drop_columns(["split"]), tmp_path / "nosplit.parquet")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--manifest",
                           str(tmp_path / "nosplit.parquet"), "--split", "val", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3 and "split" in proc.stderr and not out.exists()


@pytest.mark.slow
def test_feature_route_exports_logistic_regression_as_a_linear_head(ray_local, grocery_root, tmp_path,
                                                                    bundled_model):
    """The exported artifact gives the same probabilities as the fitted scikit-learn model."""
    from pipeline.config import EmbedConfig
    from pipeline.embeddings import Embedder, run

    manifest = small_training_manifest(grocery_root, tmp_path / "m.parquet", train_per_class=6,
                                       val_per_class=2)
    cfg = EmbedConfig(manifest=str(manifest), output=str(tmp_path / "feat"), backbone=bundled_model,
                      calibrate=False, num_cpus=2)
    summary = run(cfg)
    assert summary["train_rows"] == 36 and summary["val_rows"] == 12 and summary["feature_dim"] == 1024
    assert 0 <= summary["val_accuracy"] <= 1 and 0 <= summary["knn_val_accuracy"] <= 1

    rows = [r for r in pq.read_table(manifest).to_pylist() if r["split"] == "train"]
    meta = load_metadata(summary["model"])
    assert meta.classes == sorted({r["category"] for r in rows}) and meta.temperature == 1.0
    images = np.stack([decode_image(Path(r["image_uri"]).read_bytes(), meta.input_size) for r in rows])
    labels = np.array([meta.classes.index(r["category"]) for r in rows])
    features = Embedder(cfg.model_dump())({"image": images, "status": np.full(len(rows), "ok")})["features"]

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    reference = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(scaler.transform(features), labels)
    expected = reference.predict_proba(scaler.transform(features))
    got = Classifier(summary["model"], device="cpu").probabilities(images).numpy()
    assert np.allclose(got, expected, atol=2e-3)
