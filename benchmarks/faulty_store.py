"""At what share of failing object-store requests does the nightly job still complete?

A catalog of product photos, its manifest and the model live in a bucket on moto's S3 server
(127.0.0.1); the job (`python -m jobs.recategorize`, its own local Ray) reaches the bucket only
through tests/faulty_store.py's proxy, which fails the given share of requests (503 SlowDown,
500 InternalError, a 0.5 s delay, a reset after the server acted, in turn). For each share: the
job's exit code, the rows committed, the requests and the faults (each one a retry somewhere:
botocore, s3fs, the image fetch, or the job's re-run), the wall time. A run that fails is run
again with the same arguments (it resumes its finished chunks), up to --reruns times.

    .venv/bin/python benchmarks/faulty_store.py [--shares 0,0.05,0.1,0.2,0.3] [--images 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import BUNDLED_MODEL  # noqa: E402
from tests.conftest import (  # noqa: E402
    LOOPBACK_AWS_ENV,
    S3_PORT,
    SAMPLE_DIR,
    make_catalog,
    summary_json,
    upload_tree,
)
from tests.faulty_store import FaultProxy  # noqa: E402

BUCKET = "faulty-store-bench"
JOB_TIMEOUT_S = 900
CHUNK_ROWS = 10


def run_job(args: list[str], endpoint: str, ray_tmp: str) -> tuple[int, str, str]:
    env = {**os.environ, **LOOPBACK_AWS_ENV, "AWS_ENDPOINT_URL": endpoint, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "jobs.recategorize", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    return done.returncode, done.stdout, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default="0,0.05,0.1,0.2,0.3")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--reruns", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()

    os.environ.update(LOOPBACK_AWS_ENV)
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    work = Path(tempfile.mkdtemp(prefix="rfb-", dir="/tmp"))
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        photos = sorted(p for p in (SAMPLE_DIR / "images").rglob("*") if p.is_file())
        _, rows = make_catalog(work / "catalog", photos, good=opts.images)
        upload_tree(work / "catalog", f"s3://{BUCKET}/catalog")
        upload_tree(Path(BUNDLED_MODEL), f"s3://{BUCKET}/model")
        print(f"{rows} rows ({opts.images} photos, 3 bad), chunks of {CHUNK_ROWS}, "
              f"manifest, images, model and output in S3")
        print("| fault share | completed | tries | rows | error rows | requests | faults | wall s |")
        print("|---|---|---|---|---|---|---|---|")
        for share in (float(s) for s in opts.shares.split(",")):
            args = ["--manifest", f"s3://{BUCKET}/catalog/manifest.parquet", "--model",
                    f"s3://{BUCKET}/model", "--output", f"s3://{BUCKET}/out-{share}",
                    "--chunk-rows", str(CHUNK_ROWS), "--num-cpus", "2"]
            proxy = FaultProxy(f"http://127.0.0.1:{S3_PORT}", share, seed=opts.seed)
            start = time.perf_counter()
            committed, errors, tries, last_error = None, None, 0, ""
            try:
                while committed is None and tries <= opts.reruns:
                    tries += 1
                    ray_tmp = tempfile.mkdtemp(prefix="rfr-", dir="/tmp")
                    try:
                        code, out, err = run_job(args, proxy.url, ray_tmp)
                    finally:
                        shutil.rmtree(ray_tmp, ignore_errors=True)
                    if code == 0:
                        summary = summary_json(out)
                        committed, errors = summary["rows"], summary["errors"]
                        continue
                    last_error = (err.strip().splitlines() or ["?"])[-1][:160]
            finally:
                proxy.close()
            wall = time.perf_counter() - start
            faults = sum(proxy.stats.faults.values())
            print(f"| {share:.0%} | {'yes' if committed is not None else 'no'} | {tries} | "
                  f"{committed if committed is not None else '-'} | "
                  f"{errors if errors is not None else '-'} | {proxy.stats.requests} | "
                  f"{faults} | {wall:.0f} |", flush=True)
            if committed is None:
                print(f"  last error: {last_error}", flush=True)
            elif committed != rows:
                raise SystemExit(f"share {share}: committed {committed} rows of {rows}")
        print(json.dumps({"python": sys.version.split()[0], "cores": os.cpu_count()}))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
