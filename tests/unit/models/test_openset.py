"""The open-set score's contract: direction, threshold, what reaches the output rows."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.models import decide, openset
from pipeline.sinks.rows import OUTPUT_SCHEMA, OutputFormatter


@pytest.mark.parametrize("kind", ["energy", "max_logit", "max_softmax"])
def test_a_flat_logit_vector_is_less_familiar_than_a_peaked_one(kind):
    peaked = torch.tensor([[9.0, 0.0, 0.0, 0.0]])
    flat = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert openset.unfamiliarity(flat, 1.0, kind) > openset.unfamiliarity(peaked, 1.0, kind)


def test_energy_is_minus_temperature_times_logsumexp():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 0.5, 0.5]])
    expected = -2.0 * torch.log(torch.exp(logits / 2.0).sum(1))
    assert torch.allclose(openset.unfamiliarity(logits, 2.0, "energy"), expected)


def test_energy_sees_what_softmax_hides():
    """Two rows with the same softmax (logits shifted by a constant): max-softmax cannot tell
    them apart, energy ranks the row with the weaker evidence as less familiar."""
    strong = torch.tensor([[10.0, 8.0, 0.0]])
    weak = strong - 9.0
    assert torch.allclose(torch.softmax(strong, 1), torch.softmax(weak, 1))
    assert openset.unfamiliarity(weak, 1.0, "energy") > openset.unfamiliarity(strong, 1.0, "energy")
    assert torch.allclose(openset.unfamiliarity(weak, 1.0, "max_softmax"),
                          openset.unfamiliarity(strong, 1.0, "max_softmax"))


def test_unknown_score_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: centroid, energy, max_logit, max_softmax"):
        openset.unfamiliarity(torch.zeros(1, 2), 1.0, "entropy")
    with pytest.raises(ValueError, match="needs embeddings and class centroids"):
        openset.unfamiliarity(torch.zeros(1, 2), 1.0, "centroid")


def test_centroid_score_is_distance_to_the_nearest_class_mean():
    embeddings = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 0.1]])
    labels = torch.tensor([0, 0, 1, 1])
    centroids = openset.class_centroids(embeddings, labels, num_classes=3)
    assert torch.allclose(centroids.norm(dim=1), torch.tensor([1.0, 1.0, 0.0]))  # class 2: no rows
    rows = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # like class 0; like nothing learned
    score = openset.unfamiliarity(torch.zeros(2, 3), 1.0, "centroid", rows, centroids)
    assert score[0] < 0.01 and score[1] > 0.9
    record = openset.calibrate(torch.zeros(4, 3), 1.0, embeddings, centroids)
    assert record["score"] == "centroid" and record["threshold"] < 0.1
    assert openset.calibrate(torch.randn(4, 3), 1.0)["score"] == "energy"  # no centroids


def test_threshold_keeps_the_requested_share_of_known_rows():
    known = np.arange(1000, dtype=np.float64)
    threshold = openset.threshold_for(known, 0.95)
    assert (known <= threshold).mean() == pytest.approx(0.95, abs=0.002)


def test_auroc_and_flag_rates():
    known = np.array([0.0, 0.1, 0.2, 0.3])
    unknown = np.array([0.25, 0.9, 1.0])
    conf = np.array([0.9, 0.8, 0.95, 0.7, 0.6, 0.99, 0.5])
    scores = np.concatenate([known, unknown])
    is_unknown = np.array([False] * 4 + [True] * 3)
    out = openset.open_set_metrics(scores, conf, is_unknown, {"score": "energy", "threshold": 0.5})
    assert out["auroc"] == pytest.approx(11 / 12)  # one of 12 (known, unknown) pairs inverted
    assert out["flagged_known_share"] == 0.0 and out["flagged_unknown_share"] == pytest.approx(2 / 3)
    assert out["known_rows"] == 4 and out["unknown_rows"] == 3
    assert openset.open_set_metrics(scores[:4], conf[:4], is_unknown[:4], {})["auroc"] is None


def _batch(unfamiliarity, confidence, status):
    n = len(status)
    top_index = np.tile(np.arange(2, dtype=np.int32), (n, 1))
    return {"product_id": np.array([f"p{i}" for i in range(n)], dtype=object),
            "image_uri": np.array([f"i{i}.jpg" for i in range(n)], dtype=object),
            "status": np.array(status, dtype=object),
            "error_type": np.array([None if s == "ok" else "decode_failed" for s in status], dtype=object),
            "error_message": np.array([None if s == "ok" else "bad" for s in status], dtype=object),
            "predicted_category": np.array(["a" if s == "ok" else None for s in status], dtype=object),
            "confidence": np.array(confidence, dtype=np.float32),
            "top_k_index": top_index, "top_k_scores": np.full((n, 2), 0.5, dtype=np.float32),
            "unfamiliarity": np.array(unfamiliarity, dtype=np.float32)}


POLICY = decide.Policy(keep_threshold=0.1, change_threshold=0.9, assign_threshold=0.9)


def test_unfamiliar_products_go_to_review_even_when_confident():
    batch = _batch([-9.0, -1.0, np.nan], [0.99, 0.99, np.nan], ["ok", "ok", "error"])
    with_open_set = OutputFormatter(["a", "b"], "m", "v", "r", POLICY, open_set_threshold=-5.0)(dict(batch))
    assert with_open_set.schema == OUTPUT_SCHEMA
    assert with_open_set.column("needs_review").to_pylist() == [False, True, True]
    assert with_open_set.column("action_reason").to_pylist() == [
        decide.NO_CURRENT, decide.UNFAMILIAR, decide.ERROR]
    assert with_open_set.column("unfamiliarity").to_pylist()[:2] == [-9.0, -1.0]
    assert with_open_set.column("unfamiliarity").null_count == 1
    without = OutputFormatter(["a", "b"], "m", "v", "r", POLICY)(dict(batch))
    assert without.column("needs_review").to_pylist() == [False, False, True]
    assert isinstance(without.column("unfamiliarity").type, type(pa.float32()))
