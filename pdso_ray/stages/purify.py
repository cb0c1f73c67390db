"""Stage 4, ``purify``: cluster-aware sample purification, CSD (DESIGN §3.4).

One set of k-means shard actors holds the embeddings e(x) (read from ``denoise/``) for all of:
k-means #2 → distance filter and cluster cap on its O(N) assignments (driver) → k-means #3 trained
on the kept rows only → every image's ``topk`` nearest final centroids. Writes, aligned with the
feature files, ``purify/<name>.parquet`` (id, path, cluster, kept, topk, topk_dist) and
``purify/centroids.npy`` (C×D', in embedding space).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.stages.cluster import features_dir, save_array, write_aligned
from pdso_ray.storage import Storage
from pdso_ray.tables import parquet_files


def _lists(matrix: np.ndarray, value_type: pa.DataType) -> pa.Array:
    n, k = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), value_type))


class PurifyStage(Stage):
    name = "purify"
    config_sections = ("purify", "cluster.num_shards", "data.classes")
    depends_on = ("features", "denoise")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pdso_ray.kmeans import KMeansShards, kmeans
        from pdso_ray.method.purify import cap_large_clusters, distance_filter

        cfg, storage = ctx.cfg, ctx.storage
        pc, k = cfg.purify, cfg.data.classes
        feature_files = parquet_files(storage, features_dir(ctx))
        emb_files = [Storage.join(ctx.stage_dir("denoise"), u.rsplit("/", 1)[-1]) for u in feature_files]
        common = dict(niter=pc.niter, num_shards=None, progress=True)
        with KMeansShards.create(emb_files, cfg.cluster.num_shards, column="emb", storage=storage,
                                 use_gpu=ctx.cluster_has_gpu) as shards:
            second = kmeans(shards, k, seed=pc.seed, **common)
            nearest2 = shards.nearest(second.centroids, 1)
            assign2, dist2 = nearest2.ids[:, 0], nearest2.distances[:, 0]
            kept = (distance_filter(dist2, assign2, k, pc.dist_quantile)
                    & cap_large_clusters(assign2, dist2, k, pc.alpha))
            if kept.sum() < k:
                raise RuntimeError(
                    f"purify kept {int(kept.sum())} images, fewer than the {k} classes: raise "
                    f"purify.dist_quantile ({pc.dist_quantile}) or purify.alpha ({pc.alpha})")
            third = kmeans(shards, k, seed=pc.seed + 1, subset=np.flatnonzero(kept), **common)
            final = shards.nearest(third.centroids, min(pc.topk, k))
        save_array(storage, Storage.join(self.output_dir(ctx), "centroids.npy"), third.centroids)
        write_aligned(storage, feature_files, self.output_dir(ctx), {
            "cluster": final.ids[:, 0].astype(np.int32),
            "kept": kept,
            "topk": _lists(final.ids.astype(np.int32), pa.int32()),
            "topk_dist": _lists(final.distances.astype(np.float32), pa.float32()),
        }, keep=("id", "path"))
        sizes = np.bincount(final.ids[:, 0], minlength=k)
        return {"images": int(len(kept)), "kept": int(kept.sum()),
                "objective_kmeans2": second.objective, "objective_kmeans3": third.objective,
                "largest_cluster": int(sizes.max()), "empty_clusters": int((sizes == 0).sum())}
