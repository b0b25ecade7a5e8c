"""GPU code paths; skipped where CUDA is unavailable (see conftest)."""

import numpy as np
import pytest
import torch

from pipeline.images.decode import decode_image
from pipeline.inference.predict import Classifier
from pipeline.models.artifact import load_metadata


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_classifier_agrees_with_cpu(bundled_model, sample_images, compile):
    size = load_metadata(bundled_model).input_size
    images = np.stack([decode_image(p.read_bytes(), size) for p in sample_images[:16]])
    cpu = Classifier(bundled_model, device="cpu").probabilities(images)
    gpu = Classifier(bundled_model, device="cuda", compile=compile).probabilities(images).cpu()
    assert torch.allclose(cpu, gpu, atol=0.05)
    assert (cpu.argmax(1) == gpu.argmax(1)).float().mean() >= 0.9
