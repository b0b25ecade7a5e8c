import json

import pytest
import torch

from pipeline.errors import ModelError
from pipeline.models.artifact import ModelMetadata, load_artifact, save_artifact
from pipeline.models.registry import create_model


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


@pytest.mark.parametrize("version", ["", "   "])
def test_an_artifact_without_a_version_is_refused_not_trusted(tmp_path, version):
    save_artifact(create_model("mobilenet_v3_small", 3), _meta(), str(tmp_path / "m"))
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model_version"] = version  # two such models would look the same to an incremental night
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="no model_version") as caught:
        load_artifact(str(tmp_path / "m"))
    assert caught.value.exit_code == 4 and "jobs.train" in str(caught.value)


def test_missing_artifact(tmp_path):
    with pytest.raises(ModelError, match=r"has no model\.json"):
        load_artifact(str(tmp_path / "nothing"))


def test_classifier_bf16_is_close_to_fp32(tmp_path, sample_images):
    """The GPU default precision (bf16 autocast) must not change predictions materially; checked
    on the CPU, where autocast to bf16 is also supported."""
    import numpy as np

    from pipeline.images.decode import decode_image
    from pipeline.inference.predict import Classifier

    save_artifact(create_model("mobilenet_v3_small", 3).eval(), _meta(), str(tmp_path / "m"))
    images = np.stack([decode_image(p.read_bytes(), 64) for p in sample_images[:8]])
    fp32 = Classifier(str(tmp_path / "m"), device="cpu", precision="fp32").probabilities(images)
    bf16 = Classifier(str(tmp_path / "m"), device="cpu", precision="bf16").probabilities(images)
    assert torch.allclose(fp32, bf16, atol=0.05)
    with pytest.raises(ValueError, match="valid: auto, fp32, bf16"):
        Classifier(str(tmp_path / "m"), precision="fp16")


def test_lite_artifact_keeps_provenance_open_set_and_half_precision(tmp_path):
    """A pretrained EfficientNet-Lite artifact stored in float16: half the bytes, the metadata
    round-trips, and its predictions match the float32 model's."""
    from pipeline.models import pretrained
    from pipeline.models.registry import describe_weights, get_spec

    name = "efficientnet_lite0"
    spec = get_spec(name)
    model = create_model(name, 4, pretrained.IMAGENET).eval()
    record = describe_weights(name, pretrained.IMAGENET)
    open_set = {"score": "energy", "threshold": -3.5, "known_keep_share": 0.95}

    def meta(dtype):
        return ModelMetadata(name, ["a", "b", "c", "d"], spec.input_size, list(spec.mean),
                             list(spec.std), provenance=record, weights_dtype=dtype,
                             open_set=open_set)

    full = save_artifact(model, meta("float32"), str(tmp_path / "f32"))
    half = save_artifact(model, meta("float16"), str(tmp_path / "f16"))
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "f16")}
    assert size["f16"] < 0.6 * size["f32"]
    assert full.model_version != half.model_version
    loaded, loaded_meta = load_artifact(str(tmp_path / "f16"))
    assert loaded_meta.provenance["sha256"] == pretrained.PRETRAINED_FILES[name].sha256
    assert loaded_meta.open_set == open_set and loaded_meta.weights_dtype == "float16"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(2, 3, spec.input_size, spec.input_size)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), atol=2e-2)


def test_open_set_threshold_is_part_of_the_version(tmp_path):
    model = create_model("mobilenet_v3_small", 3)
    plain = save_artifact(model, _meta(), str(tmp_path / "a")).model_version
    meta = _meta()
    meta.open_set = {"score": "energy", "threshold": 1.0}
    assert save_artifact(model, meta, str(tmp_path / "b")).model_version != plain


def test_centroids_travel_with_the_artifact_and_are_hashed(tmp_path):
    from pipeline.models.artifact import CENTROIDS_FILE, load_centroids

    model = create_model("mobilenet_v3_small", 3)
    meta = _meta()
    meta.open_set = {"score": "centroid", "threshold": 0.4}
    centroids = torch.nn.functional.normalize(torch.randn(3, 1024), dim=1)
    saved = save_artifact(model, meta, str(tmp_path / "m"), centroids)
    _, loaded = load_artifact(str(tmp_path / "m"))
    assert torch.equal(load_centroids(str(tmp_path / "m"), loaded), centroids)
    other = save_artifact(model, _meta_with(meta), str(tmp_path / "n"), centroids.flip(0))
    assert other.model_version != saved.model_version  # the centroids are part of the version
    (tmp_path / "m" / CENTROIDS_FILE).write_bytes((tmp_path / "n" / CENTROIDS_FILE).read_bytes())
    with pytest.raises(ModelError, match="corrupt or was edited"):
        load_artifact(str(tmp_path / "m"))
    (tmp_path / "m" / CENTROIDS_FILE).unlink()
    with pytest.raises(ModelError, match=r"has no open_set\.safetensors"):
        load_artifact(str(tmp_path / "m"))


def _meta_with(meta: ModelMetadata) -> ModelMetadata:
    copy = _meta()
    copy.open_set = dict(meta.open_set)
    return copy


def test_tiny_model_fixture_is_a_real_artifact_that_tells_photos_apart(tiny_model, bundled_model,
                                                                      sample_images):
    """The stand-in model other tests push catalogs through: loads like any artifact, knows the
    bundled model's categories, and its predictions and open-set scores depend on the photo."""
    import numpy as np

    from pipeline.images.preprocess import Preprocessor
    from pipeline.inference.predict import Classifier
    from pipeline.models.artifact import load_centroids

    meta = load_artifact(tiny_model)[1]  # loads like any artifact: content hash verified
    bundled = load_artifact(bundled_model)[1]
    assert meta.classes == bundled.classes and meta.coarse_classes == bundled.coarse_classes
    assert meta.input_size < bundled.input_size and meta.open_set["score"] == "centroid"
    assert load_centroids(tiny_model, meta).shape == (len(meta.classes), 1024)
    batch = Preprocessor(meta.input_size, str(sample_images[0].parents[2]))(
        {"image_uri": np.array([str(p) for p in sample_images], dtype=object)})
    rows = Classifier(tiny_model, device="cpu")(batch)
    assert len(set(rows["predicted_category"])) > 5
    assert np.ptp(rows["confidence"]) > 0.1 and np.ptp(rows["unfamiliarity"]) > 0.1
    assert 0 < (rows["unfamiliarity"] > meta.open_set["threshold"]).sum() < len(sample_images) / 2
