"""Distributed k-means: the math of :mod:`pdso_ray.method.kmeans_math`, fanned out to Ray actors.

The data is split into shards; each shard lives in one :class:`KMeansShard` actor, in its own
bundle of a ``SPREAD`` placement group so the shards use every node (the group is placed at once
with the whole cluster in view; per-actor ``"SPREAD"`` scheduling is decided actor by actor on a
possibly stale resource view and was seen to stack two shards on one node). Per iteration the driver sends the
k x d centroids, each actor returns its partial sums (k x d float64), counts and objective, and the
driver reduces them and updates the centroids: the driver's memory stays O(k·d), plus the final
n-vector of assignments that the result returns.

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

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import ray
from tqdm.auto import tqdm

from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdso_ray.method import kmeans_math as km
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")

# Arrays up to this many rows run in-process when num_shards is None (Ray's start-up would cost
# more than the work).
IN_PROCESS_MAX_ROWS = 65_536
MAX_SHARDS = 256
MIN_ROWS_PER_SHARD = 4096
DEFAULT_MAX_RESTARTS = 3


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


class Assignment(NamedTuple):
    """ids: n x topk int64 centroid ids, nearest first; distances: n x topk float32 squared L2."""

    ids: np.ndarray
    distances: np.ndarray


# ---- kernels ------------------------------------------------------------------------------------
def search_faiss(x: np.ndarray, centroids: np.ndarray, topk: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pdso_ray.method.kmeans_math.search_numpy`'s contract with faiss's CPU brute force."""
    import faiss

    dist, ids = faiss.knn(np.ascontiguousarray(x), np.ascontiguousarray(centroids), topk)
    return np.maximum(dist, 0.0), ids


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def kernels() -> dict[str, km.SearchFn]:
    """Search kernels by name: the pure ones of kmeans_math, plus faiss when it is installed."""
    out = dict(km.KERNELS)
    if _faiss_available():
        out["faiss"] = search_faiss
    return out


def _resolve_kernel(kernel: str | None, device: str) -> str:
    if kernel is None:
        kernel = "torch" if device != "cpu" else "faiss" if _faiss_available() else "numpy"
    available = kernels()
    if kernel not in available:
        raise ValueError(f"unknown k-means kernel {kernel!r}; available: {sorted(available)}")
    if kernel != "torch" and device != "cpu":
        raise ValueError(f"kernel {kernel!r} runs on CPU, got device {device!r}; use kernel='torch'")
    return kernel


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- shard sources ------------------------------------------------------------------------------
def column_to_array(column: Any, name: str = "column") -> np.ndarray:
    """An Arrow list / fixed-size-list / tensor column of equal-length float rows -> n x d float32."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.ExtensionType):  # Ray Data's tensor columns
        column = column.storage
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise ValueError(f"column {name!r} must hold lists of floats (one vector per row), got {kind}")
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} null rows")
    n = len(column)
    if n == 0:
        d = kind.list_size if pa.types.is_fixed_size_list(kind) else 0
        return np.zeros((0, d), dtype=np.float32)
    lengths = pc.list_value_length(column)
    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    if lo != hi:
        raise ValueError(f"column {name!r} has vectors of different lengths ({lo}..{hi})")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(n, hi)


@dataclass(frozen=True)
class ArraySource:
    """Rows held in memory (in-process) or in Ray's object store (``ref``)."""

    array: np.ndarray | None = None
    ref: Any = None

    def load(self) -> np.ndarray:
        return self.array if self.array is not None else ray.get(self.ref)


@dataclass(frozen=True)
class ParquetSource:
    """Rows of ``column`` in the given Parquet files, concatenated in order.

    Loaded row group by row group into one preallocated array, so a shard's peak memory is its
    rows plus one row group (reading whole files and concatenating peaked at ~2.5x the rows)."""

    urls: tuple[str, ...]
    column: str
    storage: Storage

    def _files(self) -> Iterator[tuple[str, Any]]:
        import pyarrow.parquet as pq

        for url in self.urls:
            fs, path = self.storage.arrow_fs(url)
            with fs.open_input_file(path) as f:
                yield url, pq.ParquetFile(f)

    def load(self) -> np.ndarray:
        total = sum(pf.metadata.num_rows for _, pf in self._files())
        out: np.ndarray | None = None
        start = 0
        for url, pf in self._files():
            for group in range(pf.num_row_groups):
                rows = column_to_array(pf.read_row_group(group, columns=[self.column]).column(self.column),
                                       f"{self.column} in {url}")
                if not len(rows):
                    continue
                if out is None:
                    out = np.empty((total, rows.shape[1]), dtype=np.float32)
                elif rows.shape[1] != out.shape[1]:
                    raise ValueError(f"{self.column} in {url} has {rows.shape[1]}-dimensional vectors, "
                                     f"earlier files {out.shape[1]}")
                out[start:start + len(rows)] = rows
                start += len(rows)
        if start != total:
            raise ValueError(f"{total} rows in the Parquet footers of {self.urls[0]}..., {start} read")
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


@dataclass(frozen=True)
class ArrowRefsSource:
    """Rows of ``column`` in Ray Data blocks (object references to Arrow tables), in order."""

    refs: tuple[Any, ...]
    column: str

    def load(self) -> np.ndarray:
        tables = ray.get(list(self.refs))
        return _concat([column_to_array(t.column(self.column), self.column) for t in tables])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.shape[0]] or parts[:1]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


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
        kernel = _resolve_kernel(kernel, device)
        if threads is not None and kernel == "faiss":
            import faiss

            faiss.omp_set_num_threads(threads)
        if threads is not None and kernel == "torch":
            import torch

            torch.set_num_threads(threads)
        x = source.load()
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.float32:
            raise ValueError(f"shard rows must be an n x d float32 array, got {_describe(x)}")
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


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return type(x).__name__


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
        kind, payload = _classify_input(x, column, storage or Storage())
        if num_shards is None and kind == "array" and payload.shape[0] <= IN_PROCESS_MAX_ROWS:
            num_shards = 0
        if num_shards == 0:
            if use_gpu is None:
                use_gpu = _cuda_available()
            source = _whole_source(kind, payload, column, storage or Storage())
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
        sources, keepalive = _split_sources(kind, payload, num_shards, column, storage or Storage())
        bundle = {"CPU": cpus_per_shard, **({"GPU": 1} if use_gpu else {})}
        group = placement_group([bundle] * num_shards, strategy="SPREAD")
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


def _classify_input(x: Any, column: str, storage: Storage) -> tuple[str, Any]:
    if isinstance(x, np.ndarray):
        if x.ndim != 2 or x.dtype != np.float32:
            raise ValueError(f"x must be an n x d float32 array (use x.astype(np.float32)), got {_describe(x)}")
        return "array", x
    if isinstance(x, str):
        urls = storage.list_files(x, suffixes=(".parquet",)) if storage.isdir(x) else [x]
        if not urls:
            raise ValueError(f"no .parquet files under {x}")
        return "parquet", urls
    if isinstance(x, (list, tuple)):
        if not x or not all(isinstance(u, str) for u in x):
            raise ValueError(f"x as a list must hold Parquet URLs, got {x!r:.200}")
        return "parquet", list(x)
    import ray.data

    if isinstance(x, ray.data.Dataset):
        refs = x.select_columns([column]).to_arrow_refs()
        if not refs:
            raise ValueError("the Ray Dataset has no blocks")
        return "refs", refs
    raise ValueError(f"x must be a float32 array, Parquet URL(s), a Ray Dataset or KMeansShards, got {_describe(x)}")


def _whole_source(kind: str, payload: Any, column: str, storage: Storage) -> Any:
    if kind == "array":
        return ArraySource(array=payload)
    if kind == "parquet":
        return ParquetSource(tuple(payload), column, storage)
    return ArrowRefsSource(tuple(payload), column)


def _split_sources(kind: str, payload: Any, num_shards: int, column: str, storage: Storage) -> tuple[list, list]:
    """One source per shard, contiguous in input order (so shard order = row order)."""
    if kind == "array":
        bounds = np.linspace(0, payload.shape[0], min(num_shards, max(1, payload.shape[0])) + 1).astype(int)
        refs = [ray.put(payload[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return [ArraySource(ref=r) for r in refs], refs
    groups = [list(g) for g in np.array_split(np.arange(len(payload)), min(num_shards, len(payload)))]
    if kind == "parquet":
        return [ParquetSource(tuple(payload[i] for i in g), column, storage) for g in groups], []
    return [ArrowRefsSource(tuple(payload[i] for i in g), column) for g in groups], list(payload)


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
    Deterministic for a seed and the same shards. ``on_iteration(redo, iteration, objective)`` is
    called after each iteration.
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

        best: tuple[float, np.ndarray, list[float]] | None = None
        for redo in range(nredo):
            init = km.init_indices(n_train, k, seed, redo)
            start = shards.rows(init if train is None else train[init])
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
        raise ValueError(f"centroids must be a k x d float32 array, got {_describe(centroids)}")
    if not 1 <= topk <= centroids.shape[0]:
        raise ValueError(f"topk must be in 1..{centroids.shape[0]} (the number of centroids), got {topk}")
    options = dict(column=column, storage=storage, use_gpu=use_gpu, cpus_per_shard=cpus_per_shard, kernel=kernel)
    with _opened(x, num_shards, **options) as shards:
        if shards.n and shards.d != centroids.shape[1]:
            raise ValueError(f"centroids have dimension {centroids.shape[1]}, the rows {shards.d}")
        return shards.nearest(centroids, topk)
