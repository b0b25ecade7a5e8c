"""The review server at catalog scale: start-up, the first queue page, thumbnails, decisions.

    .venv/bin/python benchmarks/review_server.py                  # 100,000 rows, 300 decisions
    .venv/bin/python benchmarks/review_server.py --rows 1000000 --decisions 500

Synthesizes a committed night of --rows rows in the output schema (10% review, 5% change, the
rest keep; confidences spread over [0, 1]; top-5 suggestions from the bundled model's classes;
image URIs cycling over the sample catalog's real photos, relative to the manifest as the night
writes them), then runs `python -m jobs.review` on it in its own process and, from this one:
the time until it listens (imports, the queue read with its `action` filter, the model's
metadata), its resident memory, the first /api/meta and /api/queue page, 50 cold thumbnails
(6 at a time, as a browser fetches), and --decisions POST /api/decisions one after another on
one keep-alive connection (each answers once its file is on disk), then 2 clients at once, then
20 undos. Prints a table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import BUNDLED_MODEL, EXAMPLES_DIR  # noqa: E402

ROWS_PER_FILE = 250_000
REVIEW_SHARE, CHANGE_SHARE = 0.10, 0.05
MIB = 1024**2


def synthesize_night(root: Path, rows: int, seed: int = 0) -> Path:
    """A committed night of `rows` rows in the output schema; returns the output folder."""
    from pipeline import storage
    from pipeline.models.artifact import load_metadata
    from pipeline.sinks import files as run_files
    from pipeline.sinks.parquet import RUN_SUMMARY_FILE, RunFolderSink
    from pipeline.sinks.rows import OUTPUT_SCHEMA

    catalog = root / "catalog"
    shutil.copytree(EXAMPLES_DIR / "sample-catalog" / "images", catalog / "images")
    photos = sorted(p.relative_to(catalog).as_posix() for p in (catalog / "images").rglob("*.jpg"))
    classes = load_metadata(BUNDLED_MODEL).classes
    rng = np.random.default_rng(seed)
    output = root / "out"
    sink = RunFolderSink(str(output))
    run_id = sink.stage("bench", "bench-night")
    folder = sink.run_uri(run_id)
    names = []
    for n, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        k = min(rows, start + ROWS_PER_FILE) - start
        idx = np.arange(start, start + k)
        draw = rng.random(k)
        action = np.where(draw < REVIEW_SHARE, "review",
                          np.where(draw < REVIEW_SHARE + CHANGE_SHARE, "change", "keep"))
        reason = np.where(action == "review", rng.choice(["low_confidence", "confusable_pair",
                                                          "unfamiliar"], k),
                          np.where(action == "change", "confident_fix", "confirmed"))
        confidence = rng.random(k).astype(np.float32)
        picks = rng.integers(0, len(classes), (k, 5))
        scores = np.sort(rng.random((k, 5)).astype(np.float32), axis=1)[:, ::-1] * confidence[:, None]
        top = [[{"category": classes[c], "score": float(s)} for c, s in zip(p, sc, strict=True)]
               for p, sc in zip(picks, scores, strict=True)]
        predicted = [classes[p[0]] for p in picks]
        current = [classes[c] for c in rng.integers(0, len(classes), k)]
        table = pa.table({
            "product_id": [f"sku-{i:09d}" for i in idx],
            "image_uri": [photos[i % len(photos)] for i in idx],
            "status": ["ok"] * k, "error_type": pa.nulls(k, pa.string()),
            "error_message": pa.nulls(k, pa.string()), "predicted_category": predicted,
            "confidence": pa.array(confidence), "top_k": pa.array(top, OUTPUT_SCHEMA.field("top_k").type),
            "unfamiliarity": pa.array(np.full(k, 0.1, dtype=np.float32)),
            "current_category": current, "image_version": [f"v{i}" for i in idx],
            "category_changed": pa.array(action == "change"), "needs_review": pa.array(action == "review"),
            "action": action.tolist(), "action_reason": reason.tolist(),
            "p_current": pa.array(rng.random(k).astype(np.float32)),
            "model_name": ["bench"] * k, "model_version": ["bench"] * k,
            "run_id": [run_id] * k, "scored_run_id": [run_id] * k,
            "processed_at": pa.array(np.full(k, np.datetime64("2026-12-01T01:00:00", "us")),
                                     pa.timestamp("us", tz="UTC")),
        }, schema=OUTPUT_SCHEMA)
        name = run_files.carried_file_name(n, k)
        run_files.write_table(f"{folder}/{name}", table)
        names.append(f"runs/{run_id}/{name}")
    storage.write_json(f"{folder}/{RUN_SUMMARY_FILE}", {"model": BUNDLED_MODEL, "model_version": "bench"})
    sink.publish({"run_id": run_id, "manifest": str(catalog / "manifest.parquet"),
                  "model_version": "bench", "rows": rows, "files": names}, "bench")
    return output


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def connection_to(host: str, port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with Nagle off, as browsers do: http.client sends a POST's
    headers and body in two writes, and with Nagle on the body waits for the server's delayed
    ACK of the headers, which would add that wait to every decision measured."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=300)
    parser.add_argument("--root", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="review-bench-"))
    t0 = time.perf_counter()
    output = synthesize_night(root, args.rows)
    print(f"synthesized {args.rows:,} rows in {time.perf_counter() - t0:.1f} s", flush=True)

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.review", "--output", str(output),
                             "--port", "0", "--reviewer", "bench"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        listening = time.perf_counter() - start
        if "http://" not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        url = line.split()[2]
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        rss = psutil.Process(proc.pid).memory_info().rss / MIB
        conn = connection_to(host, int(port))

        def call(method: str, path: str, body: dict | None = None,
                 connection: http.client.HTTPConnection = conn) -> tuple[float, int, bytes]:
            began = time.perf_counter()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, json.dumps(body) if body is not None else None, headers)
            resp = connection.getresponse()
            data = resp.read()
            return time.perf_counter() - began, resp.status, data

        meta_s, _, meta = call("GET", "/api/meta")
        queue_s, _, page = call("GET", "/api/queue?offset=0&limit=50")
        items = json.loads(page)["items"]
        queued = json.loads(meta)["total"]

        def thumb(product: str) -> float:
            c = connection_to(host, int(port))
            began = time.perf_counter()
            c.request("GET", f"/api/thumb?id={product}")
            resp = c.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            return time.perf_counter() - began

        began = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            thumbs = list(pool.map(thumb, [i["id"] for i in items]))
        thumbs_wall = time.perf_counter() - began

        ids = [i["id"] for i in json.loads(call("GET", f"/api/queue?limit={min(1000, queued)}")[2])["items"]]
        lat, decided = [], []
        for n in range(args.decisions):
            product = ids[n % len(ids)]
            s, status, data = call("POST", "/api/decisions", {"product_id": product, "category": "Kiwi"})
            assert status == 200, data
            lat.append(s)
            decided.append(json.loads(data)["decision_ids"][0])

        def client(k: int) -> list[float]:
            c = connection_to(host, int(port))
            out = []
            for n in range(args.decisions // 2):
                out.append(call("POST", "/api/decisions", {"product_id": ids[(n + k) % len(ids)],
                                                           "category": "Kiwi"}, c)[0])
            return out

        with ThreadPoolExecutor(2) as pool:
            both = [s for part in pool.map(client, (0, 1)) for s in part]
        # A fresh connection: the first one idled past uvicorn's keep-alive meanwhile.
        again = connection_to(host, int(port))
        undo = [call("POST", "/api/undo", {"decision_ids": [d]}, again)[0] for d in decided[:20]]
        files = len(list((output / "reviews").glob("*.parquet")))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    ms = 1000
    print()
    print(f"| review server, {args.rows:,}-row night ({queued:,} queued) | value |")
    print("|---|---:|")
    print(f"| start until listening (imports, queue read, model metadata) | {listening:.2f} s |")
    print(f"| server RSS once listening | {rss:.0f} MiB |")
    print(f"| first /api/meta | {meta_s * ms:.0f} ms |")
    print(f"| first queue page (50 items) | {queue_s * ms:.0f} ms |")
    print(f"| 50 cold thumbnails, 6 at a time: wall / p50 / p95 | {thumbs_wall * ms:.0f} / "
          f"{percentile(thumbs, 50) * ms:.0f} / {percentile(thumbs, 95) * ms:.0f} ms |")
    print(f"| decision POST, one client ({len(lat)}): p50 / p95 / max | {percentile(lat, 50) * ms:.1f} / "
          f"{percentile(lat, 95) * ms:.1f} / {max(lat) * ms:.1f} ms |")
    print(f"| decision POST, two clients at once ({len(both)}): p50 / p95 | "
          f"{percentile(both, 50) * ms:.1f} / {percentile(both, 95) * ms:.1f} ms |")
    print(f"| undo POST after {files - len(undo)} files ({len(undo)}): p50 / p95 | "
          f"{percentile(undo, 50) * ms:.1f} / {percentile(undo, 95) * ms:.1f} ms |")
    print(f"| reviews files written | {files} |")
    print(f"\n(mean decision {statistics.mean(lat) * ms:.1f} ms; scratch folder {root})")


if __name__ == "__main__":
    main()
