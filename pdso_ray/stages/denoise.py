"""Stage 3, ``denoise``: DFF small-loss denoising of the k-means #1 labels (DESIGN §3.3).

Runs as one Ray task (on a GPU when the cluster has one) so that the driver never holds the
features: the task reads ``features/`` and ``cluster/`` itself, trains f, g and h, saves h
(``denoise/classifier.pt``) and writes, aligned with the feature files, ``denoise/<name>.parquet``:
id, ``emb`` (e(x), L2-normalised), ``subset1``, ``clean`` (S2) and ``relabel`` (g's label).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pdso_ray.config import DenoiseConfig
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.stages.cluster import features_dir, write_aligned
from pdso_ray.storage import Storage
from pdso_ray.tables import arrow_to_vectors, parquet_files, read_table, vectors_to_arrow

CLASSIFIER_FILE = "classifier.pt"


def load_embedding(storage: Storage, denoise_dir: str):
    """h from ``denoise/classifier.pt``, as a module mapping ...×D features to e(x) ...×D'
    (L2-normalised, like the embeddings k-means #2/#3 saw)."""
    import torch
    import torch.nn.functional as F

    from pdso_ray.method.denoise import Classifier

    state = torch.load(io.BytesIO(storage.read_bytes(Storage.join(denoise_dir, CLASSIFIER_FILE))),
                       map_location="cpu", weights_only=True)
    classifier = Classifier.from_state_dict(state).eval()

    class Embedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, x):
            return F.normalize(self.classifier.embed(x), dim=-1)

    return Embedding()


def _load_columns(storage: Storage, files: list[str], *columns: str) -> list[np.ndarray]:
    out: list[list[np.ndarray]] = [[] for _ in columns]
    for url in files:
        table = read_table(storage, url, columns=list(columns))
        for i, name in enumerate(columns):
            col = table.column(name)
            out[i].append(arrow_to_vectors(col) if str(col.type).startswith("list")
                          else col.to_numpy())
    return [np.concatenate(parts) for parts in out]


def run_denoise(storage: Storage, feature_files: list[str], cluster_dir: str, out_dir: str,
                classes: int, settings: DenoiseConfig) -> dict[str, Any]:
    """The task body: everything is read and written here, on the worker."""
    import torch

    from pdso_ray.method.denoise import ChunkedFeatures, denoise, embed_features

    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [u.rsplit("/", 1)[-1] for u in feature_files]
    feats, feats_flip = _load_columns(storage, feature_files, "feat", "feat_flip")
    (labels,) = _load_columns(storage, [Storage.join(cluster_dir, n) for n in names], "cluster")
    result = denoise(ChunkedFeatures.from_arrays(feats, feats_flip), labels.astype(np.int64),
                     classes, settings, device=device)
    buf = io.BytesIO()
    torch.save(result.classifier.state_dict(), buf)
    storage.write_bytes(Storage.join(out_dir, CLASSIFIER_FILE), buf.getvalue())
    emb = embed_features(result.classifier, feats, device=device)
    write_aligned(storage, feature_files, out_dir, {
        "emb": vectors_to_arrow(emb), "subset1": result.subset1, "clean": result.clean_mask,
        "relabel": result.labels.astype(np.int32)})
    noisy = labels != result.labels
    return {**{k: (float(v) if isinstance(v, float) else int(v)) for k, v in result.stats.items()},
            "relabelled_fraction": float(noisy.mean()) if len(noisy) else 0.0}


class DenoiseStage(Stage):
    name = "denoise"
    config_sections = ("denoise", "data.classes")
    depends_on = ("features", "cluster")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        import ray

        files = parquet_files(ctx.storage, features_dir(ctx))
        task = ray.remote(run_denoise).options(num_gpus=1 if ctx.cluster_has_gpu else 0,
                                               num_cpus=1, max_retries=2)
        return ray.get(task.remote(ctx.storage, files, ctx.stage_dir("cluster"),
                                   self.output_dir(ctx), ctx.cfg.data.classes, ctx.cfg.denoise))
