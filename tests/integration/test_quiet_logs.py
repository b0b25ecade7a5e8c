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
# The night's stderr is its phases, one line each, and may keep Ray's line about actor restarts;
# anything like the per-operator progress blocks would be dozens.
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
    assert not [line for line in lines if "Deprecat" in line or "logging_progress" in line
                or "Progress bars disabled" in line]
    assert {"validate manifest: ", "score: ", "commit: "} <= {line.split(":")[0] + ": "
                                                              for line in lines}
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["rows"] == rows and summary["executor"] == "ray"


def test_a_night_with_log_format_json_prints_only_json_objects(small_catalog, tiny_model,
                                                              tmp_path):
    """--log-format json: every line on both streams is one JSON object a log store ingests
    as it is: the phases with their seconds and the run id, then the summary."""
    manifest, rows, _ = small_catalog
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest), "--model",
         tiny_model, "--output", str(tmp_path / "out"), "--log-format", "json"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    summary = [json.loads(line) for line in proc.stdout.splitlines()]
    # the tiny model has no fitted thresholds: one warning says so
    assert [e["event"] for e in events].count("warning") == 1 and len(summary) == 1
    phases = [e for e in events if e["event"] == "phase"]
    assert {"validate manifest", "score", "commit"} <= {p["phase"] for p in phases}
    assert all(p["seconds"] >= 0 and p["job"] == "jobs.recategorize" for p in phases)
    run_id = summary[0]["run_id"]
    assert phases[-1]["run_id"] == run_id and summary[0]["event"] == "summary"
    assert summary[0]["rows"] == rows and summary[0]["phases_s"]["score"] >= 0


def test_a_bad_option_with_log_format_json_is_one_error_object(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.recategorize", "--top-k", "0", "--log-format", "json",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    error = json.loads(line)
    assert error["event"] == "error" and error["exit_code"] == 2 and "--top-k" in error["message"]
    assert not (tmp_path / "out").exists()
