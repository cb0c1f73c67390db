"""Stage 3, ``denoise``: DFF small-loss denoising of the k-means #1 labels (docs/method.md §3).

Runs as one Ray task (on a GPU when the cluster has one) so that the driver never holds the
features: the task reads ``features/`` (row group by row group) and ``cluster/`` itself, trains f,
g and h, saves h (``denoise/classifier.pt``) and its class prototypes (``denoise/prototypes.npy``,
C×D' float32, the mean embedding of each class over S2, where k-means #2 starts, and
``denoise/prototype_counts.npy``, (C,) int64 S2 images behind each) and writes, file by file and
aligned with the feature files, ``denoise/<name>.parquet``: id, ``emb`` (e(x), L2-normalised),
``subset1``, ``clean`` (S2) and ``relabel`` (g's label). Memory: the features once (N×D×2 float32) when they fit
``denoise.max_in_memory_gb``, else one shuffle block; plus O(N) labels, masks and losses.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from pdso_ray.config import DenoiseConfig
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.stages.diagnostics import folder_classes, image_diagnostics, image_scores
from pdso_ray.storage import Storage
from pdso_ray.tables import (
    arrow_to_vectors,
    column_values,
    parquet_files,
    read_table,
    row_group_sizes,
    save_array,
    vectors_to_arrow,
    write_aligned_files,
)


def prototype_files(run: RunLayout) -> tuple[str, str]:
    """``denoise/prototypes.npy`` (C×D' float32) and ``denoise/prototype_counts.npy`` ((C,) int64)."""
    folder = run.stage_dir("denoise")
    return Storage.join(folder, "prototypes.npy"), Storage.join(folder, "prototype_counts.npy")


class ParquetPairs:
    """``feat`` and ``feat_flip`` of the feature files, one Parquet row group at a time: the chunks
    of a :class:`~pdso_ray.method.denoise.ChunkedFeatures` (chunk i = the i-th row group, files in
    order). Reads only footers until a chunk is asked for."""

    def __init__(self, storage: Storage, files: list[str]):
        self.storage = storage
        self.files = files
        sizes = row_group_sizes(storage, files)
        self.chunks = [(f, g) for f, groups in enumerate(sizes) for g in range(len(groups))]
        self.chunk_sizes = [n for groups in sizes for n in groups]
        self.num_rows = int(sum(self.chunk_sizes))
        first = next((i for i, n in enumerate(self.chunk_sizes) if n), None)
        self.dim = 0 if first is None else self.load(first)[0].shape[1]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``i`` as two rows×D float32 arrays."""
        import pyarrow.parquet as pq

        f, g = self.chunks[i]
        with self.storage.open(self.files[f], "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(g, columns=["feat", "feat_flip"])
        return arrow_to_vectors(table.column("feat")), arrow_to_vectors(table.column("feat_flip"))

    def feature_bytes(self) -> int:
        return self.num_rows * self.dim * 2 * 4

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row, N×D float32 each, filled row group by row group (no second copy)."""
        feats = np.empty((self.num_rows, self.dim), dtype=np.float32)
        flips = np.empty_like(feats)
        start = 0
        for i, n in enumerate(self.chunk_sizes):
            feats[start:start + n], flips[start:start + n] = self.load(i)
            start += n
        return feats, flips

    def load_file(self, f: int) -> np.ndarray:
        """``feat`` of file ``f``: rows×D float32."""
        return arrow_to_vectors(read_table(self.storage, self.files[f], ["feat"]).column("feat"))


def run_denoise(storage: Storage, feature_files: list[str], run: RunLayout, classes: int,
                settings: DenoiseConfig) -> dict[str, Any]:
    """The task body: everything is read and written here, on the worker.

    Features of at most ``settings.max_in_memory_gb`` (feat + feat_flip as float32) are loaded once;
    larger ones are streamed row group by row group on every pass (training epochs, scoring,
    embedding), so the worker holds one shuffle block (``ChunkedFeatures.shuffle_rows`` rows) at a
    time. Outputs are written file by file.
    """
    import torch

    from pdso_ray.method.denoise import ChunkedFeatures, denoise, embed_features

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = ParquetPairs(storage, feature_files)
    in_memory = pairs.feature_bytes() <= settings.max_in_memory_gb * 1024**3
    if in_memory:
        feats, flips = pairs.load_all()
        source = ChunkedFeatures.from_arrays(feats, flips)

        def file_feats(f: int, start: int, stop: int) -> np.ndarray:
            return feats[start:stop]
    else:
        source = ChunkedFeatures(pairs.chunk_sizes, pairs.load, pairs.dim)

        def file_feats(f: int, start: int, stop: int) -> np.ndarray:
            return pairs.load_file(f)
    labels = np.concatenate([read_table(storage, run.aligned_file("cluster", u), ["cluster"]).column("cluster")
                             .to_numpy().astype(np.int64) for u in feature_files])
    result = denoise(source, labels, classes, settings, device=device)
    buf = io.BytesIO()
    torch.save(result.classifier.state_dict(), buf)
    storage.write_bytes(run.denoise_classifier, buf.getvalue())
    protos_file, counts_file = prototype_files(run)
    save_array(storage, protos_file, result.prototypes)
    save_array(storage, counts_file, result.prototype_counts)

    def columns(f: int, start: int, stop: int) -> dict[str, Any]:
        emb = embed_features(result.classifier, file_feats(f, start, stop), device=device)
        return {"emb": vectors_to_arrow(emb),
                "subset1": result.subset1[start:stop], "clean": result.clean_mask[start:stop],
                "relabel": result.labels[start:stop].astype(np.int32)}

    write_aligned_files(storage, feature_files, run.stage_dir("denoise"), columns)
    noisy = labels != result.labels
    return {**{k: (float(v) if isinstance(v, float) else int(v)) for k, v in result.stats.items()},
            "relabelled_fraction": float(noisy.mean()) if len(noisy) else 0.0,
            "features_in_memory": in_memory}


class DenoiseStage(Stage):
    name = "denoise"
    config_sections = ("denoise", "data.classes", "seed")
    depends_on = ("features", "cluster")
    # denoise.max_in_memory_gb: holding S919's features in memory (3.9 GB) beats streaming them:
    # streaming costs one zstd decode of the features per pass (~25 s per pass on one busy core,
    # half the time of a linear epoch), and a whole-data shuffle beats shuffling blocks of row groups.

    def run(self, ctx: RunContext) -> dict[str, Any]:
        import ray

        files = parquet_files(ctx.storage, ctx.run.features_dir)
        settings = dataclasses.replace(ctx.cfg.denoise, seed=ctx.cfg.seed_for("denoise"))
        task = ray.remote(run_denoise).options(num_gpus=1 if ctx.cluster_has_gpu else 0,
                                               num_cpus=1, max_retries=2)
        counts = ray.get(task.remote(ctx.storage, files, ctx.run, ctx.cfg.data.classes, settings))
        return {**counts, **self.diagnostics(ctx)}

    def diagnostics(self, ctx: RunContext) -> dict[str, Any]:
        """Purity of the k-means #1 labels on S1, and of the labels h trains on (those S2 was
        selected under, ``denoise.s2_labels``: k-means #1's or g's relabelling) on S2, against the
        class folders."""
        out = ctx.run.stage_dir(self.name)
        truth = folder_classes(ctx, out)
        if truth is None:
            return {}
        kmeans = column_values(ctx.storage, ctx.run.stage_dir("cluster"), "cluster")
        subset1 = column_values(ctx.storage, out, "subset1")
        clean = column_values(ctx.storage, out, "clean")
        trained = (kmeans if ctx.cfg.denoise.s2_labels == "kmeans"
                   else column_values(ctx.storage, out, "relabel"))
        return image_diagnostics([("denoise_s1", image_scores(truth, kmeans, subset1)),
                                  ("denoise_s2", image_scores(truth, trained, clean))])
