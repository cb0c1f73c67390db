"""Stage 2, ``cluster``: k-means #1 (K = C) on the pooled image features (DESIGN §3.2).

The shard actors of :func:`pdso_ray.kmeans.kmeans` read the feature Parquet themselves; the driver
holds the centroids and one assignment per image (O(C·D + N), never the N×D features), and writes
the labels back file by file, aligned with the feature files (``cluster/<same name>.parquet``: id,
cluster) beside ``cluster/centroids.npy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def row_group_sizes(storage: Storage, files: list[str]) -> list[list[int]]:
    """Rows of every row group of every file (Parquet footers only, no data), in file order."""
    import pyarrow.parquet as pq

    sizes = []
    for url in files:
        with storage.open(url, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        sizes.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    return sizes


def write_aligned_files(storage: Storage, source_files: list[str], out_dir: str,
                        make_columns: Callable[[int, int, int], dict[str, np.ndarray | pa.Array]],
                        keep: Sequence[str] = ("id",)) -> int:
    """Write one Parquet file per source file, named like it, holding the source's ``keep``
    columns and then ``make_columns(file_index, start, stop)``: per-row values of that file's rows,
    whose global numbers (row order of ``source_files``) are ``start .. stop``. Only one file's
    rows are in memory at a time. Returns the number of rows written."""
    start = 0
    for i, url in enumerate(source_files):
        table = read_table(storage, url, columns=list(keep))
        stop = start + table.num_rows
        for name, values in make_columns(i, start, stop).items():
            if len(values) != table.num_rows:
                raise RuntimeError(f"{out_dir}: column {name!r} has {len(values)} values for the "
                                   f"{table.num_rows} rows of {url}")
            table = table.append_column(name, pa.array(values) if isinstance(values, np.ndarray) else values)
        write_table(storage, Storage.join(out_dir, url.rsplit("/", 1)[-1]), table)
        start = stop
    return start


def write_aligned(storage: Storage, source_files: list[str], out_dir: str,
                  columns: dict[str, np.ndarray | pa.Array], keep: Sequence[str] = ("id",)) -> None:
    """:func:`write_aligned_files` for per-row arrays already in memory (in the row order of
    ``source_files``)."""
    def rows(_: int, start: int, stop: int) -> dict[str, np.ndarray | pa.Array]:
        return {name: values[start:stop] if isinstance(values, np.ndarray) else values.slice(start, stop - start)
                for name, values in columns.items()}

    total = write_aligned_files(storage, source_files, out_dir, rows, keep)
    lengths = {len(v) for v in columns.values()}
    if lengths != {total}:
        raise RuntimeError(f"{out_dir}: {total} source rows but {sorted(lengths)} values")


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
