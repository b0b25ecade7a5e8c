"""`jobs.promote` and the model pointer: a candidate replaces the current model only when it
measures at least as good on held-out rows, and `--model MODELS/current` works for the jobs.

Real parts: the sample catalog's photos as the held-out manifest (category = the photo's
folder), the `tiny_model` artifact and a copy of it with its head perturbed (re-saved, so its
content hash is valid), in-process scoring (--executor local)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jobs._main import run_job
from jobs.promote import main as promote_main
from jobs.recategorize import main as recategorize_main
from pipeline.config import SAMPLE_MANIFEST
from pipeline.errors import ModelError, PromotionRefusedError
from pipeline.models.artifact import (
    POINTER_KIND,
    load_artifact,
    load_centroids,
    load_metadata,
    resolve_model_uri,
    rewrite_artifact,
    save_artifact,
)
from pipeline.models.registry import get_spec
from pipeline.review.promote import compare
from tests.conftest import TINY_ARCHITECTURE, photos_by_category, summary_json, write_manifest


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """The sample catalog's photos, copied beside a labelled manifest (split 'val')."""
    root = tmp_path_factory.mktemp("held_out")
    rows = []
    for category, photos in photos_by_category().items():
        (root / "images" / category).mkdir(parents=True)
        for photo in photos:
            shutil.copyfile(photo, root / "images" / category / photo.name)
            rows.append({"product_id": f"{category}/{photo.name}",
                         "image_uri": f"images/{category}/{photo.name}", "category": category,
                         "split": "val"})
    return write_manifest(root / "manifest.parquet", rows)


@pytest.fixture(scope="module")
def worse_model(tiny_model, tmp_path_factory) -> str:
    """tiny_model with seeded noise on its head: same architecture, classes and thresholds,
    visibly worse answers."""
    model, meta = load_artifact(tiny_model)
    head = model.get_submodule(get_spec(TINY_ARCHITECTURE).head)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.weight.add_(torch.randn(head.weight.shape, generator=generator)
                         * 1.5 * head.weight.abs().mean())
    uri = str(tmp_path_factory.mktemp("worse") / "model")
    save_artifact(model, replace(meta, model_version=""), uri, load_centroids(tiny_model, meta))
    return uri


@pytest.fixture(scope="module")
def hesitant_model(worse_model, tmp_path_factory) -> str:
    """worse_model at twenty times its temperature: flat probabilities propose no change and
    send every disagreement to review (a perturbed head alone changes more, reviewing less)."""
    uri = str(tmp_path_factory.mktemp("hesitant") / "model")
    rewrite_artifact(worse_model, uri, temperature=load_metadata(worse_model).temperature * 20)
    return uri


def promote(capsys, candidate: str, models: Path, manifest: Path) -> tuple[int, dict | None, str]:
    code = run_job(promote_main, ["--candidate", candidate, "--models", str(models),
                                  "--manifest", str(manifest), "--executor", "local",
                                  "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, (json.loads(out[out.index("{"):]) if code == 0 else None), err.strip()


def history(models: Path) -> list[dict]:
    return [json.loads(line) for line in (models / "history.jsonl").read_text().splitlines()]


def test_first_candidate_is_promoted_and_the_nightly_job_follows_the_pointer(
        tmp_path, capsys, tiny_model, held_out):
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "v1")  # inside MODELS: named relative to it
    code, summary, _ = promote(capsys, str(models / "v1"), models, held_out)
    version = load_metadata(tiny_model).model_version
    assert code == 0 and summary["decision"] == "promoted"
    assert summary["reason"] == "no current model yet" and summary["current"] is None
    pointer = json.loads((models / "current").read_text())
    assert pointer["kind"] == POINTER_KIND
    assert pointer["model"] == "v1" and pointer["model_version"] == version
    (line,) = history(models)
    assert line["decision"] == "promoted" and line["candidate"]["model_version"] == version
    assert 0 < line["candidate"]["accuracy"] <= 1 and line["candidate"]["rows"] > 200

    # The nightly command names the pointer; the run records the model it resolved to.
    code = run_job(recategorize_main, ["--model", str(models / "current"), "--manifest",
                                       SAMPLE_MANIFEST, "--output", str(tmp_path / "night"),
                                       "--executor", "local", "--device", "cpu"])
    night = summary_json(capsys.readouterr().out)
    assert code == 0 and night["model_version"] == version
    assert night["model"] == str(models / "v1")


def test_worse_candidate_is_refused_and_the_pointer_stays(
        tmp_path, capsys, tiny_model, worse_model, held_out):
    """The perturbed model changes more categories and so reviews fewer rows, but its changes
    are less precise and its top-1 is worse: refused."""
    models = tmp_path / "models"
    assert promote(capsys, tiny_model, models, held_out)[0] == 0
    before = (models / "current").read_bytes()
    code, _, err = promote(capsys, worse_model, models, held_out)
    assert code == PromotionRefusedError.exit_code == 9
    assert len(err.splitlines()) == 1 and "not promoted: worse on" in err
    assert "top-1 accuracy" in err and "the rule:" in err and "is unchanged" in err
    assert (models / "current").read_bytes() == before
    first, refused = history(models)
    assert refused["decision"] == "refused" and refused["reason"] in err
    assert refused["candidate"]["model_version"] == load_metadata(worse_model).model_version
    assert refused["current"]["model_version"] == first["candidate"]["model_version"]
    assert refused["candidate"]["accuracy"] < refused["current"]["accuracy"]
    assert refused["candidate"]["precision"] < refused["current"]["precision"]
    assert refused["candidate"]["rows"] == refused["current"]["rows"]  # the same rows


def test_better_candidate_moves_the_pointer(tmp_path, capsys, tiny_model, hesitant_model,
                                           held_out):
    models = tmp_path / "models"
    assert promote(capsys, hesitant_model, models, held_out)[0] == 0
    code, summary, err = promote(capsys, tiny_model, models, held_out)
    assert code == 0, err
    assert summary["decision"] == "promoted" and summary["reason"].startswith("at least as good")
    cand, cur = summary["candidate"], summary["current"]
    assert cand["accuracy"] > cur["accuracy"] and cand["review_load"] <= cur["review_load"]
    pointer = json.loads((models / "current").read_text())
    assert pointer["model"] == tiny_model  # outside MODELS: named in full
    assert pointer["previous"]["model_version"] == load_metadata(hesitant_model).model_version
    assert resolve_model_uri(str(models / "current")) == tiny_model
    assert [h["decision"] for h in history(models)] == ["promoted", "promoted"]


def test_pointer_resolution(tmp_path, tiny_model):
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "v1")
    pointer = models / "current"
    version = load_metadata(tiny_model).model_version
    pointer.write_text(json.dumps({"kind": POINTER_KIND, "model": "v1", "model_version": version}))
    assert resolve_model_uri(str(pointer)) == str(models / "v1")
    assert resolve_model_uri(tiny_model) == tiny_model  # a folder is itself
    assert load_artifact(str(pointer))[1].model_version == version
    # A folder replaced after its promotion is refused, not silently run.
    pointer.write_text(json.dumps({"kind": POINTER_KIND, "model": "v1", "model_version": "0" * 16}))
    with pytest.raises(ModelError, match="replaced after its promotion"):
        load_metadata(str(pointer))
    pointer.write_text(json.dumps({"kind": POINTER_KIND, "model": "gone"}))
    with pytest.raises(ModelError, match=r"has no model\.json"):
        load_metadata(str(pointer))


def test_promotion_rule():
    def m(accuracy: float, precision: float | None, review_load: float) -> dict:
        return {"accuracy": accuracy, "precision": precision, "review_load": review_load}

    assert compare(m(0.5, 0.9, 0.3), None, 0.95) == (True, "no current model yet")
    assert compare(m(0.8, 0.96, 0.2), m(0.8, 0.96, 0.2), 0.95)[0]  # ties promote
    assert compare(m(0.9, 0.97, 0.1), m(0.8, 0.96, 0.2), 0.95)[0]
    for worse in (m(0.79, 0.97, 0.1), m(0.9, 0.95, 0.1), m(0.9, 0.97, 0.21)):
        assert not compare(worse, m(0.8, 0.96, 0.2), 0.95)[0]
    # A model that proposes no change has no precision to compare.
    assert not compare(m(0.9, None, 0.1), m(0.8, 0.96, 0.2), 0.95)[0]
    assert compare(m(0.9, 0.96, 0.1), m(0.8, None, 0.2), 0.95)[0]
    assert not compare(m(0.9, 0.90, 0.1), m(0.8, None, 0.2), 0.95)[0]


def test_bad_arguments_write_nothing(tmp_path, capsys, tiny_model, held_out):
    models = tmp_path / "models"
    code, _, err = promote(capsys, str(tmp_path / "missing"), models, held_out)
    assert code == ModelError.exit_code and len(err.splitlines()) == 1
    models.mkdir()
    (models / "current").mkdir()  # not a pointer file
    code, _, err = promote(capsys, tiny_model, models, held_out)
    assert code == 2 and "is not a model pointer" in err
    assert sorted(p.name for p in models.iterdir()) == ["current"]
