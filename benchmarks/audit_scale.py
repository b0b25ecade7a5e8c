"""The data audit at catalog scale (issue 26): driver memory and time per row of everything after
the images are embedded, on synthetic embeddings of the bundled model's width.

Each row count runs in its own fresh process. Synthetic engine batches (the columns the audit's
embedder returns: ids, URIs, categories, SHA-256 and perceptual hashes, embeddings) stream
through the audit's own `collect` (the float16 `EmbeddingStore` on disk) and its three checks,
with default options. The embeddings are clustered gaussians: one centre per category plus
sub-clusters, so a linear model can tell categories apart and neighbourhoods exist. Planted: 1% of
rows are exact copies (same SHA-256), 1% near copies (small embedding noise, a few hash bits
flipped), 2% carry another category's label, 0.1% are isolated outliers. Embedding the images is
not part of it (on the shared 2-core machine it would take days at these sizes).

    python benchmarks/audit_scale.py [--rows 100000,1000000,3000000] [--classes 50]

Prints one table: rows, peak driver RSS, seconds (generation excluded), µs per row, bytes on
disk of the embedding store, bytes of the per-row columns held in memory, and recall of the
planted faults as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.audit import collect
from pipeline.analysis.audit_checks import find_duplicates, find_label_issues, find_outliers
from pipeline.config import AuditConfig

EMBEDDING_DIM = 1280  # efficientnet_lite0's penultimate layer (the bundled model)
BATCH_ROWS = 1024  # rows per synthetic engine batch
SUBCLUSTERS_PER_CLASS = 20
EXACT, NEAR, FLIPPED, OUTLIER = 0.01, 0.01, 0.02, 0.001
NEAR_NOISE = 0.02  # per-value noise of a near copy, against values of about 1/sqrt(d)
NEAR_BITS = 4  # hash bits a near copy flips


class Timer:
    """Seconds spent generating the synthetic batches, to leave out of the audit's time."""

    def __init__(self) -> None:
        self.seconds = 0.0


def batches(n: int, classes: int, timer: Timer, planted: dict):
    """Synthetic engine batches of n rows (see the module docstring)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, EMBEDDING_DIM), dtype=np.float32)
    sub = centres.repeat(SUBCLUSTERS_PER_CLASS, 0) + 0.7 * rng.standard_normal(
        (classes * SUBCLUSTERS_PER_CLASS, EMBEDDING_DIM), dtype=np.float32)
    kind = rng.choice(5, n, p=[1 - EXACT - NEAR - FLIPPED - OUTLIER, EXACT, NEAR, FLIPPED,
                               OUTLIER])
    kind[:BATCH_ROWS] = 0  # copies need earlier rows to copy
    planted.update({name: np.flatnonzero(kind == k).tolist()
                    for k, name in enumerate(["clean", "exact", "near", "flipped", "outlier"])})
    for start in range(0, n, BATCH_ROWS):
        t0 = time.perf_counter()
        m = min(BATCH_ROWS, n - start)
        k = kind[start:start + m]
        cluster = rng.integers(0, len(sub), m)
        label = cluster // SUBCLUSTERS_PER_CLASS
        feats = sub[cluster] + 1.5 * rng.standard_normal((m, EMBEDDING_DIM), dtype=np.float32)
        feats[k == 4] = 4 * rng.standard_normal(((k == 4).sum(), EMBEDDING_DIM), dtype=np.float32)
        ids = np.arange(start, start + m)
        phash = rng.integers(0, 2**63, m, dtype=np.int64).astype(np.uint64)
        digest = ids.copy()
        for j in np.flatnonzero((k == 1) | (k == 2)):  # a copy of the row just before in the batch
            src = j - 1 if j else 0
            feats[j], label[j], digest[j] = feats[src], label[src], digest[src]
            phash[j] = phash[src]
            if k[j] == 2:
                feats[j] += NEAR_NOISE * np.linalg.norm(feats[src]) / np.sqrt(EMBEDDING_DIM) * \
                    rng.standard_normal(EMBEDDING_DIM, dtype=np.float32)
                phash[j] ^= np.uint64(sum(1 << b for b in rng.choice(64, NEAR_BITS, replace=False)))
                digest[j] = ids[j]
        label[k == 3] = (label[k == 3] + rng.integers(1, classes, (k == 3).sum())) % classes
        yield_at = time.perf_counter()
        timer.seconds += yield_at - t0
        yield {"row": ids, "product_id": np.array([f"p{i:09d}" for i in ids], dtype=object),
               "image_uri": np.array([f"s3://catalog/images/p{i:09d}.jpg" for i in ids],
                                     dtype=object),
               "given_category": np.array([f"category-{c:04d}" for c in label], dtype=object),
               "status": np.full(m, "ok", dtype=object),
               "error_type": np.full(m, None, dtype=object),
               "error_message": np.full(m, None, dtype=object),
               "content_hash": np.array([f"{d:032x}" * 2 for d in digest], dtype=object),
               "phash": phash, "features": feats}
        timer.seconds += time.perf_counter() - yield_at


def peak_mb() -> float:
    """This process's peak resident memory so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n: int, classes: int) -> dict:
    """The audit's store and checks on n synthetic rows, in this process."""
    cfg = AuditConfig()
    timer, planted, times = Timer(), {}, {}
    peaks = {"imports": peak_mb()}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="audit-scale-") as folder:
        data = collect(batches(n, classes, timer, planted), Path(folder))
        times["store_s"] = time.perf_counter() - start - timer.seconds
        peaks["store"] = peak_mb()
        store_bytes = data.features.nbytes
        columns = sum(a.nbytes for a in (data.product_id, data.image_uri, data.given)) + \
            data.digest.nbytes + data.phash.nbytes
        t = time.perf_counter()
        duplicates, roots = find_duplicates(data, cfg)
        times["duplicates_s"] = time.perf_counter() - t
        peaks["duplicates"] = peak_mb()
        t = time.perf_counter()
        labels = find_label_issues(data, cfg)
        times["labels_s"] = time.perf_counter() - t
        peaks["labels"] = peak_mb()
        t = time.perf_counter()
        outliers = find_outliers(data, roots, cfg)
        times["outliers_s"] = time.perf_counter() - t
        peaks["outliers"] = peak_mb()
    seconds = time.perf_counter() - start - timer.seconds
    dup = {int(p[1:]) for p in duplicates["product_id"].to_pylist()}
    flagged = {int(p[1:]) for p, f in zip(labels["product_id"].to_pylist(),
                                          labels["flagged"].to_pylist(), strict=True) if f}
    out = {int(p[1:]) for p, f in zip(outliers["product_id"].to_pylist(),
                                      outliers["flagged"].to_pylist(), strict=True) if f}
    return {"rows": n, "peak_rss_mb": peak_mb(), "peaks_mb": peaks,
            "seconds": seconds, "us_per_row": seconds / n * 1e6, "store_bytes": store_bytes,
            "column_bytes": columns, "generate_s": timer.seconds, **times,
            "exact_found": len(dup & set(planted["exact"])) / max(len(planted["exact"]), 1),
            "near_found": len(dup & set(planted["near"])) / max(len(planted["near"]), 1),
            "flipped_flagged": len(flagged & set(planted["flipped"])) / max(len(planted["flipped"]), 1),
            "flagged": len(flagged), "outliers_found": len(out & set(planted["outlier"]))
            / max(len(planted["outlier"]), 1), "outliers_flagged": len(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="100000,1000000,3000000")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.classes)))
        return
    print("| rows | peak driver RSS (MB) | seconds | µs per row | store on disk (MB) | "
          "columns in memory (MB) | store / duplicates / labels / outliers (s) | "
          "planted found: exact / near / flipped / outliers | peak RSS after imports / store / "
          "duplicates / labels / outliers (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---|---|---|")
    for n in (int(r) for r in args.rows.split(",")):
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--classes",
                               str(args.classes)], capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"| {n:,} | failed: {proc.stderr[-500:]} |", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {n:,} | {r['peak_rss_mb']:,.0f} | {r['seconds']:,.1f} | {r['us_per_row']:.0f} | "
              f"{r['store_bytes'] / 1e6:,.0f} | {r['column_bytes'] / 1e6:,.0f} | "
              f"{r['store_s']:.0f} / {r['duplicates_s']:.0f} / {r['labels_s']:.0f} / "
              f"{r['outliers_s']:.0f} | {r['exact_found']:.0%} / {r['near_found']:.0%} / "
              f"{r['flipped_flagged']:.0%} / {r['outliers_found']:.0%} | "
              f"{' / '.join(f'{v:,.0f}' for v in r['peaks_mb'].values())} |", flush=True)


if __name__ == "__main__":
    main()
