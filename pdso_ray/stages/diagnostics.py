"""Image-level diagnostics of the clustering stages against the classes the method never reads,
best-effort (:mod:`pdso_ray.measuring`; docs/method.md, "Measuring quality").

ImageNet-S train images sit in class folders (wnids); the method never looks at them, so they
measure it. Each clustering stage scores its assignment of images to clusters with
:func:`pdso_ray.method.cluster_metrics.cluster_scores` (purity, NMI, Hungarian accuracy, images)
and returns it in its counts under ``diagnostics.image.<step>``; the pipeline gathers them in
``summary.json``. Everything is recomputable from the run folder: the features' ``cls`` column
holds each image's class (its class folder, or the ``cls`` of a shard's sample or a table's row),
joined to the stage's Parquet by id; features without that column (a ``data.features`` folder)
give the class folder in the id (``split/<wnid>/<stem>``). With ``data.layout: folder`` (or
``data.folder_is_class: false``) there is nothing to score against and nothing is recorded; images
that carry no class (ids without a class folder, such as precomputed features named
``img00000001``, or samples without ``cls``) mean no class truth, recorded as such.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from pdso_ray.measuring import best_effort, not_computed
from pdso_ray.method.cluster_metrics import cluster_scores
from pdso_ray.stages.base import RunContext
from pdso_ray.tables import iter_row_groups, parquet_files

log = logging.getLogger("pdso_ray")


def class_codes(ids: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """(N,) int64 code of each id's class folder (the component after the split), computed in
    Arrow without Python strings per row: equal folders get equal codes. None when some id has no
    class folder (``"all/x"``, ``"img00000001"``): there is no class truth."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    parts = pac.split_pattern(ids, "/", max_splits=2)
    if pac.min(pac.list_value_length(parts)).as_py() < 3:
        return None
    encoded = pac.dictionary_encode(pac.list_element(parts, 1))
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries().combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def classes_of(ctx: RunContext, ids: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """(N,) int64 class code of each train image id (-1: no class), None when none has one. The
    classes are the features' ``cls`` column (the layout's class of each image: its class folder,
    or a shard's ``cls`` member); features without that column (a ``data.features`` folder) give
    the class folder in the id (:func:`class_codes`)."""
    return _class_truth(ctx, ids)[0]


def _class_truth(ctx: RunContext, ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray | None, str]:
    """:func:`classes_of` and, when it is None, why there is no class truth."""
    known = _feature_classes(ctx)
    if known is None:
        first = str(ids[0].as_py()) if len(ids) else ""
        return class_codes(ids), f"the image ids have no class folder (e.g. {first!r})"
    positions = pac.index_in(ids, value_set=known.column("id"))
    cls = pac.take(known.column("cls"), positions)
    cls = pac.if_else(pac.equal(cls, ""), pa.scalar(None, pa.string()), cls)
    encoded = pac.dictionary_encode(cls)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.unify_dictionaries().combine_chunks()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return (codes, "") if (codes >= 0).any() else (None, "no image has a class (no cls, no class folder)")


def _feature_classes(ctx: RunContext) -> pa.Table | None:
    """``id``, ``cls`` of the features, None when they have no ``cls`` column."""
    files = parquet_files(ctx.storage, ctx.run.features_dir)
    if not files:
        return None
    with ctx.storage.open(files[0], "rb") as f:
        if "cls" not in pq.read_schema(f).names:
            return None
    tables = list(iter_row_groups(ctx.storage, files, columns=["id", "cls"]))
    return pa.concat_tables(tables).combine_chunks()


def image_scores(truth: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> dict[str, Any]:
    """``{"purity", "nmi", "accuracy", "images"}`` of ``labels`` against ``truth`` within
    ``mask``; images without a class (truth -1) are left out."""
    known = truth >= 0
    return cluster_scores(np.asarray(labels, dtype=np.int64), np.where(known, truth, 0),
                          known if mask is None else (known & np.asarray(mask, dtype=bool)))


def image_diagnostics(ctx: RunContext, folder: str,
                      steps: Callable[[], Sequence[tuple[str, np.ndarray, np.ndarray | None]]]) -> dict[str, Any]:
    """The counts entry ``{"diagnostics": {"image": {step: scores}}}`` of a clustering stage.

    ``folder``: the stage's Parquet (its ``id`` column, in the row order of ``steps``' arrays);
    ``steps()``: ``(step, labels (N,), mask (N,) bool or None)`` to score against the images'
    classes (:func:`classes_of`). A step that cannot be scored records ``"not computed:
    <reason>"``; with no classes by the layout, nothing is recorded."""
    if not ctx.data.folder_is_class:
        return {}
    what = f"image-level diagnostics of {folder.rstrip('/').rsplit('/', 1)[-1]}"

    def scores() -> dict[str, Any]:
        ids = pa.chunked_array([c for t in iter_row_groups(ctx.storage, folder, columns=["id"])
                                for c in t.column("id").chunks], pa.string())
        truth, why = _class_truth(ctx, ids)
        named = steps()
        if truth is None:
            reason = not_computed(f"no class truth: {why}")
            log.info("%s: %s", what, reason)
            return {name: reason for name, _, _ in named}
        return {name: best_effort(f"{what} ({name})", lambda labels=labels, mask=mask: image_scores(
            truth, labels, mask)) for name, labels, mask in named}

    result = best_effort(what, scores)
    if isinstance(result, str):
        return {"diagnostics": {"image": {"all": result}}}
    return {"diagnostics": {"image": result}}
