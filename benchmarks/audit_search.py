"""Time the audit's neighbour searches alone, on random data of the bundled model's shape.

The duplicate search (Hamming radius on 64-bit perceptual hashes) and the outlier search
(5 nearest neighbours by cosine on 1,280-value embeddings), as `pipeline.audit` runs them:
scikit-learn NearestNeighbors queried in blocks. Random data has no duplicates, so the radius
search returns little; the cost is the search itself.

    python benchmarks/audit_search.py [--rows 3000,30000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.audit import near_pairs, neighbour_distances
from pipeline.config import AuditConfig

EMBEDDING_DIM = 1280  # efficientnet_lite0's penultimate layer (the bundled model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="3000,30000")
    args = parser.parse_args()
    cfg = AuditConfig()
    rng = np.random.default_rng(0)
    print("| rows | duplicate search (s) | outlier search (s) |\n|---|---|---|")
    for n in (int(r) for r in args.rows.split(",")):
        bits = rng.integers(0, 2, (n, 64)).astype(bool)
        feats = rng.standard_normal((n, EMBEDDING_DIM)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        start = time.perf_counter()
        near_pairs(bits, feats, np.arange(n), cfg.phash_max_distance, cfg.near_min_cosine)
        dup = time.perf_counter() - start
        start = time.perf_counter()
        neighbour_distances(feats, cfg.outlier_neighbours)
        print(f"| {n:,} | {dup:.2f} | {time.perf_counter() - start:.2f} |", flush=True)


if __name__ == "__main__":
    main()
