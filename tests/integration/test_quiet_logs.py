"""Off a terminal, as a scheduler captures a job, its log is the job's own lines: no colour
escapes, no progress bars, no Ray Data progress lines, no warning a user cannot act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT

ESC = "\x1b"
# The night's stderr may keep Ray's own few lines (one saying progress bars are off, one about
# actor restarts); anything like the per-operator progress blocks would be dozens.
MAX_STDERR_LINES = 15


@pytest.mark.slow
def test_a_ray_night_off_a_terminal_is_quiet_and_plain(small_catalog, tiny_model, tmp_path):
    manifest, rows, _ = small_catalog
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "RAY_COLOR_PREFIX")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest), "--model",
         tiny_model, "--output", str(tmp_path / "out"), "--executor", "ray", "--num-cpus", "2"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ESC not in proc.stdout and ESC not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= MAX_STDERR_LINES, proc.stderr
    assert not [line for line in lines if "Deprecat" in line or "logging_progress" in line]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["rows"] == rows and summary["executor"] == "ray"
