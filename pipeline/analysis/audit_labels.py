"""The audit's label check (`pipeline.analysis.audit_checks`): confident learning (cleanlab) on
out-of-fold probabilities, in bounded memory.

Each fold's logistic regression is fitted on a bounded random sample of the other folds' rows
(every row when the catalog is small), then every row's probabilities come from its own fold's
model, a block at a time, into an on-disk `EmbeddingStore` sorted by given category. cleanlab then
judges one category at a time: its confident joint is counted per category with thresholds from
every row (as `cleanlab.count.compute_confident_joint` counts it over all rows at once), and
`cleanlab.filter.find_label_issues` flags the rows of each category given that joint, which for
the noise-rate rules and predicted_neq_given flags what one call over every row would.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from pipeline.analysis.audit_store import STORE_BLOCK_ROWS, EmbeddingStore
from pipeline.config import EmbedConfig

# The label check's classifier: the feature route's own logistic regression settings.
LABEL_MODEL_C = EmbedConfig.model_fields["C"].default
LABEL_MODEL_MAX_ITER = EmbedConfig.model_fields["max_iter"].default
# Rows each fold's classifier is fitted on, at most: enough for a linear model of the embeddings
# to settle, and a fitting cost that does not grow with the catalog. Many categories need more.
LABEL_FIT_MIN_ROWS = 20_000
LABEL_FIT_ROWS_PER_CLASS = 200
# Rows of probabilities cleanlab flags in one call (whole categories, at least two).
LABEL_FLAG_ROWS = 100_000
# Rules whose flags, given the confident joint, depend only on the rows of one category.
PER_CATEGORY_RULES = ("prune_by_noise_rate", "prune_by_class", "both", "predicted_neq_given")


def fold_models(features, rows: np.ndarray, labels: np.ndarray, folds: int, seed: int
                ) -> tuple[list, np.ndarray]:
    """One fitted classifier per stratified fold (on a bounded sample of the rows outside it),
    and each row's fold. `rows` are positions in `features`; `labels` their class indices."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = int(labels.max()) + 1
    budget = max(LABEL_FIT_MIN_ROWS, LABEL_FIT_ROWS_PER_CLASS * classes)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(rows), dtype=np.int16)
    models = []
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (train, held) in enumerate(cv.split(np.zeros((len(rows), 1)), labels)):
        fold_of[held] = fold
        if len(train) > budget:
            train = np.sort(rng.choice(train, budget, replace=False))
        model = make_pipeline(StandardScaler(),
                              LogisticRegression(C=LABEL_MODEL_C, max_iter=LABEL_MODEL_MAX_ITER))
        models.append(model.fit(features[rows[train]], labels[train]))
    return models, fold_of


def fold_probabilities(models: list, fold_of: np.ndarray, block: np.ndarray, classes: int
                       ) -> np.ndarray:
    """(rows, classes) probabilities of a block of rows, each from its own fold's model (a
    class missing from a model's sample gets probability 0)."""
    out = np.zeros((len(block), classes), dtype=np.float32)
    for fold in np.unique(fold_of):
        mine = fold_of == fold
        model = models[fold]
        out[np.ix_(mine, model.classes_)] = model.predict_proba(block[mine])
    return out


def out_of_fold_store(features, rows: np.ndarray, labels: np.ndarray, folds: int, seed: int,
                      folder: Path) -> tuple[EmbeddingStore, np.ndarray]:
    """Every row's out-of-fold probabilities in a store sorted by label (stable: rows of a
    category keep their order), and that order (store row p is rows[order[p]])."""
    models, fold_of = fold_models(features, rows, labels, folds, seed)
    classes = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    store = EmbeddingStore(folder / "probabilities.f32", classes, np.float32)
    for start in range(0, len(order), STORE_BLOCK_ROWS):
        part = order[start:start + STORE_BLOCK_ROWS]
        store.append(fold_probabilities(models, fold_of[part], features[rows[part]], classes))
    return store.finish(), order


def label_flags(labels: np.ndarray, probs: EmbeddingStore, rule: str) -> np.ndarray:
    """cleanlab's `find_label_issues(labels, probs, filter_by=rule)` for `labels` sorted by
    class and their probabilities, one class's rows in memory at a time for the per-category
    rules; other rules read every row's probabilities at once."""
    from cleanlab.count import (
        calibrate_confident_joint,
        compute_confident_joint,
        get_confident_thresholds,
    )
    from cleanlab.filter import find_label_issues

    if rule not in PER_CATEGORY_RULES:
        return find_label_issues(labels, probs[0:len(labels)], filter_by=rule, n_jobs=1)
    classes = probs.dim
    bounds = np.searchsorted(labels, np.arange(classes + 1))
    thresholds = np.empty(classes)
    for k in range(classes):  # each class's threshold: the mean probability its rows give it
        thresholds[k] = get_confident_thresholds(labels[bounds[k]:bounds[k + 1]],
                                                 probs[bounds[k]:bounds[k + 1]])[k]
    joint = np.zeros((classes, classes), dtype=np.int64)
    for k in range(classes):  # a class's rows fill its row of the joint
        joint[k] = compute_confident_joint(labels[bounds[k]:bounds[k + 1]],
                                           probs[bounds[k]:bounds[k + 1]],
                                           thresholds=thresholds, calibrate=False)[k]
    joint = calibrate_confident_joint(joint, labels)
    flags = np.zeros(len(labels), dtype=bool)
    with warnings.catch_warnings():
        # each call sees a few classes: cleanlab warns that the others have too few rows
        warnings.simplefilter("ignore")
        for first, last in class_groups(bounds):
            part = slice(bounds[first], bounds[last])
            flags[part] = find_label_issues(labels[part], probs[part], filter_by=rule,
                                            confident_joint=joint, n_jobs=1)
    return flags


def class_groups(bounds: np.ndarray) -> list[tuple[int, int]]:
    """Runs [first, last) of consecutive classes (row k's rows are bounds[k]:bounds[k + 1]),
    each of at least two classes (cleanlab asks for two) and, unless one class alone is larger,
    about `LABEL_FLAG_ROWS` rows."""
    classes = len(bounds) - 1
    groups, first = [], 0
    while first < classes:
        last = first + 2
        while last < classes and bounds[last + 1] - bounds[first] <= LABEL_FLAG_ROWS:
            last += 1
        if classes - last == 1:  # never leave one class alone
            last = classes
        groups.append((first, min(last, classes)))
        first = last
    return groups
