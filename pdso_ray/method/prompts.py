"""SAM prompts from a raw pseudo label (docs/method.md §6): boxes per connected component, saliency peak.

Conventions:

* A label map is ``H×W`` integer, 0 = background, 1..C = classes.
* Connected components use **8-connectivity** (diagonal neighbours join), so a thin diagonal
  stroke of one class stays one object and yields one box, not a staircase of tiny boxes.
* Boxes are ``K×4`` float32 ``XYXY`` in pixels with *inclusive* maxima: ``(x0, y0, x1, y1)`` =
  (min column, min row, max column, max row) of the component — the convention of
  segment-anything's ``batched_mask_to_box``, which SAM's box prompts were trained with.
* Points are ``(x, y)`` = (column, row) integer pixel indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 3×3 ones: a pixel's 8 neighbours belong to its component.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ClassPrompts:
    """The prompts of one class of one image.

    Attributes:
        class_id: label id, 1..C.
        boxes: ``K×4`` float32 XYXY boxes (inclusive maxima), one per kept component, K >= 1, in
            scipy's component order (raster order of each component's first pixel).
        point: the image's saliency peak ``(x, y)`` when it lies inside one of this class's kept
            components, else None.
        point_box: index into ``boxes`` of the component holding ``point`` (None with ``point``).
    """

    class_id: int
    boxes: np.ndarray
    point: tuple[int, int] | None
    point_box: int | None


def _check_label(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label must be an H×W integer array, got shape {label.shape} dtype {label.dtype}")
    return label


def _check_min_area(min_area: int) -> None:
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """Split a boolean ``H×W`` mask into its 8-connected components.

    Returns:
        One ``H×W`` bool mask per component, in raster order of each component's first pixel;
        an empty list for an empty mask.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H×W, got shape {mask.shape}")
    comp, n = ndimage.label(mask.astype(bool), structure=_EIGHT_CONNECTED)
    return [comp == i for i in range(1, n + 1)]


def _kept_components(label: np.ndarray, class_id: int, min_area: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Components of ``label == class_id`` with at least ``min_area`` pixels.

    Returns ``(comp, kept, boxes)``: ``comp`` H×W int32 component ids (0 = not this class),
    ``kept`` the ids (1-based) of the kept components, ``boxes`` their K×4 XYXY boxes.
    """
    comp, n = ndimage.label(label == class_id, structure=_EIGHT_CONNECTED)
    if n == 0:
        return comp, np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float32)
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    kept = np.flatnonzero(areas[1:] >= min_area) + 1
    slices = ndimage.find_objects(comp)
    boxes = np.array(
        [[slices[i - 1][1].start, slices[i - 1][0].start, slices[i - 1][1].stop - 1, slices[i - 1][0].stop - 1]
         for i in kept],
        dtype=np.float32,
    ).reshape(-1, 4)
    return comp, kept, boxes


def boxes_for_class(label: np.ndarray, class_id: int, min_area: int) -> np.ndarray:
    """Box prompts of one class: one per 8-connected component of ``label == class_id``.

    Components with fewer than ``min_area`` pixels are ignored (they are mostly speckle of the
    patch-level argmax, and SAM would turn a speckle box into a spurious object).

    Returns:
        ``K×4`` float32 XYXY boxes with inclusive maxima; ``0×4`` when the class is absent.
    """
    label = _check_label(label)
    _check_min_area(min_area)
    return _kept_components(label, class_id, min_area)[2]


def saliency_peak_point(saliency: np.ndarray) -> tuple[int, int]:
    """The most salient pixel, ``(x, y)``; ties go to the first in raster order."""
    saliency = np.asarray(saliency)
    if saliency.ndim != 2 or saliency.size == 0:
        raise ValueError(f"saliency must be a non-empty H×W array, got shape {saliency.shape}")
    if not np.all(np.isfinite(saliency)):
        raise ValueError("saliency holds NaN or infinite values")
    y, x = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return int(x), int(y)


def point_in_class(label: np.ndarray, class_id: int, point: tuple[int, int]) -> bool:
    """Whether pixel ``point = (x, y)`` of ``label`` has ``class_id``."""
    label = _check_label(label)
    x, y = point
    if not (0 <= y < label.shape[0] and 0 <= x < label.shape[1]):
        raise ValueError(f"point {point} lies outside the {label.shape[1]}×{label.shape[0]} label")
    return bool(label[y, x] == class_id)


def build_prompts(
    raw_label: np.ndarray,
    saliency: np.ndarray,
    classes: Sequence[int],
    min_area: int,
) -> list[ClassPrompts]:
    """Prompts for every listed class present in the raw label (docs/method.md §6).

    Args:
        raw_label: ``H×W`` integer raw pseudo label (0 background, 1..C classes).
        saliency: ``H×W`` float saliency of the same image; its peak becomes a positive point for
            the class whose kept component contains it.
        classes: label ids, main class first, then secondary classes (order is kept).
        min_area: components with fewer pixels are ignored; a class with no kept component gets
            no prompts (and the peak point, if it falls in an ignored component, is dropped).

    Returns:
        One :class:`ClassPrompts` per class with at least one kept component, in ``classes`` order.
    """
    raw_label = _check_label(raw_label)
    _check_min_area(min_area)
    if np.shape(saliency) != raw_label.shape:
        raise ValueError(f"saliency shape {np.shape(saliency)} != raw label shape {raw_label.shape}")
    if len(set(classes)) != len(classes) or any(c < 1 for c in classes):
        raise ValueError(f"classes must be distinct label ids >= 1, got {list(classes)}")
    peak_x, peak_y = saliency_peak_point(saliency)
    prompts = []
    for class_id in classes:
        comp, kept, boxes = _kept_components(raw_label, class_id, min_area)
        if len(kept) == 0:
            continue
        hits = np.flatnonzero(kept == comp[peak_y, peak_x])
        point_box = int(hits[0]) if len(hits) else None
        point = (peak_x, peak_y) if point_box is not None else None
        prompts.append(ClassPrompts(int(class_id), boxes, point, point_box))
    return prompts
