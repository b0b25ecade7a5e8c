"""The CPU actor's thread split: the nightly job on a private local Ray (one actor that decodes
its own input) with the split it measures on its first batches, against the old fixed default
(half the cores for the model, half for decoding: `--inference-threads cores/2`), for the torch
weights and the int8 export, side by side in one run on the same catalog.

    python benchmarks/thread_split.py [--rows 6000]

Prints one row per backend and split: images/s of the whole night (manifest to committed
Parquet, the summary's `images_per_s`) and the split the actor settled on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from pipeline.analysis.benchmark import build_catalog, decode_only
    from pipeline.config import RecategorizeConfig
    from pipeline.inference.device import cpu_count
    from pipeline.nightly.recategorize import run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6000)
    args = parser.parse_args()
    os.chdir(ROOT)
    cores = cpu_count()
    sources = sorted((ROOT / "examples" / "sample-catalog" / "images").rglob("*.jpg"))
    print(f"{args.rows} rows of the sample catalog's 348 px photos, {cores} cores, one actor")
    print("| backend | split | images/s | the actor's split | trials (rows/s) |")
    print("|---|---|---:|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_catalog(Path(tmp), sources, args.rows, None)
        decode_only(manifest, 224, len(sources))  # warm the page cache
        for backend in ("onnx-int8", "torch"):
            for label, threads in (("measured (default)", None),
                                   ("half and half (old default)", max(1, cores // 2))):
                summary = run(RecategorizeConfig(
                    manifest=str(manifest), output=f"{tmp}/{backend}-{threads}", overwrite=True,
                    backend=backend, executor="ray", device="cpu", inference_threads=threads))
                split = summary["thread_split"]
                settled = [c for c in split["choices"] if c["settled"]] or split["choices"]
                chosen = max(settled, key=lambda c: c["batches"])
                print(f"| {backend} | {label} | {summary['images_per_s']:.1f} | "
                      f"{chosen['model_threads']} model + {chosen['decode_threads']} decode | "
                      f"{split.get('trials', '-')} |", flush=True)


if __name__ == "__main__":
    main()
