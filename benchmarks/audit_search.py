"""The audit's neighbour searches alone: faiss (what `pipeline.analysis.audit` runs) beside the exact
scikit-learn search it replaced (kept here only as the reference), on synthetic data of the
bundled model's shape.

- duplicate candidates: Hamming radius `--phash-max-distance` on random 64-bit hashes. The old
  search is sklearn `NearestNeighbors(metric="hamming")`, the new one `near_pairs` (since
  issue 26 each row's nearest embeddings, then the hash limit; it was a flat faiss binary
  index). Random hashes have no duplicates, so the cost is the search itself; recall is
  checked on sample queries against a numpy popcount of every pair.
- outliers: the `--outlier-neighbours` nearest rows by cosine on 1,280-value embeddings. The old
  search is sklearn `NearestNeighbors(metric="cosine")`, the new one `embedding_index` (IVF,
  8-bit codes) plus `mean_neighbour_distances`. The embeddings are a mixture of random clusters
  (one per 30 rows, noise as large as the centre): pure noise has no neighbourhoods for an
  inverted file to find. Recall@k is on sample queries against an exact flat inner-product
  search; `score error` is the mean absolute difference of the outlier score (mean distance).

Each row count runs in its own process, so `peak RSS` is that run's (data included). Above
`--exact-full-rows` the sklearn searches are timed on one block of query rows and scaled to all
rows (their cost is the same per query row).

    python benchmarks/audit_search.py [--rows 30000,300000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.analysis.audit_search import (
    NEIGHBOUR_BLOCK_ROWS,
    PHASH_BITS,
    embedding_index,
    mean_neighbour_distances,
    near_pairs,
)
from pipeline.config import AuditConfig

EMBEDDING_DIM = 1280  # efficientnet_lite0's penultimate layer (the bundled model)
ROWS_PER_CLUSTER = 30
SAMPLE_QUERIES = 1000
POPCOUNT_QUERY_BLOCK = 50  # sample queries per brute-force Hamming check (a block x N x 8 array)


def synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8) uint8 random hash codes, (n, EMBEDDING_DIM) L2-normalized clustered embeddings."""
    codes = rng.integers(0, 256, (n, PHASH_BITS // 8), dtype=np.uint8)
    centres = rng.standard_normal((max(n // ROWS_PER_CLUSTER, 1), EMBEDDING_DIM), dtype=np.float32)
    feats = centres[rng.integers(0, len(centres), n)]
    for start in range(0, n, NEIGHBOUR_BLOCK_ROWS):
        feats[start:start + NEIGHBOUR_BLOCK_ROWS] += rng.standard_normal(
            (min(NEIGHBOUR_BLOCK_ROWS, n - start), EMBEDDING_DIM), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return codes, feats


def sklearn_seconds(n: int, codes: np.ndarray, feats: np.ndarray, cfg: AuditConfig,
                    full: bool) -> tuple[float, float]:
    """The old exact searches (fit + blocked queries), on every row or one block scaled to n."""
    from sklearn.neighbors import NearestNeighbors

    bits = np.unpackbits(codes, axis=1).astype(bool)
    queries = n if full else min(n, NEIGHBOUR_BLOCK_ROWS)
    start = time.perf_counter()
    index = NearestNeighbors(radius=(cfg.phash_max_distance + 0.5) / PHASH_BITS,
                             metric="hamming").fit(bits)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    for s in range(0, queries, NEIGHBOUR_BLOCK_ROWS):
        index.radius_neighbors(bits[s:s + NEIGHBOUR_BLOCK_ROWS], return_distance=False)
    dup = fit + (time.perf_counter() - start) * n / queries
    start = time.perf_counter()
    index = NearestNeighbors(n_neighbors=cfg.outlier_neighbours + 1, metric="cosine").fit(feats)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    for s in range(0, queries, NEIGHBOUR_BLOCK_ROWS):
        index.kneighbors(feats[s:s + NEIGHBOUR_BLOCK_ROWS])
    return dup, fit + (time.perf_counter() - start) * n / queries


def one(n: int, exact_full_rows: int) -> dict:
    """Both searches, old and new, at n rows."""
    import faiss

    cfg = AuditConfig()
    rng = np.random.default_rng(0)
    codes, feats = synthetic(n, rng)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    sample = np.sort(rng.choice(n, min(n, SAMPLE_QUERIES), replace=False))
    row: dict = {"rows": n, "data_rss_gib": data_rss}

    start = time.perf_counter()
    near_pairs(codes, feats, np.arange(n), cfg.phash_max_distance, cfg.near_min_cosine)
    row["faiss_dup_s"] = time.perf_counter() - start
    flat = faiss.IndexBinaryFlat(PHASH_BITS)
    flat.add(codes)
    lims, _, hits = flat.range_search(codes[sample], cfg.phash_max_distance + 1)
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
    truth = set()
    for s in range(0, len(sample), POPCOUNT_QUERY_BLOCK):
        block = sample[s:s + POPCOUNT_QUERY_BLOCK]
        distance = popcount[np.bitwise_xor(codes[block][:, None, :], codes[None])].sum(2)
        truth |= {(int(block[q]), int(h)) for q, h in
                  zip(*np.nonzero(distance <= cfg.phash_max_distance), strict=True)}
    found = {(q, int(h)) for k, q in enumerate(sample.tolist())
             for h in hits[lims[k]:lims[k + 1]]}
    row["dup_recall"] = len(found & truth) / max(len(truth), 1)
    row["dup_false_hits"] = len(found - truth)
    row["dup_pairs_checked"] = len(truth)
    del flat

    k = cfg.outlier_neighbours
    start = time.perf_counter()
    index = embedding_index(feats)
    row["faiss_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = mean_neighbour_distances(index, feats, k)
    row["faiss_knn_s"] = time.perf_counter() - start
    row["index_bytes_per_row"] = faiss.serialize_index(index).nbytes / n
    ivf = faiss.extract_index_ivf(index)  # inside the projection (audit_search.SEARCH_DIM)
    row["lists"], row["nprobe"] = ivf.nlist, ivf.nprobe
    exact = faiss.IndexFlatIP(EMBEDDING_DIM)
    exact.add(feats)
    sims, truth_ids = exact.search(feats[sample], k + 1)
    _, got = index.search(feats[sample], k + 1)
    own = sample[:, None]
    row["knn_recall"] = float(np.mean([
        len(set(g[g != q]) & set(t[t != q][:k])) / k
        for g, t, q in zip(got, truth_ids, own[:, 0], strict=True)]))
    keep = truth_ids != own
    keep &= np.cumsum(keep, axis=1) <= k
    exact_score = np.where(keep, 1 - sims, 0).sum(1) / k
    row["score_abs_err"] = float(np.abs(scores[sample] - exact_score).mean())
    row["faiss_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del exact, index

    row["sklearn_full"] = n <= exact_full_rows
    row["sklearn_dup_s"], row["sklearn_knn_s"] = sklearn_seconds(n, codes, feats, cfg,
                                                                 row["sklearn_full"])
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="30000,300000")
    parser.add_argument("--exact-full-rows", type=int, default=30000,
                        help="above this, time the sklearn searches on one query block")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.exact_full_rows)))
        return
    print("| rows | search | sklearn exact (s) | faiss (s) | faiss index bytes/row | "
          "recall vs exact | peak RSS (GiB) |\n|---|---|---|---|---|---|---|", flush=True)
    for n in (int(r) for r in args.rows.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--exact-full-rows",
                              str(args.exact_full_rows)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {n:,} | failed: {out.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        scaled = "" if r["sklearn_full"] else " (scaled)"
        print(f"| {n:,} | duplicates (radius {AuditConfig().phash_max_distance} bits) | "
              f"{r['sklearn_dup_s']:.1f}{scaled} | {r['faiss_dup_s']:.1f} | 8 | "
              f"{r['dup_recall']:.1%} of {r['dup_pairs_checked']} pairs, "
              f"{r['dup_false_hits']} beyond | |", flush=True)
        print(f"| {n:,} | outliers (k={AuditConfig().outlier_neighbours}; IVF{r['lists']}, "
              f"nprobe {r['nprobe']}) | {r['sklearn_knn_s']:.1f}{scaled} | "
              f"{r['faiss_build_s']:.1f} build + {r['faiss_knn_s']:.1f} search | "
              f"{r['index_bytes_per_row']:.0f} | {r['knn_recall']:.1%}, score error "
              f"{r['score_abs_err']:.4f} | {r['data_rss_gib']:.1f} data, "
              f"{r['faiss_peak_rss_gib']:.1f} faiss, {r['peak_rss_gib']:.1f} sklearn |",
              flush=True)


if __name__ == "__main__":
    main()
