"""The nightly job through a misbehaving object store (tests/faulty_store.py in front of moto).

Manifest, images, model and output are all in the bucket, and every S3 request of the job (its
driver and its Ray workers) goes through the proxy, which fails 10% of them (503 SlowDown, 500,
a delay, a reset after the server acted). The first run also meets a store that refuses its
commit outright: it must fail cleanly after a bounded number of tries and publish nothing; the
same command again resumes every chunk and commits exactly the rows of a run against a healthy
store. No credential reaches the job's output streams, Ray's logs or the bucket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs._main import run_job
from jobs.recategorize import main as recategorize_main
from pipeline import storage
from pipeline.config import REPO_ROOT
from pipeline.sinks.parquet import SUCCESS_FILE, committed_files
from tests.conftest import BAD_ROWS, LOOPBACK_AWS_ENV, make_catalog, summary_json, upload_tree
from tests.faulty_store import FAULT_KINDS, FailRule, FaultProxy

SECRET = LOOPBACK_AWS_ENV["AWS_SECRET_ACCESS_KEY"]
FAULT_SHARE = 0.10
CHUNK_ROWS = 6  # 23 rows: four chunks, so resuming has several markers to find
JOB_TIMEOUT_S = 400
COMPARED = ["product_id", "image_uri", "status", "error_type", "predicted_category",
            "current_category", "category_changed", "needs_review", "model_version"]


def committed_rows(output: str) -> pa.Table:
    fs, _ = storage.arrow_filesystem(output)
    files = [storage.filesystem(f)[1] for f in committed_files(output)]
    return pq.ParquetDataset(files, filesystem=fs).read().sort_by("product_id")


def job_process(args: list[str], endpoint: str, ray_tmp: str) -> subprocess.CompletedProcess:
    """`python -m jobs.recategorize` as cron runs it, its S3 endpoint `endpoint`, its own Ray
    (logs under `ray_tmp`)."""
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    # On Ray: its workers read and write the store too, not only this process.
    return subprocess.run([sys.executable, "-m", "jobs.recategorize", "--executor", "ray", *args],
                          env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def ray_logs(ray_tmp: str) -> tuple[set[str], str]:
    """The names of the log files the jobs' Ray sessions left, and their text."""
    files = [p for p in Path(ray_tmp).rglob("session_*/logs/*")
             if p.is_file() and p.suffix in (".log", ".out", ".err")]
    return {p.name for p in files}, "".join(p.read_text(errors="replace") for p in files)


@pytest.mark.slow
def test_recategorize_through_a_faulty_store_commits_every_row_once(
        ray_local, s3_server, s3_bucket, tmp_path, sample_images, tiny_model, capsys):
    make_catalog(tmp_path / "catalog", sample_images, good=20)
    upload_tree(tmp_path / "catalog", f"{s3_bucket}/catalog")
    upload_tree(Path(tiny_model), f"{s3_bucket}/model")
    args = ["--manifest", f"{s3_bucket}/catalog/manifest.parquet", "--model",
            f"{s3_bucket}/model", "--batch-size", "8", "--chunk-rows", str(CHUNK_ROWS)]

    # The rows a healthy store gives (in this process, straight to moto).
    assert run_job(recategorize_main, [*args, "--output", f"{s3_bucket}/healthy"]) == 0
    capsys.readouterr()
    healthy = committed_rows(f"{s3_bucket}/healthy")

    ray_tmp = tempfile.mkdtemp(prefix="rfs-", dir="/tmp")  # Ray's socket paths must stay short
    output = f"{s3_bucket}/out"
    job_args = [*args, "--output", output, "--num-cpus", "2"]
    try:
        # 1. Faults, and a store that answers every write of the commit marker with a 500.
        proxy = FaultProxy(s3_server, FAULT_SHARE, seed=1,
                           rule=FailRule("PUT", f"/out/{SUCCESS_FILE}", "internal"))
        try:
            first = job_process(job_args, proxy.url, ray_tmp)
        finally:
            proxy.close()
        assert first.returncode == 1, first.stderr[-3000:]
        assert first.stderr.strip().splitlines()[-1].startswith(
            "error: storage failed after its retries"), first.stderr[-3000:]
        # Retried, and bounded: botocore tries each request S3_MAX_ATTEMPTS times; s3fs repeats
        # a call only on throttling or a lost connection, not on a 500.
        assert proxy.stats.rule_hits == storage.S3_MAX_ATTEMPTS, proxy.stats
        assert not storage.exists(f"{output}/{SUCCESS_FILE}")
        assert set(FAULT_KINDS) == set(proxy.stats.faults), proxy.stats

        # 2. The same command, the store still failing 10% of requests: resumes and commits.
        proxy = FaultProxy(s3_server, FAULT_SHARE, seed=2)
        try:
            second = job_process(job_args, proxy.url, ray_tmp)
        finally:
            proxy.close()
        assert second.returncode == 0, second.stderr[-3000:]
        assert sum(proxy.stats.faults.values()) > 0
        summary = summary_json(second.stdout)
        assert summary["chunks"] == summary["chunks_resumed"] == 4 and summary["rows"] == 23

        rows = committed_rows(output)
        assert rows.num_rows == 23 and len(set(rows.column("product_id").to_pylist())) == 23
        assert rows.select(COMPARED).equals(healthy.select(COMPARED))
        errors = {r["product_id"]: r["error_type"] for r in rows.to_pylist() if r["error_type"]}
        assert errors == BAD_ROWS

        streams = first.stdout + first.stderr + second.stdout + second.stderr
        assert SECRET not in streams and LOOPBACK_AWS_ENV["AWS_ACCESS_KEY_ID"] not in streams
        names, logs = ray_logs(ray_tmp)
        assert {"raylet.out", "gcs_server.out"} <= names  # the sessions' logs are really there
        assert SECRET not in logs
        fs, path = storage.filesystem(output)
        assert not any(SECRET.encode() in fs.cat_file(f) for f in fs.find(path))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
