"""Evaluate a folder of predicted label PNGs against ImageNet-S ground truth (the I/O side).

Files pair by relative path (``<wnid>/<name>.png``) under the two folders; the protocol itself
lives in :mod:`pdso_ray.method.metrics`. Used by the ``evaluate`` stage and by
``pdso-ray evaluate --pred DIR --gt DIR --classes C [--match FILE] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
from tqdm import tqdm

from pdso_ray.data.imagenet_s import LABEL_SUFFIX, decode_label
from pdso_ray.method.metrics import (
    RESIZE_MODES,
    SIZE_BIN_NAMES,
    SegmentationEvaluator,
    SegmentationResult,
    check_match,
)
from pdso_ray.storage import Storage

# Files named in a "missing predictions" error before the rest is summarised as a count.
_MAX_LISTED = 10


def pair_files(pred_dir: str, gt_dir: str, storage: Storage) -> list[tuple[str, str, str]]:
    """``(relative path, prediction URL, GT URL)`` for every GT PNG under ``gt_dir``, sorted.

    Raises ValueError when ``gt_dir`` holds no PNG or a GT file has no prediction (naming up to
    10 of them). Predictions without a GT file are not evaluated.
    """
    gt = relative_pngs(gt_dir, storage)
    if not gt:
        raise ValueError(f"no ground-truth {LABEL_SUFFIX} files under {gt_dir}")
    pred = relative_pngs(pred_dir, storage)
    missing = [rel for rel in gt if rel not in pred]
    if missing:
        listed = ", ".join(missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise ValueError(f"{len(missing)} of {len(gt)} ground-truth files have no prediction "
                         f"under {pred_dir}: {listed}{more}")
    return [(rel, pred[rel], gt[rel]) for rel in sorted(gt)]


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


def evaluate_dirs(pred_dir: str, gt_dir: str, classes: int, match_file: str | None = None,
                  storage: Storage | None = None, progress: bool = True,
                  resize: str | None = None, workers: int = 8) -> SegmentationResult:
    """Evaluate the predictions under ``pred_dir`` against the GT under ``gt_dir``.

    ``classes`` is C. If ``match_file`` exists it is read and applied (the test split reuses the
    validation matching); otherwise the Hungarian matching is computed and, when ``match_file``
    is given, written there as JSON. ``resize``: None (size mismatch raises ValueError) or
    ``"nearest"``. ``workers`` threads read and decode PNGs ahead of the (single-threaded)
    accumulation; at most ``2 * workers`` decoded pairs are held at once.
    Returns the result; ``result.to_json()`` is its JSON form.
    """
    storage = storage or Storage()
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    pairs = pair_files(pred_dir, gt_dir, storage)
    reuse = match_file is not None and storage.exists(match_file)
    match = read_match(match_file, classes, storage) if reuse else None
    evaluator = SegmentationEvaluator(classes, match=match, resize=resize)

    def load(pair: tuple[str, str, str]) -> tuple[str, np.ndarray, np.ndarray]:
        rel, pred_url, gt_url = pair
        return rel, _decode(pred_url, storage), _decode(gt_url, storage)

    bar = tqdm(total=len(pairs), desc="evaluate", unit="img", disable=not progress,
               file=sys.stderr)
    with bar:
        for rel, pred, gt in prefetch(load, pairs, workers):
            evaluator.update(pred, gt, name=rel)
            bar.update(1)
    result = evaluator.finalize()
    if match_file is not None and not reuse:
        storage.write_json(match_file, {str(p): g for p, g in sorted(result.match.items())})
    return result


# ---- command line ----------------------------------------------------------------------------


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pdso-ray evaluate``."""
    parser.add_argument("--pred", required=True, help="folder (or URL) of predicted label PNGs")
    parser.add_argument("--gt", required=True, help="folder (or URL) of ground-truth label PNGs")
    parser.add_argument("--classes", required=True, type=int, help="number of classes C")
    parser.add_argument("--match", default=None,
                        help="matching JSON: reused if it exists, else computed and written")
    parser.add_argument("--resize", default=None, choices=[m for m in RESIZE_MODES if m],
                        help="resize predictions whose size differs from their GT "
                             "(default: such a prediction is an error)")
    parser.add_argument("--workers", type=int, default=8, help="threads reading PNGs")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON line {mIoU, IoU, match, ...} instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (on stderr)")


def run_evaluate_command(args: argparse.Namespace) -> int:
    """Run ``pdso-ray evaluate``; returns the exit status (2 for bad input)."""
    try:
        result = evaluate_dirs(args.pred, args.gt, args.classes, match_file=args.match,
                               progress=not args.quiet,
                               resize=args.resize, workers=args.workers)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdso-ray evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), allow_nan=False))
    else:
        print(format_result(result))
    return 0


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


def relative_pngs(root: str, storage: Storage) -> dict[str, str]:
    """``{relative path: URL}`` of the PNGs under ``root``; hidden files (our atomic writes'
    temporary names) are skipped."""
    _, base = storage.fs(root)
    base = base.rstrip("/") + "/"
    out = {}
    for url in storage.list_files(root, suffixes=(LABEL_SUFFIX,)):
        _, path = storage.fs(url)
        if not path.startswith(base):
            raise ValueError(f"listing of {root} returned {url}, which is outside it")
        rel = path[len(base):]
        if not any(part.startswith(".") for part in rel.split("/")):
            out[rel] = url
    return out


def _decode(url: str, storage: Storage) -> np.ndarray:
    try:
        return decode_label(storage.read_bytes(url))
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None


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
