"""The keep / change / review rule and its fit, on constructed probabilities."""

import math

import numpy as np
import pytest

from pipeline.models import decide

POLICY = decide.Policy(keep_threshold=0.10, change_threshold=0.90, assign_threshold=0.80,
                       confusable_pairs=frozenset({("Cantaloupe", "Galia-Melon")}))


def _decide(rows, policy=POLICY, change_floor=0.0):
    """rows: (ok, current, predicted, confidence, p_current, unfamiliar)."""
    cols = list(zip(*rows, strict=True))
    action, reason = decide.decide(np.array(cols[0]), list(cols[1]), list(cols[2]),
                                   np.array(cols[3], dtype=float), np.array(cols[4], dtype=float),
                                   np.array(cols[5]), policy, change_floor)
    return list(zip(action.tolist(), reason.tolist(), strict=True))


def test_keep_change_and_review_at_the_thresholds():
    nan = math.nan
    got = _decide([
        (True, "Kiwi", "Kiwi", 0.30, 0.30, False),            # top-1 is the current: keep
        (True, "Kiwi", "Lime", 0.85, 0.10, False),            # p_current at the keep threshold
        (True, "Kiwi", "Lime", 0.90, 0.0999, False),          # just implausible, at change
        (True, "Kiwi", "Lime", 0.8999, 0.0999, False),        # just below change
        (True, "Cantaloupe", "Galia-Melon", 0.99, 0.001, False),  # a pair the model confuses
        (True, None, "Lime", 0.80, nan, False),               # no category, at assign
        (True, None, "Lime", 0.7999, nan, False),             # no category, below assign
        (True, "Kiwi", "Lime", 0.99, 0.001, True),            # unfamiliar product
        (False, "Kiwi", None, nan, nan, False),               # an error row
        (True, "Sofa", "Lime", 0.99, nan, False),             # a category the model never learned
    ])
    assert got == [
        ("keep", "confirmed"), ("keep", "confirmed"), ("change", "confident_fix"),
        ("review", "low_confidence"), ("review", "confusable_pair"),
        ("change", "no_current_category"), ("review", "low_confidence"),
        ("review", "unfamiliar"), ("review", "error"), ("keep", "not_in_model")]


def test_a_change_floor_sends_changes_below_it_to_review():
    rows = [(True, "Kiwi", "Lime", 0.95, 0.01, False), (True, None, "Lime", 0.95, math.nan, False)]
    assert [a for a, _ in _decide(rows)] == ["change", "change"]
    assert _decide(rows, change_floor=0.96) == [("review", "low_confidence")] * 2


def _record():
    points = [{"target_precision": t, "keep_threshold": 0.05 + t / 100,
               "change_threshold": t, "assign_threshold": t} for t in (0.9, 0.95, 0.97)]
    points.append({"target_precision": 0.98, "keep_threshold": 0.15, "change_threshold": None,
                   "assign_threshold": 0.97})
    points.append({"target_precision": 0.99, "keep_threshold": 0.2, "change_threshold": None,
                   "assign_threshold": None})
    return {"confusable_pairs": [["A", "B"]], "operating_points": points}


def test_the_job_takes_the_fitted_point_at_or_above_its_target():
    record = _record()
    assert decide.policy_for(record, 0.95).change_threshold == 0.95
    at = decide.policy_for(record, 0.93)  # never less precise than asked
    assert at.change_threshold == 0.95 and at.target_precision == 0.93
    assert at.confusable_pairs == frozenset({("A", "B")})
    unreachable = decide.policy_for(record, 0.99)
    assert unreachable.change_threshold == math.inf and unreachable.keep_threshold == 0.2
    assert unreachable.assign_threshold == math.inf
    assign_only = decide.policy_for(record, 0.98)  # no change certified, assignments are
    assert assign_only.change_threshold == math.inf and assign_only.assign_threshold == 0.97
    fallback = decide.policy_for({}, 0.95)
    assert not fallback.fitted and fallback.change_threshold == decide.FALLBACK["change_threshold"]


def _synthetic(n, rng, confuse=(0, 1)):
    """Probabilities of a 12-class model, of varying confidence, that calls true class
    `confuse[0]` class `confuse[1]` with confidence half the time."""
    k = 12
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += rng.uniform(3.0, 8.0, n)
    a, b = confuse
    swap = (labels == a) & (rng.random(n) < 0.5)
    logits[swap, b] += 10.0
    probs = np.exp(logits)
    return probs / probs.sum(1, keepdims=True), labels


def test_fit_finds_the_confused_pair_and_reaches_its_precision_on_fresh_rows():
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(12)]
    coarse = {c: "g0" if i < 2 else f"g{i}" for i, c in enumerate(classes)}
    probs, labels = _synthetic(1500, rng)
    record = decide.fit_policy(probs, labels, classes, coarse, fitted_on={"split": "calibration"})
    assert ["c0", "c1"] in record["confusable_pairs"] and ["c1", "c0"] in record["confusable_pairs"]
    assert record["fitted_on"] == {"split": "calibration", "rows": 1500,
                                   "accuracy": pytest.approx((probs.argmax(1) == labels).mean())}
    targets = [p["target_precision"] for p in record["operating_points"]]
    assert targets == sorted(targets) and 0.95 in targets
    policy = decide.policy_for(record, 0.95)
    assert policy.change_threshold < math.inf
    fresh_probs, fresh_labels = _synthetic(3000, np.random.default_rng(1))
    measured = decide.measure(fresh_probs, fresh_labels, classes, coarse, policy)
    assert measured["precision"] >= 0.93 and measured["catch"] >= 0.85
    # Without the pair the confident c0 -> c1 mistakes become wrong changes.
    blind = decide.Policy(policy.keep_threshold, policy.change_threshold, policy.assign_threshold)
    assert decide.measure(fresh_probs, fresh_labels, classes, coarse, blind)["precision"] < \
        measured["precision"]


def test_simulated_catalog_weighs_right_and_wrong_rows():
    sim = decide.simulate(np.array([0, 2]), 4, np.array([0, 0, 1, 1]), 0.1)
    assert sim.weight.sum() == pytest.approx(1.0)
    assert sim.weight[~sim.wrong].sum() == pytest.approx(0.9)
    # Row 0 (group 0): its one group-mate takes half of its wrong weight.
    row0_wrong = (sim.row == 0) & sim.wrong
    assert sim.weight[row0_wrong & (sim.current == 1)].sum() == pytest.approx(0.05 / 2)


def test_assignment_threshold_needs_more_than_a_few_lucky_rows():
    confidence = np.linspace(1.0, 0.5, 100)
    correct = np.ones(100, dtype=bool)
    correct[60:] = False
    # 60 of 60 right above 0.7: the Wilson bound clears 0.95; 3 of 3 alone would not.
    assert decide.assign_threshold(confidence, correct, 0.95) == pytest.approx(confidence[59])
    assert decide.assign_threshold(confidence[:3], correct[:3], 0.95) is None
