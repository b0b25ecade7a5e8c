"""Export a model artifact for ONNX Runtime: fp32 ONNX, int8 (static post-training quantization)
or fp16, as a new model artifact (`backend: onnxruntime`, `model.onnx`).

The exported graph takes the batch as the pipeline holds it (uint8 NHWC, any batch size),
normalizes it inside and returns the logits and the penultimate embeddings (the input of the
head, which the centroid open-set score reads). Classes, preprocessing, temperature, open-set
settings and centroids are the source's; `model_version` hashes the ONNX file with them.

int8: onnxruntime.quantization's static QDQ quantization (per-channel int8 weights, uint8
activations with MinMax ranges) calibrated on a seeded, category-balanced sample of training
images. Every format is checked against the source torch model on those images before anything
is written: an export whose top-1 agreement or largest logit difference misses its tolerance
(`TOLERANCES`, or the job's options) is refused. No Ray imports.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config import ExportConfig
from pipeline.config.tolerances import TOLERANCES, Tolerance
from pipeline.errors import ConfigError, ModelError
from pipeline.inference.export_images import calibration_sample, decode_uris, held_out_uris
from pipeline.inference.onnx_backend import EMBEDDINGS_OUTPUT, INPUT_NAME, LOGITS_OUTPUT, OnnxBackend
from pipeline.inference.predict import fold_batch_norms
from pipeline.models.artifact import (
    CENTROIDS_FILE,
    METADATA_FILE,
    NOTICE_FILE,
    ONNX_BACKEND,
    ONNX_FILE,
    ModelMetadata,
    check_output,
    content_hash,
    load_artifact,
    load_metadata,
)
from pipeline.models.backends import EXPORT_FORMATS, export_uri
from pipeline.models.registry import remove_head

FORMATS = EXPORT_FORMATS
# Storage precision recorded in model.json (weights_dtype) per format.
FORMAT_DTYPES = {"onnx": "float32", "onnx-int8": "int8", "onnx-fp16": "float16"}
OPSET = 18  # torch 2.14's dynamo exporter's default; ORT 1.31 runs up to 23
EXAMPLE_BATCH = 2  # the traced example's batch size (the exported batch axis is dynamic)



class ParityError(ModelError):
    """An export disagrees with its source model beyond the tolerance; nothing was written."""


class _Exported(nn.Module):
    """What the ONNX graph computes: uint8 NHWC -> (logits, embeddings), normalization inside."""

    def __init__(self, model: nn.Module, meta: ModelMetadata):
        super().__init__()
        # The head is the model's last layer, so the body without it ends in the embedding (the
        # same cut as the torch backend's head hook and jobs.embed).
        self.head = remove_head(model, meta.architecture)
        self.body = model
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(meta.mean).view(shape) * 255.0)
        self.register_buffer("std", torch.tensor(meta.std).view(shape) * 255.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        embeddings = self.body(x)
        return self.head(embeddings), embeddings


def exportable(uri: str) -> tuple[_Exported, ModelMetadata]:
    """The source artifact's model as the graph to export, BatchNorm folded, eval mode."""
    model, meta = load_artifact(uri)
    return _Exported(fold_batch_norms(model), meta).eval(), meta


def to_onnx(module: _Exported, input_size: int) -> bytes:
    """The fp32 ONNX graph (weights inline), with a dynamic batch axis."""
    example = torch.zeros(EXAMPLE_BATCH, input_size, input_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
        output_names=[LOGITS_OUTPUT, EMBEDDINGS_OUTPUT], dynamic_shapes={"images": {0: batch}},
        verbose=False)
    proto = program.model_proto
    # The exporter annotates each node with the Python stack that made it (file paths, line
    # numbers): dropped, so the file, and model_version, depend on the graph alone.
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        del node.metadata_props[:]
    return proto.SerializeToString()


def to_fp16(model: bytes) -> bytes:
    """fp16 weights and activations; the graph's inputs and outputs keep their types."""
    import onnx
    from onnxruntime.transformers import float16  # onnxruntime's own fp16 converter

    proto = float16.convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
    return proto.SerializeToString()


class _CalibrationReader:
    """onnxruntime.quantization's CalibrationDataReader over uint8 image batches."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self.batches = iter([{INPUT_NAME: images[i:i + batch_size]}
                             for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def to_int8(model: bytes, images: np.ndarray, batch_size: int, reduce_range: bool = True,
            unsigned_weights: bool = False, float_depthwise: bool = False) -> bytes:
    """Static QDQ quantization: per-channel int8 weights on 7 bits (`reduce_range`), uint8
    activations calibrated (MinMax) on `images`.

    Why 7 bits: without VNNI (AVX2 only), ONNX Runtime's U8S8 kernels multiply with
    VPMADDUBSW, whose pairwise int16 sums saturate for full-range weights, so the same file
    gave other answers there (its quantization guide names this). With 7-bit weights no sum can
    saturate, so every x86-64 CPU computes the same integers, at the same speed as full range;
    uint8 weights (U8U8) avoid it too but have no fast per-channel kernel. The stem convolution
    (on the normalized photo) and the head (the node that writes the logits) stay float: a
    sliver of the compute, and they hold a good part of the int8 error. `unsigned_weights` and
    `float_depthwise` are the alternatives benchmarks/int8_formats.py measures against this."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, out = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(source).write_bytes(model)
        # Shape inference and graph fusions first, as onnxruntime's quantization guide asks.
        quant_pre_process(source, prepared)
        nodes = onnx.load(prepared).graph.node
        stem = next(n.name for n in nodes if n.op_type == "Conv")
        head = next(n.name for n in nodes if LOGITS_OUTPUT in n.output)
        depthwise = [n.name for n in nodes if float_depthwise and n.op_type == "Conv" and any(
            a.name == "group" and a.i > 1 for a in n.attribute)]
        # The quantizer logs a line per channel whose folded bias needs a wider scale than
        # input x weight scale; it widens it itself, and the parity check judges the result,
        # so those lines are noise in a scheduler's log.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_static(prepared, out, _CalibrationReader(images, batch_size),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QUInt8 if unsigned_weights else QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=[stem, head, *depthwise])
        finally:
            root.setLevel(level)
        return Path(out).read_bytes()


# ---------------------------------------------------------------- parity


@dataclass
class Parity:
    """What the parity check measured and the tolerance it applied (model.json export.parity)."""

    images: int
    top1_agreement: float
    max_logit_error: float
    min_top1_agreement: float
    max_logit_error_allowed: float
    held_out: bool = True  # False: judged on the calibration images (no other images to use)
    labelled: int = 0  # of `images`, how many have a category the model knows
    source_accuracy: float | None = None  # top-1 accuracy on the labelled ones
    export_accuracy: float | None = None
    accuracy_drop: float | None = None
    max_accuracy_drop: float = 1.0


@dataclass
class Reference:
    """The photos parity is judged on and what the source model says of them."""

    images: np.ndarray
    logits: np.ndarray
    labels: np.ndarray  # class index, -1 where unknown
    held_out: bool


def reference_logits(module: _Exported, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The source torch model's logits, the parity check's reference."""
    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(images[i:i + batch_size]))[0].numpy()
                               for i in range(0, len(images), batch_size)])


def parity_reference(cfg: ExportConfig, module: _Exported, meta: ModelMetadata,
                     calibration: tuple[np.ndarray, list[str]]) -> Reference:
    """Held-out photos (`held_out_uris`) with the source's logits and their labels; the
    calibration images themselves when the source has no others."""
    images, uris = calibration
    chosen = held_out_uris(cfg.calibration_source, uris, cfg.parity_images, cfg.calibration_seed)
    held_out = bool(chosen)
    categories = [c for _, c in chosen]
    if held_out:
        images, ok = decode_uris(cfg.calibration_source, [u for u, _ in chosen],
                                 meta.input_size, "held-out images")
        categories = [c for c, good in zip(categories, ok, strict=True) if good]
    index = {name: i for i, name in enumerate(meta.classes)}
    labels = np.array([index.get(c, -1) for c in categories] if held_out
                      else [-1] * len(images), dtype=np.int64)
    return Reference(images, reference_logits(module, images, cfg.batch_size), labels, held_out)


def check_parity(candidate: bytes, reference: Reference, fmt: str, tolerance: Tolerance,
                 device: str, batch_size: int) -> Parity:
    """The export's agreement with the source on the reference photos (top-1, logits, and
    accuracy where labelled); raises ParityError when it misses `tolerance`."""
    images = reference.images
    try:
        session = OnnxBackend(candidate, device, model_version="parity-check",
                              fp16=fmt == "onnx-fp16")
        logits = np.concatenate([session.run(images[i:i + batch_size])[0]
                                 for i in range(0, len(images), batch_size)])
    except ConfigError:
        raise
    except Exception as exc:  # e.g. an operator the provider has no kernel for
        raise ModelError(f"--format {fmt}: the exported graph does not run in ONNX Runtime on "
                         f"{device} ({type(exc).__name__}: {str(exc).splitlines()[0]}); nothing "
                         "written") from exc
    agreement = float((logits.argmax(1) == reference.logits.argmax(1)).mean())
    error = float(np.abs(logits - reference.logits).max())
    known = reference.labels >= 0
    parity = Parity(len(images), agreement, error, tolerance.min_top1_agreement,
                    tolerance.max_logit_error, reference.held_out, int(known.sum()),
                    max_accuracy_drop=tolerance.max_accuracy_drop)
    if known.any():
        labels = reference.labels[known]
        parity.source_accuracy = float((reference.logits[known].argmax(1) == labels).mean())
        parity.export_accuracy = float((logits[known].argmax(1) == labels).mean())
        parity.accuracy_drop = parity.source_accuracy - parity.export_accuracy
    if problems := tolerance.misses(agreement, error, parity.accuracy_drop):
        where = "held-out" if reference.held_out else "calibration"
        raise ParityError(
            f"refusing to write the {fmt} export: on {len(images)} {where} images it "
            f"disagrees with the source model beyond the tolerance ({'; '.join(problems)}); "
            "nothing written. Choose another --format, more --calibration-images, or state a "
            "looser --min-top1-agreement / --max-logit-error / --max-accuracy-drop")
    return parity


# ---------------------------------------------------------------- the job


def tolerance_for(cfg: ExportConfig) -> Tolerance:
    """The format's default tolerance with the job's overrides."""
    default = TOLERANCES[cfg.format]
    return Tolerance(
        default.min_top1_agreement if cfg.min_top1_agreement is None else cfg.min_top1_agreement,
        default.max_logit_error if cfg.max_logit_error is None else cfg.max_logit_error,
        default.max_accuracy_drop if cfg.max_accuracy_drop is None else cfg.max_accuracy_drop)


def output_of(cfg: ExportConfig) -> str:
    """--output, else the source's exports/<format>/."""
    return cfg.output or export_uri(cfg.model, cfg.format)


def export(cfg: ExportConfig) -> dict:
    """Export `cfg.model` as `cfg.format` into `cfg.output` (default: the source's
    `exports/<format>/`, where the nightly job looks for it); returns the new artifact's
    metadata as a dict (with its parity record). Nothing is written unless the export passes
    its parity check on held-out photos."""
    from pipeline.inference.device import local_device

    cfg = cfg.model_copy(update={"output": output_of(cfg)})
    check_output(cfg.output, cfg.overwrite)
    source = load_metadata(cfg.model)
    if source.backend == ONNX_BACKEND:
        raise ModelError(f"--model {cfg.model} is an export already ({source.format}); export "
                         "from its source artifact (model_version "
                         f"{source.export.get('source_model_version')})")
    device = local_device(cfg.device).split(":")[0]
    images, ok, uris = calibration_sample(cfg.calibration_source, source.input_size,
                                          cfg.calibration_images, cfg.calibration_seed)
    module, meta = exportable(cfg.model)
    reference = parity_reference(cfg, module, meta, (images, uris))
    graph = to_onnx(module, meta.input_size)
    if cfg.format == "onnx-int8":
        graph = to_int8(graph, images, cfg.batch_size)
    elif cfg.format == "onnx-fp16":
        graph = to_fp16(graph)
    parity = check_parity(graph, reference, cfg.format, tolerance_for(cfg), device,
                          cfg.batch_size)
    return write_export(cfg, meta, graph, parity, len(images), int((~ok).sum()))


def write_export(cfg: ExportConfig, source: ModelMetadata, graph: bytes, parity: Parity, images: int,
                 skipped: int) -> dict:
    """The new artifact: model.onnx, the source's centroids and notice, model.json."""
    import onnxruntime

    centroids = b""
    if source.open_set.get("score") == "centroid":
        centroids = storage.read_bytes(storage.join(cfg.model, CENTROIDS_FILE))
    meta = replace(source, backend=ONNX_BACKEND, weights_dtype=FORMAT_DTYPES[cfg.format],
                   model_version="", export={
                       "format": cfg.format, "file": ONNX_FILE, "opset": OPSET,
                       "source_model_version": source.model_version,
                       "source": storage.normalize(cfg.model),
                       "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                       "calibration": {"source": storage.normalize(cfg.calibration_source),
                                       "images": images, "unreadable": skipped,
                                       "seed": cfg.calibration_seed},
                       "parity": asdict(parity)})
    meta.model_version = content_hash(graph, meta, centroids)
    storage.write_bytes(storage.join(cfg.output, ONNX_FILE), graph)
    if centroids:
        storage.write_bytes(storage.join(cfg.output, CENTROIDS_FILE), centroids)
    notice = storage.join(cfg.model, NOTICE_FILE)
    if storage.exists(notice):
        storage.write_bytes(storage.join(cfg.output, NOTICE_FILE), storage.read_bytes(notice))
    storage.write_json(storage.join(cfg.output, METADATA_FILE), asdict(meta))
    return asdict(meta)
