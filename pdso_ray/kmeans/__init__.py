"""Distributed k-means over Ray actors: ``from pdso_ray.kmeans import kmeans, assign``.

The API is :mod:`pdso_ray.kmeans.api`; shard actors in :mod:`~pdso_ray.kmeans.shards`, their row
sources in :mod:`~pdso_ray.kmeans.sources`, search kernels in :mod:`~pdso_ray.kmeans.search`.
"""

from pdso_ray.kmeans.api import KMeansResult, assign, kmeans
from pdso_ray.kmeans.search import kernels
from pdso_ray.kmeans.shards import Assignment, KMeansShard, KMeansShards

__all__ = ["Assignment", "KMeansResult", "KMeansShard", "KMeansShards", "assign", "kernels", "kmeans"]
