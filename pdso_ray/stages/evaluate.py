"""Stage 8, ``evaluate``: predictions + ground truth → ``eval/*.json`` (the official protocol).

Validation: a PASS-style background threshold sweep. The ``predict`` stage writes, per image, a
label PNG (``predictions/validation/<wnid>/<stem>.png``, predicted ids 0..C) and a foreground
map (``predictions/validation_fg/<wnid>/<stem>.png``, single-channel uint8 = round(255 · (1 −
p_background))). For every threshold t of :data:`BACKGROUND_THRESHOLDS`, pixels whose foreground
probability is below t become background (0) and the others keep their label; each t gets its
own Hungarian matching and mIoU (:class:`~pdso_ray.method.metrics.SegmentationEvaluator`). The
best t (highest mIoU, the lowest t on ties) and its matching are kept. Each image is read and
decoded once; all thresholds are evaluated from it in the same pass, one evaluator per threshold.

Test: if ground truth exists (``test-segmentation/``; the official test GT is withheld), the test
predictions are evaluated with the best t and the *validation* matching. Without GT the
predictions are only counted: ``pdso-ray export`` packs them for the benchmark server.

Writes ``eval/threshold_curve.json`` (``[{"threshold", "mIoU"}]``), ``eval/validation.json``
(the metrics of :meth:`SegmentationResult.to_json` plus ``threshold``), ``eval/match.json``
(``{"pred id": gt id}``, the official toolbox's format) and, with test GT, ``eval/test.json``.
Without foreground maps there is no sweep: the labels are evaluated as they are (threshold null).
An image the predict stage rejected (``predictions/rejected_{split}.parquet``) is scored as an
all-background prediction and listed under ``unpredicted``; any other missing prediction is an
error (the predict stage has not finished).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from pdso_ray.data.imagenet_s import (
    read_png,
    GT_SPLITS,
    IGNORE_ID,
    LABEL_SUFFIX,
    TEST,
    VALIDATION,
    dataset_dir,
    decode_label,
)
from pdso_ray.evaluation import prefetch, relative_pngs
from pdso_ray.method.metrics import SegmentationEvaluator, SegmentationResult
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.storage import Storage
from pdso_ray.tables import read_table

log = logging.getLogger("pdso_ray")

EVAL_DIR = "eval"
PREDICTIONS_DIR = "predictions"
FG_SUFFIX = "_fg"  # predictions/<split>_fg/ holds the foreground maps of predictions/<split>/
_MAX_LISTED = 10  # missing files named in an error before the rest becomes a count
# The sweep grid, 0.00 .. 0.95 in steps of 0.05 (PASS sweeps a similar range on validation).
BACKGROUND_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(20))


# ---- the background threshold -----------------------------------------------------------------


def fg_cut(threshold: float) -> int:
    """The uint8 foreground value below which a pixel becomes background at ``threshold``.

    A pixel with stored value x (x / 255 = its foreground probability) is background iff
    x / 255 < threshold, i.e. x < ceil(255 · threshold); the product is rounded first so that
    0.2 · 255 = 51.000000000000004 gives 51, not 52.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"background threshold must be in [0, 1], got {threshold!r}")
    return math.ceil(round(255.0 * threshold, 6))


def apply_background_threshold(label: np.ndarray, fg: np.ndarray, threshold: float | None
                               ) -> np.ndarray:
    """``label`` (HxW int) with every pixel whose ``fg`` (HxW uint8, 255 · p_foreground) is below
    ``threshold`` set to background 0; ``threshold`` None returns ``label`` unchanged."""
    if threshold is None:
        return label
    if label.shape != fg.shape:
        raise ValueError(f"foreground map has shape {fg.shape} but its label has {label.shape}")
    return np.where(fg < fg_cut(threshold), 0, label).astype(label.dtype, copy=False)


def decode_fg(data: bytes) -> np.ndarray:
    """HxW uint8 from a single-channel 8-bit foreground PNG; ValueError for anything else."""
    mode, arr = read_png(data, "foreground")
    if mode != "L":
        raise ValueError(f"foreground PNG must be 8-bit single-channel (mode L), got {mode!r}")
    return arr


# ---- evaluating one split --------------------------------------------------------------------


@dataclass(frozen=True)
class EvalFile:
    """One image to evaluate: its relative name ``<wnid>/<stem>.png`` and the URLs of its
    predicted label (None: the predict stage rejected the image, scored as all background),
    foreground map (None without a sweep) and ground truth."""

    rel: str
    pred: str | None
    fg: str | None
    gt: str


def split_files(storage: Storage, pred_dir: str, fg_dir: str | None, gt_dir: str,
                rejected: Collection[str] = ()) -> list[EvalFile]:
    """Pair every GT PNG under ``gt_dir`` with its prediction (and foreground map when
    ``fg_dir`` is given), sorted by relative name.

    ``rejected``: relative names of images the predict stage could not read. The protocol
    scores every GT image, so these count as all-background predictions rather than vanish.
    Any other GT file without a prediction or foreground map is a ValueError naming up to 10.
    """
    gt = relative_pngs(gt_dir, storage)
    if not gt:
        raise ValueError(f"no ground-truth {LABEL_SUFFIX} files under {gt_dir}")
    pred = relative_pngs(pred_dir, storage)
    fg = relative_pngs(fg_dir, storage) if fg_dir is not None else None
    missing = [rel for rel in sorted(gt) if rel not in rejected
               and (rel not in pred or (fg is not None and rel not in fg))]
    if missing:
        what = "prediction" if fg is None else "prediction and foreground map"
        listed = ", ".join(missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise ValueError(f"{len(missing)} of {len(gt)} ground-truth files have no {what} "
                         f"under {pred_dir}{'' if fg is None else f' and {fg_dir}'}: "
                         f"{listed}{more}")
    return [EvalFile(rel, pred.get(rel), None if fg is None else fg.get(rel), gt[rel])
            for rel in sorted(gt)]


def rejected_by_predict(ctx: RunContext, split: str) -> set[str]:
    """Relative names (``<wnid>/<stem>.png``) of the ``split`` images the predict stage
    rejected (``predictions/rejected_{split}.parquet``, ids ``{split}/<wnid>/<stem>``)."""
    url = ctx.path(PREDICTIONS_DIR, f"rejected_{split}.parquet")
    if not ctx.storage.exists(url):
        return set()
    ids = read_table(ctx.storage, url, columns=["id"]).column("id").to_pylist()
    return {i[len(split) + 1:] + LABEL_SUFFIX for i in ids if i and i.startswith(split + "/")}


def evaluate_thresholds(storage: Storage, files: Sequence[EvalFile], classes: int,
                        thresholds: Sequence[float | None], match: dict[int, int] | None = None,
                        workers: int | None = None, progress: bool = True
                        ) -> list[SegmentationResult]:
    """One result per threshold (None = labels as they are), from a single pass over ``files``.

    Each image's label, foreground map and GT are read and decoded once (``workers`` threads
    read ahead), its ignored pixels dropped once, then every threshold's evaluator is updated
    from the same arrays, spread over the CPU cores (numpy releases the GIL in the heavy parts).
    ``match``: a fixed predicted → GT matching (test reuses validation's); None computes a
    Hungarian matching per threshold. Memory: one O(C²) evaluator per threshold.
    """
    if not files:
        raise ValueError("no images to evaluate")
    if not thresholds:
        raise ValueError("no thresholds given")
    if any(t is not None for t in thresholds) and any(f.fg is None and f.pred for f in files):
        raise ValueError("thresholds need foreground maps, and some predictions have none")
    cuts = [None if t is None else fg_cut(t) for t in thresholds]
    evaluators = [SegmentationEvaluator(classes, match=match) for _ in thresholds]
    io_workers = workers or min(16, 4 * (os.cpu_count() or 1))
    cpu_workers = max(1, min(len(thresholds), os.cpu_count() or 1))
    # Threshold k is handled by thread k % cpu_workers: each evaluator is touched by one thread.
    groups = [list(range(i, len(thresholds), cpu_workers)) for i in range(cpu_workers)]

    def load(f: EvalFile) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray]:
        gt = _read(storage, f.gt, decode_label)
        if f.pred is None:  # rejected by predict: background everywhere, at every threshold
            return f.rel, np.zeros_like(gt), np.zeros(gt.shape, np.uint8), gt
        label = _read(storage, f.pred, decode_label)
        fg = None if f.fg is None else _read(storage, f.fg, decode_fg)
        if fg is not None and fg.shape != label.shape:
            raise ValueError(f"{f.fg}: foreground map has shape {fg.shape} but the prediction "
                             f"{f.pred} has {label.shape}")
        return f.rel, label, fg, gt

    def update(group: list[int], rel: str, label: np.ndarray, fg: np.ndarray | None,
               gt: np.ndarray) -> None:
        for k in group:
            pred = label if cuts[k] is None else np.where(fg < cuts[k], 0, label)
            evaluators[k].update(pred, gt, name=rel)

    bar = tqdm(total=len(files), desc="evaluate", unit="img", disable=not progress,
               file=sys.stderr, mininterval=5.0)
    with bar, ThreadPoolExecutor(max_workers=cpu_workers) as pool:
        for rel, label, fg, gt in prefetch(load, list(files), io_workers):
            if label.shape == gt.shape:
                # Ignored pixels leave the protocol anyway: drop them once for all thresholds.
                # The evaluator takes any 2-D map, so the kept pixels go in as a 1×n row.
                keep = gt != IGNORE_ID
                label, gt = label[keep][None], gt[keep][None]
                fg = None if fg is None else fg[keep][None]
            # (a shape mismatch is left for the evaluator to report)
            for fut in [pool.submit(update, g, rel, label, fg, gt) for g in groups]:
                fut.result()
            bar.update(1)
    return [ev.finalize() for ev in evaluators]


def _read(storage: Storage, url: str, decode) -> np.ndarray:
    try:
        return decode(storage.read_bytes(url))
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None


def best_index(results: Sequence[SegmentationResult]) -> int:
    """Index of the highest mIoU; the first (with an ascending grid, the lowest threshold)
    among equals."""
    return int(np.argmax([r.miou for r in results]))


# ---- the stage -------------------------------------------------------------------------------


def predictions_dir(ctx: RunContext, split: str) -> str:
    return ctx.path(PREDICTIONS_DIR, split)


def fg_dir(ctx: RunContext, split: str) -> str:
    return ctx.path(PREDICTIONS_DIR, split + FG_SUFFIX)


class EvaluateStage(Stage):
    """Threshold sweep and matching on validation, reused on test (see the module docstring)."""

    name = "evaluate"
    config_sections = ("data.root", "data.classes", "data.class_list")
    depends_on = ("predict",)
    extra_outputs = (EVAL_DIR,)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        storage, classes = ctx.storage, ctx.cfg.data.classes
        dataset = dataset_dir(ctx.cfg.data.root, classes)
        out = ctx.path(EVAL_DIR)

        val_fg = fg_dir(ctx, VALIDATION)
        sweep = bool(relative_pngs(val_fg, storage))
        files = split_files(storage, predictions_dir(ctx, VALIDATION), val_fg if sweep else None,
                            storage.join(dataset, GT_SPLITS[VALIDATION]),
                            rejected_by_predict(ctx, VALIDATION))
        unpredicted = [f.rel for f in files if f.pred is None]
        thresholds: list[float | None] = list(BACKGROUND_THRESHOLDS) if sweep else [None]
        log.info("evaluate: %d validation images, %s", len(files),
                 f"sweeping {len(thresholds)} background thresholds" if sweep
                 else "no foreground maps, no threshold sweep")
        results = evaluate_thresholds(storage, files, classes, thresholds)
        best = best_index(results)
        threshold, val = thresholds[best], results[best]
        if sweep:
            curve = [{"threshold": t, "mIoU": r.miou} for t, r in zip(thresholds, results)]
            storage.write_json(storage.join(out, "threshold_curve.json"), curve)
        storage.write_json(storage.join(out, "match.json"),
                           {str(p): g for p, g in sorted(val.match.items())})
        storage.write_json(storage.join(out, "validation.json"),
                           {**val.to_json(), "split": VALIDATION, "threshold": threshold,
                            "unpredicted": unpredicted})
        counts: dict[str, Any] = {"validation_images": val.num_images, "mIoU": val.miou,
                                  "threshold": threshold,
                                  "validation_unpredicted": len(unpredicted)}
        log.info("evaluate: validation mIoU %.2f at background threshold %s", val.miou, threshold)

        test_pred = predictions_dir(ctx, TEST)
        counts["test_images"] = len(relative_pngs(test_pred, storage))
        test_gt = storage.join(dataset, GT_SPLITS[TEST])
        if counts["test_images"] and relative_pngs(test_gt, storage):
            test_files = split_files(storage, test_pred, fg_dir(ctx, TEST) if sweep else None,
                                     test_gt, rejected_by_predict(ctx, TEST))
            (test,) = evaluate_thresholds(storage, test_files, classes, [threshold],
                                          match=val.match)
            storage.write_json(storage.join(out, "test.json"),
                               {**test.to_json(), "split": TEST, "threshold": threshold,
                                "match_from": VALIDATION,
                                "unpredicted": [f.rel for f in test_files if f.pred is None]})
            counts["mIoU_test"] = test.miou
            log.info("evaluate: test mIoU %.2f (validation matching and threshold)", test.miou)
        elif counts["test_images"]:
            log.info("evaluate: %d test predictions, no test ground truth: kept for "
                     "`pdso-ray export`", counts["test_images"])
        return counts

