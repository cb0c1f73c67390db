"""Cluster-aware sample purification, CSD (docs/method.md §4), as pure rules over k-means outputs.

On the embeddings e(x) of all N images (:func:`pdso_ray.method.denoise.embed_features`):

1. k-means #2 with K = C clusters -> assignment of every image and its distance to the centroid,
   or (``kept_distance="mean"``, :func:`cluster_means`, :func:`assigned_distances`) to the mean
   of its cluster's members: from prototypes with 0 iterations the centroid is h's class
   direction, and the members' mean ranked a purer kept set (docs/method.md §4);
2. :func:`distance_filter` drops, per cluster, the images beyond the ``dist_quantile`` quantile of
   its distances; :func:`cap_large_clusters` keeps at most ``floor(alpha·N/K)`` images of any
   cluster (its closest). Both rules are computed on the k-means #2 clusters of all N images and
   intersected (:func:`purification_mask`), so their order does not matter: a cluster keeps its
   ``min(ceil(q·n_c), floor(alpha·N/K))`` closest members;
3. k-means #3 on the kept images gives the final C centroids;
4. every image (kept or not) is assigned to its nearest final centroid and stores its ``topk``
   nearest centroid ids and distances (:func:`pdso_ray.method.kmeans_math.search_blocks`), used by
   pixel labelling and SPO.

Where k-means #2 and #3 start (``init`` of :func:`purify`): from random rows, best of ``nredo``
by objective, ``niter`` Lloyd iterations each (the paper), or from h's class prototypes (its
cosine-head class directions, :func:`pdso_ray.method.denoise.head_prototypes`, or its mean
embedding of each class, :func:`pdso_ray.method.denoise.class_prototypes`, completed by
:func:`fill_missing_prototypes`) for #2 and from #2's centroids for #3, with their own iteration
counts. Random starts re-roll the local minimum DFF's labels had settled: in h's
embedding, where classes are compact, Lloyd cannot move a centroid from one class to another, so
every class that draws no initial row is merged into a neighbour and every class that draws two
is split (measured in benchmarks/denoise_purify_quality.py: a random k-means #3 undid the gain
of the kept set). From prototypes (the defaults, ``purify.prototype_niter2/3`` = 0), 0 iterations of
#2 assign every image to its nearest prototype (with h's class directions as prototypes: h's own
partition) and 0 iterations of #3 keep #2's centroids as the final ones: measured, Lloyd
iterations of #2 on all N images lower the kept set's purity, and a Lloyd step of #3 on the kept
images (each centroid the mean of its kept members) lowers the final assignment's purity
(docs/method.md §4). That needs an h fitted well enough to be final: on small data DFF's heads
get a floor of optimiser steps (``denoise.min_steps``).

Distances are squared Euclidean (the k-means objective's unit; on L2-normalised embeddings
``2 - 2·cos``). The rules use only the order of distances within a cluster, so any increasing
function of the distance (Euclidean, squared, cosine distance) gives the same masks.

:func:`purify` composes the steps with a k-means passed in, ``kmeans_fn(x, k, *, seed, nredo, niter,
init) -> (centroids k×d, assignments (n,), sq_distances (n,))`` (``init``: k×d starting
centroids, or None for random rows; ``niter`` 0 with an ``init`` returns ``init`` itself): the
distributed k-means in production, a small in-process one in tests. At ImageNet scale the stage
calls the rules itself between distributed k-means runs: step 2's masks need only O(N)
assignments and distances, and step 4's search runs per shard where the embeddings live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pdso_ray.method.selection import keep_lowest_per_group
from pdso_ray.method.kmeans_math import search_blocks

KMeansFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
# What the rules measure each image's distance to (``purify.kept_distance``): the mean e(x) of its
# k-means #2 cluster's members, or the #2 centroid itself (from prototypes with 0 iterations: h's
# class direction).
KEPT_DISTANCES = ("mean", "centroid")


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
        alpha: allowed multiple of the mean cluster size N/k (default 2, ``purify.alpha``; docs/method.md §4).
        n_total: the N of the cap; ``None`` = ``len(assignments)``. Passing the same ``n_total``
            makes the rule idempotent (a capped set is left unchanged).

    Returns:
        (N,) bool keep mask (clusters at or under the cap keep everything).
    """
    dist, assignments = _check(dist, assignments, k)
    cap = cluster_cap(len(assignments) if n_total is None else n_total, k, alpha)
    return keep_lowest_per_group(dist, assignments, np.full(k, cap, dtype=np.int64))


def purification_mask(dist: np.ndarray, assignments: np.ndarray, k: int, dist_quantile: float, alpha: float,
                      n_total: int | None = None) -> np.ndarray:
    """Both rules on one clustering, intersected: :func:`distance_filter` and
    :func:`cap_large_clusters`. Returns the (N,) bool keep mask."""
    return (distance_filter(dist, assignments, k, dist_quantile)
            & cap_large_clusters(assignments, dist, k, alpha, n_total))


def cluster_means(sums: np.ndarray, counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """k×d float32 mean of each cluster's members from their sums (k×d) and counts (k,); an
    empty cluster keeps its ``fallback`` row (it has no member whose distance it would rank)."""
    sums, counts, fallback = np.asarray(sums, np.float64), np.asarray(counts), np.asarray(fallback, np.float32)
    if sums.ndim != 2 or counts.shape != (len(sums),) or fallback.shape != sums.shape:
        raise ValueError(f"sums {sums.shape}, counts {counts.shape} and fallback {fallback.shape} "
                         "must be k×d, (k,) and k×d")
    filled = counts > 0
    out = fallback.copy()
    out[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return out


def assigned_distances(x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray,
                       block_rows: int = 16384) -> np.ndarray:
    """(n,) float32 squared distance of every row of ``x`` (n×d) to ``centroids[assignments]``
    (k×d; its own centroid, not the nearest one), block by block (memory: block_rows×d)."""
    x, centroids = np.asarray(x, np.float32), np.asarray(centroids, np.float32)
    assignments = np.asarray(assignments, np.int64)
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1] or assignments.shape != (len(x),):
        raise ValueError(f"x {x.shape}, centroids {centroids.shape}, assignments {assignments.shape} do not fit")
    out = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), block_rows):
        diff = x[start:start + block_rows] - centroids[assignments[start:start + block_rows]]
        out[start:start + block_rows] = np.einsum("nd,nd->n", diff, diff)
    return out


def fill_missing_prototypes(prototypes: np.ndarray, counts: np.ndarray, take_rows: Callable[[np.ndarray], np.ndarray],
                            n_rows: int, seed: int) -> np.ndarray:
    """Starting centroids from class prototypes: classes with no member (``counts`` 0) take
    distinct random rows instead, as a random start would.

    Args:
        prototypes: k×d mean embedding of each class.
        counts: (k,) members behind each prototype.
        take_rows: maps sorted global row ids to their rows (m×d): ``x.__getitem__`` in memory,
            ``KMeansShards.rows`` over shards.
        n_rows: N, the rows to draw from.
        seed: for the draw.

    Returns:
        k×d float32 centroids.
    """
    prototypes, counts = np.asarray(prototypes, dtype=np.float32), np.asarray(counts)
    k = prototypes.shape[0]
    if prototypes.ndim != 2 or counts.shape != (k,):
        raise ValueError(f"prototypes {prototypes.shape} and counts {counts.shape} must be k×d and (k,)")
    missing = np.flatnonzero(counts == 0)
    out = prototypes.copy()
    if len(missing):
        if len(missing) > n_rows:
            raise ValueError(f"{len(missing)} classes have no prototype, more than the {n_rows} rows to draw from")
        rows = np.sort(np.random.default_rng([seed, 0x9F07]).choice(n_rows, len(missing), replace=False))
        out[missing] = np.asarray(take_rows(rows), dtype=np.float32)
    return out


@dataclass
class PurifyResult:
    """Outcome of CSD over N images (K = number of classes).

    Attributes:
        centroids: K×d float32 final centroids (k-means #3 on the kept images).
        assignments: (N,) int64 nearest final centroid of every image (= ``topk_ids[:, 0]``).
        assignments2: (N,) int64 k-means #2 cluster of every image (what the rules ran on).
        kept: (N,) bool survived purification (k-means #3's training set).
        topk_ids: N×t int64 nearest final centroids, nearest first (t = min(topk, K)).
        topk_dist: N×t float32 their squared distances.
    """

    centroids: np.ndarray
    assignments: np.ndarray
    assignments2: np.ndarray
    kept: np.ndarray
    topk_ids: np.ndarray
    topk_dist: np.ndarray


def purify(x: np.ndarray, k: int, kmeans_fn: KMeansFn, *, dist_quantile: float, alpha: float,
           topk: int, seed: int, nredo: int = 1, niter: tuple[int, int] = (20, 20),
           init: np.ndarray | None = None, kept_distance: str = "centroid",
           apply_rules: bool = True) -> PurifyResult:
    """k-means #2, both purification rules, k-means #3 on the kept set, top-k assignment.

    Args:
        x: N×d float32 embeddings (L2-normalised, from h).
        k: number of clusters C.
        kmeans_fn: ``(x, k, *, seed, nredo, niter, init) -> (centroids, assignments, squared
            distances)``.
        dist_quantile, alpha, topk, seed: see the module docstring; k-means #3 uses ``seed + 1``.
        nredo: restarts of each k-means when ``init`` is None.
        niter: Lloyd iterations of k-means #2 and #3 (0 only with an ``init``).
        init: k×d starting centroids of k-means #2 (e.g. :func:`fill_missing_prototypes`); k-means
            #3 then starts from #2's centroids. None: both start from random rows.
        kept_distance: the rules rank each #2 cluster's images by squared distance to its
            centroid or to the mean of its members (:data:`KEPT_DISTANCES`).
        apply_rules: False keeps every image (``purify.filter``).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"need an N×d array with N >= k={k}, got shape {x.shape}")
    if topk < 1 or nredo < 1:
        raise ValueError(f"topk and nredo must be >= 1, got topk={topk} nredo={nredo}")
    if init is not None and np.shape(init) != (k, x.shape[1]):
        raise ValueError(f"init must be {k}×{x.shape[1]}, got shape {np.shape(init)}")
    if len(niter) != 2 or min(niter) < (0 if init is not None else 1):
        raise ValueError(f"niter must be two iteration counts, >= 1 for random starts, got {niter}")
    if kept_distance not in KEPT_DISTANCES:
        raise ValueError(f"kept_distance must be one of {KEPT_DISTANCES}, got {kept_distance!r}")
    restarts = 1 if init is not None else nredo
    centroids2, assign2, dist2 = kmeans_fn(x, k, seed=seed, nredo=restarts, niter=niter[0], init=init)
    if kept_distance == "mean":
        assign2 = np.asarray(assign2, dtype=np.int64)
        sums = np.zeros((k, x.shape[1]), dtype=np.float64)
        np.add.at(sums, assign2, x)
        means = cluster_means(sums, np.bincount(assign2, minlength=k), centroids2)
        dist2 = assigned_distances(x, means, assign2)
    kept = (purification_mask(dist2, assign2, k, dist_quantile, alpha) if apply_rules
            else np.ones(len(x), dtype=bool))
    if kept.sum() < k:
        raise ValueError(f"purification kept {int(kept.sum())} images, fewer than k={k}: raise "
                         f"dist_quantile ({dist_quantile}) or alpha ({alpha})")
    init3 = None if init is None else np.asarray(centroids2, dtype=np.float32)
    centroids, _, _ = kmeans_fn(x[kept], k, seed=seed + 1, nredo=restarts, niter=niter[1], init=init3)
    ids, dists = search_blocks(x, np.asarray(centroids, dtype=np.float32), min(topk, k))
    return PurifyResult(centroids=np.asarray(centroids, dtype=np.float32), assignments=ids[:, 0].copy(),
                        assignments2=np.asarray(assign2, dtype=np.int64), kept=kept, topk_ids=ids, topk_dist=dists)
