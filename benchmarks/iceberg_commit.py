"""How long committing a night to the Iceberg table takes: full overwrite vs pyiceberg upsert.

For each night size it builds two synthetic nights in the output schema as Parquet run files
(night 2 = night 1 with `--changed` of the rows given a new category), commits night 1 with
`IcebergSink`, then times committing night 2 in a fresh process, two ways, each on its own copy
of the table:
  overwrite  IcebergSink.commit: stream the run files into new data files, one OVERWRITE snapshot
  upsert     pyiceberg Table.upsert(night 2, join_cols=[product_id]) (reads the files first)
Peak RSS is the commit process's high-water mark above its level after imports.

Upsert's best case is measured: unchanged rows are identical. In the real output every row's
`run_id` and `processed_at` change every night, so every row would count as updated, and upsert
never removes products that left the catalog.

    .venv/bin/python benchmarks/iceberg_commit.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.sinks import rows  # noqa: E402
from pipeline.sinks.iceberg import IcebergSink  # noqa: E402

TABLE = "bench.categories"
KEY = "product_id"
CATEGORIES = [f"category-{i:03d}" for i in range(300)]
TOP_K = 5
ROWS_PER_FILE = 100_000  # rows per Parquet file of a synthetic run folder
SEED = 7
KIB_PER_MIB = 1024
DEFAULT_SIZES = "10000,100000,1000000,3000000"
# pyiceberg's upsert is reported at ~1,000 s for 1M rows (apache/iceberg-python#3129).
DEFAULT_UPSERT_MAX_ROWS = 100_000


def night(n: int, run_id: str, changed: np.ndarray | None = None) -> pa.Table:
    """`n` products in the current output schema; rows flagged in `changed` get another category."""
    rng = np.random.default_rng(SEED)
    ids = np.char.add("prod-", np.char.zfill(np.arange(n).astype(str), 8))
    predicted = rng.integers(0, len(CATEGORIES), n)
    if changed is not None:
        predicted = np.where(changed, (predicted + 1) % len(CATEGORIES), predicted)
    names = pa.array(CATEGORIES)
    scores = rng.random((n, TOP_K), dtype=np.float32)
    top_index = (predicted[:, None] + np.arange(TOP_K)) % len(CATEGORIES)
    top_k = pa.ListArray.from_arrays(
        pa.array(np.arange(0, n * TOP_K + 1, TOP_K, dtype=np.int32)),
        pa.StructArray.from_arrays([names.take(pa.array(top_index.reshape(-1))),
                                    pa.array(scores.reshape(-1))], names=["category", "score"]))
    when = dt.datetime(2026, 12, 1, 1, 0, tzinfo=dt.UTC)
    values = {
        "product_id": ids,
        "image_uri": np.char.add(np.char.add("s3://catalog-images/", ids), ".jpg"),
        "status": np.full(n, "ok"),
        "predicted_category": names.take(pa.array(predicted)),
        "confidence": scores.max(axis=1),
        "top_k": top_k,
        "unfamiliarity": rng.random(n, dtype=np.float32),
        "current_category": names.take(pa.array(rng.integers(0, len(CATEGORIES), n))),
        "image_version": np.full(n, "v1"),
        "category_changed": rng.random(n) < 0.2,
        "needs_review": rng.random(n) < 0.1,
        "model_name": np.full(n, "efficientnet_lite0"),
        "model_version": np.full(n, "sha256-0123456789ab"),
        "run_id": np.full(n, run_id),
        "scored_run_id": np.full(n, run_id),
        "processed_at": pa.array([when] * n, pa.timestamp("us", tz="UTC")),
    }
    columns = []
    for field in rows.OUTPUT_SCHEMA:  # columns the generator does not know are null or a constant
        if field.name in values:
            columns.append(pa.array(values[field.name], field.type))
        elif field.nullable:
            columns.append(pa.nulls(n, field.type))
        else:
            columns.append(pa.array([field.name] * n, field.type))
    return pa.Table.from_arrays(columns, schema=rows.OUTPUT_SCHEMA)


def write_run(table: pa.Table, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    files = []
    for i, start in enumerate(range(0, table.num_rows, ROWS_PER_FILE)):
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table.slice(start, ROWS_PER_FILE), path)
        files.append(str(path))
    return files


def catalog_properties(folder: Path) -> dict[str, str]:
    return {"type": "sql", "uri": f"sqlite:///{folder}/catalog.db",
            "warehouse": f"file://{folder}/warehouse"}


def peak_rss_mib() -> float:
    """This process's peak RSS (Linux VmHWM: unlike getrusage's ru_maxrss it is not inherited
    from the parent process across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / KIB_PER_MIB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(mode: str, folder: Path) -> dict:
    """One timed commit of night 2 (run in a fresh process so its peak RSS is its own)."""
    from pyiceberg.catalog import load_catalog

    files = json.loads((folder / "night-2.json").read_text())
    props = catalog_properties(folder)
    table = load_catalog("default", **props).load_table(TABLE)
    snapshots = len(table.snapshots())
    base = peak_rss_mib()
    start = time.perf_counter()
    if mode == "overwrite":
        IcebergSink(TABLE, props).commit(files, "night-2")
    else:
        data = pa.concat_tables(pq.read_table(f, schema=rows.OUTPUT_SCHEMA) for f in files)
        table.upsert(data, join_cols=[KEY], snapshot_properties={"run-id": "night-2"})
    seconds = time.perf_counter() - start
    rss = peak_rss_mib() - base
    table = load_catalog("default", **props).load_table(TABLE)
    return {"seconds": seconds, "snapshots": len(table.snapshots()) - snapshots,
            "rows": table.scan().to_arrow().num_rows, "rss_mib": rss}


def prepare(n: int, changed: float, folder: Path) -> None:
    rng = np.random.default_rng(SEED + 1)
    write_run(night(n, "night-1"), folder / "runs" / "night-1")
    files_2 = write_run(night(n, "night-1", rng.random(n) < changed), folder / "runs" / "night-2")
    (folder / "night-2.json").write_text(json.dumps(files_2))
    files_1 = sorted(str(p) for p in (folder / "runs" / "night-1").glob("*.parquet"))
    IcebergSink(TABLE, catalog_properties(folder)).commit(files_1, "night-1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="night sizes in rows, comma-separated")
    parser.add_argument("--changed", type=float, default=0.01, help="fraction of rows changed in night 2")
    parser.add_argument("--upsert-max-rows", type=int, default=DEFAULT_UPSERT_MAX_ROWS,
                        help="skip upsert above this night size (it takes ~1,000 s at 1M rows)")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    print(f"{'rows':>9} | {'mode':<9} | {'commit s':>8} | {'rows/s':>9} | {'snapshots':>9} | "
          f"{'peak RSS MiB':>12}")
    print("-" * 72)
    work = Path(tempfile.mkdtemp(prefix="iceberg-bench-"))
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            template = work / f"{n}-template"
            prepare(n, args.changed, template)
            for mode in ("overwrite", "upsert"):
                if mode == "upsert" and n > args.upsert_max_rows:
                    print(f"{n:>9} | {mode:<9} | skipped (--upsert-max-rows {args.upsert_max_rows})")
                    continue
                folder = work / f"{n}-{mode}"
                shutil.copytree(template, folder)
                out = subprocess.run([sys.executable, __file__, "--measure", mode, str(folder)],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                assert r["rows"] == n, r
                print(f"{n:>9} | {mode:<9} | {r['seconds']:>8.2f} | {n / r['seconds']:>9,.0f} | "
                      f"{r['snapshots']:>9} | {r['rss_mib']:>12.0f}", flush=True)
                shutil.rmtree(folder)
            shutil.rmtree(template)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
