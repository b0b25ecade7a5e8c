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


def test_classifier_bf16_is_close_to_fp32(tmp_path, sample_images):
    """The GPU default precision (bf16 autocast) must not change predictions materially; checked
    on the CPU, where autocast to bf16 is also supported."""
    import numpy as np

    from pipeline.decode import decode_image
    from pipeline.predict import Classifier

    save_artifact(create_model("mobilenet_v3_small", 3).eval(), _meta(), str(tmp_path / "m"))
    images = np.stack([decode_image(p.read_bytes(), 64) for p in sample_images[:8]])
    fp32 = Classifier(str(tmp_path / "m"), device="cpu", precision="fp32").probabilities(images)
    bf16 = Classifier(str(tmp_path / "m"), device="cpu", precision="bf16").probabilities(images)
    assert torch.allclose(fp32, bf16, atol=0.05)
    with pytest.raises(ValueError, match="valid: auto, fp32, bf16"):
        Classifier(str(tmp_path / "m"), precision="fp16")
