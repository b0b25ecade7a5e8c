"""Nightly job at catalog scale: time per row and peak memory, full and incremental nights.

    python benchmarks/nightly_scale.py --rows 100000,1000000     # scored nights (the scale table)
    python benchmarks/nightly_scale.py --driver-rows 10000000    # the driver path at 10M
    python benchmarks/nightly_scale.py --incremental 100000      # night 1 vs night 2, 1% changed

Synthetic manifests repeat a pool of real Grocery Store photos (re-encoded small, so decoding
does not hide the pipeline's own per-row cost) and are scored with a small random-weight model
at 64 px for the same reason: what grows with the catalog is the pipeline, not the model.
Each night runs `jobs.recategorize` in its own process; peak memory is sampled every 0.5 s as
the largest resident set (RSS) of the driver process, and the largest RSS of any other
process of its tree (Ray's workers, raylet and object store).

The driver path measures, in this process, everything the driver does for a night whose
scoring pass is small: manifest validation, the incremental plan (DuckDB join of the manifest
with last night's rows), chunk planning, the progress listing and the commit checks, and the
statistics of every file. Last night's output is synthesized in the output schema.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import BUNDLED_MODEL, GROCERY_DATASET

POOL_IMAGES = 2000
POOL_PX = 96
MODEL_PX = 64
MODEL_ARCH = "mobilenet_v3_small"
MANIFEST_ROW_GROUP = 100_000
SAMPLE_S = 0.5
CHANGED_SHARE = 0.01
MIB = 1024**2


def image_pool(folder: Path) -> list[str]:
    """POOL_IMAGES real photos, re-encoded with a POOL_PX shorter side."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(GROCERY_DATASET).rglob("*.jpg"))[:POOL_IMAGES]
    out = []
    for i, src in enumerate(sources):
        target = folder / f"{i:05d}.jpg"
        if not target.exists():
            im = Image.open(src).convert("RGB")
            scale = POOL_PX / min(im.size)
            im.resize((round(im.width * scale), round(im.height * scale))).save(target, quality=90)
        out.append(str(target))
    return out


def write_manifest(path: Path, rows: int, pool: list[str], version_of=None) -> Path:
    """product_id, image_uri (cycling over the pool), current_category, image_version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("product_id", pa.string()), ("image_uri", pa.string()),
                        ("current_category", pa.string()), ("image_version", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, MANIFEST_ROW_GROUP):
            idx = np.arange(start, min(rows, start + MANIFEST_ROW_GROUP))
            versions = version_of(idx) if version_of else np.full(len(idx), "v1", dtype=object)
            writer.write_table(pa.table({
                "product_id": [f"sku-{i:09d}" for i in idx],
                "image_uri": [pool[i % len(pool)] for i in idx],
                "current_category": pa.nulls(len(idx), pa.string()),
                "image_version": pa.array(versions, pa.string()),
            }, schema=schema))
    return path


def small_model(folder: Path) -> str:
    """A random-weight MODEL_ARCH at MODEL_PX with the bundled model's classes."""
    import torch

    from pipeline.models.artifact import ModelMetadata, load_metadata, save_artifact
    from pipeline.models.registry import create_model, get_spec

    uri = folder / "model"
    if not (uri / "model.json").exists():
        torch.manual_seed(0)
        bundled = load_metadata(BUNDLED_MODEL)
        spec = get_spec(MODEL_ARCH)
        model = create_model(MODEL_ARCH, len(bundled.classes)).eval()
        meta = ModelMetadata(architecture=MODEL_ARCH, classes=list(bundled.classes),
                             input_size=MODEL_PX, mean=list(spec.mean), std=list(spec.std),
                             training={"kind": "benchmark: random weights"})
        save_artifact(model, meta, str(uri))
    return str(uri)


class PeakRss:
    """Largest RSS of the process `pid` and of any one of its descendants, sampled; and the
    driver's largest USS (its private pages: RSS without shared pages such as the object store's
    shared memory that the driver has mapped and touched)."""

    def __init__(self, pid: int):
        self.pid, self.driver, self.worker, self.driver_uss = pid, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):  # a process may exit while we look
                root = psutil.Process(self.pid)
                full = root.memory_full_info()
                self.driver = max(self.driver, full.rss)
                self.driver_uss = max(self.driver_uss, full.uss)
                for child in root.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self.worker = max(self.worker, child.memory_info().rss)
            self._stop.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def night(manifest: Path, model: str, output: Path, *extra: str) -> dict:
    """One `jobs.recategorize` run in its own process: summary + wall + peak memory. The image
    pool lives in the model's folder's parent (the benchmark's scratch root)."""
    allow = [] if "--allowed-uri-prefixes" in extra else ["--allowed-uri-prefixes",
                                                          str(Path(model).parent)]
    cmd = [sys.executable, "-m", "jobs.recategorize", "--manifest", str(manifest), "--model",
           model, "--output", str(output), *allow, "--batch-size", "256", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    peak = PeakRss(proc.pid)
    out, _ = proc.communicate()
    peak.stop()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"night failed ({proc.returncode}): {' '.join(cmd)}")
    summary = json.loads(out[out.index("{"):])
    return {"wall_s": wall, "driver_mib": peak.driver / MIB, "worker_mib": peak.worker / MIB,
            "driver_uss_mib": peak.driver_uss / MIB, **summary}


def scale(rows_list: list[int], root: Path) -> list[str]:
    pool = image_pool(root / "pool")
    model = small_model(root)
    lines = ["| rows | wall s | µs per row | peak driver RSS MiB | peak driver USS MiB | "
             "peak worker RSS MiB |", "|---:|---:|---:|---:|---:|---:|"]
    for rows in rows_list:
        manifest = write_manifest(root / f"scale-{rows}" / "m" / "manifest.parquet", rows, pool)
        # A whole catalog through the Ray pass: the scale table is about the streaming engine.
        r = night(manifest, model, root / f"scale-{rows}" / "out", "--executor", "ray")
        assert r["rows"] == rows and r["ok"] == rows, r
        lines.append(f"| {rows:,} | {r['wall_s']:.1f} | {r['wall_s'] / rows * 1e6:.0f} | "
                     f"{r['driver_mib']:.0f} | {r['driver_uss_mib']:.0f} | "
                     f"{r['worker_mib']:.0f} |")
        print(lines[-1], flush=True)
    return lines


def incremental(rows: int, root: Path, bundled: bool = False) -> list[str]:
    """Night 1, night 2 with CHANGED_SHARE of images changed, and night 2 with --full. With
    `bundled`, the bundled model scores the original photos (what a real night costs per row)
    instead of the small model on small re-encodes."""
    if bundled:
        pool = [str(p) for p in sorted(Path(GROCERY_DATASET).rglob("*.jpg"))[:POOL_IMAGES]]
        model, name = BUNDLED_MODEL, f"inc-bundled-{rows}"
    else:
        pool, model, name = image_pool(root / "pool"), small_model(root), f"inc-{rows}"
    out = root / name / "out"
    changed = max(1, int(rows * CHANGED_SHARE))
    n1 = write_manifest(root / name / "n1" / "manifest.parquet", rows, pool)
    n2 = write_manifest(root / name / "n2" / "manifest.parquet", rows, pool,
                        lambda idx: np.where(idx % (rows // changed) == 0, "v2", "v1"))
    allow = ("--allowed-uri-prefixes", GROCERY_DATASET if bundled else str(root))
    first = night(n1, model, out, *allow)
    second = night(n2, model, out, *allow)
    full = night(n2, model, root / name / "full", "--full", *allow)
    lines = [f"| night ({'bundled' if bundled else 'small'} model) | rows | scored | carried | "
             "executor | wall s | share of night 1 |", "|---|---:|---:|---:|---|---:|---:|"]
    for label, r in (("night 1 (full)", first), ("night 2, 1% changed", second),
                     ("night 2 with --full", full)):
        lines.append(f"| {label} | {r['rows']:,} | {r['rows_rescored']:,} | "
                     f"{r['rows_carried']:,} | {r['executor']} | {r['wall_s']:.1f} | "
                     f"{r['wall_s'] / first['wall_s']:.1%} |")
        print(lines[-1], flush=True)
    phases = ", ".join(f"{k} {v:.1f}" for k, v in second["phases_s"].items())
    lines.append(f"\nNight 2 inside the job (s): {phases}; the rest of its "
                 f"{second['wall_s']:.1f} s is process start, imports and exit.")
    return lines


def driver_path(rows: int, root: Path) -> list[str]:
    """Each driver-side step of an incremental night at `rows`, timed in this process."""
    from pipeline.catalog import validate_manifest
    from pipeline.nightly.chunks import plan_chunks
    from pipeline.nightly.incremental import plan_night
    from pipeline.sinks import files
    from pipeline.sinks.parquet import RunFolderSink
    from pipeline.sinks.rows import OUTPUT_SCHEMA

    pool = [f"s3://images/{i:05d}.jpg" for i in range(POOL_IMAGES)]
    folder = root / f"driver-{rows}"
    changed = max(1, int(rows * CHANGED_SHARE))
    manifest_path = write_manifest(folder / "n2" / "manifest.parquet", rows, pool,
                                   lambda idx: np.where(idx % (rows // changed) == 0, "v2", "v1"))
    output = str(folder / "out")
    previous = synthesize_previous(output, rows, pool, OUTPUT_SCHEMA)
    proc = psutil.Process()
    steps = []

    def step(name, fn):
        start = time.perf_counter()
        value = fn()
        steps.append((name, time.perf_counter() - start, proc.memory_info().rss / MIB))
        print(f"{name}: {steps[-1][1]:.1f} s, rss {steps[-1][2]:.0f} MiB", flush=True)
        return value

    manifest = step("validate manifest", lambda: validate_manifest(str(manifest_path)))
    sink = RunFolderSink(output)
    sink.stage("bench", "night2")
    plan = step("plan night (DuckDB join, carried rows written)", lambda: plan_night(
        manifest, previous, sink, model_version="bench", opts_key="bench", full=False,
        run_id="night2", rows_per_file=250_000, probe=None))
    assert plan.rows_carried == rows - changed, plan
    chunks = step("plan chunks", lambda: plan_chunks(plan.source, 100_000))
    folder_uri = sink.run_uri("night2")
    step("progress listing", lambda: sink.finished_chunks("night2", [c.rows for c in chunks]))
    step("run statistics (footers)", lambda: files.run_stats(
        folder_uri, files.list_run(folder_uri), []))
    peak = proc.memory_info().rss
    with open(f"/proc/{os.getpid()}/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    lines = [f"| step ({rows:,} rows, {changed:,} changed) | s | driver RSS after, MiB |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {s:.1f} | {m:.0f} |" for name, s, m in steps]
    lines.append(f"| total | {sum(s for _, s, _ in steps):.1f} | peak {max(hwm, peak) / MIB:.0f} |")
    return lines


def synthesize_previous(output: str, rows: int, pool: list[str], schema: pa.Schema) -> dict:
    """Last night's committed run in the output schema, written in files of 250k rows."""
    from pipeline.sinks import files as run_files
    from pipeline.sinks.parquet import RunFolderSink

    folder = RunFolderSink(output).run_uri("night1")
    files = []
    step = 250_000
    for n, start in enumerate(range(0, rows, step)):
        idx = np.arange(start, min(rows, start + step))
        k = len(idx)
        top = pa.array([[{"category": "Banana", "score": 0.9}]] * k, schema.field("top_k").type)
        table = pa.table({
            "product_id": [f"sku-{i:09d}" for i in idx],
            "image_uri": [pool[i % len(pool)] for i in idx],
            "status": ["ok"] * k, "error_type": pa.nulls(k, pa.string()),
            "error_message": pa.nulls(k, pa.string()), "predicted_category": ["Banana"] * k,
            "confidence": pa.array(np.full(k, 0.9, dtype=np.float32)), "top_k": top,
            "unfamiliarity": pa.array(np.full(k, 0.1, dtype=np.float32)),
            "current_category": pa.nulls(k, pa.string()), "image_version": ["v1"] * k,
            "category_changed": pa.nulls(k, pa.bool_()), "needs_review": [False] * k,
            "action": ["keep"] * k, "action_reason": ["no_current_category"] * k,
            "p_current": pa.nulls(k, pa.float32()),
            "model_name": ["bench"] * k, "model_version": ["bench"] * k,
            "run_id": ["night1"] * k, "scored_run_id": ["night1"] * k,
            "processed_at": pa.array(np.full(k, np.datetime64("2026-11-22T01:00:00", "us")),
                                     pa.timestamp("us", tz="UTC")),
        }, schema=schema)
        name = run_files.carried_file_name(n, k)
        run_files.write_table(f"{folder}/{name}", table)
        files.append(f"runs/night1/{name}")
    return {"run_id": "night1", "model_version": "bench", "options_key": "bench", "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated catalog sizes to score")
    parser.add_argument("--incremental", type=int, default=0, help="rows for night 1 vs night 2")
    parser.add_argument("--bundled", action="store_true",
                        help="incremental nights with the bundled model on the original photos")
    parser.add_argument("--driver-rows", type=int, default=0, help="rows for the driver path")
    parser.add_argument("--root", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="nightly-scale-"))
    tables = []
    if args.rows:
        tables.append(scale([int(r) for r in args.rows.split(",")], root))
    if args.incremental:
        tables.append(incremental(args.incremental, root, args.bundled))
    if args.driver_rows:
        tables.append(driver_path(args.driver_rows, root))
    print()
    for lines in tables:
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
