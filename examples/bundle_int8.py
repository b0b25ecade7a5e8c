"""Build the bundled model's int8 export, which a CPU night runs by default
(examples/model/exports/onnx-int8): export it with the default options, fit its temperature and
keep / change / review thresholds on its own scores (the calibration half of val, as the torch
model's were), and record paths relative to the checkout so the file is the same on any machine.

    python -m jobs.make_manifest --calibration-share 0.5 --output manifests/grocery-cal.parquet
    python examples/bundle_int8.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import CalibrateConfig, ExportConfig  # noqa: E402
from pipeline.config.options import GROCERY_DATASET  # noqa: E402
from pipeline.inference.export import export  # noqa: E402
from pipeline.models.artifact import load_metadata, rewrite_artifact  # noqa: E402
from pipeline.models.backends import CPU_DEFAULT_FORMAT, export_uri  # noqa: E402
from pipeline.training.recalibrate import run as calibrate  # noqa: E402

MODEL = "examples/model"
MANIFEST = "manifests/grocery-cal.parquet"


def relative(value):
    """`value` with this checkout's and the dataset's absolute paths made relative, as the torch
    artifact records them."""
    if isinstance(value, dict):
        return {k: relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v) for v in value]
    if isinstance(value, str):
        dataset = os.path.abspath(GROCERY_DATASET)
        if value.startswith(dataset):
            return "../shared/datasets/grocery-store" + value[len(dataset):]
        if value.startswith(f"{ROOT}/"):
            return value[len(f"{ROOT}/"):]
    return value


def main() -> None:
    os.chdir(ROOT)
    target = export_uri(MODEL, CPU_DEFAULT_FORMAT)
    with tempfile.TemporaryDirectory() as tmp:
        exported, calibrated = f"{tmp}/export", f"{tmp}/calibrated"
        export(ExportConfig(model=MODEL, format=CPU_DEFAULT_FORMAT, output=exported))
        calibrate(CalibrateConfig(model=exported, manifest=MANIFEST, output=calibrated))
        meta = load_metadata(calibrated)
        notice = Path(target) / "NOTICE.md"  # the export's own notice, kept over the copied one
        kept = notice.read_text() if notice.exists() else None
        shutil.rmtree(target, ignore_errors=True)
        new = rewrite_artifact(calibrated, target, export=relative(meta.export),
                               decisions=relative(meta.decisions),
                               training=relative(meta.training))
        if kept:
            notice.write_text(kept)
    print(json.dumps({"output": target, "model_version": new.model_version,
                      "parity": asdict(new)["export"]["parity"],
                      "fitted_on": new.decisions.get("fitted_on")}, indent=2))


if __name__ == "__main__":
    main()
