"""A fresh `make install`, before and after the locked install, side by side in one run.

Each variant is a fresh clone of this repository at a commit, installed with empty package caches
(pip's off, uv's a new folder), so every wheel is fetched again. Prints wall time, lines of output
and the lines that warn or mention a deprecation.

    python benchmarks/install.py                       # before: ad15cde (pip), after: HEAD (uv.lock)
    python benchmarks/install.py --variant before=ad15cde --variant after=HEAD
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install(commit: str, work: Path) -> dict:
    """Clone `commit` into `work` and time its `make install` with empty caches."""
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "UV_CACHE_DIR": str(work / "uv-cache")}
    start = time.perf_counter()
    proc = subprocess.run(["make", "install"], cwd=clone, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = (proc.stdout + proc.stderr).splitlines()
    return {
        "commit": commit, "rc": proc.returncode, "wall_s": wall, "lines": len(lines),
        "warnings": sum(bool(re.search(r"warn", x, re.I)) for x in lines),
        "deprecations": sum(bool(re.search(r"deprecat", x, re.I)) for x in lines),
        "venv_mb": sum(f.stat().st_size for f in (clone / ".venv").rglob("*") if f.is_file()) / 2**20,
        "tail": lines[-3:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", metavar="NAME=COMMIT",
                        help="a name and a commit to install (repeatable)")
    args = parser.parse_args(argv)
    variants = [v.split("=", 1) for v in (args.variant or ["before=ad15cde", "after=HEAD"])]
    rows = []
    for name, commit in variants:
        with tempfile.TemporaryDirectory(prefix=f"install-{name}-") as tmp:
            row = install(commit, Path(tmp))
        rows.append((name, row))
        print(f"# {name}: rc {row['rc']}; last lines: {row['tail']}", file=sys.stderr, flush=True)
    print(f"{'variant':<8} {'commit':<8} {'rc':>3} {'wall s':>7} {'lines':>6} {'warnings':>9} "
          f"{'deprecations':>13} {'venv MB':>8}")
    for name, r in rows:
        print(f"{name:<8} {r['commit']:<8} {r['rc']:>3} {r['wall_s']:>7.1f} {r['lines']:>6} "
              f"{r['warnings']:>9} {r['deprecations']:>13} {r['venv_mb']:>8.0f}")
    return 0 if all(r["rc"] == 0 for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
