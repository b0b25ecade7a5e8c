"""Build a training manifest from the Grocery Store dataset or a class-per-folder image tree."""

from __future__ import annotations

import sys

from jobs._main import run_job
from pipeline import logs
from pipeline.config import MakeManifestConfig, parse_args

PROG = "python -m jobs.make_manifest"


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(MakeManifestConfig, argv, __doc__, PROG)
    # torch and Ray load only once the arguments are good: --help answers at once
    from pipeline.importers import holdout_uri, make_manifest

    splits = tuple(s.strip() for s in cfg.splits.split(",") if s.strip())
    rows, held = make_manifest(cfg.source, cfg.output, cfg.layout, splits, cfg.holdout_categories,
                               cfg.holdout_seed, cfg.calibration_share)
    text = f"wrote {rows} rows to {cfg.output}"
    if held:
        text += f"\nheld out {len(held)} categories ({', '.join(held)}) in {holdout_uri(cfg.output)}"
    logs.summary({"rows": rows, "output": cfg.output, "held_out_categories": held}, text)


if __name__ == "__main__":
    sys.exit(run_job(main))
