"""The evaluation report: metrics that agree with an independent computation, plots that are
real PNGs, an HTML page that embeds them and tells a catalog team what is mistaken for what
(with pictures), and a threshold the nightly job can take."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from pipeline.analysis.evaluate import (
    Scored,
    auto_accept,
    compute_metrics,
    confused_pairs,
    coverage_curve,
    write_report,
)
from pipeline.analysis.report import THUMBNAIL_PX, coarse_groups, open_set_html, split_per_class
from pipeline.config import EvaluateConfig, RecategorizeConfig
from pipeline.errors import ConfigError
from pipeline.images.decode import decode_image
from pipeline.images.security import UriPolicy
from pipeline.importers import grocery_store_rows
from pipeline.inference.engine import ImageSettings
from pipeline.inference.predict import Classifier
from pipeline.models import decide
from pipeline.models.artifact import load_artifact, load_metadata
from pipeline.models.registry import get_spec
from tests.conftest import small_training_manifest


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


def test_confused_pairs_rank_by_count_and_show_the_most_confident_mistakes():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([1, 1, 1, 1, 0, 1, 2, 0, 2, 1])
    conf = np.array([0.6, 0.9, 0.7, 0.5, 0.8, 0.9, 0.4, 0.3, 0.9, 0.95])
    pairs = confused_pairs(labels, pred, conf, limit=3, examples=3)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [(0, 1, 4), (1, 2, 1), (2, 0, 1)]
    assert pairs[0]["share_of_true"] == pytest.approx(0.8)  # 4 of class 0's 5 rows
    assert pairs[0]["rows"] == [1, 2, 0]  # confidence 0.9, 0.7, 0.6; the 0.5 one is left out
    assert len(confused_pairs(labels, pred, conf, limit=15)) == 4
    assert confused_pairs(labels, labels, conf) == []


def test_coarse_groups_show_only_their_own_classes_plus_other():
    classes = ["Granny", "Pink", "Gala", "Oat", "Soy", "Banana"]
    coarse = {"Granny": "Apple", "Pink": "Apple", "Gala": "Apple", "Oat": "Milk", "Soy": "Milk",
              "Banana": "Banana"}
    matrix = np.zeros((6, 6), dtype=np.int64)
    matrix[0, 0], matrix[0, 1], matrix[0, 5] = 2, 3, 1  # Granny: 3 as Pink, 1 as Banana
    matrix[1, 1] = 4
    matrix[3, 3], matrix[3, 4] = 1, 2  # Oat: 2 as Soy (Soy itself absent)
    matrix[5, 5] = 5
    groups, clean = coarse_groups(matrix, classes, coarse)
    assert [g.coarse for g in groups] == ["Apple", "Milk"]  # most mistakes first
    apple, milk = groups
    assert apple.given == apple.predicted == ["Granny", "Pink"]  # Gala: neither present nor predicted
    assert apple.matrix.tolist() == [[2, 3], [0, 4]] and apple.other.tolist() == [1, 0]
    assert apple.top_other == [("Banana", 1), None] and apple.errors == 4 and apple.rows == 10
    assert milk.given == ["Oat"] and milk.predicted == ["Oat", "Soy"]  # Soy: predicted only
    assert milk.matrix.tolist() == [[1, 2]] and milk.errors == 2
    assert clean == [("Banana", 5)]


def test_support_zero_categories_are_kept_out_of_the_worst_f1_list():
    per_class = [{"category": "Kiwi", "f1": 0.5, "support": 2, "false_positives": 0},
                 {"category": "Zucchini", "f1": 0.0, "support": 0, "false_positives": 1},
                 {"category": "Lime", "f1": 0.0, "support": 0, "false_positives": 3},
                 {"category": "Granny", "f1": 0.2, "support": 5, "false_positives": 0}]
    present, absent = split_per_class(per_class)
    assert [r["category"] for r in present] == ["Granny", "Kiwi"]
    assert [r["category"] for r in absent] == ["Lime", "Zucchini"]


def test_open_set_section_renders_whatever_was_measured():
    assert "Not measured" in open_set_html(None) and "Not measured" in open_set_html({})
    page = open_set_html({"score": "energy", "auroc": 0.87, "baseline_auroc": None,
                          "baseline": "max_softmax", "known_rows": 250, "unknown_rows": 46,
                          "threshold": None, "flagged_unknown_share": 0.5, "flagged_known_share": None})
    assert "energy" in page and "0.8700" in page and "50.0%" in page and "max_softmax" in page
    assert page.count("n/a") == 3 and "Not measured" not in page


# ---- the page, from real scores of real images, without Ray ---------------------------------

# (given category, predicted category, confidence) per row; Granny-Smith -> Pink-Lady is the top
# pair; Arla-Medium-Fat-Milk and Zucchini are predicted but absent from the rows.
CRAFTED_ROWS = [
    *[("Granny-Smith", "Pink-Lady", c) for c in (0.6, 0.9, 0.7, 0.5)], ("Granny-Smith", "Granny-Smith", 0.8),
    ("Pink-Lady", "Pink-Lady", 0.9), ("Pink-Lady", "Pink-Lady", 0.7),
    ("Arla-Standard-Milk", "Arla-Standard-Milk", 0.8), ("Arla-Standard-Milk", "Arla-Standard-Milk", 0.6),
    ("Arla-Standard-Milk", "Arla-Medium-Fat-Milk", 0.55),
    *[("Banana", "Banana", c) for c in (0.9, 0.8, 0.95)],
    ("Kiwi", "Kiwi", 0.9), ("Kiwi", "Zucchini", 0.4),
]
MISSING_IMAGE_ROW = 2  # the 0.7 Granny-Smith mistake: its image is gone, the report goes on


def crafted_scored(grocery_root: Path, classes: list[str]) -> Scored:
    """Scores as the Classifier would return them for real val images (URIs relative to the
    dataset root, as manifests allow), plus one unreadable row."""
    by_class: dict[str, list[str]] = {}
    for r in grocery_store_rows(str(grocery_root), ["val"]):
        by_class.setdefault(r["category"], []).append(os.path.relpath(r["image_uri"], grocery_root))
    uris = [by_class[true].pop() for true, _, _ in CRAFTED_ROWS] + ["val/unreadable.jpg"]
    uris[MISSING_IMAGE_ROW] = "val/no-such-image.jpg"
    pred = [classes.index(p) for _, p, _ in CRAFTED_ROWS]
    top_index = np.array([[p, *[c for c in range(5) if c != p][:4]] for p in pred] + [[-1] * 5])
    conf = [c for _, _, c in CRAFTED_ROWS]
    top_scores = np.array([[c, *np.linspace((1 - c) / 2, 0, 4)] for c in conf] + [[np.nan] * 5])
    return Scored(labels=np.array([classes.index(t) for t, _, _ in CRAFTED_ROWS] + [0]),
                  top_index=top_index, top_scores=top_scores.astype(np.float32),
                  ok=np.array([True] * len(CRAFTED_ROWS) + [False]), unknown_categories={},
                  product_id=np.array([f"p{i:02d}" for i in range(len(uris))]),
                  image_uri=np.array(uris, dtype=object),
                  unfamiliarity=np.array([-c for c in conf] + [np.nan], dtype=np.float32))


def _section(page: str, heading: str) -> str:
    """The HTML from a heading that starts with `heading` up to the next heading of that level."""
    level = re.search(rf"<(h[23])>{re.escape(heading)}", page)
    assert level, f"no section {heading!r}"
    rest = page[level.start() + 4:]
    end = re.search(rf"<{level.group(1)}>|<h2>", rest)
    return rest[:end.start()] if end else rest


def _table_rows(fragment: str) -> list[list[str]]:
    """Cell texts (tags stripped) of every table row in an HTML fragment."""
    return [[" ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split())
             for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment, re.S)]


def test_report_page_tells_a_catalog_team_what_is_mistaken_for_what(grocery_root, bundled_model,
                                                                   tmp_path):
    meta = load_metadata(bundled_model)
    scored = crafted_scored(grocery_root, meta.classes)
    metrics = compute_metrics(scored, meta.classes, meta.coarse_classes, 0.98)
    model = {"architecture": meta.architecture, "version": meta.model_version, "temperature": 1.0}
    metrics = {"split": "val", **metrics}
    policy = UriPolicy.from_options("file", "", "", str(grocery_root))
    fetch = ImageSettings(64, str(grocery_root), policy).fetch
    write_report(str(tmp_path), metrics, meta, model, "manifests/grocery.parquet", fetch)
    page = (tmp_path / "report.html").read_text()

    subtitle = re.search(r'<p class="subtitle">(.*?)</p>', page).group(1)
    assert subtitle.startswith("val split of") and "manifests/grocery.parquet" in subtitle
    assert meta.architecture in subtitle and meta.model_version in subtitle and "16 rows" in subtitle

    per_class = _table_rows(_section(page, "Per category").split("<h3>")[0])
    assert [r[0] for r in per_class[1:]] == ["Granny-Smith", "Pink-Lady", "Kiwi", "Arla-Standard-Milk",
                                             "Banana"]  # worst F1 first (1/3, 1/2, 2/3, 4/5, 1)
    absent = _table_rows(_section(page, "Predicted but absent"))
    assert sorted(absent[1:]) == [["Arla-Medium-Fat-Milk", "1"], ["Zucchini", "1"]]

    pairs = _section(page, "Most-confused category pairs")
    top = _table_rows(pairs)[1]
    assert top[:3] == ["Granny-Smith → Pink-Lady", "4", "80.0%"]
    first_row = re.findall(r"<tr>(.*?)</tr>", pairs, re.S)[1]
    assert re.findall(r"<b>(p\d+)</b>", first_row) == ["p01", "p02", "p00"]  # most confident first
    assert "confidence 0.9000" in first_row and "given: Granny-Smith" in first_row
    thumbs = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', first_row)
    assert len(thumbs) == 2 and "image unavailable" in first_row  # p02's image is missing
    for data in thumbs:
        im = Image.open(io.BytesIO(base64.b64decode(data)))
        assert im.format == "JPEG" and max(im.size) == THUMBNAIL_PX
    assert len(re.findall(r"data:image/jpeg", page)) == 4  # 2 + one each for the two 1-row pairs

    coarse = _section(page, "Confusion within coarse categories")
    apple = _table_rows(_section(coarse, "Apple"))
    assert apple[0] == ["given \\ predicted", "rows", "Granny-Smith", "Pink-Lady", "other",
                        "most frequent other"]
    assert apple[1][:5] == ["Granny-Smith", "5", "1", "4", ""]
    assert [r[0] for r in apple[1:]] == apple[0][2:4]  # only Apple's own classes
    milk = _table_rows(_section(coarse, "Milk"))
    assert milk[0][2:4] == ["Arla-Medium-Fat-Milk", "Arla-Standard-Milk"]  # one only predicted
    assert [r[0] for r in milk[1:]] == ["Arla-Standard-Milk"]
    single = _table_rows(_section(coarse, "Coarse categories with one fine category"))
    assert single[1:] == [["Kiwi", "2", "1", "Zucchini (1)"]]  # Banana has no mistakes
    assert re.search(r"without mistakes</b> \(rows\): Banana \(3\)", coarse)

    assert "Not measured" in _section(page, "Unfamiliar products")
    assert base64.b64encode((tmp_path / "confusion_matrix.png").read_bytes()).decode() not in page
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["confused_pairs"][0]["examples"][0]["product_id"] == "p01"


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
    from pipeline.analysis.evaluate import run

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
        # embedded: the page stands alone; the full confusion matrix is a file only (unreadable)
        assert (base64.b64encode(png).decode() in page) == (name != "confusion_matrix.png")
    assert "Dragon-Fruit (1)" in page and '<p class="subtitle">val split of' in page
    assert metrics["accuracy"] < 1 and metrics["confused_pairs"]  # the bundled model errs here
    assert len(re.findall(r"data:image/jpeg", page)) == sum(len(p["examples"])
                                                             for p in metrics["confused_pairs"])

    # The decisions, measured by the rule itself on these rows as a simulated catalog.
    decisions = metrics["decisions"]
    policy = decide.policy_for(meta.decisions, 0.95)
    clf_unfamiliar = clf(dict(image=np.stack([decode_image(Path(r["image_uri"]).read_bytes(),
                                                           meta.input_size) for r in rows]),
                              status=np.array(["ok"] * len(rows), dtype=object)))["unfamiliarity"]
    unfamiliar = clf_unfamiliar > meta.open_set["threshold"]
    want = decide.measure(probs, y, meta.classes, meta.coarse_classes, policy, unfamiliar)
    got = decisions["at_target"]
    assert got["target_precision"] == 0.95
    assert got["review_load"] == pytest.approx(want["review_load"], abs=1e-6)
    assert got["catch"] == pytest.approx(want["catch"], abs=1e-6)
    assert [r["target_precision"] for r in decisions["curve"]] == list(decide.TARGET_PRECISIONS)
    assert decisions["fitted_on"]["split"] == "calibration" and "warning" not in decisions
    assert "Decisions: keep, change, review" in page


@pytest.mark.slow
def test_corruptions_report_robust_accuracy_beside_the_clean(ray_local, eval_manifest, tmp_path,
                                                             bundled_model):
    from pipeline.analysis.evaluate import run
    from pipeline.analysis.robustness import corrupt

    out = tmp_path / "report"
    metrics = run(EvaluateConfig(manifest=str(eval_manifest), model=bundled_model, output=str(out),
                                 split="val", num_cpus=2, corruptions="contrast", severities="5",
                                 attack_epsilons="4"))
    robust = metrics["robustness"]
    # the same 18 judged rows as the main pass, the corrupt image and the unknown category left out
    assert robust["rows"] == metrics["scored_rows"] == 18
    assert robust["clean_accuracy"] == pytest.approx(metrics["accuracy"])
    by_name = {r["condition"]: r["accuracy"] for r in robust["conditions"]}
    assert list(by_name) == ["clean", "contrast@5", "fgsm@4/255"]
    assert by_name["fgsm@4/255"] < by_name["clean"]

    rows = [r for r in pq.read_table(eval_manifest).to_pylist()
            if r["product_id"] not in ("bad", "new-kind")]
    meta = load_metadata(bundled_model)
    images = np.stack([decode_image(Path(r["image_uri"]).read_bytes(), meta.input_size) for r in rows])
    y = np.array([meta.classes.index(r["category"]) for r in rows])
    pred = Classifier(bundled_model, device="cpu").logits(corrupt(images, "contrast", 5)).argmax(1)
    assert by_name["contrast@5"] == pytest.approx((pred.numpy() == y).mean())

    table = (out / "robustness.csv").read_text().splitlines()
    assert table[0].startswith("condition,kind") and len(table) == 4
    section = _section((out / "report.html").read_text(), "Robustness")
    assert "contrast" in section and "FGSM" in section


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
                                                                    tiny_model):
    """The exported artifact gives the same probabilities as the fitted scikit-learn model."""
    from pipeline.config import EmbedConfig
    from pipeline.training.embeddings import Embedder, run

    manifest = small_training_manifest(grocery_root, tmp_path / "m.parquet", train_per_class=6,
                                       val_per_class=2)
    cfg = EmbedConfig(manifest=str(manifest), output=str(tmp_path / "feat"), backbone=tiny_model,
                      calibrate=False, num_cpus=2)
    summary = run(cfg)
    backbone, backbone_meta = load_artifact(tiny_model)
    dim = backbone.get_submodule(get_spec(backbone_meta.architecture).head).in_features
    assert summary["train_rows"] == 36 and summary["val_rows"] == 12 and summary["feature_dim"] == dim
    assert 0 <= summary["val_accuracy"] <= 1 and 0 <= summary["knn_val_accuracy"] <= 1

    rows = [r for r in pq.read_table(manifest).to_pylist() if r["split"] == "train"]
    meta = load_metadata(summary["model"])
    assert meta.classes == sorted({r["category"] for r in rows}) and meta.temperature == 1.0
    images = np.stack([decode_image(Path(r["image_uri"]).read_bytes(), meta.input_size) for r in rows])
    labels = np.array([meta.classes.index(r["category"]) for r in rows])
    features = Embedder(cfg)({"image": images, "status": np.full(len(rows), "ok")})["features"]

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    reference = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(scaler.transform(features), labels)
    expected = reference.predict_proba(scaler.transform(features))
    got = Classifier(summary["model"], device="cpu").probabilities(images).numpy()
    assert np.allclose(got, expected, atol=2e-3)


def test_report_thumbnails_obey_the_uri_policy(tmp_path, sample_images, image_server):
    """A report reads its thumbnails through the job's guarded fetch path: nothing outside the
    manifest's folder, no address the policy refuses."""
    from pipeline.analysis.report import pair_thumbnails

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "a.jpg").write_bytes(sample_images[0].read_bytes())
    (tmp_path / "secret.jpg").write_bytes(sample_images[1].read_bytes())
    image_server.routes["/b.jpg"] = ("bytes", sample_images[2].read_bytes())
    policy = UriPolicy.from_options("file,http", "", "", str(catalog))
    fetch = ImageSettings(64, str(catalog), policy).fetch
    uris = ["a.jpg", "../secret.jpg", image_server.url("/b.jpg")]
    pairs = [{"examples": [{"image_uri": u} for u in uris]}]
    assert set(pair_thumbnails(pairs, fetch)) == {"a.jpg"}
    assert image_server.hits == {}  # loopback is not a public address: never requested
