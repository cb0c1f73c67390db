"""Lloyd k-means as pure math on blocks of rows, so any number of shards can run one step each.

Conventions: data rows are ``float32`` vectors of dimension d; ``centroids`` is a k x d ``float32``
array; distances are squared L2 (``||x||^2 - 2 x.c + ||c||^2``, clamped at 0); cluster ids are
``int64`` in 0..k-1. A *partial* (:class:`Partial`) holds one shard's per-cluster sums (k x d
``float64``), counts (k ``int64``) and summed distances; partials add up to the statistics of the
whole data set whatever the split (up to float rounding), so the driver only ever holds O(k·d).

One iteration, as faiss ``Clustering::train`` does it (faiss/Clustering.cpp, ClusteringHelpers.cpp):

1. every shard assigns its rows to the nearest centroid and returns a partial (:func:`lloyd_partial`);
2. the driver adds the partials (:func:`reduce_partials`) and sets each centroid to the mean of
   its members (:func:`update_centroids`);
3. an empty cluster takes a copy of a donor centroid picked with probability proportional to
   (size - 1), the two copies are pushed apart by a symmetric relative perturbation of 1/1024,
   and the donor's count is split in half for later picks (:func:`split_empty_clusters`).

Initialisation picks k distinct rows at random (:func:`init_indices`); :func:`lloyd` runs the loop
given any ``step(centroids) -> Partial`` (in-process, or fanned out to Ray actors by
:mod:`pdso_ray.kmeans`). Everything is deterministic for a seed.

Rows come as a numpy array (CPU) or a torch tensor (CPU or CUDA: the GPU path); the search kernel
(``(x_block, centroids, topk) -> (dist, ids)``, same array type as the rows, sorted nearest first)
is looked up by name in :data:`KERNELS`, and callers may add others (``pdso_ray.kmeans`` adds
faiss). torch is imported only by the torch kernel and tensor inputs, so CPU workers skip its
start-up time and memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse

if TYPE_CHECKING:
    import torch

# Relative perturbation separating a split cluster from its donor (faiss: "a bit above machine
# epsilon for float16").
SPLIT_EPS = 1.0 / 1024.0
# Rows per block: bounds the (block x k) distance matrix, and the float32 partial sums of one
# block, before they are added in float64.
BLOCK_ROWS = 16384

Rows = Any  # np.ndarray (n x d float32) or torch.Tensor of the same layout
SearchFn = Callable[[Rows, Rows, int], tuple[Rows, Rows]]


@dataclass
class Partial:
    """Sufficient statistics of one set of rows for a Lloyd update.

    ``sums``: k x d float64, sum of the rows assigned to each cluster; ``counts``: k int64;
    ``objective``: sum over the rows of the squared distance to their nearest centroid.
    """

    sums: np.ndarray
    counts: np.ndarray
    objective: float


def as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of ``x`` without copying (read-only numpy arrays from Ray's object store
    included: the k-means code never writes to its input)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(x)


def search_numpy(x: np.ndarray, centroids: np.ndarray, topk: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``topk`` nearest centroids of each row with a float32 BLAS GEMM.

    x: n x d float32; centroids: k x d float32. Returns ``(dist, ids)``, both n x topk, sorted by
    increasing distance: dist float32 squared L2 clamped at 0, ids int64.
    """
    # ||c||^2 - 2 x.c ranks the centroids of a row; ||x||^2 is added after the selection.
    scores = x @ centroids.T
    scores *= -2.0
    scores += np.einsum("ij,ij->i", centroids, centroids)
    if topk == 1:
        ids = scores.argmin(axis=1)[:, None]
    else:
        ids = np.argpartition(scores, topk - 1, axis=1)[:, :topk]
        ids = np.take_along_axis(ids, np.take_along_axis(scores, ids, 1).argsort(axis=1, kind="stable"), 1)
    dist = np.take_along_axis(scores, ids, 1) + np.einsum("ij,ij->i", x, x)[:, None]
    return np.maximum(dist, 0.0, dtype=np.float32), ids.astype(np.int64)


def search_torch(x: torch.Tensor, centroids: torch.Tensor, topk: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`search_numpy` on torch tensors, on the rows' device (CPU or CUDA)."""
    import torch

    c_sq = (centroids * centroids).sum(1)
    scores = torch.addmm(c_sq.unsqueeze(0), x, centroids.T, beta=1.0, alpha=-2.0)
    if topk == 1:
        dist, ids = scores.min(dim=1, keepdim=True)
    else:
        dist, ids = torch.topk(scores, topk, dim=1, largest=False, sorted=True)
    dist = (dist + (x * x).sum(1, keepdim=True)).clamp_(min=0.0)
    return dist, ids


KERNELS: dict[str, SearchFn] = {"numpy": search_numpy, "torch": search_torch}


def _numpy(a: Rows) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


def _like(c: np.ndarray | Rows, x: Rows) -> Rows:
    """Centroids in the rows' array type (and device)."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(_numpy(c), dtype=np.float32)
    return as_tensor(c).to(x.device)


def _check_centroids(centroids: Rows, d: int) -> None:
    if centroids.ndim != 2 or centroids.shape[1] != d or centroids.shape[0] < 1:
        raise ValueError(f"centroids must be k x {d}, got shape {tuple(centroids.shape)}")


def _cluster_sums(xb: Rows, ids: Rows, k: int) -> np.ndarray:
    """k x d float32 sums of the rows of ``xb`` per cluster id."""
    if not isinstance(xb, np.ndarray) and xb.is_cuda:
        import torch

        # index_add_ uses atomics on CUDA (run-to-run rounding noise); a one-hot GEMM is
        # deterministic and costs no more than the distance GEMM itself.
        onehot = torch.zeros(k, xb.shape[0], device=xb.device, dtype=xb.dtype)
        onehot[ids, torch.arange(xb.shape[0], device=xb.device)] = 1.0
        return (onehot @ xb).cpu().numpy()
    # On CPU a sparse one-hot product adds the rows in order (deterministic) on one thread: 6 ms
    # for 16384 x 384 into 300 clusters, where torch's index_add_ takes 4 ms on one thread but
    # 45 ms on two busy cores, np.add.at 97 ms and a float64 reduceat 27 ms.
    b = xb.shape[0]
    onehot = scipy.sparse.csr_matrix((np.ones(b, dtype=np.float32), (_numpy(ids), np.arange(b))), shape=(k, b))
    return np.asarray(onehot @ _numpy(xb))


def lloyd_partial(x: Rows, centroids: Rows, search: SearchFn = search_numpy, block_rows: int = BLOCK_ROWS) -> Partial:
    """Assign every row of ``x`` (n x d float32, numpy or torch) to its nearest centroid (k x d
    float32) and return the partial statistics. ``search`` must accept ``x``'s array type."""
    c = _like(centroids, x)
    _check_centroids(c, x.shape[1])
    k, d = c.shape
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    objective = 0.0
    for start in range(0, x.shape[0], block_rows):
        xb = x[start : start + block_rows]
        dist, ids = search(xb, c, 1)
        ids = ids[:, 0]
        sums += _cluster_sums(xb, ids, k)
        counts += np.bincount(_numpy(ids), minlength=k)
        objective += float(_numpy(dist).sum(dtype=np.float64))
    return Partial(sums, counts, objective)


def search_blocks(
    x: Rows, centroids: Rows, topk: int = 1, search: SearchFn = search_numpy, block_rows: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """The ``topk`` nearest centroids of every row of ``x``, block by block.

    Returns ``(ids, dist)`` as numpy arrays, n x topk: ids int64, dist float32 (squared L2),
    nearest first.
    """
    c = _like(centroids, x)
    _check_centroids(c, x.shape[1])
    if not 1 <= topk <= c.shape[0]:
        raise ValueError(f"topk must be in 1..{c.shape[0]} (the number of centroids), got {topk}")
    ids = np.empty((x.shape[0], topk), dtype=np.int64)
    dist = np.empty((x.shape[0], topk), dtype=np.float32)
    for start in range(0, x.shape[0], block_rows):
        db, ib = search(x[start : start + block_rows], c, topk)
        ids[start : start + ib.shape[0]] = _numpy(ib)
        dist[start : start + db.shape[0]] = _numpy(db)
    return ids, dist


def reduce_partials(parts: Iterable[Partial]) -> Partial:
    """Sum partials in the order given (a fixed order keeps the float64 sums reproducible)."""
    parts = list(parts)
    if not parts:
        raise ValueError("reduce_partials needs at least one partial, got none")
    sums = parts[0].sums.astype(np.float64, copy=True)
    counts = parts[0].counts.astype(np.int64, copy=True)
    objective = float(parts[0].objective)
    for p in parts[1:]:
        if p.sums.shape != sums.shape:
            raise ValueError(f"partials disagree on k x d: {p.sums.shape} vs {sums.shape}")
        sums += p.sums
        counts += p.counts
        objective += float(p.objective)
    return Partial(sums, counts, objective)


def split_empty_clusters(
    centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator, eps: float = SPLIT_EPS
) -> tuple[np.ndarray, int]:
    """Give every empty cluster (count 0) a perturbed copy of a populated one, as faiss does.

    Empty clusters are handled in id order; each picks a donor with probability proportional to
    (count - 1) (the largest cluster if every count is <= 1), takes its centroid times
    (1 + eps, 1 - eps, 1 + eps, ...) while the donor gets (1 - eps, 1 + eps, ...), and takes half
    the donor's count, so later empty clusters see the split. centroids: k x d float32 (not
    modified); counts: k, sum n >= k. Returns the new centroids and the number of splits.
    """
    k = centroids.shape[0]
    sizes = np.asarray(counts, dtype=np.float64).copy()
    if sizes.shape != (k,):
        raise ValueError(f"counts must have shape ({k},), got {sizes.shape}")
    if sizes.sum() < k:
        raise ValueError(f"need at least k={k} points to fill every cluster, got {sizes.sum():g}")
    out = np.array(centroids, dtype=np.float32, copy=True)
    up = np.ones(out.shape[1], dtype=np.float32)
    up[0::2] += eps
    up[1::2] -= eps
    down = (2.0 - up).astype(np.float32)  # 1 - eps on even coordinates, 1 + eps on odd ones
    empty = np.flatnonzero(sizes == 0)
    for ci in empty:
        weights = np.maximum(sizes - 1.0, 0.0)
        total = weights.sum()
        donor = int(rng.choice(k, p=weights / total)) if total > 0 else int(np.argmax(sizes))
        out[ci] = out[donor] * up
        out[donor] = out[donor] * down
        sizes[ci] = sizes[donor] / 2
        sizes[donor] -= sizes[ci]
    return out, int(empty.size)


def update_centroids(part: Partial, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """New k x d float32 centroids from reduced statistics: the mean of each cluster's rows, and
    empty clusters split off populated ones (:func:`split_empty_clusters`). Returns
    ``(centroids, number of splits)``."""
    counts = part.counts
    means = np.zeros(part.sums.shape, dtype=np.float64)
    filled = counts > 0
    means[filled] = part.sums[filled] / counts[filled, None]
    return split_empty_clusters(means.astype(np.float32), counts, rng)


def init_indices(n: int, k: int, seed: int, redo: int = 0) -> np.ndarray:
    """k distinct row indices in 0..n-1 (int64), random for (seed, redo): the initial centroids."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got {k}")
    rng = np.random.default_rng([seed, redo, 0x1D17])
    return rng.choice(n, size=k, replace=False).astype(np.int64)


def sample_indices(n: int, k: int, max_points_per_centroid: int | None, seed: int) -> np.ndarray | None:
    """The rows k-means trains on when the data is larger than ``k * max_points_per_centroid``
    (faiss's subsampling): sorted distinct int64 indices, or None to train on all n rows."""
    if max_points_per_centroid is None or n <= k * max_points_per_centroid:
        return None
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")
    rng = np.random.default_rng([seed, 0x5A3B])
    return np.sort(rng.choice(n, size=k * max_points_per_centroid, replace=False)).astype(np.int64)


def split_by_offsets(indices: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Split sorted global row indices into per-shard local indices, for shards of the given
    sizes laid end to end."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    cuts = np.searchsorted(indices, bounds)
    return [indices[cuts[i] : cuts[i + 1]] - bounds[i] for i in range(len(sizes))]


def lloyd(
    step: Callable[[np.ndarray], Partial],
    centroids: np.ndarray,
    niter: int,
    seed: int,
    redo: int = 0,
    on_iteration: Callable[[int, float, int], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Run up to ``niter`` Lloyd iterations from ``centroids`` (k x d float32).

    ``step(centroids)`` returns the reduced :class:`Partial` of the training rows for the given
    centroids. Stops early once an update leaves the centroids unchanged (the assignment is then
    a fixed point). ``on_iteration(i, objective, nsplit)`` is called after each update. Returns
    the final centroids and the objective of each iteration (measured before its update, as
    faiss reports it).
    """
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    history: list[float] = []
    for i in range(niter):
        part = step(centroids)
        history.append(part.objective)
        new, nsplit = update_centroids(part, np.random.default_rng([seed, redo, i, 0x5B17]))
        if on_iteration is not None:
            on_iteration(i, part.objective, nsplit)
        if np.array_equal(new, centroids):
            break
        centroids = new
    return centroids, history
