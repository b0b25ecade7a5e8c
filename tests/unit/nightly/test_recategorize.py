"""End to end on a real local Ray, real Grocery images, real Parquet."""

import json
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import LOCAL_MAX_ROWS, RecategorizeConfig
from pipeline.images.preprocess import Preprocessor
from pipeline.models import decide
from pipeline.models.artifact import load_metadata
from pipeline.nightly.recategorize import choose_executor, run
from pipeline.sinks.parquet import committed_files
from pipeline.sinks.rows import OUTPUT_SCHEMA
from tests.conftest import SAMPLE_DIR


def test_preprocessor_keeps_every_row(small_catalog):
    manifest, n, expected = small_catalog
    table = pq.read_table(manifest)
    batch = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
    out = Preprocessor(64, str(manifest.parent))(batch)
    assert out["image"].shape == (n, 64, 64, 3)
    errors = {pid: et for pid, et in zip(out["product_id"], out["error_type"], strict=True) if et}
    assert errors == expected
    ok = out["status"] == "ok"
    assert ok.sum() == n - 3 and out["image"][ok].reshape(n - 3, -1).std(axis=1).min() > 5


def test_auto_executor_scores_small_nights_in_process_and_clusters_on_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RecategorizeConfig()
    assert choose_executor(cfg, LOCAL_MAX_ROWS)[0] == "local"
    assert choose_executor(cfg, 0)[0] == "local"
    assert choose_executor(cfg, LOCAL_MAX_ROWS + 1)[0] == "ray"
    assert choose_executor(cfg.model_copy(update={"device": "cuda"}), 1)[0] == "ray"
    assert choose_executor(cfg.model_copy(update={"ray_address": "auto"}), 1)[0] == "ray"
    assert choose_executor(cfg.model_copy(update={"executor": "local"}), 10**7)[0] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` gives a driver
    assert choose_executor(cfg, 1) == ("ray", "a Ray cluster was given")


@pytest.mark.slow
def test_end_to_end(ray_local, small_catalog, tmp_path, bundled_model):
    manifest, n, expected = small_catalog
    out = tmp_path / "out"
    cfg = RecategorizeConfig(manifest=str(manifest), model=bundled_model, output=str(out),
                             batch_size=8, preprocess_batch_size=4, top_k=3, executor="ray")
    summary = run(cfg)
    assert summary["executor"] == "ray"

    table = pq.read_table(out / "predictions")
    assert table.num_rows == n == summary["rows"]
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in OUTPUT_SCHEMA]
    rows = {r["product_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(pq.read_table(manifest).column("product_id").to_pylist())

    # On cpu the bundled model runs its int8 export, with the decisions fitted on its scores.
    assert summary["backend"]["name"] == "onnx-int8"
    meta = load_metadata(summary["backend"]["model"])
    assert meta.export["source_model_version"] == load_metadata(bundled_model).model_version
    assert meta.decisions["fitted_on"]["backend"] == "onnx-int8"
    classes, unfamiliar_above = set(meta.classes), meta.open_set["threshold"]
    policy = decide.policy_for(meta.decisions, cfg.change_precision)
    assert summary["decisions"] == policy.to_json() and policy.fitted
    for pid, row in rows.items():
        if pid in expected:
            assert row["status"] == "error" and row["error_type"] == expected[pid]
            assert row["error_message"] and row["predicted_category"] is None
            assert row["needs_review"] is True and row["top_k"] is None
            assert (row["action"], row["action_reason"]) == ("review", "error")
            continue
        assert row["status"] == "ok" and row["error_type"] is None
        assert row["predicted_category"] in classes
        assert 0.0 < row["confidence"] <= 1.0
        scores = [t["score"] for t in row["top_k"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert row["top_k"][0] == {"category": row["predicted_category"],
                                   "score": row["confidence"]}
        assert row["category_changed"] == (row["predicted_category"] != row["current_category"])
        assert row["needs_review"] == (row["action"] == "review")
        action, reason = decide.decide(
            np.array([True]), [row["current_category"]], [row["predicted_category"]],
            np.array([row["confidence"]]), np.array([row["p_current"]], dtype=float),
            np.array([row["unfamiliarity"] > unfamiliar_above]), policy)
        assert (row["action"], row["action_reason"]) == (action[0], reason[0])
        ranked = {t["category"]: t["score"] for t in row["top_k"]}
        if row["current_category"] in ranked:  # the same calibrated probability
            assert row["p_current"] == pytest.approx(ranked[row["current_category"]], abs=1e-6)
        assert row["run_id"] == summary["run_id"]
        assert row["model_version"] == meta.model_version

    assert summary["ok"] == n - 3 and summary["errors_by_type"] == {
        "decode_failed": 1, "not_an_image": 1, "fetch_not_found": 1}
    assert summary["needs_review"] == sum(r["needs_review"] for r in rows.values())
    assert summary["actions"] == dict(Counter(r["action"] for r in rows.values()).most_common())
    assert sum(summary["action_reasons"].values()) == n
    marker = json.loads((out / "_SUCCESS").read_text())
    assert marker["rows"] == n and all((out / f).exists() for f in marker["files"])
    assert json.loads((out / "summary.json").read_text())["rows"] == n
    assert (out / "config.yaml").exists() and not (out / "_staging").exists()  # removed on commit

    # Readable by an ordinary warehouse engine.
    con = duckdb.connect()
    got = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE status = 'error'), max(len(top_k)) "
        f"FROM read_parquet('{out}/predictions/*.parquet')").fetchone()
    assert got == (n, 3, 3)


@pytest.mark.slow
def test_decode_tasks_in_actor_decoding_and_the_local_executor_give_the_same_rows(
        ray_local, small_catalog, tmp_path, tiny_model):
    manifest, n, expected = small_catalog
    tables = {}
    for executor, decode_in in (("ray", "tasks"), ("ray", "actor"), ("local", "auto")):
        out = tmp_path / f"{executor}-{decode_in}"
        summary = run(RecategorizeConfig(manifest=str(manifest), model=tiny_model, output=str(out),
                                         batch_size=8, decode_in=decode_in, executor=executor))
        assert summary["executor"] == executor
        tables[executor, decode_in] = pq.read_table(out / "predictions").sort_by("product_id")
    tasks = tables["ray", "tasks"]
    for other in (tables["ray", "actor"], tables["local", "auto"]):
        assert tasks.num_rows == other.num_rows == n
        for column in ("product_id", "status", "error_type", "error_message",
                       "predicted_category", "needs_review", "action", "action_reason",
                       "image_version"):
            assert tasks.column(column).to_pylist() == other.column(column).to_pylist(), column
        confidence = [np.array(t.column("confidence").to_pylist(), dtype=float)
                      for t in (tasks, other)]
        np.testing.assert_allclose(*confidence, atol=1e-5)
        assert sum(s == "error" for s in other.column("status").to_pylist()) == len(expected)


@pytest.mark.slow
def test_rerun_commits_a_new_run_and_a_new_manifest_is_the_normal_case(ray_local, small_catalog,
                                                                       tmp_path, tiny_model):
    manifest, n, expected = small_catalog
    out = tmp_path / "out"
    cfg = RecategorizeConfig(manifest=str(manifest), model=tiny_model, output=str(out))
    first = run(cfg)
    files = committed_files(str(out))
    second = run(cfg)
    assert first["run_id"] != second["run_id"]
    assert (second["rows_carried"], second["rows_rescored"]) == (n - len(expected), len(expected))
    table = pq.read_table(out / "predictions")
    assert table.num_rows == n and set(table.column("run_id").to_pylist()) == {second["run_id"]}
    # The old run stays readable until the run after next (the same on S3:
    # tests/integration/test_s3.py::test_recategorize_end_to_end).
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == second["run_id"]
    assert files and all(Path(f).exists() for f in files)
    assert {p.name for p in (out / "runs").iterdir()} == {first["run_id"], second["run_id"]}

    # Tomorrow's manifest at a new path with fewer products: committed, the rest gone.
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(manifest).slice(0, 3), other)
    third = run(cfg.model_copy(update={"manifest": str(other)}))
    assert third["rows"] == 3 and third["removed_products"] == n - 3
    assert pq.read_table(out / "predictions").num_rows == 3


def test_publish_removes_the_staging_folder_unless_another_run_stages(tmp_path):
    from pipeline.sinks.parquet import RunFolderSink

    out = tmp_path / "out"
    publish = RunFolderSink(str(out)).publish
    (out / "runs" / "night1").mkdir(parents=True)
    for key in ("mine", "other"):
        (out / "_staging" / key).mkdir(parents=True)
        (out / "_staging" / key / "plan.json").write_text("{}")
    publish({"run_id": "night1", "files": []}, "mine")
    assert not (out / "_staging" / "mine").exists()
    assert (out / "_staging" / "other" / "plan.json").exists()  # another run's staging stays

    (out / "runs" / "night2").mkdir()
    publish({"run_id": "night2", "files": []}, "other")
    assert not (out / "_staging").exists()  # nothing left in it: no empty folder behind
    assert json.loads((out / "_SUCCESS").read_text())["run_id"] == "night2"


@pytest.mark.slow
def test_the_demo_night_decides_every_product_of_the_sample_catalog(tmp_path, bundled_model):
    """`make demo`'s night: 296 real photos, 18 of them with a wrong current category; every
    row gets one action, the summary counts them, and changes are rare and mostly right."""
    out = tmp_path / "demo"
    summary = run(RecategorizeConfig(model=bundled_model, output=str(out), executor="local"))
    table = pq.read_table(out / "predictions")
    actions = Counter(table.column("action").to_pylist())
    assert summary["rows"] == table.num_rows == 296 and sum(actions.values()) == 296
    assert summary["actions"] == dict(actions) and set(actions) <= set(decide.ACTIONS)
    assert summary["needs_review"] == actions["review"]
    assert sum(summary["action_reasons"].values()) == 296
    assert summary["decisions"]["fitted"] and summary["decisions"]["target_precision"] == 0.95
    truth = {r["product_id"]: r["image_uri"].split("/")[1]
             for r in pq.read_table(SAMPLE_DIR / "manifest.parquet").to_pylist()}
    rows = table.to_pylist()
    changes = [r for r in rows if r["action"] == "change"]
    right = sum(r["predicted_category"] == truth[r["product_id"]] for r in changes)
    assert right >= 0.8 * len(changes)
    wrong = [r for r in rows if r["current_category"] != truth[r["product_id"]]]
    assert len(wrong) == 18
    assert sum(r["action"] != "keep" for r in wrong) >= 15  # caught: changed or reviewed
    # What the drift report counts.
    assert (out / "drift.html").exists() and summary["drift"]["rates"]["change"]["current"] == \
        pytest.approx(actions["change"] / 296, abs=1e-6)


@pytest.mark.slow
def test_an_artifact_without_decision_thresholds_runs_with_a_warning(small_catalog, tmp_path,
                                                                     tiny_model, capsys):
    manifest, n, _ = small_catalog
    summary = run(RecategorizeConfig(manifest=str(manifest), model=tiny_model,
                                     output=str(tmp_path / "out"), executor="local"))
    error = capsys.readouterr().err
    assert "no fitted decision thresholds" in error and "jobs.calibrate" in error
    assert summary["decisions"] == decide.Policy(**decide.FALLBACK, fitted=False).to_json()
    assert sum(summary["actions"].values()) == n
