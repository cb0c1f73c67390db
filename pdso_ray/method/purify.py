"""Cluster-aware sample purification, CSD (DESIGN §3.4), as pure rules over k-means outputs.

On the embeddings e(x) of all N images (:func:`pdso_ray.method.denoise.embed_features`):

1. k-means #2 with K = C clusters -> assignment and distance to the centroid of every image;
2. :func:`distance_filter` drops, per cluster, the images beyond the ``dist_quantile`` quantile of
   its distances; :func:`cap_large_clusters` keeps at most ``floor(alpha·N/K)`` images of any
   cluster (its closest). Both rules are computed on the k-means #2 clusters of all N images and
   intersected, so their order does not matter: a cluster keeps its
   ``min(ceil(q·n_c), floor(alpha·N/K))`` closest members;
3. k-means #3 on the kept images gives the final C centroids;
4. every image (kept or not) is assigned to its nearest final centroid and stores its ``topk``
   nearest centroid ids and distances (:func:`pdso_ray.method.kmeans_math.search_blocks`), used by
   pixel labelling and SPO.

Distances are squared Euclidean (the k-means objective's unit; on L2-normalised embeddings
``2 - 2·cos``). The rules use only the order of distances within a cluster, so any increasing
function of the distance (Euclidean, squared, cosine distance) gives the same masks.

:func:`purify` composes the steps with a k-means passed in, ``kmeans_fn(x, k, seed) -> (centroids
k×d, assignments (n,), sq_distances (n,))``: the distributed k-means in production, a small
in-process one in tests. At ImageNet scale the stage calls the rules itself between distributed
k-means runs: step 2's masks need only O(N) assignments and distances, and step 4's search runs
per shard where the embeddings live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pdso_ray.method.selection import keep_lowest_per_group
from pdso_ray.method.kmeans_math import search_blocks

KMeansFn = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _check(dist: np.ndarray, assignments: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist, assignments = np.asarray(dist), np.asarray(assignments)
    if dist.ndim != 1 or dist.shape != assignments.shape:
        raise ValueError(f"dist {dist.shape} and assignments {assignments.shape} must be equal-length vectors")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(assignments) and (assignments.min() < 0 or assignments.max() >= k):
        raise ValueError(f"assignments must lie in [0, {k}), got [{assignments.min()}, {assignments.max()}]")
    return dist, assignments.astype(np.int64, copy=False)


def distance_filter(dist: np.ndarray, assignments: np.ndarray, k: int, quantile: float) -> np.ndarray:
    """Per cluster, keep the images at or below the ``quantile`` of its distances.

    The quantile is the order statistic ("inverted CDF" definition): a cluster of n_c images keeps
    its ``ceil(quantile · n_c)`` closest (ties: lower index first), hence at least one, and all of
    them when ``quantile`` = 1.

    Args:
        dist: (N,) distance of each image to its centroid.
        assignments: (N,) cluster ids in [0, k).
        quantile: in (0, 1].

    Returns:
        (N,) bool keep mask.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    dist, assignments = _check(dist, assignments, k)
    counts = np.bincount(assignments, minlength=k)
    keep = np.ceil(np.round(quantile * counts, 9)).astype(np.int64)  # round: 0.7 * 10 = 7.000...01
    return keep_lowest_per_group(dist, assignments, keep)


def cluster_cap(n_total: int, k: int, alpha: float) -> int:
    """Most images one cluster may keep: ``floor(alpha · n_total / k)``, at least 1."""
    if alpha <= 0 or k < 1 or n_total < 0:
        raise ValueError(f"bad cap settings: n_total={n_total} k={k} alpha={alpha}")
    return max(1, int(np.floor(np.round(alpha * n_total / k, 9))))


def cap_large_clusters(assignments: np.ndarray, dist: np.ndarray, k: int, alpha: float,
                       n_total: int | None = None) -> np.ndarray:
    """Clusters holding more than :func:`cluster_cap` images keep only that many, the closest.

    Args:
        assignments: (N,) cluster ids in [0, k).
        dist: (N,) distance of each image to its centroid.
        alpha: allowed multiple of the mean cluster size N/k (default 2 in DESIGN).
        n_total: the N of the cap; ``None`` = ``len(assignments)``. Passing the same ``n_total``
            makes the rule idempotent (a capped set is left unchanged).

    Returns:
        (N,) bool keep mask (clusters at or under the cap keep everything).
    """
    dist, assignments = _check(dist, assignments, k)
    cap = cluster_cap(len(assignments) if n_total is None else n_total, k, alpha)
    return keep_lowest_per_group(dist, assignments, np.full(k, cap, dtype=np.int64))


@dataclass
class PurifyResult:
    """Outcome of CSD over N images (K = number of classes).

    Attributes:
        centroids: K×d float32 final centroids (k-means #3 on the kept images).
        assignments: (N,) int64 nearest final centroid of every image (= ``topk_ids[:, 0]``).
        kept: (N,) bool survived purification (k-means #3's training set).
        topk_ids: N×t int64 nearest final centroids, nearest first (t = min(topk, K)).
        topk_dist: N×t float32 their squared distances.
    """

    centroids: np.ndarray
    assignments: np.ndarray
    kept: np.ndarray
    topk_ids: np.ndarray
    topk_dist: np.ndarray


def purify(x: np.ndarray, k: int, kmeans_fn: KMeansFn, *, dist_quantile: float, alpha: float,
           topk: int, seed: int) -> PurifyResult:
    """k-means #2, both purification rules, k-means #3 on the kept set, top-k assignment.

    Args:
        x: N×d float32 embeddings (L2-normalised, from h).
        k: number of clusters C.
        kmeans_fn: ``(x, k, seed) -> (centroids, assignments, squared distances)``.
        dist_quantile, alpha, topk, seed: see the module docstring; k-means #3 uses ``seed + 1``.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"need an N×d array with N >= k={k}, got shape {x.shape}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    _, assign2, dist2 = kmeans_fn(x, k, seed)
    kept = distance_filter(dist2, assign2, k, dist_quantile) & cap_large_clusters(assign2, dist2, k, alpha)
    if kept.sum() < k:
        raise ValueError(f"purification kept {int(kept.sum())} images, fewer than k={k}: raise "
                         f"dist_quantile ({dist_quantile}) or alpha ({alpha})")
    centroids, _, _ = kmeans_fn(x[kept], k, seed + 1)
    ids, dists = search_blocks(x, np.asarray(centroids, dtype=np.float32), min(topk, k))
    return PurifyResult(centroids=np.asarray(centroids, dtype=np.float32), assignments=ids[:, 0].copy(),
                        kept=kept, topk_ids=ids, topk_dist=dists)
