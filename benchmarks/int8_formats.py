"""int8 quantization formats for the bundled model, side by side: agreement with the torch model
and accuracy on the same held-out photos, and ONNX Runtime images/s on this CPU.

Every variant is quantized from the same fp32 graph on the same calibration photos (the
export's defaults) and judged on the same held-out photos (`jobs.export`'s parity check).

    python benchmarks/int8_formats.py [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ExportConfig
from pipeline.config.tolerances import Tolerance
from pipeline.inference import export as ex
from pipeline.models.artifact import load_metadata

MODEL = str(Path(__file__).resolve().parents[1] / "examples" / "model")


def images_per_s(graph: bytes, x: np.ndarray, threads: int, rounds: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        rates.append(len(x) / (time.perf_counter() - start))
    return float(np.median(rates))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = ExportConfig(model=MODEL, format="onnx-int8", output=tempfile.mkdtemp())
    meta = load_metadata(cfg.model)
    images, _, uris = ex.calibration_sample(cfg.calibration_source, meta.input_size,
                                            cfg.calibration_images, cfg.calibration_seed)
    module, meta = ex.exportable(cfg.model)
    reference = ex.parity_reference(cfg, module, meta, (images, uris))
    graph = ex.to_onnx(module, meta.input_size)
    variants = {
        "fp32 (no quantization)": graph,
        "7-bit s8 weights (shipped)": ex.to_int8(graph, images, cfg.batch_size),
        "7-bit s8, depthwise float": ex.to_int8(graph, images, cfg.batch_size,
                                                float_depthwise=True),
        "8-bit s8 weights (VNNI only)": ex.to_int8(graph, images, cfg.batch_size,
                                                   reduce_range=False),
        "8-bit u8 weights (U8U8)": ex.to_int8(graph, images, cfg.batch_size, reduce_range=False,
                                              unsigned_weights=True),
    }
    print(f"{len(images)} calibration photos, {len(reference.images)} held-out photos, "
          f"{args.threads} threads, batch 64")
    print(f"{'variant':<30} {'top-1 agree':>11} {'max logit err':>13} {'accuracy':>9} "
          f"{'drop pt':>8} {'images/s':>9}")
    loose = Tolerance(0.0, 1e9, 1.0)
    for name, model in variants.items():
        parity = ex.check_parity(model, reference, "onnx-int8", loose, "cpu", cfg.batch_size)
        speed = images_per_s(model, reference.images[:64], args.threads, args.rounds)
        print(f"{name:<30} {parity.top1_agreement:>11.3f} {parity.max_logit_error:>13.2f} "
              f"{parity.export_accuracy:>9.3f} {100 * parity.accuracy_drop:>8.1f} {speed:>9.0f}")
    print(f"torch source accuracy on the same photos: {parity.source_accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
