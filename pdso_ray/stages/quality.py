"""The run's label-free quality signals, measured from the run folder before the report is built
(:mod:`pdso_ray.method.quality`; docs/method.md, "Label-free quality signals").

Each signal reads a bounded sample, so the cost does not grow with the data set: at most
:data:`MAX_LABEL_IMAGES` pseudo labels and predictions (spread over the ids by a hash) and the
first :data:`MAX_FEATURE_ROWS` feature rows; the class agreement reads the evaluation's validation
confusion matrix (``eval/confusion.npy``) when there is one. Each is best-effort (:mod:`pdso_ray.measuring`): what
cannot be measured is recorded as ``not computed: <reason>`` and the others go on. The result,
with the warnings :func:`~pdso_ray.method.quality.quality_warnings` draws from it, is written to
``report/quality.json``; the report shows it at the top, the CLI prints the warnings last.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from pdso_ray.data.ids import LABEL_SUFFIX, image_id
from pdso_ray.measuring import best_effort, not_computed
from pdso_ray.method import quality
from pdso_ray.report.base import sample
from pdso_ray.stages.base import RunContext
from pdso_ray.tables import column_names, column_values, iter_row_groups, load_array

log = logging.getLogger("pdso_ray")

MAX_LABEL_IMAGES = 300
MAX_FEATURE_ROWS = 4000
# Where the demo's stand-in models ship (pdso_ray/standins/assets/): a path, not an import (the
# stand-ins sit on the top floor).
STANDIN_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "standins", "assets")


def uses_standins(ctx: RunContext) -> bool:
    """Whether the run's DINO is the demo's stand-in, trained on synthetic shapes only."""
    checkpoint = ctx.cfg.models.dino.checkpoint
    if not checkpoint or "://" in checkpoint:
        return False
    return os.path.dirname(os.path.realpath(checkpoint)) == os.path.realpath(STANDIN_ASSETS)


def measure_quality(ctx: RunContext) -> dict[str, Any]:
    """``{signal: measurement or "not computed: ..."} + {"standins", "ground_truth",
    "warnings"}`` for the run folder as it is now (module docstring)."""
    storage = ctx.storage
    signals: dict[str, Any] = {
        "standins": uses_standins(ctx),
        "ground_truth": any(info.gt_dir for info in ctx.data.eval_splits(storage)),
    }
    refined = _refined_labels(ctx)
    predictions = _predictions(ctx)
    if refined:
        signals["pseudo_labels"] = best_effort("quality: pseudo labels", lambda: _label_set(ctx, refined))
    if predictions:
        signals["predictions"] = best_effort("quality: predictions", lambda: _label_set(ctx, predictions))
        if refined:
            signals["agreement"] = best_effort("quality: agreement",
                                               lambda: _agreement(ctx, predictions, refined))
    if storage.exists(ctx.run.centroids_file("cluster")):
        signals.update(_feature_signals(ctx))
    if storage.exists(ctx.run.confusion_file):
        signals["classes"] = best_effort("quality: classes", lambda: quality.class_agreement(
            load_array(storage, ctx.run.confusion_file)))
    signals["warnings"] = quality.quality_warnings(signals)
    return signals


def _refined_labels(ctx: RunContext) -> dict[str, str]:
    """``{id: URL}`` of a sample of the refined train pseudo labels (from ``labels/stats/``)."""
    urls: dict[str, str] = {}
    for table in iter_row_groups(ctx.storage, ctx.run.label_stats_dir, ["id", "label_refined"]):
        urls.update((i, u) for i, u in zip(*(table.column(c).to_pylist() for c in ("id", "label_refined"))) if u)
    return {i: urls[i] for i in sample(list(urls), MAX_LABEL_IMAGES)}


def _predictions(ctx: RunContext) -> dict[str, str]:
    """``{id: URL}`` of a sample of the prediction PNGs of every evaluation split."""
    urls: dict[str, str] = {}
    for info in ctx.data.eval_splits(ctx.storage):
        folder = ctx.run.predictions_dir(info.split)
        if ctx.storage.exists(folder):
            urls.update((image_id(info.split, rel[: -len(LABEL_SUFFIX)]), url)
                        for rel, url in ctx.storage.list_relative(folder, LABEL_SUFFIX).items())
    return {i: urls[i] for i in sample(list(urls), MAX_LABEL_IMAGES)}


def _read_label(ctx: RunContext, url: str) -> np.ndarray:
    from pdso_ray.data.imagenet_s import decode_label

    return decode_label(ctx.storage.read_bytes(url))


def _label_set(ctx: RunContext, urls: dict[str, str]) -> dict[str, Any]:
    labels = quality.LabelSet(ctx.cfg.data.classes)
    for image_id_, url in urls.items():
        labels.add(image_id_, _read_label(ctx, url))
    return labels.summary()


def _agreement(ctx: RunContext, predictions: dict[str, str], refined: dict[str, str]) -> dict[str, Any] | str:
    both = sorted(set(predictions) & set(refined))
    if not both:
        return not_computed("no sampled image has both a prediction and a refined pseudo label "
                            "(the model predicts evaluation images, the pseudo labels are of train images)")
    scores = [quality.agreement(_read_label(ctx, predictions[i]), _read_label(ctx, refined[i])) for i in both]
    agree, iou = np.array(scores).T
    return {"images": len(both), "median": float(np.nanmedian(agree)),
            "median_foreground_iou": float(np.nanmedian(iou)) if np.isfinite(iou).any() else float("nan"),
            "per_image": {i: round(float(a), 4) for i, a in zip(both, agree)},
            "per_image_foreground_iou": {i: round(float(a), 4) for i, a in zip(both, iou) if np.isfinite(a)}}


def _feature_rows(ctx: RunContext) -> tuple[np.ndarray, np.ndarray | None]:
    """The first :data:`MAX_FEATURE_ROWS` feature rows (N×D float32) and their saliency peaks
    (N×2, None when the features have none, as precomputed ones may not)."""
    folder = ctx.run.features_dir
    has_peaks = "saliency_peak" in column_names(ctx.storage, folder)
    feats, peaks, n = [], [], 0
    for table in iter_row_groups(ctx.storage, folder, ["feat", *(["saliency_peak"] if has_peaks else [])]):
        feats.append(np.asarray(table.column("feat").to_pylist(), dtype=np.float32))
        if has_peaks:
            peaks.append(np.asarray(table.column("saliency_peak").to_pylist(), dtype=np.float64))
        n += table.num_rows
        if n >= MAX_FEATURE_ROWS:
            break
    x = np.concatenate(feats)[:MAX_FEATURE_ROWS]
    return x, (np.concatenate(peaks)[:MAX_FEATURE_ROWS] if has_peaks else None)


def _feature_signals(ctx: RunContext) -> dict[str, Any]:
    """``clusters`` (k-means #1's sizes over every image, compactness on the sample),
    ``stability`` (against k-means from ``seed + 1`` on the sample) and ``saliency``."""
    c = ctx.cfg.data.classes
    rows = best_effort("quality: feature sample", lambda: _feature_rows(ctx))
    if isinstance(rows, str):
        return {"clusters": rows, "stability": rows, "saliency": rows}
    x, peaks = rows
    centroids = load_array(ctx.storage, ctx.run.centroids_file("cluster")).astype(np.float32)

    def clusters() -> dict[str, Any]:
        assigned = column_values(ctx.storage, ctx.run.stage_dir("cluster"), "cluster")
        nearest, ratios = quality.margin_ratios(x, centroids)
        out = quality.cluster_signals(assigned if assigned is not None else nearest, len(centroids), ratios, nearest)
        return {**out, "classes": c}

    def stability() -> dict[str, Any]:
        nearest = quality.margin_ratios(x, centroids)[0]
        return {**quality.seed_stability(x, nearest, len(centroids), ctx.cfg.seed + 1), "images": len(x)}

    def saliency() -> dict[str, Any] | str:
        if peaks is None:
            return not_computed("the features have no saliency_peak column")
        return {"border_share": quality.border_share(peaks), "images": len(peaks)}

    return {"clusters": best_effort("quality: clusters", clusters),
            "stability": best_effort("quality: stability", stability),
            "saliency": best_effort("quality: saliency", saliency)}
