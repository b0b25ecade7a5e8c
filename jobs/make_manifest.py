"""Build a training manifest from the Grocery Store dataset or a class-per-folder image tree."""

from __future__ import annotations

import sys

from jobs._main import run_job
from pipeline.config import MakeManifestConfig, parse_args
from pipeline.importers import make_manifest


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(MakeManifestConfig, argv, __doc__)
    splits = tuple(s.strip() for s in cfg.splits.split(",") if s.strip())
    rows = make_manifest(cfg.source, cfg.output, cfg.layout, splits)
    print(f"wrote {rows} rows to {cfg.output}")


if __name__ == "__main__":
    sys.exit(run_job(main))
