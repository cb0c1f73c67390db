"""Quality of a clustering against known classes, on label vectors (pure numpy/scipy).

Used for image-level diagnostics of every clustering stage (k-means #1, the denoising subsets,
k-means #2/#3) against class ids the method never reads. Conventions: ``pred`` and ``truth`` are
(N,) integer vectors of any ids (not necessarily 0..K-1 or contiguous); an optional (N,) bool
``mask`` restricts every score to a subset, and majorities, entropies and matchings are then
taken within that subset. Every score lies in [0, 1]; an empty set scores NaN.

- :func:`purity`: each cluster votes for its majority class; the fraction of images that are in
  their cluster's majority class. Rises with the number of clusters (one image per cluster is
  pure), so compare it only between clusterings with the same number of clusters.
- :func:`nmi`: mutual information over the arithmetic mean of the two entropies (scikit-learn's
  default normalisation); 1 when both labelings are constant.
- :func:`hungarian_accuracy`: the fraction of images whose cluster is matched to their class by
  the one-to-one matching of clusters to classes that maximises it (unmatched clusters, when
  there are more clusters than classes, count as wrong).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
from scipy.optimize import linear_sum_assignment


def contingency(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Counts ``table[i, j]`` of images in the i-th distinct cluster and the j-th distinct class
    (ids in sorted order, only those present within ``mask``): a dense K×C int64 array."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.ndim != 1 or pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must be equal-length vectors")
    for name, a in (("pred", pred), ("truth", truth)):
        if not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{name} must hold integers, got {a.dtype}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != pred.shape or mask.dtype != bool:
            raise ValueError(f"mask must be {pred.shape[0]} bools, got {mask.shape} {mask.dtype}")
        pred, truth = pred[mask], truth[mask]
    clusters, rows = np.unique(pred, return_inverse=True)
    classes, cols = np.unique(truth, return_inverse=True)
    table = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int64), (rows, cols)),
                                    shape=(len(clusters), len(classes)))
    return table.toarray()


def purity(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of images whose cluster's majority class (within ``mask``) is their own."""
    return _purity(contingency(pred, truth, mask))


def nmi(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised mutual information, I(pred; truth) / ((H(pred) + H(truth)) / 2), natural log."""
    return _nmi(contingency(pred, truth, mask))


def hungarian_accuracy(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Accuracy after the best one-to-one matching of clusters to classes (linear assignment)."""
    return _accuracy(contingency(pred, truth, mask))


def cluster_scores(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """``{"purity", "nmi", "accuracy", "images"}`` of ``pred`` against ``truth`` within ``mask``
    from one contingency table (``images``: how many were scored)."""
    table = contingency(pred, truth, mask)
    return {"purity": _purity(table), "nmi": _nmi(table), "accuracy": _accuracy(table),
            "images": int(table.sum())}


# ---- on a contingency table ---------------------------------------------------------------------
def _purity(table: np.ndarray) -> float:
    total = table.sum()
    return float(table.max(axis=1).sum() / total) if total else float("nan")


def _entropy(counts: np.ndarray, total: int) -> float:
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _nmi(table: np.ndarray) -> float:
    total = int(table.sum())
    if not total:
        return float("nan")
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    h_pred, h_truth = _entropy(rows, total), _entropy(cols, total)
    if h_pred == 0 and h_truth == 0:
        return 1.0  # both constant: the same partition
    i, j = np.nonzero(table)
    joint = table[i, j] / total
    mutual = float((joint * np.log(table[i, j] * total / (rows[i] * cols[j]))).sum())
    # rounding can leave I a hair below 0 or above the mean entropy
    return float(np.clip(mutual / ((h_pred + h_truth) / 2), 0.0, 1.0))


def _accuracy(table: np.ndarray) -> float:
    total = table.sum()
    if not total:
        return float("nan")
    r, c = linear_sum_assignment(table, maximize=True)
    return float(table[r, c].sum() / total)
