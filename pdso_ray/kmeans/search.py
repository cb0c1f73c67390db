"""Search kernels of distributed k-means by name: the pure ones of
:mod:`pdso_ray.method.kmeans_math` (``numpy``, ``torch``) plus ``faiss`` (CPU brute force) when it
is installed. A kernel maps ``(rows, centroids, topk)`` to ``(squared distances, ids)``, nearest
first; see :mod:`pdso_ray.kmeans.api` for when each is picked. No Ray here: shard actors and the
purify writers both look kernels up.
"""

from __future__ import annotations

import numpy as np

from pdso_ray.method import kmeans_math as km


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


def resolve_kernel(kernel: str | None, device: str) -> str:
    if kernel is None:
        kernel = "torch" if device != "cpu" else "faiss" if _faiss_available() else "numpy"
    available = kernels()
    if kernel not in available:
        raise ValueError(f"unknown k-means kernel {kernel!r}; available: {sorted(available)}")
    if kernel != "torch" and device != "cpu":
        raise ValueError(f"kernel {kernel!r} runs on CPU, got device {device!r}; use kernel='torch'")
    return kernel
