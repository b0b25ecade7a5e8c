"""The scoring engine: every job that reads images applies the same URI policy.

Each job gets a manifest whose rows point at the same real photo, once inside the manifest's
folder (allowed by default) and once outside it (refused by default): the nightly job writes an
error row, the evaluation and embedding jobs count the row as unreadable, training data
preparation drops and counts it. None of them reads the outside file.
"""

import shutil

import pyarrow as pa
import pytest

from pipeline.analysis import evaluate
from pipeline.config import EmbedConfig, EvaluateConfig, RecategorizeConfig, TrainConfig
from pipeline.errors import ConfigError, TrainingError
from pipeline.models.artifact import load_metadata
from pipeline.nightly.recategorize import run
from pipeline.training import embeddings, train
from tests.conftest import committed_table, write_manifest

REFUSED = "not allowed"


@pytest.fixture
def inside_and_outside(tmp_path, sample_images):
    """(manifest folder, rows): one photo inside the folder, the same photo outside it."""
    folder = tmp_path / "catalog"
    (folder / "images").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "photo.jpg"
    outside.parent.mkdir()
    shutil.copyfile(sample_images[0], folder / "images" / "photo.jpg")
    shutil.copyfile(sample_images[0], outside)
    category = sample_images[0].parent.name
    rows = [{"product_id": "inside", "image_uri": "images/photo.jpg", "category": category,
             "current_category": category},
            {"product_id": "outside", "image_uri": str(outside), "category": category,
             "current_category": category}]
    return folder, rows


def test_nightly_job_refuses_a_path_outside_the_manifest_folder(ray_local, inside_and_outside,
                                                               tiny_model, tmp_path):
    folder, rows = inside_and_outside
    manifest = write_manifest(folder / "manifest.parquet", rows)
    run(RecategorizeConfig(manifest=str(manifest), model=tiny_model, output=str(tmp_path / "o")))
    got = {r["product_id"]: r for r in committed_table(tmp_path / "o").to_pylist()}
    assert got["inside"]["status"] == "ok"
    assert got["outside"]["status"] == "error" and REFUSED in got["outside"]["error_message"]


def test_evaluation_refuses_it_too(ray_local, inside_and_outside, tiny_model):
    folder, rows = inside_and_outside
    table = pa.Table.from_pylist(rows).select(["product_id", "image_uri", "category"])
    cfg = EvaluateConfig(model=tiny_model)
    scored = evaluate.score(cfg, table, str(folder), load_metadata(tiny_model).classes)
    assert dict(zip(scored.product_id, scored.ok, strict=True)) == {"inside": True,
                                                                     "outside": False}
    # ... unless the job's own policy option lets it read there.
    wider = cfg.model_copy(update={"allowed_uri_prefixes": str(folder.parent)})
    assert evaluate.score(wider, table, str(folder), load_metadata(tiny_model).classes).ok.all()


def test_embedding_route_refuses_it_too(ray_local, inside_and_outside, tiny_model):
    folder, rows = inside_and_outside
    table = pa.Table.from_pylist(rows).select(["product_id", "image_uri"]).append_column(
        "label", pa.array([0, 0])).append_column("is_val", pa.array([False, False]))
    found = embeddings.embed(EmbedConfig(backbone=tiny_model), table, str(folder),
                             load_metadata(tiny_model).input_size)
    assert found["unreadable"] == 1 and len(found["features"]) == 1


def test_training_data_preparation_refuses_it_too(ray_local, inside_and_outside):
    folder, rows = inside_and_outside
    table = pa.Table.from_pylist(rows).select(["product_id", "image_uri"]).append_column(
        "label", pa.array([0, 0])).append_column("coarse_label", pa.array([0, 0]))
    decoded, bad = train.decoded_dataset(TrainConfig(), table, 32, str(folder))
    assert bad == 1 and decoded.count() == 1
    assert decoded.take(1)[0]["image"].shape == (32, 32, 3)


def test_evaluation_of_refused_images_names_the_cause_and_the_fix(ray_local, inside_and_outside,
                                                                   tiny_model, tmp_path):
    folder, rows = inside_and_outside
    outside = [r for r in rows if r["product_id"] == "outside"]
    manifest = write_manifest(folder / "m.parquet", [{**r, "category": "Banana"} for r in outside])
    with pytest.raises(ConfigError) as caught:
        evaluate.run(EvaluateConfig(manifest=str(manifest), model=tiny_model,
                                    output=str(tmp_path / "report"), dataset_root=None))
    message = str(caught.value)
    assert "1 could not be read" in message and "failed as fetch_failed" in message
    assert REFUSED in message and "--allowed-uri-prefixes" in message


def test_jobs_that_train_on_images_name_the_cause_when_most_cannot_be_read(
        ray_local, inside_and_outside, tiny_model):
    folder, rows = inside_and_outside
    outside = [r for r in rows if r["product_id"] == "outside"]
    table = pa.Table.from_pylist(outside).select(["product_id", "image_uri"])
    with pytest.raises(TrainingError, match="most training images could not be read") as caught:
        train.decoded_dataset(TrainConfig(), table.append_column("label", pa.array([0]))
                              .append_column("coarse_label", pa.array([0])), 32, str(folder))
    assert "1 of 1 images" in str(caught.value) and "--allowed-uri-prefixes" in str(caught.value)
    with pytest.raises(ConfigError, match="no image could be read") as caught:
        embeddings.embed(EmbedConfig(backbone=tiny_model),
                         table.append_column("label", pa.array([0]))
                         .append_column("is_val", pa.array([False])), str(folder),
                         load_metadata(tiny_model).input_size)
    assert "fetch_failed" in str(caught.value) and "--allowed-uri-prefixes" in str(caught.value)
