"""Evaluating folders of predicted label PNGs against ImageNet-S ground truth (the I/O side).

Files pair by relative name (``<wnid>/<stem>.png``) between a prediction folder and the ground
truth — a folder, or a mapping for ground truth held in shards or tables (PNG sources,
:mod:`pdso_ray.data.png_sets`; either folder may hold PNG shards); the protocol itself lives in
:mod:`pdso_ray.method.metrics`. One implementation serves
the ``evaluate`` stage (:mod:`pdso_ray.stages.evaluate`) and ``pdso-ray evaluate``
(:func:`evaluate_dirs`).

Background threshold rule (``predict.background: threshold``, PASS's rule): beside each label PNG
of the best foreground class, a foreground map (8-bit, ``round(255 · (1 − p_background))``) lets
:func:`evaluate_thresholds` score many thresholds t in one pass: pixels whose foreground
probability is below t become background (:func:`apply_background_threshold`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
from tqdm import tqdm

from pdso_ray.data.imagenet_s import IGNORE_ID, decode_gray_png, decode_label
from pdso_ray.data.members import read_one
from pdso_ray.data.png_sets import PngSource, png_files
from pdso_ray.method.metrics import (
    RESIZE_MODES,
    SIZE_BIN_NAMES,
    SegmentationEvaluator,
    SegmentationResult,
    check_match,
)
from pdso_ray.data.ids import LABEL_SUFFIX
from pdso_ray.storage import Storage

_MAX_LISTED = 10  # missing files named in an error before the rest becomes a count
# The background-threshold sweep grid, 0.00 .. 0.95 in steps of 0.05 (PASS sweeps a similar range).
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
    """HxW uint8 from a single-channel 8-bit foreground (or saliency) PNG; ValueError for
    anything else."""
    return decode_gray_png(data, "foreground")


# ---- pairing files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalFile:
    """One image to evaluate: its relative name ``<wnid>/<stem>.png`` and the URLs of its
    predicted label (None: the image was rejected before it could be predicted, scored as all
    background), foreground map (None without a threshold sweep) and ground truth."""

    rel: str
    pred: str | None
    fg: str | None
    gt: str


def pair_files(storage: Storage, pred_dir: PngSource, gt_dir: PngSource, fg_dir: PngSource | None = None,
               rejected: Collection[str] = ()) -> list[EvalFile]:
    """Pair every GT PNG of ``gt_dir`` with its prediction (and foreground map when
    ``fg_dir`` is given), sorted by relative name. Each is a PNG source
    (:mod:`pdso_ray.data.png_sets`): a folder of PNGs or PNG shards, or a mapping
    ``{<rel>.png: URL}`` (the ground truth held in shards or tables).

    ``rejected``: relative names of images that could not be read. The protocol scores every GT
    image, so these count as all-background predictions rather than vanish. Any other GT file
    without a prediction or foreground map is a ValueError naming up to 10. Predictions without a
    GT file are not evaluated.
    """
    gt = png_files(storage, gt_dir)
    if not gt:
        raise ValueError(f"no ground-truth {LABEL_SUFFIX} files under {_describe(gt_dir)}")
    pred = png_files(storage, pred_dir)
    fg = png_files(storage, fg_dir) if fg_dir is not None else None
    missing = [rel for rel in sorted(gt) if rel not in rejected
               and (rel not in pred or (fg is not None and rel not in fg))]
    if missing:
        what = "prediction" if fg is None else "prediction and foreground map"
        listed = ", ".join(missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise ValueError(f"{len(missing)} of {len(gt)} ground-truth files have no {what} "
                         f"under {_describe(pred_dir)}{'' if fg is None else f' and {_describe(fg_dir)}'}: "
                         f"{listed}{more}")
    return [EvalFile(rel, pred.get(rel) if rel not in rejected else None,
                     None if fg is None or rel in rejected else fg.get(rel), gt[rel])
            for rel in sorted(gt)]


def read_match(match_file: str, num_classes: int, storage: Storage) -> dict[int, int]:
    """The matching stored at ``match_file``: JSON ``{"pred id": gt id}`` (the official
    toolbox's format), validated against ``num_classes``."""
    try:
        raw = storage.read_json(match_file)
    except json.JSONDecodeError as e:
        raise ValueError(f"match file {match_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"match file {match_file} must hold a non-empty JSON object")
    try:
        return check_match(raw, num_classes)
    except ValueError as e:
        raise ValueError(f"match file {match_file}: {e}") from None


# ---- evaluating ------------------------------------------------------------------------------


def evaluate_thresholds(storage: Storage, files: Sequence[EvalFile], classes: int,
                        thresholds: Sequence[float | None] = (None,),
                        match: dict[int, int] | None = None, resize: str | None = None,
                        workers: int | None = None, progress: bool = True, size_bins: bool = True,
                        per_image: bool = False) -> list[SegmentationResult]:
    """One result per threshold (None = labels as they are), from a single pass over ``files``.

    Each image's label, foreground map and GT are read and decoded once (``workers`` threads
    read ahead, at most ``2 · workers`` images in memory), its ignored pixels dropped once, then
    every threshold's evaluator is updated from the same arrays, spread over the CPU cores (numpy
    releases the GIL in the heavy parts). ``match``: a fixed predicted → GT matching (test reuses
    validation's); None computes a Hungarian matching per threshold. ``resize``: None (a size
    mismatch is an error) or ``"nearest"``. Memory: one O(C²) evaluator per threshold
    (``size_bins=False`` drops 4 of its 7 C×C tables, for long sweeps at large C). ``per_image``:
    each result's ``image_miou`` scores every image alone, by its relative name.
    """
    if not files:
        raise ValueError("no images to evaluate")
    if not thresholds:
        raise ValueError("no thresholds given")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if any(t is not None for t in thresholds) and any(f.fg is None and f.pred for f in files):
        raise ValueError("thresholds need foreground maps, and some predictions have none")
    cuts = [None if t is None else fg_cut(t) for t in thresholds]
    evaluators = [SegmentationEvaluator(classes, match=match, resize=resize, size_bins=size_bins,
                                        per_image=per_image) for _ in thresholds]
    io_workers = workers or min(16, 4 * (os.cpu_count() or 1))
    cpu_workers = max(1, min(len(thresholds), os.cpu_count() or 1))
    # Threshold k is handled by thread k % cpu_workers: each evaluator is touched by one thread.
    groups = [list(range(i, len(thresholds), cpu_workers)) for i in range(cpu_workers)]

    def load(f: EvalFile) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray]:
        gt = _read(storage, f.gt, decode_label)
        if f.pred is None:  # rejected: background everywhere, at every threshold
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
            # (a shape mismatch is left for the evaluator to resize or report)
            for fut in [pool.submit(update, g, rel, label, fg, gt) for g in groups]:
                fut.result()
            bar.update(1)
    return [ev.finalize() for ev in evaluators]


def per_image_accuracy(storage: Storage, files: Sequence[EvalFile], match: dict[int, int],
                       workers: int = 8) -> dict[str, float]:
    """``{relative name: accuracy}``: per image, the share of its valid (non-ignore) pixels whose
    prediction, mapped by ``match`` (predicted → GT id), equals the GT (NaN for an image with no
    valid pixel). Scores single images under a dataset's matching, e.g. to find the images that
    a refinement helped or hurt most."""
    lut = np.full(max(match) + 1 if match else 1, -1, dtype=np.int64)
    for p, g in match.items():
        lut[p] = g

    def score(f: EvalFile) -> tuple[str, float]:
        gt = _read(storage, f.gt, decode_label)
        pred = np.zeros_like(gt) if f.pred is None else _read(storage, f.pred, decode_label)
        if pred.shape != gt.shape:
            raise ValueError(f"{f.pred}: shape {pred.shape}, its GT {f.gt} has {gt.shape}")
        keep = gt != IGNORE_ID
        if not keep.any():
            return f.rel, float("nan")
        p = pred[keep]
        mapped = np.where(p < len(lut), lut[np.minimum(p, len(lut) - 1)], -1)
        return f.rel, float((mapped == gt[keep]).mean())

    return dict(prefetch(score, list(files), workers))


def best_index(results: Sequence[SegmentationResult]) -> int:
    """Index of the highest mIoU; the first (with an ascending grid, the lowest threshold)
    among equals."""
    return int(np.argmax([r.miou for r in results]))


def evaluate_dirs(pred_dir: PngSource, gt_dir: PngSource, classes: int, match_file: str | None = None,
                  storage: Storage | None = None, progress: bool = True,
                  resize: str | None = None, workers: int = 8) -> SegmentationResult:
    """Evaluate the predictions under ``pred_dir`` against the GT under ``gt_dir`` as they are
    (PNG sources: folders of PNGs or PNG shards, or mappings).

    ``classes`` is C. If ``match_file`` exists it is read and applied (the test split reuses the
    validation matching); otherwise the Hungarian matching is computed and, when ``match_file``
    is given, written there as JSON. ``resize``: None (size mismatch raises ValueError) or
    ``"nearest"``. Returns the result; ``result.to_json()`` is its JSON form.
    """
    storage = storage or Storage()
    files = pair_files(storage, pred_dir, gt_dir)
    reuse = match_file is not None and storage.exists(match_file)
    match = read_match(match_file, classes, storage) if reuse else None
    (result,) = evaluate_thresholds(storage, files, classes, [None], match=match, resize=resize,
                                    workers=workers, progress=progress)
    if match_file is not None and not reuse:
        storage.write_json(match_file, {str(p): g for p, g in sorted(result.match.items())})
    return result


def format_result(result: SegmentationResult) -> str:
    """Human-readable summary: headline numbers, then one line per class."""

    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.2f}"

    lines = [
        f"images {result.num_images}, valid pixels {result.num_pixels}",
        f"mIoU {pct(result.miou)}  Acc {pct(result.image_accuracy)}  "
        f"PixelAcc {pct(result.pixel_accuracy)}",
        "size mIoU  " + "  ".join(f"{k} {pct(result.size_miou[k])}" for k in SIZE_BIN_NAMES),
    ]
    if result.resized:
        lines.append(f"resized {len(result.resized)} predictions to their GT size")
    lines.append("class  IoU")
    lines += [f"{c:5d}  {pct(v)}" for c, v in enumerate(result.iou)]
    return "\n".join(lines)


# ---- helpers ---------------------------------------------------------------------------------


def _read(storage: Storage, url: str, decode) -> np.ndarray:
    try:
        return decode(read_one(storage, url))
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None


def _describe(source: PngSource) -> str:
    return source if isinstance(source, str) else f"the dataset's ground truth ({len(source)} masks)"


def prefetch(fn, items: list, workers: int) -> Iterator:
    """``fn(item)`` for each item, in order, computed by ``workers`` threads at most
    ``2 * workers`` items ahead of the consumer (bounded memory, unlike ``Executor.map``)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        it = iter(items)
        pending = deque(pool.submit(fn, item) for item in islice(it, 2 * workers))
        while pending:
            done = pending.popleft()
            pending.extend(pool.submit(fn, item) for item in islice(it, 1))
            yield done.result()
    finally:
        # Also reached when the consumer stops early (an error in one image): drop the rest.
        pool.shutdown(wait=True, cancel_futures=True)
