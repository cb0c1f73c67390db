"""Distributed k-means: the math of :mod:`pdso_ray.method.kmeans_math`, fanned out to Ray actors.

The data is split into shards; each shard lives in one :class:`KMeansShard` actor, in its own
bundle of a ``SPREAD`` placement group so the shards use every node (the group is placed at once
with the whole cluster in view; per-actor ``"SPREAD"`` scheduling is decided actor by actor on a
possibly stale resource view and was seen to stack two shards on one node). Per iteration the
driver sends the k x d centroids, each actor returns its partial sums (k x d float64), counts and
objective, and the driver reduces them and updates the centroids: the driver's memory stays
O(k·d), plus the final n-vector of assignments that the result returns.

This module is the API (:func:`kmeans`, :func:`assign`); the actors and their driver-side handle
live in :mod:`pdso_ray.kmeans.shards`, the row sources they load in :mod:`pdso_ray.kmeans.sources`,
the search kernels in :mod:`pdso_ray.kmeans.search`.

Inputs: a float32 numpy array (n x d), a Parquet file / folder URL or a list of Parquet URLs with
a list<float32> column (default ``feat``), a Ray Dataset with such a column, or a
:class:`KMeansShards` built once and reused by several calls (k-means, then ``nearest``). Rows are
numbered in input order (files in the order given, Ray Data blocks in ``to_arrow_refs`` order).
Arrays of at most IN_PROCESS_MAX_ROWS rows, or ``num_shards=0``, run the same code in this process
without Ray.

Fault tolerance: actors have ``max_restarts`` and ``max_task_retries``; the constructor (re)loads
the shard from its source (an object-store reference, the Parquet URLs, or Ray Data block
references), so a killed actor comes back with the same rows and the interrupted call is retried:
the result is identical to an uninterrupted run. Ray logs a warning for actors whose constructor
arguments hold object references (ray#53727: such references are not kept alive for restarts);
:class:`KMeansShards` holds them itself for the actors' lifetime.

Reproducibility: the same data, shards and seed give bit-identical results. Another split into
shards changes the float32 rounding of the partial sums, so runs may drift apart by a few
assignments (objectives agree to ~1e-4 relative).

Kernels (``kernel=``): ``"faiss"`` (faiss CPU brute force: BLAS GEMM plus a fused arg-min; the
fastest on CPU, 0.16 s vs 0.19 s numpy vs 0.25 s torch for 50k x 384 rows against 300 centroids on
one core), ``"numpy"`` (float32 BLAS GEMM plus arg-min) and ``"torch"`` (GEMM plus ``min``/``topk``
on the shard's device; the default on GPU, where each shard is copied to its GPU once and stays
resident, so a step moves only the centroids and the k x d partials; faiss-gpu would run the same
cuBLAS GEMM). ``None`` picks torch on GPU, else faiss when it is installed, else numpy. CPU shards
never import torch (start-up time and a few hundred MB per actor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from pdso_ray.kmeans.shards import KMeansShards
from pdso_ray.kmeans.sources import describe
from pdso_ray.method import kmeans_math as km
from pdso_ray.storage import Storage

if TYPE_CHECKING:
    from pdso_ray.kmeans.shards import Assignment


@dataclass
class KMeansResult:
    """centroids: k x d float32; assignments: n int64 (nearest final centroid of every row, in
    input order); objective: sum over all rows of the squared L2 distance to that centroid;
    counts: k int64 cluster sizes; history: the training objective of each iteration of the kept
    restart (before its update, as faiss reports ``obj``)."""

    centroids: np.ndarray
    assignments: np.ndarray
    objective: float
    counts: np.ndarray
    history: list[float] = field(default_factory=list)


@contextmanager
def _opened(x: Any, num_shards: int | None, **options: Any) -> Iterator[KMeansShards]:
    if isinstance(x, KMeansShards):
        yield x
        return
    with KMeansShards.create(x, num_shards, **options) as shards:
        yield shards


# ---- public API ---------------------------------------------------------------------------------
def kmeans(
    x: Any,
    k: int,
    niter: int = 20,
    nredo: int = 1,
    seed: int = 0,
    num_shards: int | None = None,
    *,
    column: str = "feat",
    storage: Storage | None = None,
    max_points_per_centroid: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_shard: float = 1.0,
    kernel: str | None = None,
    progress: bool = True,
    on_iteration: Callable[[int, int, float], None] | None = None,
    subset: np.ndarray | None = None,
    row_order: np.ndarray | None = None,
) -> KMeansResult:
    """Lloyd k-means (squared L2) of the rows of ``x``, faiss-style, over shard actors.

    x: see :class:`KMeansShards` (array n x d float32, Parquet URL(s) + ``column``, Ray Dataset,
    or KMeansShards; with KMeansShards the sharding options are not used). Initial centroids are k
    distinct random training rows; ``niter`` iterations (fewer if the centroids stop changing);
    empty clusters are split off large ones; of ``nredo`` restarts the one with the lowest final
    training objective is kept. Training rows: all rows, or ``subset`` (global row ids, or an
    n-long bool mask; e.g. the images that survived purification), further cut to a random
    k * ``max_points_per_centroid`` of them when there are more (faiss does this by default with
    256; None: never). Assignments, counts and objective always cover every row of ``x``.
    Deterministic for a seed and the same shards. ``row_order``: the rows in a canonical order (a
    permutation of the global row ids, e.g. by image id, :func:`pdso_ray.tables.id_order`); the
    random starts are drawn as positions in it, so the same data in another row order starts
    from the same rows. ``on_iteration(redo, iteration, objective)`` is called after each iteration.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if nredo < 1:
        raise ValueError(f"nredo must be >= 1, got {nredo}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    options = dict(column=column, storage=storage, use_gpu=use_gpu, cpus_per_shard=cpus_per_shard, kernel=kernel)
    with _opened(x, num_shards, **options) as shards:
        train = _training_rows(shards.n, k, subset, max_points_per_centroid, seed)
        samples = None if train is None else shards.put_per_shard(km.split_by_offsets(train, shards.sizes))
        n_train = shards.n if train is None else train.size
        starts = train if row_order is None else _in_order(row_order, train, shards.n)

        best: tuple[float, np.ndarray, list[float]] | None = None
        for redo in range(nredo):
            init = km.init_indices(n_train, k, seed, redo)
            start = shards.rows(init if starts is None else starts[init])
            desc = f"k-means k={k}" + (f" run {redo + 1}/{nredo}" if nredo > 1 else "")
            with tqdm(total=niter, desc=desc, disable=not progress, leave=False) as bar:

                def report(i: int, objective: float, nsplit: int, redo: int = redo) -> None:
                    bar.set_postfix(objective=f"{objective:.6g}", split=nsplit, refresh=False)
                    bar.update(1)  # redraws at most every 0.1 s
                    if on_iteration is not None:
                        on_iteration(redo, i, objective)

                centroids, history = km.lloyd(lambda c: shards.step(c, samples), start, niter, seed, redo, report)
            final = history[-1] if history else math.inf
            if best is None or final < best[0]:
                best = (final, centroids, history)

        _, centroids, history = best
        nearest = shards.nearest(centroids, 1)
    assignments = nearest.ids[:, 0]
    return KMeansResult(
        centroids=centroids,
        assignments=assignments,
        objective=float(nearest.distances[:, 0].sum(dtype=np.float64)),
        counts=np.bincount(assignments, minlength=k).astype(np.int64),
        history=history,
    )


def _in_order(row_order: np.ndarray, train: np.ndarray | None, n: int) -> np.ndarray:
    """The training rows (all, or the sorted ids ``train``) in the order of ``row_order``."""
    row_order = np.asarray(row_order, dtype=np.int64)
    if row_order.shape != (n,) or not np.array_equal(np.sort(row_order), np.arange(n)):
        raise ValueError(f"row_order must be a permutation of 0..{n - 1}")
    return row_order if train is None else row_order[np.isin(row_order, train)]


def _training_rows(
    n: int, k: int, subset: np.ndarray | None, max_points_per_centroid: int | None, seed: int
) -> np.ndarray | None:
    """Sorted global ids of the rows k-means trains on, or None for all n rows."""
    if subset is None:
        train = None
    else:
        subset = np.asarray(subset)
        if subset.dtype == bool:
            if subset.shape != (n,):
                raise ValueError(f"a bool subset must have shape ({n},), got {subset.shape}")
            subset = np.flatnonzero(subset)
        if subset.ndim != 1 or not (subset.size == 0 or np.issubdtype(subset.dtype, np.integer)):
            raise ValueError(f"subset must be 1-D integer row ids, got shape {subset.shape} {subset.dtype}")
        train = np.unique(subset).astype(np.int64)
        if train.size != subset.size:
            raise ValueError(f"subset repeats {subset.size - train.size} row ids")
        if train.size and (train[0] < 0 or train[-1] >= n):
            raise ValueError(f"subset holds row ids outside 0..{n - 1}: {train[0]}..{train[-1]}")
    n_train = n if train is None else train.size
    if k > n_train:
        raise ValueError(f"k={k} exceeds the number of training rows {n_train}")
    sample = km.sample_indices(n_train, k, max_points_per_centroid, seed)
    if sample is None:
        return train
    return sample if train is None else train[sample]


def assign(
    x: Any,
    centroids: np.ndarray,
    topk: int = 1,
    num_shards: int | None = None,
    *,
    column: str = "feat",
    storage: Storage | None = None,
    use_gpu: bool | None = None,
    cpus_per_shard: float = 1.0,
    kernel: str | None = None,
) -> Assignment:
    """The ``topk`` nearest of ``centroids`` (k x d float32) for every row of ``x`` (same inputs
    as :func:`kmeans`), shard-parallel. Returns :class:`Assignment` (ids, distances), n x topk,
    in input row order, nearest first."""
    centroids = np.asarray(centroids)
    if centroids.ndim != 2 or centroids.dtype != np.float32:
        raise ValueError(f"centroids must be a k x d float32 array, got {describe(centroids)}")
    if not 1 <= topk <= centroids.shape[0]:
        raise ValueError(f"topk must be in 1..{centroids.shape[0]} (the number of centroids), got {topk}")
    options = dict(column=column, storage=storage, use_gpu=use_gpu, cpus_per_shard=cpus_per_shard, kernel=kernel)
    with _opened(x, num_shards, **options) as shards:
        if shards.n and shards.d != centroids.shape[1]:
            raise ValueError(f"centroids have dimension {centroids.shape[1]}, the rows {shards.d}")
        return shards.nearest(centroids, topk)
