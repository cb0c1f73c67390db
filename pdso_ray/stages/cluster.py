"""Stage 2, ``cluster``: k-means #1 (K = C) on the pooled image features (DESIGN §3.2).

The shard actors of :func:`pdso_ray.kmeans.kmeans` read the feature Parquet themselves; the driver
holds the centroids and one assignment per image, and writes the labels back file by file, aligned
with the feature files (``cluster/<same name>.parquet``: id, cluster, dist).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.storage import Storage
from pdso_ray.tables import parquet_files, read_table, write_table


def features_dir(ctx: RunContext) -> str:
    """Precomputed features (``data.features``) or this run's ``features/``."""
    return ctx.cfg.data.features or ctx.stage_dir("features")


def save_array(storage: Storage, url: str, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    storage.write_bytes(url, buf.getvalue())


def load_array(storage: Storage, url: str) -> np.ndarray:
    import io

    return np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)


def write_aligned(storage: Storage, source_files: list[str], out_dir: str,
                  columns: dict[str, np.ndarray | pa.Array], keep: list[str] = ("id",)) -> None:
    """Write per-row arrays (in the row order of ``source_files``) as one Parquet file per source
    file, named like it, with the source's ``keep`` columns first."""
    start = 0
    for url in source_files:
        table = read_table(storage, url, columns=list(keep))
        stop = start + table.num_rows
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values[start:stop]) if isinstance(values, np.ndarray)
                                        else values.slice(start, stop - start))
        write_table(storage, Storage.join(out_dir, url.rsplit("/", 1)[-1]), table)
        start = stop
    lengths = {len(v) for v in columns.values()}
    if lengths != {start}:
        raise RuntimeError(f"{out_dir}: {start} source rows but {sorted(lengths)} values")


class ClusterStage(Stage):
    name = "cluster"
    config_sections = ("cluster", "data.classes")
    depends_on = ("features",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pdso_ray.kmeans import kmeans

        cfg, storage = ctx.cfg, ctx.storage
        files = parquet_files(storage, features_dir(ctx))
        if not files:
            raise RuntimeError(f"cluster: no feature files in {features_dir(ctx)}")
        result = kmeans(files, cfg.data.classes, niter=cfg.cluster.niter, nredo=cfg.cluster.nredo,
                        seed=cfg.cluster.seed, num_shards=cfg.cluster.num_shards, column="feat",
                        storage=storage, use_gpu=ctx.cluster_has_gpu)
        out = self.output_dir(ctx)
        save_array(storage, Storage.join(out, "centroids.npy"), result.centroids)
        write_aligned(storage, files, out, {"cluster": result.assignments.astype(np.int32)})
        return {"images": int(result.assignments.size), "objective": result.objective,
                "empty_clusters": int((result.counts == 0).sum()),
                "largest_cluster": int(result.counts.max()),
                "smallest_cluster": int(result.counts.min())}
