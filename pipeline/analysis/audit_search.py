"""The audit's neighbour searches (`pipeline.analysis.audit`): perceptual hashes and faiss.

Neighbour searches use faiss, queried in blocks of rows: the duplicate candidates are an exact
Hamming range search over the 8-byte hashes (a flat binary index: a popcount per pair is cheaper
than the bookkeeping of hash-table indexes at catalog sizes), the outliers' nearest neighbours an
inverted-file index of 8-bit scalar-quantized embeddings (a byte per value instead of four; only
the lists nearest a query are searched).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

PHASH_BITS = 64
# Rows per query block of a neighbour search: bounds its results and the pairs it confirms.
NEIGHBOUR_BLOCK_ROWS = 4096
# Outlier search, an IVF index of SQ8 codes: lists a small multiple of sqrt(N) balance choosing
# lists (a centroid each, and k-means to train them) against scanning them (N / lists rows each).
IVF_LISTS_PER_SQRT_ROW = 2.0
# k-means needs a few dozen points per centroid (faiss warns below 39); fewer rows, fewer lists.
IVF_TRAIN_ROWS_PER_LIST = 40
# Lists scanned per query. Catalogs of fewer than IVF_PROBES x IVF_TRAIN_ROWS_PER_LIST rows have
# no more lists than this, so every list is scanned: exhaustive, up to the 8-bit codes.
IVF_PROBES = 16
# The training sample of the IVF centroids and the quantizer's ranges: fixed, so runs repeat.
IVF_TRAIN_SEED = 0


def phash_value(image: np.ndarray) -> np.uint64:
    """The 64-bit DCT perceptual hash of a uint8 HWC image, as one integer."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(image)).hash.flatten()
    return np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8")[0].astype(np.uint64)


def phash_bits(values: np.ndarray) -> np.ndarray:
    """uint64 hashes -> (n, 64) bool bits, as `phash_value` packed them."""
    raw = np.asarray(values, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(raw, axis=1).astype(bool)


def phash_codes(values: np.ndarray) -> np.ndarray:
    """uint64 hashes -> (n, 8) uint8 codes, the layout of a faiss binary index (the byte order
    does not change a Hamming distance)."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.uint64).astype(">u8")
                                .view(np.uint8).reshape(-1, PHASH_BITS // 8))


def row_cosines(features: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine of each pair (i[p], j[p]) of L2-normalized rows, gathered a block at a time so a
    burst of pairs (a cluster of flat-colour images) does not copy all their embeddings at once."""
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), NEIGHBOUR_BLOCK_ROWS):
        a, b = i[start:start + NEIGHBOUR_BLOCK_ROWS], j[start:start + NEIGHBOUR_BLOCK_ROWS]
        out[start:start + len(a)] = np.einsum("ij,ij->i", features[a], features[b])
    return out


def near_pairs(codes: np.ndarray, features: np.ndarray, candidates: np.ndarray,
               max_distance: int, min_cosine: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine), i < j, among `candidates` (row positions): perceptual hashes (`codes`,
    from `phash_codes`) within `max_distance` bits, confirmed by embedding cosine >= min_cosine.

    An exact range search of a flat faiss binary index, queried in blocks: every pair within the
    radius is found. Multi-index hashing (faiss IndexBinaryMultiHash) is exact too when its
    tables and bit flips cover the radius, but at a 12-bit radius on 64 bits it probes thousands
    of buckets per query and was slower than the flat scan at every size measured."""
    import faiss

    if len(candidates) < 2:
        return []
    index = faiss.IndexBinaryFlat(PHASH_BITS)
    index.add(codes[candidates])
    pairs = []
    for start in range(0, len(candidates), NEIGHBOUR_BLOCK_ROWS):
        block = candidates[start:start + NEIGHBOUR_BLOCK_ROWS]
        # faiss keeps distances strictly below the radius; Hamming distances are whole bits.
        lims, _, hits = index.range_search(codes[block], max_distance + 1)
        i = np.repeat(block, np.diff(lims.astype(np.int64)))
        j = candidates[hits]
        later = j > i
        i, j = i[later], j[later]
        cosine = row_cosines(features, i, j)
        ok = cosine >= min_cosine
        pairs += zip(i[ok].tolist(), j[ok].tolist(), cosine[ok].astype(float).tolist(), strict=True)
    return pairs


def embedding_index(features: np.ndarray) -> faiss.Index:
    """An inner-product faiss IVF index of 8-bit scalar-quantized rows (L2-normalized, so inner
    product is cosine): a byte per value plus an 8-byte id per row, a quarter of the float32
    embeddings; a query scans the `IVF_PROBES` lists whose centroids are nearest, not every row.

    `IVF_LISTS_PER_SQRT_ROW` x sqrt(N) lists, at most one per `IVF_TRAIN_ROWS_PER_LIST`
    rows; centroids and quantizer ranges are trained on a fixed random sample of that many rows
    per list. With no more lists than probes (small catalogs) the search is exhaustive."""
    import faiss

    n, d = features.shape
    lists = max(1, min(int(IVF_LISTS_PER_SQRT_ROW * np.sqrt(n)), n // IVF_TRAIN_ROWS_PER_LIST))
    index = faiss.index_factory(d, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(IVF_TRAIN_SEED).choice(
        n, min(n, lists * IVF_TRAIN_ROWS_PER_LIST), replace=False)
    index.train(np.ascontiguousarray(features[np.sort(sample)], dtype=np.float32))
    for start in range(0, n, NEIGHBOUR_BLOCK_ROWS):
        index.add(np.ascontiguousarray(features[start:start + NEIGHBOUR_BLOCK_ROWS],
                                       dtype=np.float32))
    index.nprobe = min(lists, IVF_PROBES)
    return index


def neighbour_distances(features: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row (L2-normalized) to its k nearest other rows, from
    `embedding_index` queried in blocks (approximate above a few hundred rows: see there)."""
    n = len(features)
    if min(k, n - 1) < 1:
        return np.zeros(n, dtype=np.float32)
    return mean_neighbour_distances(embedding_index(features), features, k)


def mean_neighbour_distances(index: faiss.Index, features: np.ndarray, k: int) -> np.ndarray:
    """`neighbour_distances` with the index of `features` given (the benchmark times the two
    parts apart)."""
    n = len(features)
    k = min(k, n - 1)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, NEIGHBOUR_BLOCK_ROWS):
        block = np.ascontiguousarray(features[start:start + NEIGHBOUR_BLOCK_ROWS], dtype=np.float32)
        sims, idx = index.search(block, k + 1)
        # Not the row itself (normally the first hit) nor a missing hit (-1: the scanned lists
        # held fewer than k + 1 rows); then the k nearest of the rest.
        keep = (idx != np.arange(start, start + len(idx))[:, None]) & (idx >= 0)
        keep &= np.cumsum(keep, axis=1) <= k
        dist = np.where(keep, 1.0 - sims, 0.0).sum(1)
        out[start:start + len(idx)] = dist / np.maximum(keep.sum(1), 1)
    return out
