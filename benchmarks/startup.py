"""A small catalog, whole process: our nightly job against the usual Ray Data recipe.

    python benchmarks/startup.py                 # 1,500 Grocery Store validation photos
    python benchmarks/startup.py --rows 1500 --repeat 2

Each run is a fresh `python` process, timed from its start to its exit, Ray's start included
where it starts Ray: what a scheduler pays for a small night. Runs, side by side:
- ours, `--executor auto`: a night this small scores in the job's own process (no Ray);
- ours, `--executor ray`: the same night through the Ray Data plan;
- the Ray Data documentation's recipe (`pipeline.analysis.benchmark.ray_docs_baseline`) on the same
  model and photos, in a process that starts its own Ray.
Then the start-up budget of our local night, line by line: the interpreter and imports (timed
as `python -c "import ..."` alone), then the job's own phases from its summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.benchmark import build_catalog
from pipeline.config import BUNDLED_MODEL, GROCERY_DATASET

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = 1500
JOB_IMPORTS = "import jobs.recategorize, pipeline.nightly.recategorize, pipeline.inference.cluster"
BASELINE = ("import sys, ray; from pathlib import Path; "
            "from pipeline.analysis.benchmark import ray_docs_baseline; "
            "ray.init(address='local', include_dashboard=False, logging_level='ERROR'); "
            "print(ray_docs_baseline(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))")


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of one process, and its stdout; a failed run stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def ours(manifest: Path, out: Path, executor: str) -> tuple[float, dict]:
    wall, stdout = timed([sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest),
                          "--model", BUNDLED_MODEL, "--output", str(out), "--overwrite",
                          "--allowed-uri-prefixes", str(manifest.parent),
                          "--executor", executor])
    return wall, json.loads(stdout[stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the median is shown")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="startup-"))
    photos = sorted((Path(GROCERY_DATASET) / "val").rglob("*.jpg"))
    manifest = build_catalog(root, photos, args.rows, upload_px=None)

    walls: dict[str, list[float]] = {"ours (auto: in-process)": [], "ours (--executor ray)": [],
                                     "Ray Data docs recipe": [], "imports only": []}
    summary: dict = {}
    for i in range(args.repeat):  # interleaved, so drift in the machine's load hits each alike
        wall, summary = ours(manifest, root / f"auto-{i}", "auto")
        walls["ours (auto: in-process)"].append(wall)
        walls["ours (--executor ray)"].append(ours(manifest, root / f"ray-{i}", "ray")[0])
        walls["Ray Data docs recipe"].append(timed(
            [sys.executable, "-c", BASELINE, str(manifest), BUNDLED_MODEL,
             str(root / f"baseline-{i}")])[0])
        walls["imports only"].append(timed([sys.executable, "-c", JOB_IMPORTS])[0])

    median = {k: statistics.median(v) for k, v in walls.items()}
    base = median["Ray Data docs recipe"]
    print(f"\n{args.rows} photos, whole process, median of {args.repeat}\n")
    print("| run | wall s | images/s | vs recipe |\n|---|---:|---:|---:|")
    for name in ("ours (auto: in-process)", "ours (--executor ray)", "Ray Data docs recipe"):
        print(f"| {name} | {median[name]:.1f} | {args.rows / median[name]:.1f} | "
              f"{base / median[name]:.2f}x |")
    phases = summary["phases_s"]
    rest = median["ours (auto: in-process)"] - median["imports only"] - sum(phases.values())
    print("\nStart-up budget of our in-process night (last run's phases):\n")
    print("| step | s |\n|---|---:|")
    print(f"| interpreter start and imports (`python -c \"{JOB_IMPORTS}\"`) | "
          f"{median['imports only']:.1f} |")
    for name, seconds in phases.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"| the rest: argument parsing, later imports, exit | {rest:.1f} |")


if __name__ == "__main__":
    main()
