"""The entry points as users run them: bad arguments stop the job before it writes anything."""

import json
import subprocess
import sys

import pytest

from pipeline.config import REPO_ROOT
from tests.conftest import write_manifest


def run_job(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_invalid_manifest_exits_nonzero_and_writes_nothing(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [
        {"product_id": "a", "image_uri": "x.jpg"}, {"product_id": "a", "image_uri": "y.jpg"}])
    out = tmp_path / "out"
    proc = run_job("jobs.recategorize", "--manifest", str(manifest), "--output", str(out))
    assert proc.returncode == 3
    assert "m.parquet" in proc.stderr and "product_id" in proc.stderr and "'a'" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_bad_option_and_missing_model(tmp_path):
    proc = run_job("jobs.recategorize", "--top-k", "0", "--output", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--top-k" in proc.stderr
    proc = run_job("jobs.recategorize", "--model", str(tmp_path / "nomodel"),
                   "--output", str(tmp_path / "o"))
    assert proc.returncode == 4 and "nomodel" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_every_option_has_help():
    for job, option in (("jobs.recategorize", "--top-k"), ("jobs.train", "--time-budget-min"),
                        ("jobs.make_manifest", "--output"), ("jobs.evaluate", "--target-accuracy"),
                        ("jobs.embed", "--knn-k"), ("jobs.audit", "--near-min-cosine")):
        proc = run_job(job, "--help", cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert option in proc.stdout and "(default:" in proc.stdout and "--config" in proc.stdout
        assert str(REPO_ROOT) not in proc.stdout  # defaults as typed in the checkout


JOBS = ("recategorize", "train", "evaluate", "embed", "audit", "make_manifest", "benchmark",
        "train_benchmark", "export", "calibrate", "review", "promote")
HEAVY = ("torch", "torchvision", "ray", "pyarrow", "onnx", "onnxruntime")
# A value out of range for an option each job has: the config's validation runs, then fails.
OUT_OF_RANGE = {"make_manifest": ["--holdout-categories", "-1"], "train_benchmark": ["--steps", "0"],
                "export": ["--calibration-images", "0"], "review": ["--port", "-1"]}
PARSE_ONLY = """
import importlib, json, sys
job = importlib.import_module("jobs." + sys.argv[1])
codes = []
for argv in (["--help"], ["--no-such-option", "1"], json.loads(sys.argv[2])):
    try:
        codes.append(job.run_job(job.main, argv))
    except SystemExit as exc:  # --help
        codes.append(exc.code)
print(json.dumps({"codes": codes, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


@pytest.mark.parametrize("job", JOBS)
def test_help_and_bad_arguments_load_no_heavy_module(job):
    """--help and a bad argument answer before torch, Ray or pyarrow are imported."""
    bad = OUT_OF_RANGE.get(job, ["--num-cpus", "0"])
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, job, json.dumps(bad)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 2, 2]
    assert not set(HEAVY) & set(result["loaded"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "--no-such-option" in errors[0] and bad[0] in errors[1]
    assert not any("Config" in line for line in errors)  # no internal class name


@pytest.mark.parametrize("value", ["0", "1.5", "high", "1"])
def test_a_bad_change_precision_is_refused_before_anything_is_written(value, tmp_path, capsys):
    from jobs import recategorize

    out = tmp_path / "out"
    code = recategorize.run_job(recategorize.main, ["--change-precision", value,
                                                    "--output", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and "--change-precision" in error
    assert not out.exists()
