"""Image-level diagnostics of the clustering stages, best-effort (:mod:`pdso_ray.measuring`; docs/method.md,
"Measuring quality").

ImageNet-S train images sit in class folders (wnids); the method never looks at them, so they
measure it. Each clustering stage scores its assignment of images to clusters with
:func:`pdso_ray.method.cluster_metrics.cluster_scores` (purity, NMI, Hungarian accuracy, images)
and returns it in its counts under ``diagnostics.image.<step>``; the pipeline gathers them in
``summary.json``. Everything is recomputable from the run folder: the ids in the stage's Parquet
carry the class folder (``split/<wnid>/<stem>``). With ``data.layout: folder`` (or
``data.folder_is_class: false``) there is nothing to score against and nothing is recorded; ids
without a class folder (precomputed features named ``img00000001``) mean no class truth either,
recorded as such.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac

from pdso_ray.measuring import best_effort, not_computed
from pdso_ray.method.cluster_metrics import cluster_scores
from pdso_ray.stages.base import RunContext
from pdso_ray.tables import iter_row_groups

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


def _first_id(ids: pa.ChunkedArray) -> str:
    return str(ids[0].as_py()) if len(ids) else ""


def image_diagnostics(ctx: RunContext, folder: str,
                      steps: Callable[[], Sequence[tuple[str, np.ndarray, np.ndarray | None]]]) -> dict[str, Any]:
    """The counts entry ``{"diagnostics": {"image": {step: scores}}}`` of a clustering stage.

    ``folder``: the stage's Parquet (its ``id`` column, in the row order of ``steps``' arrays);
    ``steps()``: ``(step, labels (N,), mask (N,) bool or None)`` to score against the class
    folders. A step that cannot be scored records ``"not computed: <reason>"``; with no class
    folders by the layout, nothing is recorded."""
    if not ctx.data.folder_is_class:
        return {}
    what = f"image-level diagnostics of {folder.rstrip('/').rsplit('/', 1)[-1]}"

    def scores() -> dict[str, Any]:
        ids = pa.chunked_array([c for t in iter_row_groups(ctx.storage, folder, columns=["id"])
                                for c in t.column("id").chunks], pa.string())
        truth = class_codes(ids)
        named = steps()
        if truth is None:
            reason = not_computed(f"no class truth: the image ids have no class folder (e.g. {_first_id(ids)!r})")
            log.info("%s: %s", what, reason)
            return {name: reason for name, _, _ in named}
        return {name: best_effort(f"{what} ({name})", lambda labels=labels, mask=mask: cluster_scores(
            np.asarray(labels, dtype=np.int64), truth, mask)) for name, labels, mask in named}

    result = best_effort(what, scores)
    if isinstance(result, str):
        return {"diagnostics": {"image": {"all": result}}}
    return {"diagnostics": {"image": result}}
