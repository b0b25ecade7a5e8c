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

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from pipeline import storage
from pipeline.config import ExportConfig
from pipeline.errors import ConfigError, ModelError
from pipeline.images.security import UriPolicy
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
from pipeline.models.registry import remove_head

FORMATS = ("onnx", "onnx-int8", "onnx-fp16")
# Storage precision recorded in model.json (weights_dtype) per format.
FORMAT_DTYPES = {"onnx": "float32", "onnx-int8": "int8", "onnx-fp16": "float16"}
OPSET = 18  # torch 2.14's dynamo exporter's default; ORT 1.31 runs up to 23
EXAMPLE_BATCH = 2  # the traced example's batch size (the exported batch axis is dynamic)
CALIBRATION_MAX_BYTES = 50_000_000  # the jobs' default --max-image-bytes


@dataclass(frozen=True)
class Tolerance:
    """How far an export may disagree with its source on the calibration images."""

    min_top1_agreement: float  # share of images with the same top-1 class
    max_logit_error: float  # largest |logit difference| over every image and class

    def misses(self, agreement: float, logit_error: float) -> list[str]:
        problems = []
        if agreement < self.min_top1_agreement:
            problems.append(f"top-1 agreement {agreement:.4f} < min_top1_agreement "
                            f"{self.min_top1_agreement}")
        if not logit_error <= self.max_logit_error:  # also catches NaN
            problems.append(f"max logit error {logit_error:.6g} > max_logit_error "
                            f"{self.max_logit_error}")
        return problems


# fp32 ONNX is the same arithmetic in another order: float rounding only. fp16 keeps ~3
# significant digits of each activation. int8 rounds every weight and activation to 256 levels:
# images near a decision boundary may flip, and single logits can move by a good part of their
# spread; its bound sits about 1.5x above what the bundled model's export shows (BENCHMARKS.md),
# so that a broken export (wrong ranges, a wrong input layout), which misses by far more, is
# refused.
TOLERANCES = {
    "onnx": Tolerance(min_top1_agreement=1.0, max_logit_error=1e-3),
    "onnx-fp16": Tolerance(min_top1_agreement=0.99, max_logit_error=0.1),
    "onnx-int8": Tolerance(min_top1_agreement=0.97, max_logit_error=3.0),
}


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


def to_int8(model: bytes, images: np.ndarray, batch_size: int) -> bytes:
    """Static QDQ quantization: per-channel int8 weights, uint8 activations calibrated (MinMax)
    on `images`. The stem convolution (the first, on the normalized photo) and the head (the
    node that writes the logits) stay float: a sliver of the compute, and on the bundled model
    they hold a good part of the int8 error (BENCHMARKS.md)."""
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
        quantize_static(prepared, out, _CalibrationReader(images, batch_size),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=[stem, head])
        return Path(out).read_bytes()


# ---------------------------------------------------------------- calibration images


def calibration_uris(source: str) -> list[tuple[str, str]]:
    """(image path, category) of the training images of `source`: the Grocery Store dataset
    (its train split), a folder of class folders (its train/ split where it has one), or a
    labelled Parquet manifest (rows with split 'train' where it has a split column)."""
    from pipeline.importers import folder_rows, grocery_store_rows

    path = Path(source)
    if path.is_dir():
        rows = (grocery_store_rows(source, ["train"]) if (path / "classes.csv").exists()
                else folder_rows(source))
    elif path.is_file() and path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            if not os.path.isabs(row["image_uri"]) and "://" not in row["image_uri"]:
                row["image_uri"] = str(path.parent / row["image_uri"])
    else:
        raise ConfigError(f"--calibration-source {source}: neither a folder of images (the "
                          "Grocery Store dataset, class folders) nor a .parquet manifest")
    if any(r.get("split") == "train" for r in rows):
        rows = [r for r in rows if r.get("split") == "train"]
    return [(r["image_uri"], r.get("category") or "") for r in rows]


def sample_balanced(items: list[tuple[str, str]], count: int, seed: int) -> list[str]:
    """Up to `count` image paths, round-robin over categories in a seeded order, so every
    category is represented before any has two."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[str]] = {}
    for uri, category in sorted(items):
        by_category.setdefault(category, []).append(uri)
    queues = [list(rng.permutation(uris)) for _, uris in sorted(by_category.items())]
    chosen: list[str] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(str(queue.pop()))
    return chosen


def calibration_images(source: str, size: int, count: int, seed: int) -> tuple[np.ndarray, int]:
    """A balanced sample of `source`'s training images, decoded by the scoring engine as every
    job decodes them (uint8 NHWC); returns them and how many unreadable files were skipped."""
    from pipeline.inference import engine

    # The guarded fetch path, as every job reads images: local files under the source's own
    # folder only (no http, no '../'), regular files, the byte limit.
    root = os.path.abspath(source if Path(source).is_dir() else str(Path(source).parent))
    images = engine.ImageSettings(size, root, UriPolicy.from_options("file", "", "", root),
                                  max_bytes=CALIBRATION_MAX_BYTES, fetch_retries=0)
    uris = sample_balanced(calibration_uris(source), count, seed)
    rows = pa.table({"product_id": [str(i) for i in range(len(uris))], "image_uri": uris})
    batches = engine.decode_rows(images, rows)
    ok = np.concatenate([b["status"] for b in batches]) == "ok" if batches else np.array([], bool)
    if not ok.any():
        messages = [m for b in batches for m in b["error_message"] if m]
        refused = sum(str(m).startswith("not allowed") for m in messages)
        why = (f"; {refused} refused by the URI policy: images must be local files under {root}"
               if refused else "")
        raise ConfigError(f"--calibration-source {source}: no readable training images{why}")
    return np.concatenate([b["image"] for b in batches])[ok], int((~ok).sum())


# ---------------------------------------------------------------- parity


@dataclass
class Parity:
    """What the parity check measured and the tolerance it applied (model.json export.parity)."""

    images: int
    top1_agreement: float
    max_logit_error: float
    min_top1_agreement: float
    max_logit_error_allowed: float


def reference_logits(module: _Exported, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The source torch model's logits, the parity check's reference."""
    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(images[i:i + batch_size]))[0].numpy()
                               for i in range(0, len(images), batch_size)])


def check_parity(candidate: bytes, reference: np.ndarray, images: np.ndarray, fmt: str,
                 tolerance: Tolerance, device: str, batch_size: int) -> Parity:
    """The export's agreement with the source's logits on `images`; raises ParityError when it
    misses `tolerance`."""
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
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    error = float(np.abs(logits - reference).max())
    parity = Parity(len(images), agreement, error, tolerance.min_top1_agreement,
                    tolerance.max_logit_error)
    if problems := tolerance.misses(agreement, error):
        raise ParityError(
            f"refusing to write the {fmt} export: on {len(images)} calibration images it "
            f"disagrees with the source model beyond the tolerance ({'; '.join(problems)}); "
            "nothing written. Choose another --format, more --calibration-images, or state a "
            "looser --min-top1-agreement / --max-logit-error")
    return parity


# ---------------------------------------------------------------- the job


def export(cfg: ExportConfig) -> dict:
    """Export `cfg.model` as `cfg.format` into `cfg.output`; returns the new artifact's
    metadata as a dict (with its parity record). Nothing is written unless the export passes
    its parity check."""
    from pipeline.inference.device import local_device

    check_output(cfg.output, cfg.overwrite)
    source = load_metadata(cfg.model)
    if source.backend == ONNX_BACKEND:
        raise ModelError(f"--model {cfg.model} is an export already ({source.format}); export "
                         "from its source artifact (model_version "
                         f"{source.export.get('source_model_version')})")
    default = TOLERANCES[cfg.format]
    tolerance = Tolerance(
        default.min_top1_agreement if cfg.min_top1_agreement is None else cfg.min_top1_agreement,
        default.max_logit_error if cfg.max_logit_error is None else cfg.max_logit_error)
    device = local_device(cfg.device).split(":")[0]
    images, skipped = calibration_images(cfg.calibration_source, source.input_size,
                                         cfg.calibration_images, cfg.calibration_seed)

    module, meta = exportable(cfg.model)
    reference = reference_logits(module, images, cfg.batch_size)
    graph = to_onnx(module, meta.input_size)
    if cfg.format == "onnx-int8":
        graph = to_int8(graph, images, cfg.batch_size)
    elif cfg.format == "onnx-fp16":
        graph = to_fp16(graph)
    parity = check_parity(graph, reference, images, cfg.format, tolerance, device, cfg.batch_size)
    return write_export(cfg, meta, graph, parity, len(images), skipped)


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
