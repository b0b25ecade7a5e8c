import json

import pytest
import torch

from pipeline.artifact import ModelMetadata, load_artifact, save_artifact
from pipeline.errors import ModelError
from pipeline.models import create_model


def _meta(classes=("a", "b", "c")):
    return ModelMetadata("mobilenet_v3_small", list(classes), 64, [0.5] * 3, [0.25] * 3)


def test_roundtrip_gives_identical_logits(tmp_path):
    model = create_model("mobilenet_v3_small", 3).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        before = model(x)
    meta = save_artifact(model, _meta(), str(tmp_path / "m"))
    loaded, loaded_meta = load_artifact(str(tmp_path / "m"))
    with torch.inference_mode():
        assert torch.equal(before, loaded(x))
    assert loaded_meta.model_version == meta.model_version and len(meta.model_version) == 16
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]


def test_version_depends_on_classes_and_weights(tmp_path):
    model = create_model("mobilenet_v3_small", 3)
    v1 = save_artifact(model, _meta(), str(tmp_path / "a")).model_version
    v2 = save_artifact(model, _meta(("a", "b", "x")), str(tmp_path / "b")).model_version
    assert v1 != v2
    assert save_artifact(model, _meta(), str(tmp_path / "c")).model_version == v1


def test_corrupt_or_edited_artifact_is_refused(tmp_path):
    save_artifact(create_model("mobilenet_v3_small", 3), _meta(), str(tmp_path / "m"))
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["classes"] = ["a", "c", "b"]  # a silent relabel would mis-name every prediction
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="corrupt or was edited"):
        load_artifact(str(tmp_path / "m"))


def test_missing_artifact(tmp_path):
    with pytest.raises(ModelError, match=r"has no model\.json"):
        load_artifact(str(tmp_path / "nothing"))
