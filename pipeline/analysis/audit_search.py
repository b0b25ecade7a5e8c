"""The audit's neighbour searches (`pipeline.analysis.audit`): perceptual hashes and faiss.

Both searches are one kind of faiss search, queried in blocks of rows: each row's nearest rows
in an inverted-file index of 8-bit scalar-quantized embeddings, projected onto their
`SEARCH_DIM` main directions (a byte per value of a tenth of the width; only the lists nearest a
query are searched). Duplicate candidates are a row's nearest rows whose perceptual hashes are
within the Hamming limit; outliers take the distances to their nearest rows. The embeddings are
read a block at a time (`features[a:b]`, `features[positions]`): an array, or the audit's
on-disk `EmbeddingStore`; nothing holds all of them, nor a matrix of every pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator

    import faiss

PHASH_BITS = 64
# Rows per query block of a neighbour search: bounds its results and the pairs it confirms.
NEIGHBOUR_BLOCK_ROWS = 4096
# The IVF index of SQ8 codes: lists of about this many rows, so a query scans about
# IVF_PROBES x this many rows whatever the catalog's size (with lists a multiple of sqrt(N),
# the rows scanned per query grew with sqrt(N), and the whole search with N^1.5); choosing the
# lists costs a query a product with each centroid, cheap beside the scan up to millions of rows.
IVF_ROWS_PER_LIST = 256
# Rows the centroids and the quantizer's ranges are trained on: every row up to this many, then a
# fixed sample, so training costs the same per row at any size (k-means wants a few dozen points
# per centroid; above a few thousand lists they get fewer: coarser lists, the same rows scanned).
IVF_TRAIN_MAX_ROWS = 100_000
# Lists scanned per query. Catalogs of fewer than IVF_PROBES x IVF_ROWS_PER_LIST rows have
# no more lists than this, so every list is scanned: exhaustive, up to the 8-bit codes.
IVF_PROBES = 16
# The training sample of the IVF centroids and the quantizer's ranges: fixed, so runs repeat.
IVF_TRAIN_SEED = 0
# Width of the searched space: the embeddings' main directions (uncentered, so inner products of
# rows inside that space are kept exactly), found on a sample. The search's cost is
# proportional to the width; the near-duplicate confirmation and exact-copy checks use the
# stored embeddings themselves.
SEARCH_DIM = 128
SEARCH_SPACE_SAMPLE_ROWS = 10_000
# Near-duplicate candidates per row: its nearest rows, then the hash and cosine conditions.
# A group larger than this is still joined through its members' own neighbours.
NEAR_NEIGHBOURS = 16


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


def row_cosines(features, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine of each pair (i[p], j[p]) of L2-normalized rows, gathered a block at a time so a
    burst of pairs (a cluster of flat-colour images) does not copy all their embeddings at once."""
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), NEIGHBOUR_BLOCK_ROWS):
        a, b = i[start:start + NEIGHBOUR_BLOCK_ROWS], j[start:start + NEIGHBOUR_BLOCK_ROWS]
        out[start:start + len(a)] = np.einsum("ij,ij->i", features[a], features[b])
    return out


def hamming(values: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Bits that differ between the uint64 hashes values[i] and values[j]."""
    return np.bitwise_count(values[i] ^ values[j])


def near_pairs(codes: np.ndarray, features, candidates: np.ndarray,
               max_distance: int, min_cosine: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine), i < j, among `candidates` (row positions): each candidate's
    `NEAR_NEIGHBOURS` nearest candidates (`neighbour_search`) whose perceptual hashes (`codes`,
    from `phash_codes`) are within `max_distance` bits, confirmed by the embeddings' cosine
    >= min_cosine. Linear in the rows, where a range search of every pair of hashes is not; a
    pair within the hash limit that is not among either row's nearest is missed, which takes a
    group of more than `NEAR_NEIGHBOURS` rows nearer than the pair."""
    if len(candidates) < 2:
        return []
    values = np.ascontiguousarray(codes).view(np.uint64)[:, 0]
    index = embedding_index(features, candidates)
    found = []
    for start, _, ids in neighbour_search(index, features, NEAR_NEIGHBOURS, candidates):
        q = np.repeat(np.arange(start, start + len(ids)), ids.shape[1])
        hit = ids.ravel()
        keep = hit >= 0
        i, j = candidates[q[keep]], candidates[hit[keep]]
        i, j = np.minimum(i, j), np.maximum(i, j)
        close = hamming(values, i, j) <= max_distance
        found.append(np.stack([i[close], j[close]], axis=1))
    if not found:
        return []
    pairs = np.unique(np.concatenate(found), axis=0)  # both rows may have found the pair
    cosine = row_cosines(features, pairs[:, 0], pairs[:, 1])
    ok = cosine >= min_cosine
    return list(zip(pairs[ok, 0].tolist(), pairs[ok, 1].tolist(),
                    cosine[ok].astype(float).tolist(), strict=True))


def search_space(features, rows: np.ndarray) -> np.ndarray | None:
    """(SEARCH_DIM, d) projection onto the main directions of a fixed sample of `rows`, or None
    when the embeddings are no wider. Uncentered (the eigenvectors of the sample's second-moment
    matrix), so rows in the span of those directions keep their inner products exactly."""
    d = features.shape[1]
    if d <= SEARCH_DIM:
        return None
    sample = np.random.default_rng(IVF_TRAIN_SEED).choice(
        len(rows), min(len(rows), SEARCH_SPACE_SAMPLE_ROWS), replace=False)
    moment = np.zeros((d, d), dtype=np.float64)
    for start in range(0, len(sample), NEIGHBOUR_BLOCK_ROWS):
        block = features[rows[np.sort(sample)[start:start + NEIGHBOUR_BLOCK_ROWS]]]
        moment += block.T @ block  # float32 products of a block, summed in float64
    _, vectors = np.linalg.eigh(moment)  # ascending eigenvalues
    return np.ascontiguousarray(vectors[:, ::-1][:, :SEARCH_DIM].T, dtype=np.float32)


def embedding_index(features, rows: np.ndarray | None = None) -> faiss.Index:
    """An inner-product faiss IVF index of 8-bit scalar-quantized rows (L2-normalized, so inner
    product is cosine) projected onto `search_space`: a byte per searched value plus an 8-byte
    id per row; a query (full width: the index projects it) scans the `IVF_PROBES` lists whose
    centroids are nearest, not every row. Of every row, or of `rows` (positions), whose ids
    are then positions in `rows`.

    A list per `IVF_ROWS_PER_LIST` rows; centroids and quantizer ranges are trained on at most
    `IVF_TRAIN_MAX_ROWS` rows (a fixed random sample), and rows are added a block at a time.
    With no more lists than probes (small catalogs) the search is exhaustive."""
    import faiss

    rows = np.arange(len(features)) if rows is None else np.asarray(rows, dtype=np.int64)
    n, d = len(rows), features.shape[1]
    projection = search_space(features, rows)
    width = d if projection is None else len(projection)
    lists = max(1, n // IVF_ROWS_PER_LIST)
    index = ivf = faiss.index_factory(width, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    ivf.cp.min_points_per_centroid = 1  # fewer than faiss warns about is intended: see above
    sample = np.sort(np.random.default_rng(IVF_TRAIN_SEED).choice(
        n, min(n, IVF_TRAIN_MAX_ROWS), replace=False))
    # the sample is projected a block at a time: never a sample of full-width rows at once
    ivf.train(np.concatenate([
        project(features[rows[sample[start:start + NEIGHBOUR_BLOCK_ROWS]]], projection)
        for start in range(0, len(sample), NEIGHBOUR_BLOCK_ROWS)]))
    if projection is not None:
        transform = faiss.LinearTransform(d, width, False)
        faiss.copy_array_to_vector(projection.ravel(), transform.A)
        transform.is_trained = True
        index = faiss.IndexPreTransform(transform, ivf)
    for start in range(0, n, NEIGHBOUR_BLOCK_ROWS):
        index.add(features[rows[start:start + NEIGHBOUR_BLOCK_ROWS]])
    ivf.nprobe = min(lists, IVF_PROBES)
    return index


def project(block: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """Full-width rows -> the searched space (float32, contiguous, as faiss takes them)."""
    out = block if projection is None else block @ projection.T
    return np.ascontiguousarray(out, dtype=np.float32)


def neighbour_search(index: faiss.Index, features, k: int, rows: np.ndarray | None = None
                     ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, similarities, ids) per block of the indexed rows, each row's k nearest other rows
    in `index` (from `embedding_index` of the same `rows`): ids are positions in `rows`, -1
    where fewer were found, never the row itself."""
    n = index.ntotal
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    for start in range(0, n, NEIGHBOUR_BLOCK_ROWS):
        block = features[rows[start:start + NEIGHBOUR_BLOCK_ROWS]]
        sims, idx = index.search(np.ascontiguousarray(block, dtype=np.float32), k + 1)
        # Not the row itself (normally the first hit) nor a missing hit (-1: the scanned lists
        # held fewer than k + 1 rows); then the k nearest of the rest.
        keep = (idx != np.arange(start, start + len(idx))[:, None]) & (idx >= 0)
        keep &= np.cumsum(keep, axis=1) <= k
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept hits first, in rank order
        ids = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(idx, order, 1), -1)
        yield start, np.take_along_axis(sims, order, 1), ids


def neighbour_distances(features, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Mean cosine distance of each row (L2-normalized; of `rows` when given) to its k nearest
    other rows, from `embedding_index` queried in blocks (approximate above a few hundred rows
    and for rows outside the searched space: see there)."""
    n = len(features) if rows is None else len(rows)
    if min(k, n - 1) < 1:
        return np.zeros(n, dtype=np.float32)
    return mean_neighbour_distances(embedding_index(features, rows), features, k, rows)


def mean_neighbour_distances(index: faiss.Index, features, k: int,
                             rows: np.ndarray | None = None) -> np.ndarray:
    """`neighbour_distances` with the index of `features` given (the benchmark times the two
    parts apart)."""
    n = index.ntotal
    out = np.empty(n, dtype=np.float32)
    for start, sims, ids in neighbour_search(index, features, min(k, n - 1), rows):
        found = ids >= 0
        dist = np.where(found, 1.0 - sims, 0.0).sum(1)
        out[start:start + len(ids)] = dist / np.maximum(found.sum(1), 1)
    return out
