import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.catalog import stratified_split
from pipeline.config import TrainConfig
from pipeline.images.decode import decode_image
from pipeline.importers import make_manifest
from pipeline.models import decide
from pipeline.models.artifact import load_artifact
from pipeline.models.registry import create_model
from pipeline.training.data import load_data
from pipeline.training.train import run


def test_stratified_split_takes_a_share_of_every_class():
    labels = np.repeat(np.arange(5), [10, 20, 2, 1, 40])
    is_val = stratified_split(labels, 0.25, seed=3)
    per_class = [int(is_val[labels == c].sum()) for c in range(5)]
    assert per_class == [2, 5, 1, 0, 10]
    assert np.array_equal(is_val, stratified_split(labels, 0.25, seed=3))
    assert not np.array_equal(is_val, stratified_split(labels, 0.25, seed=4))


def _ids(table) -> set[str]:
    return set(table.column("product_id").to_pylist())


def test_calibration_rows_are_held_out_of_training_and_validation(grocery_root, tmp_path):
    manifest = tmp_path / "m.parquet"
    make_manifest(str(grocery_root), str(manifest))
    data = load_data(TrainConfig(manifest=str(manifest)))
    train, val, calibration = _ids(data.train), _ids(data.val), _ids(data.calibration)
    assert not train & val and not train & calibration and not val & calibration
    assert len(train | val | calibration) == pq.read_metadata(manifest).num_rows
    assert len(val) == 296  # the dataset's own val split reports; calibration comes out of train
    labels = data.calibration.column("label").to_numpy()
    train_labels = data.train.column("label").to_numpy()
    assert set(labels) == set(train_labels)  # every category is calibrated
    assert 0.12 < len(calibration) / (len(train) + len(calibration)) < 0.18
    # A block per category, its last photos in manifest order: new shots, not near-copies.
    table = pq.read_table(manifest)
    for category in ("Granny-Smith", "Kiwi"):
        rows = [r["product_id"] for r in table.to_pylist()
                if r["category"] == category and r["split"] == "train"]
        k = sum(p in calibration for p in rows)
        assert k >= 1 and set(rows[-k:]) <= calibration and not set(rows[:-k]) & calibration
    shuffled = load_data(TrainConfig(manifest=str(manifest), calibration_sampling="random"))
    assert _ids(shuffled.calibration) != calibration
    assert len(_ids(shuffled.calibration)) == len(calibration)
    # Rows a manifest marks as its calibration split are used as they are.
    table = pq.read_table(manifest)
    split = table.column("split").to_pylist()
    marked = [s if s != "train" or i % 7 else "calibration" for i, s in enumerate(split)]
    pq.write_table(table.set_column(table.schema.get_field_index("split"), "split",
                                    pa.array(marked)), tmp_path / "marked.parquet")
    given = load_data(TrainConfig(manifest=str(tmp_path / "marked.parquet")))
    ids = table.column("product_id").to_pylist()
    assert _ids(given.calibration) == {ids[i] for i, s in enumerate(marked) if s == "calibration"}
    assert load_data(TrainConfig(manifest=str(manifest), calibration_fraction=0)).calibration is None


@pytest.mark.slow
def test_short_training_exports_an_artifact_with_the_checkpoint_logits(
        ray_local, grocery_root, tmp_path):
    manifest = tmp_path / "m.parquet"
    make_manifest(str(grocery_root), str(manifest))
    cfg = TrainConfig(manifest=str(manifest), output=str(tmp_path / "run"), epochs=1,
                      max_train_rows=96, input_size=64, batch_size=16)
    summary = run(cfg)
    assert summary["train_rows"] == 96 and summary["val_rows"] == 296
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["best_epoch"] == 1

    model, meta = load_artifact(summary["model"])
    assert len(meta.classes) == 81 and meta.input_size == 64
    assert meta.coarse_classes["Granny-Smith"] == "Apple"
    assert meta.training["val_accuracy"] == summary["val_accuracy"]
    assert meta.temperature == summary["temperature"] > 0  # calibrated on by default
    # Temperature and decision thresholds come from the held-out calibration rows, not val.
    assert summary["calibration_split"] == "calibration" and summary["calibration_rows"] > 300
    assert meta.decisions["fitted_on"]["split"] == "calibration"
    assert meta.decisions["fitted_on"]["rows"] == summary["calibration_rows"]
    assert [p["target_precision"] for p in meta.decisions["operating_points"]] == list(
        decide.TARGET_PRECISIONS)
    assert 0.0 <= summary["val_macro_f1"] <= 1.0 and 0.0 <= summary["val_ece"] <= 1.0
    assert summary["start"] == {"kind": "random", "weights": None}

    checkpoints = [p for p in glob.glob(str(tmp_path / "run" / "checkpoints" / "run" / "checkpoint_*"))
                   if os.path.isdir(p)]
    assert len(checkpoints) == 1
    trained = create_model("mobilenet_v3_small", 81)
    trained.load_state_dict(load_file(f"{checkpoints[0]}/model.safetensors"))
    trained.eval()
    images = [decode_image(p.read_bytes(), 64)
              for p in sorted((grocery_root / "val" / "Fruit" / "Apple").rglob("*.jpg"))[:4]]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        assert torch.equal(trained(x), model(x))
