"""Label-free quality signals of a run, and the thresholds that call a result degenerate (pure
numpy; docs/method.md, "Label-free quality signals").

A run on images without ground truth has no mIoU to tell it failed. These signals need none:

- :class:`LabelSet` — foreground share of each label map (pseudo labels or predictions) and, per
  class, in how many images it appears and how much of the foreground it takes;
- :func:`agreement` — how well the model reproduces the refined pseudo labels it learned from;
- :func:`margin_ratios` and :func:`cluster_signals` — cluster sizes and compactness: each image's
  distance to its centroid over its distance to the second nearest (near 1: it sits between two
  clusters);
- :func:`seed_stability` — the same k-means from another seed, compared with the run's;
- :func:`border_share` — how many saliency maps peak on the image's border ring (the background).

Where a split has ground truth, one more: :func:`class_agreement` — on the pixels that both the
matched prediction and the ground truth call foreground, how often the classes agree, against
chance (Cohen's κ). Masks that find the objects but classes drawn at random score well on every
label-free signal and still mean nothing.

:func:`quality_warnings` turns them into one line per problem, each naming the likely cause and
the fix. Conventions: label maps are H×W integer ids, 0 background, 1..C classes,
:data:`IGNORE_ID` ignored; feature rows are N×D float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pdso_ray.method.cluster_metrics import hungarian_accuracy, nmi
from pdso_ray.method.kmeans_math import init_indices, lloyd, lloyd_partial, search_numpy
from pdso_ray.method.metrics import IGNORE_ID, resize_nearest

# ---- thresholds (docs/method.md, "Label-free quality signals") --------------------------------------
EMPTY_FOREGROUND = 0.005  # a label map with less foreground than this is "all background"
MAX_EMPTY_PREDICTIONS = 0.9  # share of predictions that may be all background
MIN_PSEUDO_FOREGROUND = 0.05  # median foreground share of the refined pseudo labels
MIN_AGREEMENT = 0.5  # pixels where the model repeats its own refined pseudo labels
MIN_FOREGROUND_IOU = 0.3  # ... and the IoU of their foregrounds (pixels favour the background)
MAX_CLASS_SHARE = 0.8  # of all predicted foreground pixels, for one class (C >= 3)
MAX_ABSENT_CLASSES = 0.1  # share of the C classes the model may never predict
MAX_EMPTY_CLUSTERS = 0.1  # share of the C clusters that may hold no image
MIN_SEED_NMI = 0.5  # NMI of the clustering against the same k-means from another seed
MAX_BORDER_SHARE = 0.6  # saliency peaks on the border ring (0.44 if peaks fell anywhere)
MIN_CLASS_KAPPA = 0.2  # Cohen's κ of the matched classes on the shared foreground (0: chance)
BORDER_RING = 0.125  # the ring: this share of the side along each edge

FIX_WEIGHTS = ("DINO weights that fit the images (models.dino.checkpoint: the official "
               "dino_deitsmall8_pretrain.pth for photographs, with jobs/configs/photos.yaml) or a "
               "backbone pretrained on them (`pdso-ray pretrain DATA OUTPUT`; README, \"Your own images\")")


def foreground_share(label: np.ndarray) -> float:
    """Share of the labelled pixels (not :data:`IGNORE_ID`) that are foreground (0 < id); NaN
    when every pixel is ignored."""
    label = np.asarray(label)
    labelled = label != IGNORE_ID
    total = int(labelled.sum())
    return float(((label > 0) & labelled).sum() / total) if total else float("nan")


@dataclass
class LabelSet:
    """Signals of a set of label maps with class ids 1..``classes``, added one map at a time
    (:meth:`add`) so that the maps need not be held together."""

    classes: int
    shares: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    class_images: np.ndarray = field(init=False)  # (C+1,) images in which each id appears
    class_pixels: np.ndarray = field(init=False)  # (C+1,) foreground pixels of each id

    def __post_init__(self):
        if self.classes < 1:
            raise ValueError(f"classes must be >= 1, got {self.classes}")
        self.class_images = np.zeros(self.classes + 1, dtype=np.int64)
        self.class_pixels = np.zeros(self.classes + 1, dtype=np.int64)

    def add(self, image_id: str, label: np.ndarray) -> None:
        label = np.asarray(label)
        self.ids.append(image_id)
        self.shares.append(foreground_share(label))
        fg = label[(label > 0) & (label <= self.classes)].astype(np.int64)
        counts = np.bincount(fg, minlength=self.classes + 1)
        self.class_images += counts > 0
        self.class_pixels += counts

    def summary(self) -> dict[str, Any]:
        """``images``, ``median_foreground``, ``empty_images`` (all background),
        ``empty_share``, ``per_image`` {id: foreground share}, ``per_class`` [{class, images,
        foreground_share}], ``classes_absent`` (ids in no map) and ``largest_class_share`` (of
        all foreground pixels; NaN without foreground)."""
        shares = np.asarray(self.shares, dtype=np.float64)
        known = shares[~np.isnan(shares)]
        empty = int((known < EMPTY_FOREGROUND).sum())
        fg_total = int(self.class_pixels[1:].sum())
        per_class = [{"class": c, "images": int(self.class_images[c]),
                      "foreground_share": float(self.class_pixels[c] / fg_total) if fg_total else 0.0}
                     for c in range(1, self.classes + 1)]
        return {"images": len(self.ids),
                "median_foreground": float(np.median(known)) if known.size else float("nan"),
                "empty_images": empty, "empty_share": float(empty / known.size) if known.size else float("nan"),
                "per_image": dict(zip(self.ids, (round(float(s), 4) for s in shares))),
                "per_class": per_class,
                "classes_absent": [c for c in range(1, self.classes + 1) if self.class_images[c] == 0],
                "largest_class_share": float(self.class_pixels[1:].max() / fg_total) if fg_total else float("nan")}


def agreement(prediction: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """``(pixel agreement, foreground IoU)`` of a prediction with a reference label (the refined
    pseudo label the model learned), the prediction resized to the reference by nearest neighbour.
    Agreement: share of the reference's labelled pixels with the same id; foreground IoU: of
    ``id > 0`` in both (NaN when neither has foreground: nothing to agree on). NaN agreement when
    nothing is labelled."""
    reference = np.asarray(reference)
    prediction = resize_nearest(np.asarray(prediction), reference.shape)
    labelled = reference != IGNORE_ID
    n = int(labelled.sum())
    same = float((prediction[labelled] == reference[labelled]).sum() / n) if n else float("nan")
    fg_p, fg_r = (prediction > 0) & labelled, (reference > 0) & labelled
    union = int((fg_p | fg_r).sum())
    return same, float((fg_p & fg_r).sum() / union) if union else float("nan")


def margin_ratios(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest centroid (N int64) and its distance ratio to the nearest and the second
    nearest centroid (N float64 in [0, 1]: 0 at a centroid, 1 halfway between two). With one
    centroid every ratio is 0."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    k = min(2, len(centroids))
    dist, ids = search_numpy(x, centroids, k)
    if k < 2:
        return ids[:, 0].astype(np.int64), np.zeros(len(x))
    near, second = np.sqrt(np.maximum(dist[:, 0], 0)), np.sqrt(np.maximum(dist[:, 1], 0))
    ratio = np.divide(near, second, out=np.ones_like(near, dtype=np.float64), where=second > 0)
    return ids[:, 0].astype(np.int64), np.clip(ratio, 0.0, 1.0)


def cluster_signals(assignment: np.ndarray, k: int, ratios: np.ndarray | None = None,
                    ratio_of: np.ndarray | None = None) -> dict[str, Any]:
    """Sizes of ``k`` clusters from an (N,) assignment: ``sizes``, ``empty`` (count), ``largest``
    and ``largest_share``; with ``ratios`` (M,) of rows assigned ``ratio_of`` (M,) (a sample of
    the rows, :func:`margin_ratios`), also their median and each cluster's
    (``margin_ratio_median``, ``per_cluster_margin``; None for a cluster without sampled rows)."""
    assignment = np.asarray(assignment, dtype=np.int64)
    if assignment.size and (assignment.min() < 0 or assignment.max() >= k):
        raise ValueError(f"cluster ids must lie in 0..{k - 1}, got {assignment.min()}..{assignment.max()}")
    sizes = np.bincount(assignment, minlength=k)
    out: dict[str, Any] = {"sizes": sizes.tolist(), "empty": int((sizes == 0).sum()),
                           "largest": int(sizes.argmax()) if sizes.size else -1,
                           "largest_share": float(sizes.max() / sizes.sum()) if sizes.sum() else float("nan")}
    if ratios is not None and ratio_of is not None and len(ratios):
        ratios, ratio_of = np.asarray(ratios, dtype=np.float64), np.asarray(ratio_of, dtype=np.int64)
        out["margin_ratio_median"] = float(np.median(ratios))
        out["per_cluster_margin"] = [float(np.median(ratios[ratio_of == c])) if (ratio_of == c).any() else None
                                     for c in range(k)]
    return out


def seed_stability(x: np.ndarray, assignment: np.ndarray, k: int, seed: int, niter: int = 20,
                   nredo: int = 5) -> dict[str, float]:
    """The clustering ``assignment`` (N,) of the rows ``x`` (N×D) against a plain k-means of the
    same rows from ``seed`` (the best of ``nredo`` starts from k random rows, ``niter`` Lloyd steps
    each, as the run's k-means keeps its best start): ``{"nmi", "agreement"}`` (agreement: share
    of rows whose clusters the best one-to-one matching pairs)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, len(x))
    best, best_objective = None, np.inf
    for redo in range(nredo):
        start = x[init_indices(len(x), k, seed, redo)]
        centroids, _ = lloyd(lambda c: lloyd_partial(x, c), start, niter, seed, redo)
        objective = lloyd_partial(x, centroids).objective
        if objective < best_objective:
            best, best_objective = centroids, objective
    other = search_numpy(x, best, 1)[1][:, 0].astype(np.int64)
    assignment = np.asarray(assignment, dtype=np.int64)
    return {"nmi": nmi(other, assignment), "agreement": hungarian_accuracy(other, assignment)}


def border_share(peaks: np.ndarray, ring: float = BORDER_RING) -> float:
    """Share of saliency peaks, (N, 2) relative (y, x) in (0, 1), that lie within ``ring`` of an
    edge; NaN for none."""
    peaks = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    if not len(peaks):
        return float("nan")
    on_ring = ((peaks < ring) | (peaks > 1 - ring)).any(axis=1)
    return float(on_ring.mean())


def class_agreement(confusion: np.ndarray) -> dict[str, float]:
    """How well the classes of a matched prediction agree with the ground truth where both see an
    object.

    Args:
        confusion: ``(C + 1)×(C + 1)`` pixel counts, predicted id × ground-truth id, after the
            evaluation's matching (``eval/confusion.npy``); row and column 0 are background.

    Returns:
        ``{"foreground_pixels", "agreement", "chance", "kappa"}`` over the pixels that are
        foreground in both: the share whose classes agree, the share expected if the predicted
        class were independent of the true one (from the two class marginals), and Cohen's κ,
        ``(agreement - chance) / (1 - chance)`` (1: all agree; about 0 at chance; the matching
        chose the best permutation, so chance-level classes score a little above 0). NaN where
        no pixel is foreground in both.
    """
    shared = np.asarray(confusion, dtype=np.float64)[1:, 1:]
    n = shared.sum()
    if n == 0:
        nan = float("nan")
        return {"foreground_pixels": 0, "agreement": nan, "chance": nan, "kappa": nan}
    agree = float(np.trace(shared) / n)
    chance = float((shared.sum(axis=1) * shared.sum(axis=0)).sum() / n**2)
    kappa = (agree - chance) / (1 - chance) if chance < 1 else float("nan")
    return {"foreground_pixels": int(n), "agreement": agree, "chance": chance, "kappa": float(kappa)}


# ---- warnings -----------------------------------------------------------------------------------------


def _measured(signals: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = signals.get(key)
    return value if isinstance(value, Mapping) else None


def quality_warnings(signals: Mapping[str, Any]) -> list[str]:
    """One line per sign of a degenerate result, each with its likely cause and the fix.

    ``signals`` holds what was measured (a key absent, or not a mapping, was not): ``predictions``
    and ``pseudo_labels`` (:meth:`LabelSet.summary`), ``agreement`` (``{"median",
    "median_foreground_iou", "images"}``),
    ``clusters`` (:func:`cluster_signals` with ``classes``), ``stability``
    (:func:`seed_stability`), ``saliency`` (``{"border_share", "images"}``), ``classes``
    (:func:`class_agreement` on the validation split's matched confusion), and the booleans
    ``standins`` (the run used the synthetic stand-in models) and ``ground_truth`` (some split is
    evaluated)."""
    out = []
    if signals.get("standins") and not signals.get("ground_truth"):
        out.append("this run used the stand-in models, which know only the synthetic shapes of "
                   "`pdso-ray demo`, on images without ground truth: their clusters and masks mean "
                   f"nothing for photographs; fix: {FIX_WEIGHTS}")
    pred = _measured(signals, "predictions")
    if pred and pred["images"] and pred["empty_share"] > MAX_EMPTY_PREDICTIONS:
        pseudo = _measured(signals, "pseudo_labels")
        cause = (f"the refined pseudo labels it learned are nearly empty (median foreground "
                 f"{100 * pseudo['median_foreground']:.1f} %)" if pseudo and pseudo["images"]
                 else "its training labels held little foreground")
        out.append(f"the model predicts background on {pred['empty_images']} of {pred['images']} "
                   f"images; likely cause: {cause}, i.e. the DINO saliency does not find objects in "
                   f"these images; fix: {FIX_WEIGHTS}")
    pseudo = _measured(signals, "pseudo_labels")
    if pseudo and pseudo["images"] and pseudo["median_foreground"] < MIN_PSEUDO_FOREGROUND:
        out.append(f"the refined pseudo labels are {100 * pseudo['median_foreground']:.1f} % foreground "
                   f"(median of {pseudo['images']} images): the saliency threshold leaves almost "
                   f"nothing; fix: {FIX_WEIGHTS}, or a lower pseudo_labels.threshold")
    if pred and pred["images"]:
        c = len(pred["per_class"])
        if c >= 3 and pred["largest_class_share"] > MAX_CLASS_SHARE:
            out.append(f"one class takes {100 * pred['largest_class_share']:.0f} % of the predicted "
                       f"foreground (C = {c}): the classes collapsed into one; likely cause: features "
                       f"that do not fit the images; fix: {FIX_WEIGHTS}")
        if len(pred["classes_absent"]) > MAX_ABSENT_CLASSES * c:
            out.append(f"the model never predicts {len(pred['classes_absent'])} of its {c} classes (in "
                       f"{pred['images']} images): their pseudo labels were empty or tiny; fix: a smaller "
                       "data.classes, or check the pseudo labels in the report")
    agree = _measured(signals, "agreement")
    if agree and agree["images"] and (agree["median"] < MIN_AGREEMENT
                                      or agree["median_foreground_iou"] < MIN_FOREGROUND_IOU):
        out.append(f"the model does not repeat the refined pseudo labels it learned (pixel agreement "
                   f"{100 * agree['median']:.0f} %, foreground IoU {agree['median_foreground_iou']:.2f}; "
                   f"medians of {agree['images']} images): it has not learned them; fix: more "
                   "finetune.epochs, or check the pseudo labels in the report")
    clusters = _measured(signals, "clusters")
    if clusters:
        c = clusters["classes"]
        if c >= 2 and clusters["largest_share"] > max(0.5, 1.5 / c):
            out.append(f"one cluster holds {100 * clusters['largest_share']:.0f} % of the images "
                       f"(C = {c}): the features do not separate them; likely cause: features that do "
                       f"not fit the images; fix: {FIX_WEIGHTS}")
        if clusters["empty"] > MAX_EMPTY_CLUSTERS * c:
            out.append(f"{clusters['empty']} of {c} clusters hold no image: C is larger than the "
                       "kinds of image the features tell apart; fix: a smaller data.classes")
    stable = _measured(signals, "stability")
    if stable and stable["nmi"] < MIN_SEED_NMI:
        out.append(f"the clustering changes with the seed (NMI {stable['nmi']:.2f} against k-means from "
                   "another seed): the images do not fall into C clear groups; fix: another "
                   f"data.classes, or {FIX_WEIGHTS}")
    saliency = _measured(signals, "saliency")
    if saliency and saliency["images"] and saliency["border_share"] > MAX_BORDER_SHARE:
        out.append(f"the DINO saliency peaks on the image border in {100 * saliency['border_share']:.0f} % "
                   "of the images: it sits on the background, so the pseudo labels miss the objects; "
                   f"fix: {FIX_WEIGHTS}")
    classes = _measured(signals, "classes")
    if classes and classes["foreground_pixels"] and classes["kappa"] < MIN_CLASS_KAPPA:
        out.append(f"where the model and the ground truth both see an object, their classes agree on "
                   f"{100 * classes['agreement']:.0f} % of the pixels, against {100 * classes['chance']:.0f} % "
                   f"by chance (κ {classes['kappa']:.2f}): the masks find objects, the classes mean "
                   f"little; likely cause: features that do not tell the categories apart (k-means #1 "
                   f"near chance); fix: {FIX_WEIGHTS}")
    return out
