"""The shard actors of distributed k-means and the driver-side handle on them
(:class:`KMeansShards`); see :mod:`pdso_ray.kmeans.api` for the design."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdso_ray.kmeans.search import kernels, resolve_kernel
from pdso_ray.kmeans.sources import classify_input, describe, split_sources, whole_source
from pdso_ray.method import kmeans_math as km
from pdso_ray.method.purify import assigned_distances
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")

# Arrays up to this many rows run in-process when num_shards is None (Ray's start-up would cost
# more than the work).
IN_PROCESS_MAX_ROWS = 65_536
MAX_SHARDS = 256
MIN_ROWS_PER_SHARD = 4096
DEFAULT_MAX_RESTARTS = 3


class Assignment(NamedTuple):
    """ids: n x topk int64 centroid ids, nearest first; distances: n x topk float32 squared L2."""

    ids: np.ndarray
    distances: np.ndarray


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- one shard ----------------------------------------------------------------------------------
class KMeansShard:
    """One shard of rows and the k-means work on them.

    Runs as a Ray actor (``ray.remote(KMeansShard)``; a restart re-runs this constructor, which
    reloads the rows from ``source``) or as a plain object in the driver. The rows are a read-only
    n x d float32 numpy array, or a torch tensor for the torch kernel (on ``device="cuda"`` a copy
    on the GPU). ``threads`` sets the faiss/torch thread count of this process (actors only; None
    leaves it alone; numpy's BLAS follows OMP_NUM_THREADS, which Ray sets from the actor's CPUs).
    """

    def __init__(self, source: Any, kernel: str | None = None, device: str = "cpu", threads: int | None = None):
        kernel = resolve_kernel(kernel, device)
        if threads is not None and kernel == "faiss":
            import faiss

            faiss.omp_set_num_threads(threads)
        if threads is not None and kernel == "torch":
            import torch

            torch.set_num_threads(threads)
        x = source.load()
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.float32:
            raise ValueError(f"shard rows must be an n x d float32 array, got {describe(x)}")
        if not np.isfinite(x).all():
            raise ValueError(f"shard rows contain NaN or Inf values (source {source!r:.200})")
        self.x = km.as_tensor(x).to(device) if kernel == "torch" else x
        self.search = kernels()[kernel]
        self._sample_ids: np.ndarray | None = None
        self._sample_x: km.Rows | None = None

    def info(self) -> dict[str, Any]:
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"n": int(self.x.shape[0]), "d": int(self.x.shape[1]), "node_id": node_id, "pid": os.getpid()}

    def _take(self, local_ids: np.ndarray) -> km.Rows:
        ids = np.asarray(local_ids, dtype=np.int64)
        if isinstance(self.x, np.ndarray):
            return self.x[ids]
        return self.x[km.as_tensor(ids).to(self.x.device)]

    def rows(self, local_ids: np.ndarray) -> np.ndarray:
        """The rows at the given local indices, as a len(local_ids) x d float32 array."""
        rows = self._take(local_ids)
        return rows if isinstance(rows, np.ndarray) else rows.cpu().numpy()

    def _training_rows(self, sample: np.ndarray | None) -> km.Rows:
        if sample is None:
            return self.x
        # The sample comes with every step (stateless across restarts); gather it once.
        if self._sample_ids is None or not np.array_equal(sample, self._sample_ids):
            self._sample_ids = np.array(sample)
            self._sample_x = self._take(self._sample_ids)
        return self._sample_x

    def step(self, centroids: np.ndarray, sample: np.ndarray | None = None) -> km.Partial:
        """Partial statistics of this shard's rows (or of its ``sample`` local row ids)."""
        x = self._training_rows(sample)
        if x.shape[0] == 0:
            k, d = centroids.shape
            return km.Partial(np.zeros((k, d)), np.zeros(k, dtype=np.int64), 0.0)
        return km.lloyd_partial(x, centroids, self.search)

    def nearest(self, centroids: np.ndarray, topk: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(ids n x topk int64, distances n x topk float32) of this shard's rows."""
        if self.x.shape[0] == 0:
            return np.zeros((0, topk), dtype=np.int64), np.zeros((0, topk), dtype=np.float32)
        return km.search_blocks(self.x, centroids, topk, self.search)

    def assigned_distances(self, centroids: np.ndarray, assignments: np.ndarray) -> np.ndarray:
        """(n,) float32 squared distance of each of this shard's rows to ``centroids[assignments]``
        (its given centroid, not the nearest), for ``assignments`` (n,) in this shard's row order."""
        if isinstance(self.x, np.ndarray):
            return assigned_distances(self.x, centroids, assignments)
        step = km.BLOCK_ROWS  # torch rows (maybe on the GPU): copied to the host block by block
        out = [assigned_distances(self.x[a:a + step].cpu().numpy(), centroids, assignments[a:a + step])
               for a in range(0, self.x.shape[0], step)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# ---- a sharded data set -------------------------------------------------------------------------
class KMeansShards:
    """A data set split over :class:`KMeansShard` workers: Ray actors, or one in-process shard.

    Build it with :meth:`create`; use it as a context manager (or call :meth:`close`) to free the
    actors. Passing it to :func:`kmeans` / :func:`assign` reuses the loaded shards.
    """

    def __init__(self, workers: list[Any], remote: bool, keepalive: Sequence[Any] = (), group: Any = None):
        self.workers = workers
        self.remote = remote
        self._keepalive = list(keepalive)  # sources' object refs: restarts reload from them
        self._group = group  # the placement group that spreads the actors over nodes
        infos = _started_info(workers) if remote else self.call("info")
        self.sizes = [info["n"] for info in infos]
        dims = {info["d"] for info in infos if info["n"]}
        if len(dims) > 1:
            raise ValueError(f"shards disagree on the vector dimension: {sorted(dims)}")
        self.d = dims.pop() if dims else 0
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    @property
    def actors(self) -> list[Any]:
        """The actor handles (empty when running in-process)."""
        return list(self.workers) if self.remote else []

    def info(self) -> list[dict[str, Any]]:
        """Per shard: n, d, node_id (None in-process without Ray) and pid of its process."""
        return self.call("info")

    @classmethod
    def create(
        cls,
        x: Any,
        num_shards: int | None = None,
        *,
        column: str = "feat",
        storage: Storage | None = None,
        use_gpu: bool | None = None,
        cpus_per_shard: float = 1.0,
        kernel: str | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
    ) -> KMeansShards:
        """Split ``x`` into shards (see the module docstring for the accepted inputs).

        ``num_shards``: 0 runs in this process; None picks in-process for arrays of at most
        IN_PROCESS_MAX_ROWS rows and otherwise one shard per free GPU (``use_gpu``) or per
        ``cpus_per_shard`` free CPUs, at most MAX_SHARDS and no more than the data can fill.
        ``use_gpu`` None: use GPUs when there are some.
        """
        if num_shards is not None and num_shards < 0:
            raise ValueError(f"num_shards must be >= 0 or None, got {num_shards}")
        if cpus_per_shard <= 0:
            raise ValueError(f"cpus_per_shard must be > 0, got {cpus_per_shard}")
        kind, payload = classify_input(x, column, storage or Storage())
        if num_shards is None and kind == "array" and payload.shape[0] <= IN_PROCESS_MAX_ROWS:
            num_shards = 0
        if num_shards == 0:
            if use_gpu is None:
                use_gpu = _cuda_available()
            source = whole_source(kind, payload, column, storage or Storage())
            shard = KMeansShard(source, kernel=kernel, device="cuda" if use_gpu else "cpu")
            return cls([shard], remote=False)

        if not ray.is_initialized():
            ray.init()
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        if num_shards is None:
            free = ray.available_resources()
            slots = int(free.get("GPU", 0)) if use_gpu else int(free.get("CPU", 0) // cpus_per_shard)
            # No more shards than the data can fill: rows for an array, files or blocks otherwise.
            by_data = math.ceil(payload.shape[0] / MIN_ROWS_PER_SHARD) if kind == "array" else len(payload)
            num_shards = max(1, min(slots, MAX_SHARDS, by_data))
        sources, keepalive = split_sources(kind, payload, num_shards, column, storage or Storage())
        bundle = {"CPU": cpus_per_shard, **({"GPU": 1} if use_gpu else {})}
        # One shard per node where the cluster has enough nodes that can hold one: SPREAD alone is
        # a preference, and on a busy two-node cluster it put both shards on one node.
        fit = sum(1 for n in ray.nodes() if n["Alive"] and all(
            n["Resources"].get(k, 0) >= v for k, v in bundle.items()))
        strategy = "STRICT_SPREAD" if fit >= num_shards else "SPREAD"
        group = placement_group([bundle] * num_shards, strategy=strategy)
        actor_cls = ray.remote(KMeansShard)
        threads = max(1, int(cpus_per_shard))
        device = "cuda" if use_gpu else "cpu"
        workers = [
            actor_cls.options(
                num_cpus=cpus_per_shard,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
                max_restarts=max_restarts,
                max_task_retries=max_restarts,
            ).remote(src, kernel, device, threads)
            for i, src in enumerate(sources)
        ]
        try:
            return cls(workers, remote=True, keepalive=keepalive, group=group)
        except Exception:  # a shard failed to load (bad file, NaN rows): free the others
            for w in workers:
                ray.kill(w)
            remove_placement_group(group)
            raise

    def call(self, method: str, *args: Any, per_shard: Sequence[Any] | None = None) -> list[Any]:
        """Run ``method(*args[, per_shard[i]])`` on every shard; results in shard order."""
        if not self.remote:
            fn = getattr(self.workers[0], method)
            return [fn(*args) if per_shard is None else fn(*args, per_shard[0])]
        # One object-store copy of each shared argument instead of one per actor.
        args = tuple(ray.put(a) if isinstance(a, np.ndarray) else a for a in args)
        futures = [
            getattr(w, method).remote(*args) if per_shard is None else getattr(w, method).remote(*args, per_shard[i])
            for i, w in enumerate(self.workers)
        ]
        return ray.get(futures)

    def put_per_shard(self, values: Sequence[Any]) -> list[Any]:
        """Values to pass as ``per_shard`` on many calls: stored once in the object store."""
        return [ray.put(v) for v in values] if self.remote else list(values)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows with the given global ids (int64, in 0..n-1), in that order: len(ids) x d."""
        ids = np.asarray(ids, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((ids.size, self.d), dtype=np.float32)
        wanted = [ids[shard_of == s] - self.offsets[s] for s in range(len(self.workers))]
        for s, block in enumerate(self.call("rows", per_shard=wanted)):
            out[shard_of == s] = block
        return out

    def step(self, centroids: np.ndarray, samples: Sequence[Any] | None = None) -> km.Partial:
        """The reduced partial statistics of all shards (of their samples, if given)."""
        return km.reduce_partials(self.call("step", centroids, per_shard=samples))

    def nearest(self, centroids: np.ndarray, topk: int = 1) -> Assignment:
        """The ``topk`` nearest centroids of every row, in global row order."""
        parts = self.call("nearest", np.ascontiguousarray(centroids, dtype=np.float32), topk)
        return Assignment(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def assigned_distances(self, centroids: np.ndarray, assignments: np.ndarray) -> np.ndarray:
        """(n,) float32 squared distance of every row to ``centroids[assignments]`` (assignments
        (n,) int in global row order: each row's own centroid, e.g. the mean of its cluster)."""
        assignments = np.asarray(assignments, dtype=np.int64)
        if assignments.shape != (self.n,):
            raise ValueError(f"assignments must be ({self.n},), got {assignments.shape}")
        per_shard = [assignments[self.offsets[s]:self.offsets[s + 1]] for s in range(len(self.workers))]
        return np.concatenate(self.call("assigned_distances", np.ascontiguousarray(centroids, dtype=np.float32),
                                        per_shard=per_shard))

    def close(self) -> None:
        if self.remote:
            for w in self.workers:
                ray.kill(w)
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None
        self.workers = []

    def __enter__(self) -> KMeansShards:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _started_info(workers: list[Any], warn_after_s: float = 60.0) -> list[dict[str, Any]]:
    """Every shard actor's info, once it has loaded its rows; logs a warning when that takes long
    (short of resources: an autoscaler may still add nodes, so this waits rather than fails)."""
    futures = [w.info.remote() for w in workers]
    _, pending = ray.wait(futures, num_returns=len(futures), timeout=warn_after_s)
    if pending:
        log.warning(
            "%d of %d k-means shard actors are not running after %.0f s; free resources: %s",
            len(pending),
            len(workers),
            warn_after_s,
            ray.available_resources(),
        )
    return ray.get(futures)
