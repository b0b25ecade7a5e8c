"""ONNX Runtime inference backend: an exported artifact's graph (pipeline.inference.export) in an
InferenceSession.

The graph takes the batch as the pipeline holds it (uint8 NHWC) and normalizes inside, so no
float copy of the batch is made outside it; it returns the logits and the penultimate embeddings
(what the centroid open-set score reads). Execution providers: TensorRT (with an engine cache on
local disk), then CUDA, where the installed onnxruntime has them (`onnxruntime-gpu`) and the
device is cuda; else the CPU provider, with intra-op threads set as the torch backend sets
torch's. No torch or Ray imports.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

INPUT_NAME = "images"  # uint8 [batch, size, size, 3]
LOGITS_OUTPUT = "logits"
EMBEDDINGS_OUTPUT = "embeddings"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
# TensorRT builds an engine per model and input shape, minutes for a large model: cached on local
# disk (this variable, else the user cache folder), one folder per model_version.
TRT_CACHE_ENV = "RECATEGORIZER_TRT_CACHE"
TRT_CACHE_DEFAULT = Path.home() / ".cache" / "catalog-recategorizer" / "tensorrt"
# ORT's default thread count: its physical-core count, as torch's default.
DEFAULT_THREADS = 0


def available_providers() -> list[str]:
    """The execution providers the installed onnxruntime build offers."""
    import onnxruntime as ort

    return ort.get_available_providers()


def trt_cache_dir(model_version: str) -> str:
    """The TensorRT engine cache folder of one model version (created)."""
    root = Path(os.environ.get(TRT_CACHE_ENV) or TRT_CACHE_DEFAULT)
    path = root / model_version
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def providers_for(device: str, model_version: str, fp16: bool,
                  available: list[str] | None = None) -> list:
    """The execution providers for `device` ('cpu', 'cuda' or 'cuda:N'), best first.

    cuda needs onnxruntime's CUDA provider: running silently on CPU would make a GPU night many
    times slower, so its absence is an error that names the fix."""
    available = available_providers() if available is None else available
    if not device.startswith("cuda"):
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        raise ConfigError(
            f"--device {device}: this onnxruntime has no {CUDA_PROVIDER} (providers: "
            f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime, or run "
            "the artifact with --device cpu")
    device_id = int(device.partition(":")[2] or 0)
    providers: list = []
    if TENSORRT_PROVIDER in available:
        providers.append((TENSORRT_PROVIDER, {
            "device_id": device_id, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": trt_cache_dir(model_version),
            # fp16 kernels for an fp16 artifact; an int8 artifact's Q/DQ nodes are explicit.
            "trt_fp16_enable": fp16}))
    providers.append((CUDA_PROVIDER, {"device_id": device_id}))
    providers.append(CPU_PROVIDER)
    return providers


class OnnxBackend:
    """An exported artifact's graph in an InferenceSession: uint8 NHWC -> (logits, embeddings),
    float32 numpy arrays."""

    def __init__(self, model: bytes, device: str, model_version: str, fp16: bool = False,
                 num_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or DEFAULT_THREADS
        # One graph, one batch at a time: operators run in order, parallel inside each.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = providers_for(device, model_version, fp16)
        self.session = ort.InferenceSession(model, sess_options=options, providers=self.providers)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, embeddings) of a uint8 NHWC batch."""
        logits, embeddings = self.session.run(
            [LOGITS_OUTPUT, EMBEDDINGS_OUTPUT], {INPUT_NAME: np.ascontiguousarray(images)})
        return logits.astype(np.float32, copy=False), embeddings.astype(np.float32, copy=False)
