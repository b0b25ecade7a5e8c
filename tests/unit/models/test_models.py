import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import ModelError
from pipeline.models.registry import create_model, list_models


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"])
def test_registry_builds_each_backbone(name):
    model = create_model(name, num_classes=7).eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ModelError, match=r"unknown model 'resnet9000'; valid: .*resnet18"):
        create_model("resnet9000", 3)


def test_unknown_torchvision_weights_lists_valid_ones():
    with pytest.raises(ModelError, match=r"IMAGENET1K_V1"):
        create_model("resnet18", 3, weights="IMAGENET9K_V7")


def test_weights_file_transfers_backbone_and_replaces_head(tmp_path):
    source = create_model("mobilenet_v3_small", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = create_model("mobilenet_v3_small", num_classes=4, weights=str(path))
    src_state, dst_state = source.state_dict(), target.state_dict()
    assert torch.equal(src_state["features.0.0.weight"], dst_state["features.0.0.weight"])
    assert dst_state["classifier.3.weight"].shape == (4, 1024)


def test_pickled_weights_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not opened")
    with pytest.raises(ModelError, match=r"must be \.safetensors"):
        create_model("resnet18", 3, weights=str(path))


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet18", 3).state_dict().items()},
              str(path))
    with pytest.raises(ModelError, match="does not fit mobilenet_v3_small"):
        create_model("mobilenet_v3_small", 3, weights=str(path))


def test_list_models_sorted():
    assert list_models() == sorted(list_models()) and "efficientnet_b0" in list_models()
