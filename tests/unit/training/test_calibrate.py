"""jobs.calibrate: refit the temperature, open-set threshold and decision thresholds of an
artifact on held-out rows, scored by its own backend, as a new artifact."""

import pytest

from pipeline.config import CalibrateConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.importers import make_manifest
from pipeline.models import decide
from pipeline.models.artifact import load_metadata, rewrite_artifact, verify_artifact
from pipeline.training.data import load_data
from pipeline.training.recalibrate import run


@pytest.fixture(scope="module")
def grocery_manifest(grocery_root, tmp_path_factory):
    manifest = tmp_path_factory.mktemp("manifest") / "grocery.parquet"
    make_manifest(str(grocery_root), str(manifest))
    return manifest


@pytest.mark.slow
def test_calibration_writes_a_new_artifact_with_fitted_thresholds(ray_local, grocery_manifest,
                                                                  tiny_model, tmp_path):
    # A model that records its training config: its calibration split can be recomputed.
    recorded = TrainConfig(manifest=str(grocery_manifest)).model_dump(mode="json")
    source = str(tmp_path / "source")
    rewrite_artifact(tiny_model, source, training={"config": recorded})
    out = tmp_path / "calibrated"
    summary = run(CalibrateConfig(manifest=str(grocery_manifest), model=source, output=str(out)))

    before, after = load_metadata(source), verify_artifact(str(out))  # hash checked
    held_out = load_data(TrainConfig(**recorded)).calibration.num_rows
    assert summary["split"] == "calibration" and summary["rows"] == held_out
    assert after.decisions["fitted_on"]["split"] == "calibration"
    assert after.decisions["fitted_on"]["rows"] == held_out
    assert after.decisions["fitted_on"]["backend"] == "torch-float32"
    assert after.decisions["fitted_on"]["source_model_version"] == before.model_version
    assert after.temperature == summary["temperature"] != before.temperature
    assert after.open_set["score"] == before.open_set["score"] == "centroid"
    assert after.open_set["threshold"] == summary["open_set_threshold"] != before.open_set["threshold"]
    assert after.model_version == summary["model_version"] != before.model_version
    weights = "model.safetensors"
    assert (out / weights).read_bytes() == (tmp_path / "source" / weights).read_bytes()
    assert summary["policy_at_0.95"] == decide.policy_for(after.decisions, 0.95).to_json()

    with pytest.raises(ConfigError, match="--overwrite"):
        run(CalibrateConfig(manifest=str(grocery_manifest), model=source, output=str(out)))


def test_a_model_without_a_recorded_split_needs_one_named(grocery_manifest, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="--split"):
        run(CalibrateConfig(manifest=str(grocery_manifest), model=tiny_model,
                            output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
