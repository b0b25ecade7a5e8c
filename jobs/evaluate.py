"""Evaluate a model artifact on a labelled manifest: metrics JSON, CSV tables, plots and one HTML
report, including the confidence threshold that reaches a target auto-accept accuracy and, with
--corruptions, accuracy under common image corruptions and an FGSM attack."""

from __future__ import annotations

import json
import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import EvaluateConfig, parse_args

PROG = "python -m jobs.evaluate"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(EvaluateConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.analysis.evaluate import run

    metrics = run(cfg)
    keys = ("rows", "scored_rows", "error_rows", "accuracy", "top5_accuracy", "coarse_accuracy",
            "macro_f1", "ece", "auto_accept")
    out = {k: metrics.get(k) for k in keys}
    out["decisions"] = {k: metrics["decisions"]["at_target"][k]
                        for k in ("target_precision", "precision", "catch", "review_load", "change_rate")}
    if "robustness" in metrics:
        robust = metrics["robustness"]
        out["robustness"] = {r["condition"]: r["accuracy"] for r in robust["conditions"]} | {
            "mean_corruption_accuracy": robust["mean_corruption_accuracy"]}
    result = out | {"output": cfg.output}
    logs.summary(result, json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main))
