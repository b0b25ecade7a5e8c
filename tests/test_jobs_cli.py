"""The entry points as users run them: bad arguments stop the job before it writes anything."""

import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_every_option_has_help():
    for job, option in (("jobs.recategorize", "--top-k"), ("jobs.train", "--time-budget-min"),
                        ("jobs.make_manifest", "--output"), ("jobs.evaluate", "--target-accuracy"),
                        ("jobs.embed", "--knn-k")):
        proc = run_job(job, "--help")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert option in proc.stdout and "(default:" in proc.stdout and "--config" in proc.stdout
