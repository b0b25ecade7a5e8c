"""The inference model: BatchNorm folded into the convolutions changes speed, not predictions."""

import copy
import warnings

import numpy as np
import pytest
import torch

from pipeline.images.preprocess import Preprocessor
from pipeline.inference.predict import Classifier, fold_batch_norms
from pipeline.models.artifact import load_artifact
from pipeline.models.registry import create_model
from pipeline.models.transforms import norm_tensors, to_model_input


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorms hold mean 0 / var 1, which folding would turn into a no-op: give them
    statistics and affine parameters like a trained model's."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0",
                                  "efficientnet_lite0"])
def test_folding_removes_every_batch_norm_and_keeps_outputs(name):
    torch.manual_seed(0)  # the same random weights every run: the tolerance below is for them
    model = _trained_like(create_model(name, num_classes=7))
    folded = fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = model(x), folded(x)
    assert not torch.equal(expected, got)  # the graph really changed...
    # ...the function did not: float32 rounding of the folded products stays near 1e-4 on these
    # random weights (one run reached 1.8e-4); a wrong fold is off by the size of the logits.
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_bundled_model_predicts_the_same_on_real_photos(bundled_model, sample_images):
    batch = {"image_uri": np.array([str(p) for p in sample_images], dtype=object)}
    model, meta = load_artifact(bundled_model)
    images = Preprocessor(meta.input_size, str(sample_images[0].parents[2]))(batch)["image"]
    mean, std = norm_tensors(meta.mean, meta.std, "cpu")
    with torch.inference_mode():
        logits = model.eval()(to_model_input(torch.from_numpy(images), mean, std))
        plain = torch.softmax(logits / meta.temperature, 1)
    folded = Classifier(bundled_model, device="cpu").probabilities(images)
    assert torch.equal(plain.argmax(1), folded.argmax(1))
    torch.testing.assert_close(folded, plain, rtol=0, atol=1e-5)


class _DataDependent(torch.nn.Module):
    """A branch on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_untraceable_model_runs_unfolded_with_a_warning():
    model = _DataDependent()
    with pytest.warns(UserWarning, match="could not fold BatchNorm"):
        same = fold_batch_norms(model)
    assert same is model and not model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fold_batch_norms(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))


def test_flip_tta_averages_each_image_with_its_mirror(tiny_model, sample_images):
    model, meta = load_artifact(tiny_model)
    batch = {"image_uri": np.array([str(p) for p in sample_images[:4]], dtype=object)}
    images = Preprocessor(meta.input_size, str(sample_images[0].parents[2]))(batch)["image"]
    mean, std = norm_tensors(meta.mean, meta.std, "cpu")
    x = to_model_input(torch.from_numpy(images), mean, std)
    with torch.inference_mode():
        expected = (model(x) + model(x.flip(3))) / 2
    got = Classifier(tiny_model, device="cpu", tta="flip").logits(images)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(Classifier(tiny_model, device="cpu").logits(images), got)
    with pytest.raises(ValueError, match="valid: none, flip"):
        Classifier(tiny_model, device="cpu", tta="five-crop")


def test_classifier_rows_carry_an_open_set_score(tiny_model, sample_images):
    meta_size = load_artifact(tiny_model)[1].input_size
    uris = [str(p) for p in sample_images[:3]] + [str(sample_images[0].parent / "missing.jpg")]
    batch = Preprocessor(meta_size, str(sample_images[0].parents[2]))(
        {"image_uri": np.array(uris, dtype=object)})
    out = Classifier(tiny_model, device="cpu")(batch)
    assert out["unfamiliarity"].dtype == np.float32
    assert np.isfinite(out["unfamiliarity"][:3]).all() and np.isnan(out["unfamiliarity"][3])
