"""Pseudo-label refiners (docs/method.md §6), picked by name from :data:`REFINERS`.

Every refiner has the signature ``refine(image, raw_label, saliency, context, predictor) ->
RefineResult`` and returns an ``H×W`` int32 label holding only 0 (background), class ids taken
from the raw label or the context (1..C), and, for ``gmm``, 1000 (ignore).

The SAM-based refiners talk to SAM only through the small :class:`MaskPredictor` protocol, so this
module needs nothing but numpy/torch/scipy and tests can use a deterministic fake;
``pdso_ray.models.sam.SamMaskPredictor`` is the real implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pdso_ray.method.prompts import ClassPrompts, build_prompts

IGNORE = 1000


class MaskPredictor(Protocol):
    """What the SAM refiners need from a promptable segmenter (SAM's ``SamPredictor`` contract).

    Coordinates are in pixels of the image given to :meth:`set_image`; ``L`` is the side of the
    low-resolution logits (256 for SAM at 1024 px: 4 × the image-embedding side).
    """

    def set_image(self, image: np.ndarray) -> None:
        """Embed an ``H×W×3`` uint8 RGB image once; later :meth:`predict` calls reuse it."""

    def predict(
        self,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = True,
        return_masks: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Masks for ``N`` prompts in one batched decoder call.

        Args:
            boxes: ``N×4`` float XYXY boxes, or None.
            points: ``N×P×2`` float ``(x, y)`` points, or None.
            point_labels: ``N×P`` int: 1 positive, 0 negative, -1 padding (ignored point).
            mask_input: ``N×1×L×L`` float logits from an earlier call, or None.
            multimask: M = 3 candidate masks per prompt if True, else M = 1.
            return_masks: False skips the full-resolution masks (None is returned instead),
                for a pass that only needs the scores and low-res logits.

        Returns:
            ``(masks N×M×H×W bool | None, iou N×M float32, low_res_logits N×M×L×L float32)``.
        """

    def generate_automatic(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """SAM's automatic masks of an ``H×W×3`` uint8 image: ``(H×W bool mask, predicted IoU)``
        pairs. Independent of :meth:`set_image`."""


# Choices of RefineParams.spo_components and RefineParams.select_fail.
SPO_COMPONENTS = ("all", "first")
SELECT_FAIL_RULES = ("drop", "keep")


@dataclass(frozen=True)
class RefineParams:
    """Per-run settings of the refiners (``pseudo_labels.refine`` in the config).

    Attributes:
        min_area: spo — connected components with fewer pixels get no box prompt. The official
            ``spo.py`` has no such filter (its ``largestConnectComponent`` returns the whole
            label), so 0 reproduces it; the default 100 is ours, against single-patch speckle of
            the patch-level argmax, which SAM would turn into spurious objects.
        spo_components: spo — ``all``: one box per kept component (the intended rule: the PDSO
            figure boxes every object); ``first``: only the first kept component of each class
            in raster order, which is what the official Jittor predictor effectively prompts
            (it decodes one prompt per box but returns element 0 only).
        select_mask_overlap: sam_select — a mask goes to a class when more than this fraction of
            the mask lies in the class's raw region ...
        select_region_cover: sam_select — ... or when it covers at least this fraction of it.
        select_fail: sam_select — what becomes of a raw pixel that an automatic mask covers but
            no assigned mask does (the mask failed the class test): ``drop`` sets it to 0, as
            SAM_WSSS ``merge/max_iou_imp2.py``; ``keep`` leaves the raw label.
        gmm_confidence: gmm — pixels whose largest posterior is below this become 1000.
        gmm_em_steps: gmm — EM steps after the fit from the raw label's hard assignment.
    """

    min_area: int = 100
    spo_components: str = "all"
    select_mask_overlap: float = 0.5
    select_region_cover: float = 0.85
    select_fail: str = "drop"
    gmm_confidence: float = 0.5
    gmm_em_steps: int = 2

    def __post_init__(self):
        if self.min_area < 0 or self.gmm_em_steps < 0:
            raise ValueError(f"min_area and gmm_em_steps must be >= 0, got {self.min_area}, {self.gmm_em_steps}")
        for name in ("select_mask_overlap", "select_region_cover", "gmm_confidence"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.spo_components not in SPO_COMPONENTS:
            raise ValueError(f"spo_components must be one of {SPO_COMPONENTS}, got {self.spo_components!r}")
        if self.select_fail not in SELECT_FAIL_RULES:
            raise ValueError(f"select_fail must be one of {SELECT_FAIL_RULES}, got {self.select_fail!r}")


@dataclass(frozen=True)
class RefineContext:
    """Per-image inputs beyond the image, raw label and saliency.

    Attributes:
        main_class: label id (1..C) of the image's nearest centroid.
        secondary_classes: label ids of the other candidates within sigma, nearest first.
        patch_emb: ``h×w×D'`` float embedded patch features (needed by ``gmm`` only).
        params: per-run settings.
    """

    main_class: int
    secondary_classes: Sequence[int] = ()
    patch_emb: np.ndarray | None = None
    params: RefineParams = field(default_factory=RefineParams)

    def __post_init__(self):
        classes = self.classes
        if any(int(c) < 1 for c in classes) or len(set(classes)) != len(classes):
            raise ValueError(
                f"main_class {self.main_class} and secondary_classes {list(self.secondary_classes)} "
                "must be distinct label ids >= 1"
            )

    @property
    def classes(self) -> tuple[int, ...]:
        """Main class first, then secondary classes."""
        return (int(self.main_class), *(int(c) for c in self.secondary_classes))


@dataclass(frozen=True)
class RefineResult:
    """``label``: ``H×W`` int32 refined label. ``stats``: ``prompts`` (SAM prompts or automatic
    masks considered), ``masks_used`` (masks that set at least one output pixel; gmm: classes
    fitted), ``pixels_changed`` (pixels whose label differs from the raw label)."""

    label: np.ndarray
    stats: dict[str, int]


Refiner = Callable[[np.ndarray, np.ndarray, np.ndarray, RefineContext, MaskPredictor | None], RefineResult]


def _check_inputs(image: np.ndarray, raw_label: np.ndarray, saliency: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H×W×3 uint8, got shape {image.shape} dtype {image.dtype}")
    if raw_label.shape != image.shape[:2] or not np.issubdtype(raw_label.dtype, np.integer):
        raise ValueError(
            f"raw_label must be an integer array of shape {image.shape[:2]}, "
            f"got shape {raw_label.shape} dtype {raw_label.dtype}"
        )
    if np.shape(saliency) != image.shape[:2]:
        raise ValueError(f"saliency shape {np.shape(saliency)} != image shape {image.shape[:2]}")


def _result(label: np.ndarray, raw_label: np.ndarray, prompts: int, masks_used: int) -> RefineResult:
    label = label.astype(np.int32, copy=False)
    changed = int(np.count_nonzero(label != raw_label))
    return RefineResult(label, {"prompts": prompts, "masks_used": masks_used, "pixels_changed": changed})


def merge_class_masks(shape: tuple[int, int], class_masks: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    """Merge per-class masks by priority: each class only fills pixels no earlier class took.

    Args:
        shape: ``(H, W)``.
        class_masks: ``(class_id >= 1, H×W bool mask)`` pairs, highest priority (main class) first.

    Returns:
        ``H×W`` int32 label; pixels no mask covers are 0.
    """
    label = np.zeros(shape, dtype=np.int32)
    for class_id, mask in class_masks:
        label[mask & (label == 0)] = class_id
    return label


def _stack_prompts(prompts: Sequence[ClassPrompts]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All boxes of all classes as one batch: ``(boxes N×4, points N×2, owner N)``. ``points``
    holds the saliency peak on the row of the box of the component holding it and NaN elsewhere;
    ``owner[i]`` indexes ``prompts``."""
    boxes = np.concatenate([p.boxes for p in prompts]).astype(np.float32)
    owner = np.concatenate([np.full(len(p.boxes), i) for i, p in enumerate(prompts)])
    points = np.full((len(boxes), 2), np.nan, dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum([len(p.boxes) for p in prompts])])
    for i, p in enumerate(prompts):
        if p.point is not None:
            points[starts[i] + p.point_box] = p.point
    return boxes, points, owner


def _predict_batched(
    predictor: MaskPredictor,
    boxes: np.ndarray,
    points: np.ndarray,
    mask_input: np.ndarray | None,
    multimask: bool,
    return_masks: bool,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """``predictor.predict`` over N box prompts, ``points`` (N×2, NaN = none) riding on some.

    One call serves all box-only prompts and one all box+point prompts: a batch needs the same
    number of points per prompt, and padding the box-only prompts with SAM's "not a point" token
    would change their masks (SAM's own predictor sends a box alone without it). Results come
    back in input order.
    """
    has_point = ~np.isnan(points[:, 0])
    out: list[np.ndarray | None] = [None, None, None]
    for rows in (np.flatnonzero(~has_point), np.flatnonzero(has_point)):
        if len(rows) == 0:
            continue
        pts = lab = None
        if has_point[rows[0]]:
            pts, lab = points[rows][:, None], np.ones((len(rows), 1), dtype=np.int64)
        sub_mask = None if mask_input is None else mask_input[rows]
        result = predictor.predict(boxes[rows], pts, lab, sub_mask, multimask=multimask, return_masks=return_masks)
        for k, value in enumerate(result):
            if value is None:
                continue
            if out[k] is None:
                out[k] = np.empty((len(boxes), *value.shape[1:]), dtype=value.dtype)
            out[k][rows] = value
    return out[0], out[1], out[2]


def _first_component(prompts: ClassPrompts) -> ClassPrompts:
    """The class's first kept component only (``spo_components: first``). The saliency peak, when
    it lies in any kept component of the class, rides on that first box: the official predictor
    broadcasts the point to every box of the class and returns element 0, i.e. point + box 0."""
    return ClassPrompts(prompts.class_id, prompts.boxes[:1], prompts.point,
                        None if prompts.point is None else 0)


def refine_spo(
    image: np.ndarray,
    raw_label: np.ndarray,
    saliency: np.ndarray,
    context: RefineContext,
    predictor: MaskPredictor | None,
) -> RefineResult:
    """SAM optimisation (SPO).

    For the main class, then each secondary class present in the raw label: one box per kept
    connected component (``min_area``), plus the saliency peak as a positive point on the box of
    the component holding it; with ``spo_components: first`` only the first kept component in
    raster order gets a box, and the peak rides on it (see :func:`_first_component`). Pass 1 asks for three masks per prompt and keeps the one of highest predicted IoU;
    pass 2 re-asks each prompt for a single mask with pass 1's low-res logits as ``mask_input``.
    A class's mask is the union of its pass-2 masks; classes merge main first, secondary classes
    only filling pixels still unlabelled; pixels no mask covers are 0. The image is embedded once;
    each pass batches all classes' prompts into one predictor call, or two when the saliency peak
    rides on a box (see :func:`_predict_batched`).
    """
    _check_inputs(image, raw_label, saliency)
    if predictor is None:
        raise ValueError("refine method 'spo' needs a MaskPredictor, got None")
    prompts = build_prompts(raw_label, saliency, context.classes, context.params.min_area)
    if context.params.spo_components == "first":
        prompts = [_first_component(p) for p in prompts]
    if not prompts:
        return _result(np.zeros(raw_label.shape, np.int32), raw_label, prompts=0, masks_used=0)

    boxes, points, owner = _stack_prompts(prompts)
    predictor.set_image(image)
    # Pass 1 needs only scores and low-res logits: skip the full-resolution masks.
    _, iou, low_res = _predict_batched(predictor, boxes, points, None, multimask=True, return_masks=False)
    best = np.argmax(iou, axis=1)
    mask_input = low_res[np.arange(len(boxes)), best][:, None]
    masks, _, _ = _predict_batched(predictor, boxes, points, mask_input, multimask=False, return_masks=True)
    masks = masks[:, 0]

    class_masks = [(p.class_id, masks[owner == i].any(axis=0)) for i, p in enumerate(prompts)]
    label = merge_class_masks(raw_label.shape, class_masks)
    # A prompt's mask is used when it set a pixel: its class won there and the mask covers it.
    used = sum(
        int(np.any(m & (label == prompts[owner[j]].class_id))) for j, m in enumerate(masks)
    )
    return _result(label, raw_label, prompts=len(boxes), masks_used=used)


def refine_sam_select(
    image: np.ndarray,
    raw_label: np.ndarray,
    saliency: np.ndarray,
    context: RefineContext,
    predictor: MaskPredictor | None,
) -> RefineResult:
    """Assign SAM's automatic masks to classes (SAM_WSSS ``merge/max_iou_imp2.py``).

    The class test (SAM_WSSS's): a mask qualifies for a context class present in the raw label
    when more than ``select_mask_overlap`` of the mask lies in the class's raw region, or when it
    covers at least ``select_region_cover`` of that region. A mask goes to the qualifying class
    of largest overlap and is claimed by one class at most. Masks are scanned by decreasing
    predicted IoU, then decreasing area, then the generator's order; a pixel takes the class of
    the first assigned mask covering it (an assigned mask labels all its pixels, raw background
    included). The other pixels follow ``select_fail``:

    * ``drop`` (SAM_WSSS): a pixel under some mask that no class took is set to 0 — the mask
      failed the test, so the raw label there is taken for a false activation; only pixels no
      mask touches keep the raw label;
    * ``keep``: every pixel outside the assigned masks keeps the raw label.

    Differences from ``max_iou_imp2.py``, which loops over classes in increasing id order, lets
    the lowest id claim a mask that qualifies for several, and lets a later class overwrite an
    earlier one where their masks and raw regions overlap: here a mask goes to its best class and
    the first mask wins a pixel, so the result does not depend on class ids; only the context
    classes (main and secondary) can take masks, so under ``drop`` raw pixels of other classes
    survive only where no mask lies; and the scan order is fixed instead of the filesystem's.
    Under ``drop`` the result does not depend on the scan order except where assigned masks of
    different classes overlap.
    """
    _check_inputs(image, raw_label, saliency)
    if predictor is None:
        raise ValueError("refine method 'sam_select' needs a MaskPredictor, got None")
    params = context.params
    regions = [(c, raw_label == c) for c in context.classes]
    regions = [(c, r, int(r.sum())) for c, r in regions if r.any()]
    masks, scores = [], []
    for mask, score in predictor.generate_automatic(image):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != raw_label.shape:
            raise ValueError(f"automatic mask shape {mask.shape} != raw label shape {raw_label.shape}")
        masks.append(mask)
        scores.append(float(score))
    areas = [int(m.sum()) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: (-scores[i], -areas[i], i))

    label = raw_label.astype(np.int32, copy=True)
    claimed = np.zeros(raw_label.shape, dtype=bool)
    covered = np.zeros(raw_label.shape, dtype=bool)
    used = 0
    for i in order:
        mask, area = masks[i], areas[i]
        if area == 0:
            continue
        covered |= mask
        best_class, best_overlap = None, 0
        for c, region, region_area in regions:
            overlap = int(np.count_nonzero(mask & region))
            qualifies = (overlap > params.select_mask_overlap * area
                         or overlap >= params.select_region_cover * region_area)
            if qualifies and overlap > best_overlap:
                best_class, best_overlap = c, overlap
        if best_class is None:
            continue
        take = mask & ~claimed
        if take.any():
            label[take] = best_class
            claimed |= take
            used += 1
    if params.select_fail == "drop":
        label[covered & ~claimed] = 0
    return _result(label, raw_label, prompts=len(masks), masks_used=used)


def _patch_labels(raw_label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The raw label sampled at the centre pixel of each of the ``h×w`` patches."""
    H, W = raw_label.shape
    rows = np.minimum(((np.arange(hw[0]) + 0.5) * H / hw[0]).astype(int), H - 1)
    cols = np.minimum(((np.arange(hw[1]) + 0.5) * W / hw[1]).astype(int), W - 1)
    return raw_label[np.ix_(rows, cols)]


def _gmm_posteriors(x: torch.Tensor, resp: torch.Tensor, fg: torch.Tensor, em_steps: int) -> torch.Tensor:
    """Fit a shared-diagonal-covariance Gaussian mixture and return the posteriors of every row.

    ``x``: ``n×D`` float64 features; ``resp``: ``n×K`` initial responsibilities (one-hot raw
    classes); ``fg``: ``n`` bool rows that take part in the fit. The shared covariance keeps the
    fit well-posed for classes with a handful of patches and makes the normalising constants
    cancel, so the posterior is a softmax of prior-weighted Mahalanobis distances. Everything is
    written with ``n×K`` and ``K×D`` products (no ``n×K×D`` tensor): K can be 50 and n thousands.
    """
    xf = x[fg]
    r = resp[fg]
    sum_sq = (xf**2).sum(dim=0)  # D
    for step in range(em_steps + 1):
        nk = r.sum(dim=0).clamp_min(1e-12)
        means = (r.T @ xf) / nk[:, None]  # K×D
        # sum_n sum_k r_nk (x_n - mu_k)^2 = sum_n x_n^2 - sum_k n_k mu_k^2 (as sum_k r_nk = 1)
        var = (sum_sq - (nk[:, None] * means**2).sum(dim=0)) / len(xf)
        var = var.clamp_min(1e-6 * float(var.clamp_min(0).mean()) + 1e-12)
        # -||x - mu_k||^2_var / 2 up to a term constant in k, which the softmax drops
        logits = x @ (means / var).T - 0.5 * (means**2 / var).sum(dim=1) + torch.log(nk / nk.sum())
        post = torch.softmax(logits, dim=1)
        if step < em_steps:
            r = post[fg]
    return post


def refine_gmm(
    image: np.ndarray,
    raw_label: np.ndarray,
    saliency: np.ndarray,
    context: RefineContext,
    predictor: MaskPredictor | None,
) -> RefineResult:
    """Relabel foreground by a per-image Gaussian mixture over class prototypes in feature space.

    The classes are those present in the raw label at the patch centres. Patch features
    (``context.patch_emb``, L2-normalised) initialise one component per class: its mean is the
    class prototype (mean embedding of its patches), its prior the class's share, and a diagonal
    variance shared by all classes is estimated from the patches around their means; then
    ``gmm_em_steps`` EM steps refine the fit on the foreground patches. The per-patch posteriors
    are upsampled bilinearly to the image size; each foreground pixel takes the class of largest
    posterior, or 1000 (ignore) when that posterior is below ``gmm_confidence``. Background stays
    where the raw label has 0 (saliency below the threshold): the mixture only decides *which*
    class, not whether a pixel is an object. ``predictor`` is unused.
    """
    _check_inputs(image, raw_label, saliency)
    if context.patch_emb is None:
        raise ValueError("refine method 'gmm' needs context.patch_emb (h×w×D' embedded patches), got None")
    emb = np.asarray(context.patch_emb)
    if emb.ndim != 3:
        raise ValueError(f"context.patch_emb must be h×w×D', got shape {emb.shape}")
    h, w, _ = emb.shape
    patch_label = _patch_labels(raw_label, (h, w)).ravel()
    classes = np.array(sorted(int(c) for c in np.unique(patch_label) if c != 0))
    if len(classes) == 0:
        return _result(raw_label.copy(), raw_label, prompts=0, masks_used=0)

    x = torch.from_numpy(emb.reshape(h * w, -1).astype(np.float64))
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    onehot = torch.from_numpy((patch_label[:, None] == classes[None]).astype(np.float64))
    fg = torch.from_numpy(patch_label != 0)
    post = _gmm_posteriors(x, onehot, fg, context.params.gmm_em_steps)

    maps = post.T.reshape(1, len(classes), h, w).float()
    maps = F.interpolate(maps, size=raw_label.shape, mode="bilinear", align_corners=False)[0]
    conf, best = maps.max(dim=0)
    label = classes[best.numpy()].astype(np.int32)
    label[conf.numpy() < context.params.gmm_confidence] = IGNORE
    label[raw_label == 0] = 0
    return _result(label, raw_label, prompts=0, masks_used=len(classes))


def refine_none(
    image: np.ndarray,
    raw_label: np.ndarray,
    saliency: np.ndarray,
    context: RefineContext,
    predictor: MaskPredictor | None,
) -> RefineResult:
    """The raw label unchanged (the ablation baseline)."""
    _check_inputs(image, raw_label, saliency)
    return _result(raw_label.astype(np.int32, copy=True), raw_label, prompts=0, masks_used=0)


REFINERS: dict[str, Refiner] = {
    "spo": refine_spo,
    "sam_select": refine_sam_select,
    "gmm": refine_gmm,
    "none": refine_none,
}

# Refiners that call a MaskPredictor: the pseudo-label stage loads SAM only for these.
NEEDS_SAM = frozenset({"spo", "sam_select"})


def get_refiner(name: str) -> Refiner:
    """The refiner registered as ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in REFINERS:
        raise ValueError(f"unknown refine method {name!r}; choose one of {sorted(REFINERS)}")
    return REFINERS[name]
