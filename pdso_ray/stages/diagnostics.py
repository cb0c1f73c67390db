"""Image-level diagnostics of the clustering stages against the class folders the method never
reads (docs/method.md, "Measuring quality").

ImageNet-S train images sit in class folders (wnids); the method never looks at them, so they
measure it. Each clustering stage scores its assignment of images to clusters with
:func:`pdso_ray.method.cluster_metrics.cluster_scores` (purity, NMI, Hungarian accuracy, images)
and returns it in its counts under ``diagnostics.image.<step>``; the pipeline gathers them in
``summary.json``. Everything is recomputable from the run folder: the ids in the stage's Parquet
carry the class folder (``split/<wnid>/<stem>``). With ``data.layout: folder`` (or
``data.folder_is_class: false``) there is no class to score against and nothing is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac

from pdso_ray.method.cluster_metrics import cluster_scores
from pdso_ray.stages.base import RunContext
from pdso_ray.tables import iter_row_groups

def class_codes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) int64 code of each id's class folder (the component after the split), computed in
    Arrow without Python strings per row: equal folders get equal codes."""
    parts = pac.split_pattern(ids, "/", max_splits=2)
    folders = pac.list_element(parts, 1)
    encoded = pac.dictionary_encode(folders)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries().combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def folder_classes(ctx: RunContext, folder: str) -> np.ndarray | None:
    """The class code of every row of a Parquet folder (file order), or None when this run's
    images have no class folders to score against."""
    if not ctx.data.folder_is_class:
        return None
    ids = [t.column("id") for t in iter_row_groups(ctx.storage, folder, columns=["id"])]
    if not ids:
        return None
    return class_codes(pa.chunked_array([c for t in ids for c in t.chunks]))


def image_scores(truth: np.ndarray | None, labels: np.ndarray,
                 mask: np.ndarray | None = None) -> dict[str, Any] | None:
    """``{"purity", "nmi", "accuracy", "images"}`` of ``labels`` against ``truth`` within
    ``mask`` (None when there is no truth)."""
    if truth is None:
        return None
    return cluster_scores(np.asarray(labels, dtype=np.int64), truth, mask)


def image_diagnostics(steps: Sequence[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    """The counts entry ``{"diagnostics": {"image": {step: scores}}}`` of the steps that could be
    scored (empty when none could)."""
    scored = {name: scores for name, scores in steps if scores is not None}
    return {"diagnostics": {"image": scored}} if scored else {}
