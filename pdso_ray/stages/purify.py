"""Stage 4, ``purify``: cluster-aware sample purification, CSD (docs/method.md §4).

One set of k-means shard actors holds the embeddings e(x) (read from ``denoise/``) for all of:
k-means #2 → distance filter and cluster cap on its O(N) assignments and distances (driver; with
``purify.kept_distance=mean`` the distance of each row to the mean of its #2 cluster's members;
``purify.filter=false`` keeps every row) → k-means #3 trained on the kept rows only. With ``purify.init=prototypes`` (default) k-means #2
starts from h's class prototypes (``denoise/prototypes.npy``) and runs ``purify.prototype_niter2`` Lloyd iterations (0:
nearest prototype), #3 starts from #2's centroids and runs ``prototype_niter3``; with ``random``
both are the distributed :func:`~pdso_ray.kmeans.kmeans`, best of ``purify.nredo`` random starts.
Then Ray tasks, one per group of files, compute every image's ``topk`` nearest final centroids and
write them, aligned with the feature files, as
``purify/<name>.parquet`` (id, path, cluster, kept, topk, topk_dist), beside
``purify/centroids.npy`` (C×D', in embedding space). The driver holds O(C·D' + N) numbers (the
k-means #2 assignments, distances and the kept mask), never the N×topk lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pdso_ray.config import PipelineConfig
from pdso_ray.stages.base import Needs, PipelineError, RunContext, Stage, WorkerGroup
from pdso_ray.stages.denoise import prototype_files
from pdso_ray.stages.diagnostics import image_diagnostics
from pdso_ray.storage import Storage
from pdso_ray.tables import (
    arrow_to_vectors,
    column_values,
    id_order,
    load_array,
    parquet_files,
    read_table,
    row_group_sizes,
    save_array,
    vectors_to_arrow,
    write_aligned_files,
)

if TYPE_CHECKING:
    from pdso_ray.kmeans import KMeansShards


# Rows per top-k writer task (whole files, at least one): bounds a task's memory (~100 MB at
# D'=256, top-50) and keeps the task count small when feature files are tiny.
ROWS_PER_WRITER = 65_536


def write_topk(storage: Storage, feature_files: list[str], emb_files: list[str], out_dir: str,
               kept: np.ndarray, cluster2: np.ndarray, centroids: np.ndarray, topk: int) -> np.ndarray:
    """Task body: for each file of a group, the ``topk`` nearest final ``centroids`` (C×D'
    float32) of every row's embedding, written as ``purify/<name>.parquet`` (id, path, cluster,
    kept, cluster2, topk, topk_dist). ``kept``, ``cluster2``: the group's rows' purification mask
    and k-means #2 cluster, in file order. Returns the group's cluster sizes (C int64)."""
    from pdso_ray.kmeans.search import kernels
    from pdso_ray.method.kmeans_math import search_blocks, search_numpy

    search = kernels().get("faiss", search_numpy)
    sizes = np.zeros(len(centroids), dtype=np.int64)

    def columns(f: int, start: int, stop: int) -> dict[str, np.ndarray | pa.Array]:
        emb = arrow_to_vectors(read_table(storage, emb_files[f], ["emb"]).column("emb"))
        ids, dist = search_blocks(emb, centroids, topk, search)
        sizes[:] += np.bincount(ids[:, 0], minlength=len(centroids))
        return {"cluster": ids[:, 0].astype(np.int32), "kept": kept[start:stop],
                "cluster2": cluster2[start:stop].astype(np.int32),
                "topk": vectors_to_arrow(ids, pa.int32()),
                "topk_dist": vectors_to_arrow(dist)}

    rows = write_aligned_files(storage, feature_files, out_dir, columns, keep=("id", "path"))
    if rows != len(kept):
        raise RuntimeError(f"purify: {rows} rows in {feature_files[0]}... but {len(kept)} kept flags")
    return sizes


def _writer_groups(file_rows: list[int]) -> list[tuple[int, int, int, int]]:
    """Consecutive files in groups of about ROWS_PER_WRITER rows: (first file, end file, first
    row, end row)."""
    groups, first, start, rows = [], 0, 0, 0
    for i, n in enumerate(file_rows):
        rows += n
        if rows - start >= ROWS_PER_WRITER or i == len(file_rows) - 1:
            groups.append((first, i + 1, start, rows))
            first, start = i + 1, rows
    return groups


def lloyd_from(shards: KMeansShards, init: np.ndarray, niter: int, seed: int,
               subset: np.ndarray | None = None) -> np.ndarray:
    """``niter`` Lloyd iterations over the shard actors from the given k×d ``init`` (0: ``init``
    itself), trained on all rows or on ``subset`` (sorted global row ids). The distributed
    :func:`~pdso_ray.kmeans.kmeans` starts only from random rows; this runs its same steps."""
    from pdso_ray.method import kmeans_math as km

    samples = None if subset is None else shards.put_per_shard(km.split_by_offsets(subset, shards.sizes))
    centroids, _ = km.lloyd(lambda c: shards.step(c, samples), np.asarray(init, dtype=np.float32), niter, seed)
    return centroids


class PurifyStage(Stage):
    name = "purify"
    config_sections = ("purify", "cluster.num_shards", "data.classes", "seed")
    depends_on = ("features", "denoise")

    @classmethod
    def needs(cls, cfg: PipelineConfig) -> Needs:
        shards = cfg.cluster.num_shards  # None: as many as the cluster has CPUs (or GPUs) free
        return Needs(groups=(WorkerGroup("k-means shards", "cluster.num_shards", shards or 1, None, 1.0,
                                         gpus=1.0),))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        import ray

        from pdso_ray.kmeans import KMeansShards, kmeans
        from pdso_ray.method.purify import cluster_means, fill_missing_prototypes, purification_mask

        cfg, storage = ctx.cfg, ctx.storage
        pc, k = cfg.purify, cfg.data.classes
        feature_files = parquet_files(storage, ctx.run.features_dir)
        emb_files = [ctx.run.aligned_file("denoise", u) for u in feature_files]
        seed = cfg.seed_for("purify")
        # random starts drawn by image id, as k-means #1's
        common = dict(niter=pc.niter, nredo=pc.nredo, num_shards=None, progress=True,
                      row_order=id_order(storage, feature_files) if pc.init == "random" else None)
        with KMeansShards.create(emb_files, cfg.cluster.num_shards, column="emb", storage=storage,
                                 use_gpu=ctx.cluster_has_gpu) as shards:
            if pc.init == "prototypes":
                protos_file, counts_file = prototype_files(ctx.run)
                init = fill_missing_prototypes(load_array(storage, protos_file), load_array(storage, counts_file),
                                               shards.rows, shards.n, seed)
                centroids2 = lloyd_from(shards, init, pc.prototype_niter2, seed)
            else:
                centroids2 = kmeans(shards, k, seed=seed, **common).centroids
            nearest2 = shards.nearest(centroids2, 1)
            assign2, dist2 = nearest2.ids[:, 0], nearest2.distances[:, 0]
            ranked = dist2  # what the rules rank by; dist2 stays the #2 objective's
            if pc.kept_distance == "mean":
                # the members' means: one Lloyd update of #2 (its step assigns as nearest did)
                part = shards.step(centroids2)
                ranked = shards.assigned_distances(cluster_means(part.sums, part.counts, centroids2), assign2)
            kept = (purification_mask(ranked, assign2, k, pc.dist_quantile, pc.alpha) if pc.filter
                    else np.ones(len(assign2), dtype=bool))
            if kept.sum() < k:
                raise PipelineError(
                    f"purify kept {int(kept.sum())} images, fewer than the {k} classes: raise "
                    f"purify.dist_quantile ({pc.dist_quantile}) or purify.alpha ({pc.alpha})")
            if pc.init == "prototypes":
                centroids3 = lloyd_from(shards, centroids2, pc.prototype_niter3, seed + 1, np.flatnonzero(kept))
            else:
                centroids3 = kmeans(shards, k, seed=seed + 1, subset=np.flatnonzero(kept), **common).centroids
        # The shards are gone (their CPUs free): the N×topk ids and distances are computed and
        # written file group by file group by tasks, never gathered here.
        out = ctx.run.stage_dir(self.name)
        save_array(storage, ctx.run.centroids_file(self.name), centroids3)
        file_rows = [sum(groups) for groups in row_group_sizes(storage, feature_files)]
        if sum(file_rows) != len(kept):
            raise RuntimeError(f"purify: the feature files hold {sum(file_rows)} rows, the "
                               f"embeddings {len(kept)}")
        task = ray.remote(write_topk).options(num_cpus=1, max_retries=2)
        centroids = ray.put(centroids3)
        sizes = sum(ray.get([
            task.remote(storage, feature_files[a:b], emb_files[a:b], out,
                        kept[start:stop], assign2[start:stop], centroids, min(pc.topk, k))
            for a, b, start, stop in _writer_groups(file_rows)]))
        return {"images": int(len(kept)), "kept": int(kept.sum()),
                "objective_kmeans2": float(dist2.sum(dtype=np.float64)),
                "objective_kept": float(dist2[kept].sum(dtype=np.float64)),
                "largest_cluster": int(sizes.max()), "empty_clusters": int((sizes == 0).sum()),
                **self.diagnostics(ctx)}

    def diagnostics(self, ctx: RunContext) -> dict[str, Any]:
        """Image-level scores of the kept set and the final assignment (best-effort)."""
        out = ctx.run.stage_dir(self.name)

        def steps():
            final = column_values(ctx.storage, out, "cluster")
            return [("purify_kmeans2", column_values(ctx.storage, out, "cluster2"), None),
                    ("purify_kept", final, column_values(ctx.storage, out, "kept").astype(bool)),
                    ("purify_final", final, None)]

        return image_diagnostics(ctx, out, steps)
