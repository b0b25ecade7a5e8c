"""Inference stage: a callable class that loads the model once and maps a batch to predictions.

Each BatchNorm that follows a convolution is folded into that convolution's weights (inference
only; torch.fx finds the pairs by data flow), which saves a pass over every activation map
(BENCHMARKS.md has the speed-up).

Top-k leaves as class indices (numeric arrays travel zero-copy); the output stage names them.
uint8 NHWC images go to the device as they are (4x less to copy than float32) and are normalized
there. Rows that failed preprocessing pass through with null predictions. An exported artifact
(jobs.export) runs in ONNX Runtime instead (pipeline.inference.onnx_backend); the artifact names its
backend. No Ray imports, so the same class runs in a Ray actor pool, a plain script or a GPU
benchmark.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.inference.device import local_device
from pipeline.models import openset
from pipeline.models.artifact import (
    ONNX_BACKEND,
    TORCH_BACKEND,
    ModelMetadata,
    load_artifact,
    load_centroids,
    load_metadata,
    read_weights,
)
from pipeline.models.registry import get_spec
from pipeline.models.transforms import norm_tensors, to_model_input


def resolve_device(device: str) -> torch.device:
    """`device` on this machine as a torch device (`device.local_device`): fails here, by
    name, rather than deep inside the first tensor copy."""
    return torch.device(local_device(device))


@dataclass(frozen=True)
class ClassifierSettings:
    """A Classifier's settings as the engine passes them (`engine.Predictor`): the engine adds
    the device and the thread count."""

    model_uri: str
    top_k: int = 5
    precision: str = "auto"
    compile: bool = False
    tta: str = "none"
    with_logits: bool = False


PRECISIONS = ("auto", "fp32", "bf16")
# Test-time augmentation: "flip" averages the logits of each image and its mirror image, at twice
# the model cost per image (BENCHMARKS.md has what it buys).
TTA_MODES = ("none", "flip")


def _trace_conv_bn(model: torch.nn.Module) -> torch.fx.Graph:
    """The fx graph with every convolution and BatchNorm (subclasses included, e.g. timm's
    Conv2dSame and BatchNormAct2d) kept as one opaque node, so pairs are found by data flow."""
    from torch import fx, nn

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.Conv2d | nn.modules.batchnorm._BatchNorm) or \
                super().is_leaf_module(m, qualname)

    return Tracer().trace(model)


def _after_norm(bn: torch.nn.Module) -> torch.nn.Module:
    """What a folded BatchNorm leaves behind: timm's BatchNormAct2d keeps its activation."""
    from torch import nn

    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """The eval-mode model with each conv -> BatchNorm pair folded into the conv, in place (the
    model keeps its class). A model torch.fx cannot trace runs unfolded (same outputs, slower),
    with a warning."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    try:
        graph = _trace_conv_bn(model)
    except Exception as exc:  # tracing fails on data-dependent control flow
        warnings.warn(f"could not fold BatchNorm into convolutions ({type(exc).__name__}: {exc}); "
                      "running the model as it is", stacklevel=2)
        return model
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and type(modules[source.target]) in (nn.Conv2d, *_same_pad_convs())
                and len(source.users) == 1):
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        _replace(model, source.target, fuse_conv_bn_eval(modules[source.target], bn))
        _replace(model, node.target, _after_norm(bn))
    return model


def _same_pad_convs() -> tuple[type, ...]:
    """timm's convolutions with TensorFlow "same" padding: plain convs after a pad, foldable."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return ()
    return (Conv2dSame,)


def _replace(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def check_backend_options(meta: ModelMetadata, precision: str = "auto", compile: bool = False) -> None:
    """Refuse torch-only options for an exported artifact, whose precision was fixed at export
    (the jobs call this before they write anything)."""
    if meta.backend == TORCH_BACKEND:
        return
    if precision != "auto":
        raise ConfigError(f"--precision {precision}: model {meta.model_version} is a {meta.format} "
                          "export, whose precision was fixed at export; give --precision auto, or "
                          "export another format (python -m jobs.export --format ...)")
    if compile:
        raise ConfigError(f"--compile: model {meta.model_version} is a {meta.format} export for "
                          "ONNX Runtime, which optimizes the graph itself; drop --compile")


class TorchBackend:
    """The artifact's torch model, BatchNorm folded, channels_last: uint8 NHWC -> (logits,
    embeddings or None)."""

    def __init__(self, model_uri: str, device: torch.device, precision: str = "auto",
                 compile: bool = False, embeddings: bool = False):
        self.device = device
        model, meta = load_artifact(model_uri, device)
        self.model = fold_batch_norms(model).to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model)
        self.autocast = precision == "bf16" or (precision == "auto" and device.type == "cuda")
        self.pin = device.type == "cuda"
        self.mean, self.std = norm_tensors(meta.mean, meta.std, device)
        self._embeddings: list[torch.Tensor] = []
        if embeddings:  # the head's input is the embedding
            head = model.get_submodule(get_spec(meta.architecture).head)
            head.register_forward_pre_hook(lambda _, args: self._embeddings.append(args[0].float()))

    @torch.inference_mode()
    def forward(self, images: np.ndarray, tta: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.pin:  # page-locked source: the copy runs async, overlapping the previous batch
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        self._embeddings.clear()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            x = to_model_input(x, self.mean, self.std)
            logits = self.model(x).float()
            if tta == "flip":
                logits = (logits + self.model(x.flip(3)).float()) / 2
        embeddings = torch.stack(self._embeddings).mean(0) if self._embeddings else None
        return logits, embeddings


class OnnxRuntimeBackend:
    """An exported artifact (pipeline.inference.export) in ONNX Runtime: uint8 NHWC -> (logits,
    embeddings), as torch tensors on the CPU."""

    def __init__(self, model_uri: str, meta: ModelMetadata, device: torch.device,
                 num_threads: int | None = None):
        self.device = torch.device("cpu")  # where the outputs land
        self.graph, self.target, self.meta = read_weights(model_uri, meta), str(device), meta
        self.sessions: dict[int | None, Any] = {}  # thread count -> onnx_backend.OnnxBackend
        self.set_threads(num_threads)

    def set_threads(self, num_threads: int | None) -> None:
        """Run on `num_threads` intra-op threads: ONNX Runtime fixes them per session, so one
        session per thread count, built once."""
        from pipeline.inference.onnx_backend import OnnxBackend

        if num_threads not in self.sessions:
            self.sessions[num_threads] = OnnxBackend(
                self.graph, self.target, self.meta.model_version,
                fp16=self.meta.weights_dtype == "float16", num_threads=num_threads)
        self.session = self.sessions[num_threads]

    def forward(self, images: np.ndarray, tta: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, embeddings = self.session.run(images)
        if tta == "flip":  # the mirror image: NHWC width axis
            flipped_logits, flipped_embeddings = self.session.run(images[:, :, ::-1])
            logits = (logits + flipped_logits) / 2
            embeddings = (embeddings + flipped_embeddings) / 2
        return torch.from_numpy(logits), torch.from_numpy(embeddings)


class Classifier:
    """Scores uint8 NHWC batches with the backend the artifact names (`backend` in model.json):
    torch, or ONNX Runtime for an exported artifact (jobs.export).

    torch: precision 'auto' is bf16 autocast on CUDA (tensor cores) and fp32 on CPU, where bf16 is
    slower on most cores without AMX. `compile` runs torch.compile (worth it on long GPU runs).
    ONNX Runtime: the precision is the export's; `num_threads` sets its intra-op threads as it
    sets torch's."""

    def __init__(self, model_uri: str, device: str = "auto", top_k: int = 5,
                 num_threads: int | None = None, precision: str = "auto", compile: bool = False,
                 tta: str = "none", with_logits: bool = False):
        self.with_logits = with_logits  # a `logits` column (n x classes): calibration, evaluation
        if num_threads:
            torch.set_num_threads(num_threads)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if tta not in TTA_MODES:
            raise ValueError(f"unknown tta {tta!r}; valid: {', '.join(TTA_MODES)}")
        self.tta = tta
        self.device = resolve_device(device)
        self.meta = load_metadata(model_uri)
        check_backend_options(self.meta, precision, compile)
        self.open_set_kind = self.meta.open_set.get("score", openset.LOGIT_SCORE)
        if self.meta.backend == ONNX_BACKEND:
            self.backend: TorchBackend | OnnxRuntimeBackend = OnnxRuntimeBackend(
                model_uri, self.meta, self.device, num_threads)
        else:
            self.backend = TorchBackend(model_uri, self.device, precision, compile,
                                        embeddings=self.open_set_kind == "centroid")
        self.classes = np.array(self.meta.classes, dtype=object)
        self.class_index = {c: i for i, c in enumerate(self.meta.classes)}
        self.top_k = min(top_k, len(self.classes))
        self.centroids = load_centroids(model_uri, self.meta)
        if self.centroids is not None:
            self.centroids = self.centroids.to(self.backend.device)
        self._embeddings: torch.Tensor | None = None

    def set_threads(self, num_threads: int) -> None:
        """The model's intra-op threads from the next batch on (the thread-split tuner)."""
        if isinstance(self.backend, OnnxRuntimeBackend):
            self.backend.set_threads(num_threads)
        else:
            torch.set_num_threads(num_threads)

    def logits(self, images: np.ndarray) -> torch.Tensor:
        """Raw float32 logits for a uint8 NHWC batch (averaged with the mirror image's with
        tta='flip')."""
        logits, self._embeddings = self.backend.forward(images, self.tta)
        return logits

    def embeddings(self) -> torch.Tensor | None:
        """The embeddings of the last `logits` call (mean over its TTA views)."""
        return self._embeddings

    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """Softmax (with the artifact's temperature) for a uint8 NHWC batch."""
        return torch.softmax(self.logits(images) / self.meta.temperature, dim=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        n = len(images)
        ok = np.asarray(batch["status"]) == "ok"
        predicted = np.full(n, None, dtype=object)
        confidence = np.full(n, np.nan, dtype=np.float32)
        top_index = np.full((n, self.top_k), -1, dtype=np.int32)
        top_scores = np.full((n, self.top_k), np.nan, dtype=np.float32)
        unfamiliar = np.full(n, np.nan, dtype=np.float32)
        p_current = np.full(n, np.nan, dtype=np.float32)
        all_logits = np.full((n, len(self.classes)), np.nan, dtype=np.float32) if self.with_logits else None
        if ok.any():
            logits = self.logits(images[ok])
            if all_logits is not None:
                all_logits[ok] = logits.float().cpu().numpy()
            probs = torch.softmax(logits / self.meta.temperature, dim=1)
            if batch.get("current_category") is not None:
                p_current[ok] = self.current_probability(probs, np.asarray(batch["current_category"])[ok])
            unfamiliar[ok] = openset.unfamiliarity(
                logits, self.meta.temperature, self.open_set_kind, self.embeddings(),
                self.centroids).cpu().numpy()
            scores, idx = probs.topk(self.top_k, dim=1)
            scores, idx = scores.cpu().numpy(), idx.cpu().numpy()
            top_index[ok] = idx
            top_scores[ok] = scores
            predicted[ok] = self.classes[idx[:, 0]]
            confidence[ok] = scores[:, 0]
        out = {**batch, "predicted_category": predicted, "confidence": confidence,
               "top_k_index": top_index, "top_k_scores": top_scores, "unfamiliarity": unfamiliar,
               "p_current": p_current}
        if all_logits is not None:
            out["logits"] = all_logits
        return out

    def current_probability(self, probs: torch.Tensor, current: np.ndarray) -> np.ndarray:
        """The calibrated probability of each row's current category; NaN where there is none
        or the model does not know it."""
        index = np.array([self.class_index.get(c, -1) if isinstance(c, str) else -1
                          for c in current], dtype=np.int64)
        known = np.flatnonzero(index >= 0)
        out = np.full(len(index), np.nan, dtype=np.float32)
        if len(known):
            rows = torch.from_numpy(known).to(probs.device)
            cols = torch.from_numpy(index[known]).to(probs.device)
            out[known] = probs[rows, cols].float().cpu().numpy()
        return out
