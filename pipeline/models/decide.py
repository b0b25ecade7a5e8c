"""Decisions: `keep`, `change` or `review` for every row, at a measured change precision.

Most of a catalog's current categories are right, so the rule starts from the current category:

- `keep` (`confirmed`): the model's top-1 is the current category, or the calibrated probability
  of the current category (`p_current`) is at least the keep threshold: the model finds it
  plausible, even if it prefers another.
- `change` (`confident_fix`): the current category is implausible, the replacement's calibrated
  confidence clears the change threshold, and the (current, predicted) pair is not one the
  model was seen to confuse on held-out rows. Without a current category a confident prediction
  is a `change` (`no_current_category`): assign it.
- `review`: everything else, with the reason (`low_confidence`, `confusable_pair`,
  `unfamiliar`, `error`).

A current category that the model does not know is kept (`not_in_model`): the model has no
opinion on it. A product a person has decided (the reviews table, `pipeline.sinks.reviews`) is
kept with their category (`reviewed`); the nightly formatter applies that, not this rule.

`fit_policy` chooses the thresholds on held-out rows (a calibration split, never the split
that reports them). It simulates catalog errors on those rows: each row once with its true
category as the current one, and once with every wrong category, half the weight within its
coarse group (the look-alikes catalogs confuse) and half across. For each target precision it
keeps the operating point with the least review load that still catches the target share of
wrong categories. Confusable pairs are cross-fitted: the precision of each point is measured on
folds whose pairs came from the other folds, so pairs the model confuses but the calibration
rows never showed count against the precision. No Ray, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KEEP, CHANGE, REVIEW = "keep", "change", "review"
ACTIONS = (KEEP, CHANGE, REVIEW)
CONFIRMED, CONFIDENT_FIX, NO_CURRENT = "confirmed", "confident_fix", "no_current_category"
LOW_CONFIDENCE, CONFUSABLE, UNFAMILIAR, ERROR = "low_confidence", "confusable_pair", "unfamiliar", "error"
NOT_IN_MODEL = "not_in_model"
REVIEWED = "reviewed"  # a person's decision in force for this image (sinks.rows.OutputFormatter)
REASONS = (CONFIRMED, CONFIDENT_FIX, NO_CURRENT, LOW_CONFIDENCE, CONFUSABLE, UNFAMILIAR, ERROR,
           NOT_IN_MODEL, REVIEWED)

POLICY_VERSION = 1
DEFAULT_CHANGE_PRECISION = 0.95
# The share of wrong current categories a fitted point must send to change or review, and the
# share of catalog rows assumed wrong when weighing right against wrong changes.
DEFAULT_CATCH_TARGET = 0.90
DEFAULT_CATALOG_ERROR_RATE = 0.05
TARGET_PRECISIONS = tuple(round(0.80 + 0.01 * i, 2) for i in range(20))  # 0.80 .. 0.99
KEEP_GRID = tuple(float(x) for x in np.geomspace(0.002, 0.5, 25))
CHANGE_GRID = tuple(float(x) for x in np.concatenate([np.linspace(0.3, 0.9, 13),
                                                      np.linspace(0.91, 0.999, 12)]))
FOLDS = 5
PSEUDO_MISTAKES = 0.5  # added to the wrong changes seen when a point's precision is judged
# An artifact without fitted thresholds runs with these: few changes, the rest to review.
FALLBACK = {"keep_threshold": 0.05, "change_threshold": 0.99, "assign_threshold": 0.99}


@dataclass(frozen=True)
class Policy:
    """One operating point: the thresholds the rule applies."""

    keep_threshold: float
    change_threshold: float
    assign_threshold: float
    confusable_pairs: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    target_precision: float | None = None
    fitted: bool = True  # False: the fallback for an artifact without fitted thresholds

    def to_json(self) -> dict[str, Any]:
        """JSON values (null where no change or assignment is certified: never Infinity)."""
        def finite(x: float) -> float | None:
            return None if math.isinf(x) else x

        return {"keep_threshold": self.keep_threshold,
                "change_threshold": finite(self.change_threshold),
                "assign_threshold": finite(self.assign_threshold),
                "target_precision": self.target_precision, "fitted": self.fitted,
                "confusable_pairs": len(self.confusable_pairs)}


def policy_for(record: dict[str, Any] | None, change_precision: float) -> Policy:
    """The operating point of an artifact's `decisions` record for a target change precision:
    the fitted point of the smallest stored target at or above it (never less precise than
    asked). A target above every stored one, or one no point reached, proposes no change."""
    if not record:
        return Policy(**FALLBACK, fitted=False)
    pairs = frozenset((c, p) for c, p in record.get("confusable_pairs", []))
    points = sorted(record.get("operating_points", []), key=lambda p: p["target_precision"])
    for point in points:
        if point["target_precision"] >= change_precision - 1e-9:
            if point.get("change_threshold") is None:  # no change certified; assignments may be
                assign = point.get("assign_threshold")
                return Policy(point["keep_threshold"], math.inf,
                              assign if assign is not None else math.inf, pairs, change_precision)
            if point.get("review_within_group"):
                pairs = pairs | {(c, p) for c, p in record.get("group_pairs", [])}
            return Policy(point["keep_threshold"], point["change_threshold"],
                          point["assign_threshold"] if point.get("assign_threshold") is not None
                          else math.inf, pairs, change_precision)
    keep = points[-1]["keep_threshold"] if points else FALLBACK["keep_threshold"]
    return Policy(keep, math.inf, math.inf, pairs, change_precision)


def decide(ok: np.ndarray, current: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
           p_current: np.ndarray, unfamiliar: np.ndarray, policy: Policy,
           change_floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(action, action_reason) per row. `current` and `predicted` hold category names or None;
    `p_current` is NaN where the current category is missing or unknown to the model;
    `unfamiliar` is the open-set flag; `change_floor` a minimum confidence for any change
    (--review-threshold)."""
    n = len(ok)
    ok = np.asarray(ok, dtype=bool)
    unfamiliar = np.asarray(unfamiliar, dtype=bool)
    confidence = np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=-1.0)
    p_current = np.asarray(p_current, dtype=np.float64)
    has_current = np.array([c is not None and c == c for c in current], dtype=bool)
    known_current = has_current & ~np.isnan(p_current)
    agrees = np.array([c == p for c, p in zip(current, predicted, strict=True)], dtype=bool)
    pairs = policy.confusable_pairs
    confusable = np.array([(c, p) in pairs for c, p in zip(current, predicted, strict=True)],
                          dtype=bool) if pairs else np.zeros(n, dtype=bool)
    plausible = agrees | (np.nan_to_num(p_current, nan=-1.0) >= policy.keep_threshold)
    change_at = max(policy.change_threshold, change_floor)
    assign_at = max(policy.assign_threshold, change_floor)

    action = np.full(n, REVIEW, dtype=object)
    reason = np.full(n, LOW_CONFIDENCE, dtype=object)
    # Later assignments win: written from the weakest rule to the strongest.
    no_current = ok & ~unfamiliar & ~has_current
    assign = no_current & (confidence >= assign_at)
    action[assign], reason[assign] = CHANGE, NO_CURRENT
    judged = ok & ~unfamiliar & known_current & ~plausible
    fix = judged & ~confusable & (confidence >= change_at)
    action[fix], reason[fix] = CHANGE, CONFIDENT_FIX
    reason[judged & confusable] = CONFUSABLE
    keep = ok & known_current & plausible & ~unfamiliar
    action[keep], reason[keep] = KEEP, CONFIRMED
    foreign = ok & has_current & ~known_current
    action[foreign], reason[foreign] = KEEP, NOT_IN_MODEL
    reason[ok & unfamiliar & ~foreign] = UNFAMILIAR
    action[~ok], reason[~ok] = REVIEW, ERROR
    return action, reason


# ---------------------------------------------------------------------------------------------
# Fitting on held-out rows


@dataclass
class Simulated:
    """Held-out rows as catalog rows: every (row, current category) scenario with its weight."""

    row: np.ndarray        # index of the held-out row
    current: np.ndarray    # class index of the simulated current category
    wrong: np.ndarray      # current != true category
    weight: np.ndarray


def simulate(labels: np.ndarray, num_classes: int, groups: np.ndarray | None,
             error_rate: float) -> Simulated:
    """Each row right (weight 1 - error_rate) and wrong as every other category (error_rate
    split: half within the row's coarse group, half across; all across when its group has no
    other member or no groups are known)."""
    rows, currents, weights = [], [], []
    n = len(labels)
    for i, y in enumerate(labels):
        others = np.delete(np.arange(num_classes), y)
        w = np.full(len(others), 1.0)
        if groups is not None and groups[y] >= 0:
            same = groups[others] == groups[y]
            if same.any() and (~same).any():
                w[same] = 0.5 / same.sum()
                w[~same] = 0.5 / (~same).sum()
            else:
                w /= w.sum()
        else:
            w /= w.sum()
        rows.append(np.concatenate([[i], np.full(len(others), i)]))
        currents.append(np.concatenate([[y], others]))
        weights.append(np.concatenate([[(1 - error_rate) / n], error_rate * w / n]))
    row, current = np.concatenate(rows), np.concatenate(currents)
    return Simulated(row, current, current != labels[row], np.concatenate(weights))


def coarse_groups(classes: list[str], coarse_classes: dict[str, str] | None) -> np.ndarray | None:
    """Each class's coarse group index (-1 without one); None when no class has a group."""
    if not coarse_classes:
        return None
    names = sorted(set(coarse_classes.values()))
    return np.array([names.index(coarse_classes[c]) if c in coarse_classes else -1 for c in classes])


def measure(probs: np.ndarray, labels: np.ndarray, classes: list[str],
            coarse_classes: dict[str, str] | None, policy: Policy,
            unfamiliar: np.ndarray | None = None,
            error_rate: float = DEFAULT_CATALOG_ERROR_RATE) -> dict[str, float | None]:
    """What the rule does to labelled rows (with their calibrated probabilities) made into a
    catalog with simulated wrong categories (`simulate`): change precision, the share of wrong
    categories caught (changed or reviewed), the share fixed (changed to the true category),
    review load and change rate, all weighted per catalog row. Runs `decide` itself."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    sim = simulate(labels, probs.shape[1], coarse_groups(classes, coarse_classes), error_rate)
    names = np.asarray(classes, dtype=object)
    predicted = probs.argmax(1)
    flags = np.zeros(len(labels), dtype=bool) if unfamiliar is None else np.asarray(unfamiliar, bool)
    action, _ = decide(np.ones(len(sim.row), dtype=bool), names[sim.current].tolist(),
                       names[predicted[sim.row]].tolist(), probs.max(1)[sim.row],
                       probs[sim.row, sim.current], flags[sim.row], policy)
    w = sim.weight
    change, review = action == CHANGE, action == REVIEW
    right = change & sim.wrong & (predicted[sim.row] == labels[sim.row])
    changed = float(w[change].sum())
    wrong_total = float(w[sim.wrong].sum())
    return {"precision": float(w[right].sum()) / changed if changed else None,
            "catch": float(w[sim.wrong & (change | review)].sum()) / wrong_total,
            "fixed": float(w[right].sum()) / wrong_total,
            "review_load": float(w[review].sum()), "change_rate": changed}


def _pair_mask(pairs: set[tuple[int, int]], current: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    if not pairs:
        return np.zeros(len(current), dtype=bool)
    codes = current.astype(np.int64) * 100_003 + predicted
    wanted = np.array([c * 100_003 + p for c, p in pairs], dtype=np.int64)
    return np.isin(codes, wanted)


def confused_pairs(labels: np.ndarray, predicted: np.ndarray) -> set[tuple[int, int]]:
    """(true, predicted) of every mistake, both ways round: look-alikes are confused either way."""
    wrong = labels != predicted
    pairs = set(zip(labels[wrong].tolist(), predicted[wrong].tolist(), strict=True))
    return pairs | {(b, a) for a, b in pairs}


def _outcomes(sim: Simulated, probs: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
              confidence: np.ndarray, confusable: np.ndarray) -> dict[str, np.ndarray]:
    """Per grid point (keep x change): weighted right changes, wrong changes, catches, reviews."""
    row = sim.row
    p_cur = probs[row, sim.current]
    agrees = predicted[row] == sim.current
    conf = confidence[row]
    pred_right = predicted[row] == labels[row]
    keep_grid = np.asarray(KEEP_GRID)[:, None]
    change_grid = np.asarray(CHANGE_GRID)[:, None]
    implausible = ~agrees[None, :] & (p_cur[None, :] < keep_grid)          # (keep, scenarios)
    changeable = ~confusable[None, :] & (conf[None, :] >= change_grid)     # (change, scenarios)
    w = sim.weight
    right_w = w * (pred_right & sim.wrong)       # a change to the true category
    wrong_w = w * ~(pred_right & sim.wrong)      # any other change is a mistake
    return {
        "right": (implausible * right_w) @ changeable.T.astype(float),
        "wrong": (implausible * wrong_w) @ changeable.T.astype(float),
        "flagged": implausible.astype(float) @ w,               # changed or reviewed
        "caught": implausible.astype(float) @ (w * sim.wrong),  # wrong categories flagged
    }


def fit_policy(probs: np.ndarray, labels: np.ndarray, classes: list[str],
               coarse_classes: dict[str, str] | None = None, fitted_on: dict | None = None,
               error_rate: float = DEFAULT_CATALOG_ERROR_RATE,
               catch_target: float = DEFAULT_CATCH_TARGET, seed: int = 0) -> dict[str, Any]:
    """The artifact's `decisions` record from calibrated probabilities of held-out rows with
    their true labels: confusable pairs, and one operating point per target precision."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, k = probs.shape
    predicted = probs.argmax(1)
    confidence = probs.max(1)
    sim = simulate(labels, k, coarse_groups(classes, coarse_classes), error_rate)
    confusable = cross_fitted_confusable(sim, labels, predicted, seed)
    groups = coarse_groups(classes, coarse_classes)
    same_group = (np.zeros(len(sim.row), dtype=bool) if groups is None else
                  (groups[sim.current] == groups[predicted[sim.row]]) & (groups[sim.current] >= 0))
    # Two families of points: changes allowed within a coarse group (the look-alikes), or not.
    families = [_grid(sim, probs, labels, predicted, confidence, confusable | extra)
                for extra in (np.zeros_like(same_group), same_group)]
    points = [operating_point(target, families, confidence, predicted == labels, catch_target)
              for target in TARGET_PRECISIONS]
    all_pairs = confused_pairs(labels, predicted)
    group_pairs = [] if groups is None else sorted(
        [classes[a], classes[b]] for a in range(k) for b in range(k)
        if a != b and groups[a] >= 0 and groups[a] == groups[b])
    return {
        "version": POLICY_VERSION, "rule": "keep if top-1 or p_current >= keep; change if "
        "confidence >= change and the pair is not confusable; else review",
        "catalog_error_rate": error_rate, "catch_target": catch_target,
        "confusable_pairs": sorted([classes[a], classes[b]] for a, b in all_pairs),
        "group_pairs": group_pairs,
        "operating_points": points,
        "fitted_on": {**(fitted_on or {}), "rows": int(n),
                      "accuracy": float((predicted == labels).mean())},
    }


def cross_fitted_confusable(sim: Simulated, labels: np.ndarray, predicted: np.ndarray,
                            seed: int) -> np.ndarray:
    """Per simulated row: is its (current, predicted) pair a known mistake? Cross-fitted, so
    each fold's scenarios see only the other folds' mistakes."""
    fold = np.random.default_rng(seed).permutation(len(labels)) % FOLDS
    confusable = np.zeros(len(sim.row), dtype=bool)
    for f in range(FOLDS):
        others = fold != f
        pairs = confused_pairs(labels[others], predicted[others])
        here = fold[sim.row] == f
        confusable[here] = _pair_mask(pairs, sim.current[here], predicted[sim.row[here]])
    return confusable


def operating_point(target: float, families: list[dict[str, np.ndarray]], confidence: np.ndarray,
                    right: np.ndarray, catch_target: float) -> dict[str, Any]:
    """The least review load that reaches `target` precision and catches `catch_target` of the
    wrong categories, over both families of points; all to review when none reaches it."""
    point = {"target_precision": target, "keep_threshold": None, "change_threshold": None,
             "review_within_group": False,
             "assign_threshold": assign_threshold(confidence, right, target)}
    family, score, (i, j) = max(((family, *_best(grid, target, catch_target))
                                 for family, grid in enumerate(families)), key=lambda f: f[2])
    grid = families[family]
    if np.isfinite(score):
        point.update(keep_threshold=KEEP_GRID[i], change_threshold=CHANGE_GRID[j],
                     review_within_group=bool(family),
                     expected={"precision": float(grid["precision"][i, j]),
                               "catch": float(grid["catch"][i]),
                               "review_load": float(grid["review"][i, j]),
                               "change_rate": float(grid["changes"][i, j])})
    else:  # no point reaches the target: catch what the keep rule catches, all to review
        catch = grid["catch"]
        i = int(np.argmax(catch >= catch_target)) if (catch >= catch_target).any() else len(KEEP_GRID) - 1
        point.update(keep_threshold=KEEP_GRID[i],
                     expected={"precision": None, "catch": float(catch[i]),
                               "review_load": float(grid["flagged"][i]), "change_rate": 0.0})
    return point


def _grid(sim: Simulated, probs: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
          confidence: np.ndarray, confusable: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, catch and review load over the keep x change grid."""
    out = _outcomes(sim, probs, labels, predicted, confidence, confusable)
    changes = out["right"] + out["wrong"]
    # Half a wrong change more than observed: a handful of held-out rows cannot certify a high
    # precision (the weight of one held-out row with its true category is (1 - rate) / n).
    unseen = PSEUDO_MISTAKES * sim.weight[~sim.wrong].sum() / max(len(np.unique(sim.row)), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(changes > 0, out["right"] / (changes + unseen), np.nan)
    return {"precision": precision, "catch": out["caught"] / float(sim.weight[sim.wrong].sum()),
            "review": out["flagged"][:, None] - changes, "changes": changes, "right": out["right"],
            "flagged": out["flagged"]}


def _best(grid: dict[str, np.ndarray], target: float, catch_target: float) -> tuple[float, tuple]:
    """(score, (keep index, change index)) of the best point reaching `target` precision:
    enough wrong categories caught first, then the least review load, then the most fixes;
    score -inf when none reaches it."""
    score = np.where(grid["precision"] >= target,
                     (grid["catch"][:, None] >= catch_target) * 1e6 - grid["review"] * 1e3
                     + grid["right"], -np.inf)
    if not np.isfinite(score).any():
        return -np.inf, (0, 0)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    return float(score[i, j]), (int(i), int(j))


# One-sided z of the Wilson lower bound an assignment threshold's precision must clear (90%).
WILSON_Z = 1.2816


def wilson_lower(hits: np.ndarray, n: np.ndarray, z: float = WILSON_Z) -> np.ndarray:
    """Wilson score lower bound of a proportion hits/n: a few lucky rows do not make a
    threshold."""
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def assign_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest confidence at which the predictions at or above it are `target` right, by
    the Wilson lower bound (the selective-classification point for products without a current
    category); None if none."""
    order = np.argsort(-confidence)
    k = np.arange(1, len(order) + 1)
    good = np.flatnonzero(wilson_lower(np.cumsum(correct[order]), k) >= target)
    if not len(good):
        return None
    return float(confidence[order][good[-1]])
