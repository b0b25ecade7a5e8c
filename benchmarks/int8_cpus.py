"""Does one int8 file give the same answers on every x86-64 CPU? The bundled model quantized in
the old format (full-range int8 weights) and the export's format (7-bit weights), each scored on
the Grocery val photos on this CPU and, where `qemu-x86_64` is installed (Debian's qemu-user),
on an emulated AVX2-only CPU (`-cpu Haswell`: AVX2 and FMA, no AVX-512, no VNNI), where ONNX
Runtime takes its non-VNNI kernels.

    python benchmarks/int8_cpus.py [--emulated-images 96]

Prints one row per format and CPU: top-1 agreement with the torch model, top-1 accuracy, the
largest logit difference from the same file on this CPU, and images/s (2 threads; the emulated
CPU's speed is the emulator's, not a real CPU's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = {"full-range int8 weights (before)": False, "7-bit weights (the export's)": True}
BATCH = 32


def score(graph: str, images: np.ndarray) -> tuple[np.ndarray, float]:
    """(logits, images/s) of one ONNX file on this CPU, 2 intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    logits = np.concatenate([session.run(["logits"], {"images": images[i:i + BATCH]})[0]
                             for i in range(0, len(images), BATCH)])
    return logits, len(images) / (time.perf_counter() - start)


def child(folder: str, name: str, count: int) -> None:
    """Under the emulator: score `name`.onnx on the first `count` photos, save its logits."""
    data = np.load(f"{folder}/photos.npz")
    logits, speed = score(f"{folder}/{name}.onnx", data["images"][:count])
    np.savez(f"{folder}/{name}.emulated.npz", logits=logits, speed=speed)


def prepare(folder: str) -> None:
    """The photos, the torch logits and both int8 files."""
    from pipeline.config.options import GROCERY_DATASET
    from pipeline.inference.export import exportable, reference_logits, to_int8, to_onnx
    from pipeline.inference.export_images import (
        calibration_images,
        decode_uris,
        held_out_uris,
    )

    module, meta = exportable("examples/model")
    calibration, _ = calibration_images(GROCERY_DATASET, meta.input_size, 300, 0)
    held = held_out_uris(GROCERY_DATASET, [], 296, 0)
    images, ok = decode_uris(GROCERY_DATASET, [u for u, _ in held], meta.input_size)
    labels = np.array([meta.classes.index(c) for (_, c), good in zip(held, ok, strict=True) if good])
    np.savez(f"{folder}/photos.npz", images=images, labels=labels,
             torch=reference_logits(module, images, BATCH))
    graph = to_onnx(module, meta.input_size)
    for index, reduce_range in enumerate(FORMATS.values()):
        Path(f"{folder}/f{index}.onnx").write_bytes(to_int8(graph, calibration, BATCH, reduce_range))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulated-images", type=int, default=96,
                        help="photos scored under the emulator (slow: about 1 image/s)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.emulated_images)
        return
    os.chdir(ROOT)
    qemu = shutil.which("qemu-x86_64")
    with tempfile.TemporaryDirectory() as folder:
        prepare(folder)
        data = np.load(f"{folder}/photos.npz")
        reference, labels = data["torch"], data["labels"]
        print(f"torch fp32: top-1 accuracy {np.mean(reference.argmax(1) == labels):.1%} on "
              f"{len(labels)} val photos")
        print("| int8 format | CPU | photos | top-1 agreement with torch | top-1 accuracy | "
              "max logit difference from this CPU | images/s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for index, name in enumerate(FORMATS):
            logits, speed = score(f"{folder}/f{index}.onnx", data["images"])
            rows = [("this CPU", logits, speed, len(logits))]
            if qemu:
                subprocess.run([qemu, "-cpu", "Haswell", sys.executable, __file__, "--child",
                                folder, f"f{index}", "--emulated-images",
                                str(args.emulated_images)],
                               check=True, stderr=subprocess.DEVNULL)
                emulated = np.load(f"{folder}/f{index}.emulated.npz")
                rows.append(("emulated AVX2, no VNNI", emulated["logits"],
                             float(emulated["speed"]), len(emulated["logits"])))
            for cpu, out, images_per_s, n in rows:
                same = np.abs(out - logits[:n]).max()
                print(f"| {name} | {cpu} | {n} | {np.mean(out.argmax(1) == reference[:n].argmax(1)):.1%} | "
                      f"{np.mean(out.argmax(1) == labels[:n]):.1%} | {same:.3g} | {images_per_s:.1f} |")
        if not qemu:
            print("qemu-x86_64 is not installed (apt-get install qemu-user): no emulated rows")


if __name__ == "__main__":
    main()
