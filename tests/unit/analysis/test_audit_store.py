"""The audit's on-disk embedding store reads back what it wrote (float16, several appended blocks,
row order, empty), the engine's batches stream into it in manifest order, and the label check's
per-category cleanlab calls flag what one call over every row flags."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.audit import collect
from pipeline.analysis.audit_labels import label_flags
from pipeline.analysis.audit_store import EmbeddingStore, Scratch

# float16 keeps 11 significant bits: a value in [-1, 1] is off by at most half a step at 1.
FLOAT16_TOLERANCE = 2.0**-11


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_store_reads_back_appended_blocks_in_order_within_float16(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [_unit_rows(rng, n, 24) for n in (5, 1, 130, 64)]
    store = EmbeddingStore(tmp_path / "e.f16", 24)
    for block in blocks:
        store.append(block)
    store.finish()
    everything = np.concatenate(blocks)
    assert store.shape == (200, 24) and len(store) == 200
    assert store.nbytes == 200 * 24 * 2 == (tmp_path / "e.f16").stat().st_size
    np.testing.assert_allclose(store[0:200], everything, atol=FLOAT16_TOLERANCE, rtol=0)
    assert store[0:200].dtype == np.float32
    np.testing.assert_allclose(store[5:6], blocks[1], atol=FLOAT16_TOLERANCE, rtol=0)
    positions = np.array([199, 3, 3, 0, 150])  # any order, repeats
    np.testing.assert_allclose(store[positions], everything[positions], atol=FLOAT16_TOLERANCE,
                               rtol=0)
    swept = np.concatenate([b for _, b in store.blocks(rows=64)])
    assert [s for s, _ in store.blocks(rows=64)] == [0, 64, 128, 192]
    np.testing.assert_array_equal(swept, store[0:200])
    order = rng.permutation(200)
    moved = store.reordered(order, tmp_path / "moved.f16")
    np.testing.assert_array_equal(moved[0:200], store[order])


def test_empty_store_and_a_wrong_width(tmp_path):
    store = EmbeddingStore(tmp_path / "e.f16", 8).finish()
    assert store.shape == (0, 8) and store.nbytes == 0
    assert store[0:10].shape == (0, 8) and store[np.array([], dtype=np.int64)].shape == (0, 8)
    assert list(store.blocks()) == []
    with pytest.raises(ValueError, match="8 values"):
        EmbeddingStore(tmp_path / "f.f16", 8).append(np.zeros((2, 7)))


def test_scratch_folder_is_removed_after_use_and_on_errors(tmp_path):
    with Scratch(str(tmp_path)) as folder:
        EmbeddingStore(folder / "e.f16", 4).append(np.ones((3, 4)))
        assert folder.is_dir() and folder.parent == tmp_path
    assert not folder.exists()
    with pytest.raises(RuntimeError), Scratch(str(tmp_path)) as folder:
        raise RuntimeError
    assert not folder.exists()


def _batch(rows: np.ndarray, feats: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
    return {"row": rows, "product_id": np.array([f"p{r}" for r in rows], dtype=object),
            "image_uri": np.array([f"img/{r}.jpg" for r in rows], dtype=object),
            "given_category": np.array(["a" if r % 2 else None for r in rows], dtype=object),
            "status": np.where(ok, "ok", "error").astype(object),
            "error_type": np.where(ok, None, "decode_error").astype(object),
            "error_message": np.where(ok, None, "bad bytes").astype(object),
            "content_hash": np.array([f"{r:064x}"[::-1] for r in rows], dtype=object),
            "phash": rows.astype(np.uint64), "features": feats}


def test_batches_stream_into_a_store_in_manifest_order(tmp_path):
    """Batches out of row order (as Ray may return them), error rows among them: the readable
    rows come back in manifest order with their normalized embeddings, in a store on disk."""
    rng = np.random.default_rng(1)
    feats = 3 * rng.standard_normal((40, 16)).astype(np.float32)
    ok = np.ones(40, dtype=bool)
    ok[[7, 33]] = False
    batches = [_batch(np.arange(s, s + 10), feats[s:s + 10], ok[s:s + 10]) for s in (20, 0, 30, 10)]
    data = collect(iter(batches), tmp_path)
    kept = np.flatnonzero(ok)
    assert isinstance(data.features, EmbeddingStore) and data.features.path.parent == tmp_path
    assert data.product_id.to_pylist() == [f"p{r}" for r in kept]
    assert data.phash.tolist() == kept.tolist()
    expected = feats[kept] / np.linalg.norm(feats[kept], axis=1, keepdims=True)
    np.testing.assert_allclose(data.features[0:len(kept)], expected, atol=FLOAT16_TOLERANCE,
                               rtol=0)
    assert data.errors["product_id"].to_pylist() == ["p7", "p33"]


@pytest.mark.parametrize("rule", ["prune_by_noise_rate", "prune_by_class", "both",
                                  "predicted_neq_given"])
def test_label_flags_by_category_match_one_cleanlab_call_over_every_row(tmp_path, rule):
    from cleanlab.filter import find_label_issues

    rng = np.random.default_rng(2)
    n, classes = 3000, 7
    labels = np.sort(rng.integers(0, classes, n))
    logits = 2 * rng.standard_normal((n, classes))
    logits[np.arange(n), labels] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    store = EmbeddingStore(tmp_path / "p.f32", classes, np.float32)
    store.append(probs[:1000])
    store.append(probs[1000:])
    flags = label_flags(labels, store.finish(), rule)
    expected = find_label_issues(labels, probs.astype(np.float32), filter_by=rule, n_jobs=1)
    assert flags.sum() > 100
    np.testing.assert_array_equal(flags, expected)
