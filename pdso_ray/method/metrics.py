"""The ImageNet-S evaluation protocol on label arrays (pure numpy/scipy).

Conventions: a label map is an HxW integer array of class ids; 0 is background, 1..C the classes,
1000 (``IGNORE_ID``) marks pixels the ground truth (GT) leaves out. Predicted ids are the model's
own cluster ids in 0..C; matching maps them to GT ids. Every percentage is in [0, 100].

The protocol, as the official toolbox (LUSSeg/ImageNet-S, ``evaluation/``) computes it:

1. Pixels whose GT is 1000 are dropped from GT *and* prediction before anything else.
2. Matching (validation): a class is present in an image if at least one remaining pixel has it.
   For foreground ids p, g in 1..C, ``cooccurrence[p-1, g-1]`` counts the images in which
   predicted id p and GT id g are both present. The one-to-one assignment maximising the summed
   co-occurrence maps predicted ids to GT ids (the official code minimises ``1 - count / N`` with
   ``munkres``; we maximise the counts with ``scipy.optimize.linear_sum_assignment``: the same
   optimum, but where several assignments tie, either may be chosen). Background maps to
   background (0 -> 0). The test split reuses the validation matching.
3. Per class c in 0..C, with the matched prediction: TP = pixels predicted c whose GT is c,
   P = pixels predicted c, T = pixels whose GT is c, summed over the whole dataset;
   IoU = TP / (T + P - TP + 1e-10), so a class absent from GT and prediction scores 0.
   mIoU is the mean over all C + 1 classes, background included.
4. "Acc" (image-level accuracy): per image, the matched foreground id with most predicted pixels
   (lowest id on ties) counts as a hit when it is present in the GT; images with no predicted
   foreground are misses.
5. Size bins S / MS / ML / L: per image, each GT foreground class is binned by
   ceil(100 * its pixels / valid pixels) <= 5, <= 25, <= 50, > 50; each bin accumulates T, P, TP
   over the pixels of its classes plus all GT-background pixels of the image; the bin's mIoU
   averages the IoU of the classes whose T > 0 in that bin (NaN for a bin no image uses).

Where this module departs from the official code, on purpose:

- Counts accumulate in int64 (the official float32 sums drop pixels past 2**24 per class).
- Size bins use exact integer comparisons instead of float32 percentages.
- A predicted id outside 0..C on a non-ignored pixel is a ValueError (the official code raises a
  KeyError when it applies the matching, and silently drops such pixels without one).
- A prediction whose shape differs from its GT is a ValueError, unless ``resize="nearest"``
  resizes it (nearest neighbour) and records the image (the official code never resizes).
- Pixel accuracy (matched TP over valid pixels) is reported in addition; boundary IoU and the
  F-measure of the official toolbox are not computed.

Memory is O(C^2): the evaluator keeps pixel confusion matrices (predicted id x GT id) and the
image co-occurrence counts, and applies the matching when it finalises, so one pass suffices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

IGNORE_ID = 1000
BACKGROUND_ID = 0
# Upper edges, in percent of an image's valid pixels, of the first three object-size bins.
SIZE_BIN_EDGES = (5, 25, 50)
SIZE_BIN_NAMES = ("S", "MS", "ML", "L")
RESIZE_MODES = (None, "nearest")
# The official IoU denominator's epsilon: a class with no pixels anywhere scores 0, not NaN.
_EPS = 1e-10


# ---- single-image helpers ------------------------------------------------------------------


def drop_ignored(pred: np.ndarray, gt: np.ndarray, ignore_id: int = IGNORE_ID
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Flattened ``(pred, gt)`` without the pixels whose GT is ``ignore_id``.

    Both inputs must have the same shape; the prediction's value at an ignored pixel never
    matters (it is dropped before matching too).
    """
    pred, gt = np.ravel(pred), np.ravel(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels, GT {gt.size}")
    keep = gt != ignore_id
    if keep.all():
        return pred, gt
    return pred[keep], gt[keep]


def resize_nearest(label: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``label`` (HxW) resized to ``shape`` (H'xW') by nearest neighbour, pixel centres aligned.

    Output pixel (i, j) takes input pixel (floor((i + 0.5) * H / H'), floor((j + 0.5) * W / W')),
    PIL's NEAREST convention; ids are never blended.
    """
    label = np.asarray(label)
    if label.ndim != 2 or len(shape) != 2 or min(label.shape) == 0 or min(shape) <= 0:
        raise ValueError(f"cannot resize a label of shape {label.shape} to {tuple(shape)}")
    h, w = label.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.intp), w - 1)
    return label[rows[:, None], cols[None, :]]


# ---- dataset-level protocol ----------------------------------------------------------------


def hungarian_match(cooccurrence: np.ndarray) -> dict[int, int]:
    """The predicted-id -> GT-id matching maximising total image co-occurrence.

    ``cooccurrence`` is a (C, C) array, ``[p - 1, g - 1]`` = number of images in which predicted
    foreground id p and GT id g are both present. Returns ``{0: 0, p: g, ...}`` with every
    p in 1..C mapped to a distinct g in 1..C. Ties between optimal assignments are broken by
    scipy, which may differ from the official ``munkres`` choice (same total either way).
    """
    cooccurrence = np.asarray(cooccurrence)
    if cooccurrence.ndim != 2 or cooccurrence.shape[0] != cooccurrence.shape[1]:
        raise ValueError(f"co-occurrence must be a square (C, C) matrix, got {cooccurrence.shape}")
    rows, cols = linear_sum_assignment(cooccurrence, maximize=True)
    match = {BACKGROUND_ID: BACKGROUND_ID}
    match.update({int(r) + 1: int(c) + 1 for r, c in zip(rows, cols)})
    return match


def check_match(match: dict[int, int], num_classes: int) -> dict[int, int]:
    """``match`` with int keys and values, validated to lie in 0..C; raises ValueError otherwise.

    Accepts the JSON form (string keys) of a matching file.
    """
    out = {}
    for p, g in match.items():
        try:
            p_int, g_int = int(p), int(g)
        except (TypeError, ValueError):
            raise ValueError(f"match entry {p!r}: {g!r} is not an integer pair") from None
        if not (0 <= p_int <= num_classes and 0 <= g_int <= num_classes):
            raise ValueError(f"match entry {p!r}: {g!r} outside 0..{num_classes}")
        out[p_int] = g_int
    return out


def apply_match(confusion: np.ndarray, match: dict[int, int]) -> np.ndarray:
    """Confusion matrix of the matched prediction: row p of ``confusion`` is added to row
    ``match[p]``. ``confusion`` is (C + 1, C + 1), predicted id x GT id; ids that have no
    predicted pixels need no entry in ``match``.
    """
    k = confusion.shape[0]
    target = np.full(k, -1, dtype=np.intp)
    for p, g in match.items():
        target[p] = g
    unmatched = np.flatnonzero((target < 0) & (confusion.sum(axis=1) > 0))
    if unmatched.size:
        raise ValueError(f"predicted ids {unmatched[:10].tolist()} have pixels but no match entry")
    used = target >= 0
    out = np.zeros_like(confusion)
    np.add.at(out, target[used], confusion[used])
    return out


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU in percent, float64 of shape (C + 1,), from a matched confusion matrix:
    100 * TP / (T + P - TP + 1e-10) with TP the diagonal, P the row sums, T the column sums.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    return 100.0 * tp / (union + _EPS)


def foreground_iou(confusion: np.ndarray) -> float:
    """Class-agnostic foreground IoU in percent from a (C + 1)×(C + 1) confusion matrix (predicted
    × GT, id 0 = background, matched or not): pixels that are foreground in both over pixels that
    are foreground in either, whatever their classes. For labels cut by a saliency threshold it
    is the saliency's own IoU with the objects. NaN when neither has a foreground pixel."""
    confusion = np.asarray(confusion, dtype=np.int64)
    both = int(confusion[1:, 1:].sum())
    either = both + int(confusion[1:, 0].sum()) + int(confusion[0, 1:].sum())
    return 100.0 * both / either if either else math.nan


def size_bin(class_pixels: np.ndarray, valid_pixels: int) -> np.ndarray:
    """Object-size bin (0 = S, 1 = MS, 2 = ML, 3 = L) of each class from its pixel count.

    Bin edges compare ceil(100 * n / valid_pixels) with 5, 25 and 50, done exactly in integers:
    ceil(100 n / N) <= e  <=>  100 n <= e N.
    """
    scaled = 100 * np.asarray(class_pixels, dtype=np.int64)
    bins = np.full(scaled.shape, len(SIZE_BIN_EDGES), dtype=np.intp)
    for b, edge in reversed(list(enumerate(SIZE_BIN_EDGES))):
        bins[scaled <= edge * int(valid_pixels)] = b
    return bins


# ---- the evaluator -------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentationResult:
    """Outcome of an evaluation.

    ``miou``: percent, mean of ``iou``. ``iou``: C + 1 percentages indexed by GT id (0 =
    background). ``match``: predicted id -> GT id used. ``image_accuracy``: the official "Acc",
    percent. ``pixel_accuracy``: matched correct pixels over valid pixels, percent (NaN with no
    valid pixel). ``size_miou``: ``{"S", "MS", "ML", "L"}`` -> percent (NaN for an unused bin).
    ``resized``: names of the predictions that were resized to their GT's shape.
    ``foreground_iou``: class-agnostic foreground IoU, percent (:func:`foreground_iou`). ``confusion``:
    the matched pixel counts, (C + 1)×(C + 1) int64, matched predicted id (row) × GT id (column).
    ``image_miou``: with ``per_image``, ``{image name: percent}``: the mean IoU of one image over
    the ids its matched prediction or its GT holds, background included (:func:`image_miou`).
    """

    miou: float
    iou: list[float]
    match: dict[int, int]
    image_accuracy: float
    pixel_accuracy: float
    size_miou: dict[str, float]
    num_images: int
    num_pixels: int
    resized: list[str] = field(default_factory=list)
    foreground_iou: float = math.nan
    confusion: np.ndarray | None = field(default=None, compare=False, repr=False)
    image_miou: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        """JSON-able dict: ``{"mIoU", "IoU", "match": {str(pred): gt}, "Acc", "PixelAcc",
        "FgIoU", "size_mIoU", "num_images", "num_pixels", "resized"}``; NaN becomes null (the
        confusion matrix and the per-image scores are the caller's to store)."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "mIoU": num(self.miou),
            "IoU": [num(x) for x in self.iou],
            "match": {str(p): int(g) for p, g in sorted(self.match.items())},
            "Acc": num(self.image_accuracy),
            "PixelAcc": num(self.pixel_accuracy),
            "FgIoU": num(self.foreground_iou),
            "size_mIoU": {k: num(v) for k, v in self.size_miou.items()},
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "resized": list(self.resized),
        }


class SegmentationEvaluator:
    """Accumulates the ImageNet-S protocol over images, one ``update`` per image.

    ``num_classes`` is C. ``match``: a fixed predicted -> GT mapping (e.g. the validation
    matching reused on test); when None the Hungarian matching is computed from all images at
    :meth:`finalize`. ``resize``: None (shape mismatch raises ValueError) or ``"nearest"``.
    ``ignore_id``: GT value whose pixels are dropped. ``size_bins=False`` skips the object-size
    bins (their mIoU is then NaN): a threshold sweep keeps one evaluator per threshold, and the bins
    are 4 of its 7 C×C tables. ``per_image=True`` also keeps each image's small confusion (the ids
    it holds) to score it alone at :meth:`finalize` (``image_miou``).

    State is O(C^2) int64 counts, independent of the number of images and pixels (plus, with
    ``per_image``, a few counts per image).
    """

    def __init__(self, num_classes: int, match: dict[int, int] | None = None,
                 resize: str | None = None, ignore_id: int = IGNORE_ID, size_bins: bool = True,
                 per_image: bool = False):
        if int(num_classes) < 1 or int(num_classes) >= ignore_id:
            raise ValueError(f"num_classes must be in 1..{ignore_id - 1}, got {num_classes}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.num_classes = c = int(num_classes)
        self.resize = resize
        self.ignore_id = ignore_id
        self.match = None if match is None else check_match(match, c)
        # Lookup table for a fixed matching: predictions are mapped as they arrive, so every
        # count below is then already in GT ids (-1 flags ids the matching does not cover).
        self._lut = None
        if self.match is not None:
            self._lut = np.full(c + 1, -1, dtype=np.int64)
            for p, g in self.match.items():
                self._lut[p] = g
        k = c + 1
        self._confusion = np.zeros((k, k), dtype=np.int64)
        self.size_bins = size_bins
        self._bin_confusion = np.zeros((len(SIZE_BIN_NAMES) if size_bins else 0, k, k), dtype=np.int64)
        self._cooccurrence = np.zeros((c, c), dtype=np.int64)
        # [p, g]: images whose single most-predicted foreground id is p and whose GT has g.
        self._dominant = np.zeros((k, k), dtype=np.int64)
        # Images where several foreground ids tie for most pixels: (tied ids, GT ids present).
        # Which one wins depends on the matching, unknown until finalize; ties are rare.
        self._ties: list[tuple[np.ndarray, np.ndarray]] = []
        # With per_image: (name, predicted ids, GT ids, their pixel counts) of every image.
        self._images: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] | None = [] if per_image else None
        self.num_images = 0
        self.resized: list[str] = []

    @property
    def confusion(self) -> np.ndarray:
        """Pixel counts so far, (C + 1, C + 1) int64, predicted id (matched if a fixed match
        was given) x GT id."""
        return self._confusion.copy()

    @property
    def cooccurrence(self) -> np.ndarray:
        """Image co-occurrence counts so far, (C, C) int64, ``[p - 1, g - 1]`` (unmatched
        predicted ids; zeros when a fixed match was given)."""
        return self._cooccurrence.copy()

    def update(self, pred: np.ndarray, gt: np.ndarray, name: str | None = None) -> None:
        """Add one image: ``pred`` and ``gt`` are HxW integer label maps; ``name`` appears in
        error messages and in ``resized``.

        Raises ValueError for non-2-D or non-integer input, a shape mismatch (unless resizing),
        GT ids outside 0..C and ``ignore_id``, predicted ids outside 0..C on non-ignored pixels,
        or (with a fixed match) predicted ids the match does not cover.
        """
        where = f" ({name})" if name else ""
        pred, gt = np.asarray(pred), np.asarray(gt)
        for what, arr in (("prediction", pred), ("GT", gt)):
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{what}{where} must be a 2-D integer array, "
                                 f"got shape {arr.shape} dtype {arr.dtype}")
        if pred.shape != gt.shape:
            if self.resize != "nearest":
                raise ValueError(f"prediction{where} has shape {pred.shape} but its GT has "
                                 f"{gt.shape}; predictions must have their GT's size "
                                 "(or evaluate with resize='nearest')")
            pred = resize_nearest(pred, gt.shape)
            self.resized.append(name or f"#{self.num_images}")
        pred, gt = drop_ignored(pred, gt, self.ignore_id)
        c = self.num_classes
        _check_range(gt, c, f"GT{where}")
        _check_range(pred, c, f"prediction{where}")
        if self._lut is not None:
            pred = self._lut[pred]
            if pred.size and pred.min() < 0:
                raise ValueError(f"prediction{where} has ids the match does not cover")
        self.num_images += 1
        if gt.size == 0:
            return

        pred_counts = np.bincount(pred, minlength=c + 1)
        gt_counts = np.bincount(gt, minlength=c + 1)
        pred_ids = np.flatnonzero(pred_counts)
        gt_ids = np.flatnonzero(gt_counts)

        # Pixel confusion restricted to the ids present: a (kp, kg) bincount instead of a
        # (C+1)^2 one per image.
        local_p = np.zeros(c + 1, dtype=np.int64)
        local_p[pred_ids] = np.arange(pred_ids.size)
        local_g = np.zeros(c + 1, dtype=np.int64)
        local_g[gt_ids] = np.arange(gt_ids.size)
        joint = local_p[pred] * gt_ids.size + local_g[gt]
        counts = np.bincount(joint, minlength=pred_ids.size * gt_ids.size)
        counts = counts.reshape(pred_ids.size, gt_ids.size)
        self._confusion[np.ix_(pred_ids, gt_ids)] += counts
        if self._images is not None:
            self._images.append((name or f"#{self.num_images}", pred_ids, gt_ids, counts))

        fg_pred, fg_gt = pred_ids[pred_ids > 0], gt_ids[gt_ids > 0]
        if self._lut is None:
            self._cooccurrence[np.ix_(fg_pred - 1, fg_gt - 1)] += 1

        # Size bins: each GT foreground class's pixels go to its bin; GT background pixels go
        # to every bin used by this image.
        is_fg = gt_ids > 0
        if self.size_bins:
            col_bins = np.full(gt_ids.size, -1, dtype=np.intp)
            col_bins[is_fg] = size_bin(gt_counts[gt_ids[is_fg]], gt.size)
            for b in np.unique(col_bins[is_fg]):
                cols = ~is_fg | (col_bins == b)
                self._bin_confusion[b][np.ix_(pred_ids, gt_ids[cols])] += counts[:, cols]

        if fg_pred.size:
            top = pred_counts[fg_pred]
            tied = fg_pred[top == top.max()]
            if tied.size == 1 or self._lut is not None:
                # With a fixed match the ids are final: the lowest tied id wins, as in argmax.
                self._dominant[tied[0], gt_ids] += 1
            else:
                self._ties.append((tied, gt_ids))

    def finalize(self) -> SegmentationResult:
        """Match (unless a fixed match was given) and compute the metrics."""
        if self.num_images == 0:
            raise ValueError("no images were evaluated")
        c = self.num_classes
        match = self.match if self.match is not None else hungarian_match(self._cooccurrence)
        # Counts are already in GT ids when a fixed match was applied on the way in.
        final = {i: i for i in range(c + 1)} if self.match is not None else match
        matched = apply_match(self._confusion, final)
        iou = iou_from_confusion(matched)
        total = int(matched.sum())
        correct = int(np.trace(matched))
        pixel_accuracy = 100.0 * correct / total if total else math.nan

        target = np.array([final.get(i, -1) for i in range(c + 1)], dtype=np.intp)
        # Rows of ids without a match entry are all zero (apply_match has checked it).
        covered = np.flatnonzero(target >= 0)
        hits = int(self._dominant[covered, target[covered]].sum())
        for tied, gt_ids in self._ties:
            # A Hungarian match is one-to-one on 1..C, so the matched ids stay distinct and the
            # tie goes to the lowest matched id, as the official argmax over matched counts does.
            hits += int(target[tied].min() in gt_ids)
        image_accuracy = 100.0 * hits / self.num_images

        size_miou = {name: math.nan for name in SIZE_BIN_NAMES}
        for b, bin_name in enumerate(SIZE_BIN_NAMES[: len(self._bin_confusion)]):
            bin_matched = apply_match(self._bin_confusion[b], final)
            present = bin_matched.sum(axis=0) > 0
            bin_iou = iou_from_confusion(bin_matched)
            size_miou[bin_name] = float(bin_iou[present].mean()) if present.any() else math.nan

        per_image = {name: image_miou(target[p], g, counts) for name, p, g, counts in self._images or ()}
        return SegmentationResult(
            miou=float(iou.mean()),
            iou=iou.tolist(),
            match=dict(match),
            image_accuracy=image_accuracy,
            pixel_accuracy=pixel_accuracy,
            size_miou=size_miou,
            num_images=self.num_images,
            num_pixels=total,
            resized=list(self.resized),
            foreground_iou=foreground_iou(self._confusion),
            confusion=matched,
            image_miou=per_image,
        )


def image_miou(pred_ids: np.ndarray, gt_ids: np.ndarray, counts: np.ndarray) -> float:
    """One image's mean IoU in percent: ``counts[i, j]`` pixels are predicted ``pred_ids[i]``
    (already matched to GT ids) where the GT is ``gt_ids[j]``; the mean runs over the ids either
    holds, background included (an image predicted perfectly scores 100, one whose prediction and
    GT share no id 0)."""
    classes = np.union1d(pred_ids, gt_ids)
    rows, cols = np.searchsorted(classes, pred_ids), np.searchsorted(classes, gt_ids)
    confusion = np.zeros((classes.size, classes.size), dtype=np.int64)
    np.add.at(confusion, (rows[:, None], cols[None, :]), counts)
    return float(iou_from_confusion(confusion).mean())


def _check_range(labels: np.ndarray, num_classes: int, what: str) -> None:
    """ValueError naming up to 10 offending values unless all ``labels`` lie in 0..C."""
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > num_classes:
        bad = np.unique(labels[(labels < 0) | (labels > num_classes)])
        raise ValueError(f"{what} has ids outside 0..{num_classes}: {bad[:10].tolist()}"
                         + (f" and {bad.size - 10} more" if bad.size > 10 else ""))
