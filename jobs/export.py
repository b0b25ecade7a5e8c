"""Export a model artifact for ONNX Runtime (fp32, int8 or fp16) as a new model artifact that
jobs.recategorize, jobs.evaluate and jobs.benchmark run as they run any other (--model DIR).
By default it is written into the source artifact's exports/<format>/ folder, where the nightly
job finds it (--backend auto runs the int8 export on CPU). The export is checked against the
source model on held-out images and refused, with nothing written, when it disagrees beyond the
tolerance."""

from __future__ import annotations

import json
import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import ExportConfig, parse_args

PROG = "python -m jobs.export"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(ExportConfig, argv, __doc__, PROG)
    # torch and onnxruntime load only once the arguments are good: --help answers at once
    from pipeline.inference.export import export, output_of

    meta = export(cfg)
    result = {"output": output_of(cfg), "format": meta["export"]["format"],
              "model_version": meta["model_version"],
              "source_model_version": meta["export"]["source_model_version"],
              "parity": meta["export"]["parity"]}
    logs.summary(result, json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main))
