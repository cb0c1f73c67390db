"""Stage 2, ``cluster``: k-means #1 (K = C) on the pooled image features (docs/method.md §2).

The shard actors of :func:`pdso_ray.kmeans.kmeans` read the feature Parquet themselves; the driver
holds the centroids and one assignment per image (O(C·D + N), never the N×D features), and writes
the labels back file by file, aligned with the feature files (``cluster/<same name>.parquet``: id,
cluster) beside ``cluster/centroids.npy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pdso_ray.config import PipelineConfig
from pdso_ray.stages.base import Needs, PipelineError, RunContext, Stage, WorkerGroup
from pdso_ray.stages.diagnostics import image_diagnostics
from pdso_ray.tables import column_values, id_order, parquet_files, save_array, write_aligned


class ClusterStage(Stage):
    name = "cluster"
    config_sections = ("cluster", "data.classes", "seed")
    depends_on = ("features",)

    @classmethod
    def needs(cls, cfg: PipelineConfig) -> Needs:
        shards = cfg.cluster.num_shards  # None: as many as the cluster has CPUs (or GPUs) free
        return Needs(groups=(WorkerGroup("k-means shards", "cluster.num_shards", shards or 1, None, 1.0,
                                         gpus=1.0),))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pdso_ray.kmeans import kmeans

        cfg, storage = ctx.cfg, ctx.storage
        files = parquet_files(storage, ctx.run.features_dir)
        if not files:
            raise PipelineError(f"cluster: no feature files in {ctx.run.features_dir}")
        # starts drawn by image id: the features stage writes rows in the order they arrive
        result = kmeans(files, cfg.data.classes, niter=cfg.cluster.niter, nredo=cfg.cluster.nredo,
                        seed=cfg.seed_for("cluster"), num_shards=cfg.cluster.num_shards, column="feat",
                        storage=storage, use_gpu=ctx.cluster_has_gpu, row_order=id_order(storage, files))
        save_array(storage, ctx.run.centroids_file(self.name), result.centroids)
        write_aligned(storage, files, ctx.run.stage_dir(self.name),
                      {"cluster": result.assignments.astype(np.int32)})
        return {"images": int(result.assignments.size), "objective": result.objective,
                "empty_clusters": int((result.counts == 0).sum()),
                "largest_cluster": int(result.counts.max()),
                "smallest_cluster": int(result.counts.min()),
                **self.diagnostics(ctx)}

    def diagnostics(self, ctx: RunContext) -> dict[str, Any]:
        """Image-level scores of k-means #1 against the class folders (best-effort)."""
        out = ctx.run.stage_dir(self.name)
        return image_diagnostics(ctx, out, lambda: [("cluster", column_values(ctx.storage, out, "cluster"), None)])
