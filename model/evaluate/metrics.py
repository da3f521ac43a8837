"""The numbers, as pure functions of labels, predictions, features and scores (numpy in, plain
Python out), so each can be checked against an independent implementation.

Definitions (docs/method.md):
- WAR = accuracy over all items, in %.
- UAR = mean of per-class recall over the classes that HAVE items, in %. A class in the class list
  with no items has no recall (None): it is left out of the mean, though predicting it still counts
  as an error for the item's true class. (sklearn: `recall_score(average="macro", labels=present)`.)
- Confusion matrix: rows = true class, columns = predicted; row-normalised, a row with no items is 0.
- Feature variance (appendix D): see `feature_variance`.
- Retrieval: see `retrieval_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] integer counts, rows = true class, columns = predicted class."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def row_normalise(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> dict:
    """UAR, WAR (in %), per-class recall (in %, None for classes without items), counts and the
    row-normalised confusion matrix."""
    counts = confusion_counts(labels, predictions, len(classes))
    per_class_n = counts.sum(axis=1)
    recall = [float(100.0 * counts[c, c] / n) if n else None for c, n in enumerate(per_class_n)]
    present = [r for r in recall if r is not None]
    return {
        "n": int(per_class_n.sum()),
        "uar": float(np.mean(present)) if present else 0.0,
        "war": float(100.0 * np.trace(counts) / max(1, per_class_n.sum())),
        "per_class_recall": dict(zip(classes, recall, strict=True)),
        "per_class_n": {c: int(n) for c, n in zip(classes, per_class_n, strict=True)},
        "confusion": row_normalise(counts).tolist(),
    }


def spread(features: np.ndarray) -> float:
    """Mean squared distance of the rows to their mean: the sum over dimensions of the per-dimension
    variance, i.e. D x (mean over dimensions of the variance). For L2-normalised rows it lies in
    [0, 1] whatever D is (it equals 1 - |mean|^2), which is what makes a 512-d CLIP space and a
    4096-d projected space comparable; the mean over dimensions alone would shrink as 1/D."""
    if len(features) == 0:
        return float("nan")
    centred = features - features.mean(axis=0, keepdims=True)
    return float((centred**2).sum(axis=1).mean())


def feature_variance(features: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Per-class variance of L2-normalised features (`spread` of the class's items) and the same
    relative to the spread of ALL items (`relative`: < 1 = the class is tighter than the data set;
    this also cancels a space's overall spread, e.g. CLIP's features all being close together).
    A class with fewer than two items has no spread to speak of: None."""
    overall = spread(features)
    per_class, relative = {}, {}
    for c, name in enumerate(classes):
        members = features[np.asarray(labels) == c]
        value = spread(members) if len(members) >= 2 else None
        per_class[name] = value
        relative[name] = value / overall if value is not None and overall > 0 else None
    return {"all_items": overall, "per_class": per_class, "relative": relative}


def retrieval_metrics(scores: np.ndarray, relevant: Sequence[frozenset[int]], ks: Sequence[int]) -> dict:
    """scores [N items, M descriptions] (higher = better; ties keep description order).
    P@k = relevant among the top k / k (k, not min(k, relevant): the usual definition, so P@k of an
    item with one relevant description is at most 1/k); R@k = relevant among the top k / all relevant;
    MRR = mean of 1 / rank of the first relevant description. All in [0, 1], averaged over items.
    Chance: the P@k a random ranking has on average: mean relevant / max(k, M) (for k beyond M the top
    k holds every description, the relevant ones included, and P@k still divides by k)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.stack([np.isin(order[i], sorted(rel)) for i, rel in enumerate(relevant)])  # [N, M] bool
    n_relevant = np.array([len(rel) for rel in relevant], dtype=np.float64)
    first = hits.argmax(axis=1) + 1
    return {
        "n_items": int(scores.shape[0]),
        "n_descriptions": int(scores.shape[1]),
        "precision_at_k": {str(k): float((hits[:, :k].sum(axis=1) / k).mean()) for k in ks},
        "recall_at_k": {str(k): float((hits[:, :k].sum(axis=1) / n_relevant).mean()) for k in ks},
        "mrr": float((1.0 / first).mean()),
        "chance_precision_at_k": {str(k): float(n_relevant.mean() / max(k, scores.shape[1])) for k in ks},
        "first_relevant_rank": first.tolist(),
    }
