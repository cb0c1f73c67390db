"""LightCluster (Cheung et al., arXiv 2311.18628): training-free multi-level clustering of a ViT's
attention features into binary foreground masks, labelled by clustering CLS tokens.

What the paper states: attention features of a self-supervised ViT separate foreground from
background patches; clustering them into a small number of clusters within the dataset, within a
category and within an image gives three masks; the masks are made consistent into one binary
patch-level mask, which is upsampled, refined, and labelled by the CLS token of the object region.
Everything else here (which features, how a cluster is called foreground, the consistency rule,
the refiner, the labelling rule) is our reading, argued in ``/work/notes/lightcluster.md``:

- features: the last block's keys, heads concatenated, L2-normalised per patch
  (``DinoBackbone.attention_features``; :func:`normalize_features`);
- a cluster is foreground when its members' mean saliency (min-max normalised CLS attention)
  exceeds the mean over all rows it was fitted on (:func:`foreground_clusters`);
- dataset level: k-means over a sample of patches of the whole dataset; category level: images
  grouped by k-means of their CLS tokens, then k-means over the sampled patches of each group;
  image level: k-means over the image's own patches;
- consistency: a patch is foreground when at least ``min_votes`` of the voting levels say so
  (all three by default; ``voters`` may keep fewer: the choice is measured, docs/method.md §9);
- upsampling: bilinear; refinement: pixel-adaptive mask refinement on the RGB image
  (:mod:`pdso_ray.method.mask_refine`); then a 0.5 threshold;
- labelling: k-means (K = C) over one vector per image, the CLS token of its object region (or of
  the whole image); label = 1 + cluster id on the mask, 0 elsewhere (:func:`label_from_mask`).

Conventions: features are ``float32`` rows in the space of :func:`normalize_features`; saliency is
``float`` in [0, 1], min-max normalised per image (``pdso_ray.method.features``); masks are
``bool`` (True = foreground); cluster and category ids are ``int64`` from 0; label maps are
``int32`` with 0 background and 1..C classes. k-means here runs in-process
(:func:`kmeans_in_process`, the Lloyd loop of :mod:`pdso_ray.method.kmeans_math`); the dataset
and CLS-token k-means of a large run use the distributed ``pdso_ray.kmeans`` instead and pass
their outputs to :func:`foreground_clusters` and :func:`fit_category_models`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pdso_ray.method import kmeans_math as km
from pdso_ray.method.mask_refine import refine_mask, upsample_mask

_EPS = 1e-12
LEVELS = ("dataset", "category", "image")
NUM_LEVELS = len(LEVELS)


@dataclass(frozen=True)
class LightClusterParams:
    """LightCluster's settings (defaults: our choices where the paper gives none, see the notes).

    Attributes:
        dataset_k: clusters of the dataset-level k-means over sampled patches.
        category_k: clusters of each category's k-means over its sampled patches.
        image_k: clusters of each image's k-means over its own patches.
        voters: the levels (of :data:`LEVELS`) whose masks vote, in any order.
        min_votes: voters that must call a patch foreground: 1 union, all of them intersection;
            with the three levels, 2 is a majority.
        niter: Lloyd iterations of the in-process k-means.
        patches_per_image: patches sampled per image for the dataset and category levels.
        refine_iterations: refinement steps (0 = threshold the upsampled mask as it is).
        refine_dilations: neighbourhood dilations of the refinement, in pixels.
        refine_temperature: scale of the local colour spread in the refinement's affinities
            (smaller = edges stop the mask more sharply).
        seed: seed of every k-means and of the patch sampling.
    """

    dataset_k: int = 2
    category_k: int = 2
    image_k: int = 2
    voters: tuple[str, ...] = LEVELS
    min_votes: int = 2
    niter: int = 20
    patches_per_image: int = 4
    refine_iterations: int = 10
    refine_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    refine_temperature: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("dataset_k", "category_k", "image_k"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (foreground and background), got {getattr(self, name)}")
        if not self.voters or len(set(self.voters)) != len(self.voters) or set(self.voters) - set(LEVELS):
            raise ValueError(f"voters must be distinct levels among {LEVELS}, got {self.voters}")
        if not 1 <= self.min_votes <= len(self.voters):
            raise ValueError(f"min_votes must be in 1..{len(self.voters)} (the number of voters), got {self.min_votes}")
        if self.niter < 1 or self.patches_per_image < 1 or self.refine_iterations < 0:
            raise ValueError(f"niter and patches_per_image must be >= 1 and refine_iterations >= 0, got "
                             f"{self.niter}, {self.patches_per_image}, {self.refine_iterations}")
        if not self.refine_dilations or min(self.refine_dilations) < 1 or self.refine_temperature <= 0:
            raise ValueError(f"refine_dilations must be positive pixels and refine_temperature > 0, got "
                             f"{self.refine_dilations}, {self.refine_temperature}")


@dataclass
class LevelModel:
    """One clustering level: ``centroids`` k×D float32 and ``foreground`` k bool."""

    centroids: np.ndarray
    foreground: np.ndarray


@dataclass
class CategoryModels:
    """Every category's level model: ``centroids`` Kc×k×D float32, ``foreground`` Kc×k bool."""

    centroids: np.ndarray
    foreground: np.ndarray

    def level(self, category: int) -> LevelModel:
        if not 0 <= category < self.centroids.shape[0]:
            raise ValueError(f"category must be in 0..{self.centroids.shape[0] - 1}, got {category}")
        return LevelModel(self.centroids[category], self.foreground[category])

    @classmethod
    def stack(cls, models: Sequence[LevelModel]) -> CategoryModels:
        """Models fitted one category at a time (category i = ``models[i]``), all of the same k."""
        if not models or len({m.centroids.shape for m in models}) != 1:
            raise ValueError(f"need >= 1 models of one k×D shape, got {[m.centroids.shape for m in models]}")
        return cls(np.stack([m.centroids for m in models]).astype(np.float32),
                   np.stack([m.foreground for m in models]).astype(bool))


@dataclass
class LightClusterState:
    """The global state the per-image steps need, O((k + Kc·k + Kc)·D) floats.

    ``dataset``: the dataset-level model; ``categories``: the category-level models;
    ``category_centroids``: Kc×D float32 centroids of the CLS-token k-means (to place an image
    that was not in that k-means, with :func:`nearest_centroid`).
    """

    dataset: LevelModel
    categories: CategoryModels
    category_centroids: np.ndarray


# ---- features and k-means ------------------------------------------------------------------------
def normalize_features(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """``x`` (…×D, any float) as float32 numpy with unit L2 norm along the last axis (zero rows stay 0)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def kmeans_in_process(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd k-means of the rows of ``x`` (n×D float32) in this process: ``(centroids k×D float32,
    assignments n int64)``, each row assigned to its nearest final centroid."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means needs an n×D array with n >= k={k}, got shape {x.shape}")
    init = x[km.init_indices(x.shape[0], k, seed)]
    centroids, _ = km.lloyd(lambda c: km.lloyd_partial(x, c), init, niter, seed)
    ids, _ = km.search_blocks(x, centroids, 1)
    return centroids, ids[:, 0]


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """n int64 ids of the nearest (squared L2) of ``centroids`` (k×D) to each row of ``x`` (n×D)."""
    ids, _ = km.search_blocks(np.ascontiguousarray(x, dtype=np.float32), centroids, 1)
    return ids[:, 0]


def sample_patches(features: np.ndarray, saliency: np.ndarray, n: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``min(n, h·w)`` distinct patches of one image, uniformly at random, for the dataset and
    category levels.

    Args:
        features: h×w×D raw attention features of the image (normalised here).
        saliency: h×w in [0, 1].
        n: patches wanted.
        rng: the sampler (seed it per image, e.g. from the image id, for reproducible samples).

    Returns:
        ``(rows m×D float32 normalised, saliency m float32)``.
    """
    rows, sal = _flat(features, saliency)
    pick = np.sort(rng.choice(rows.shape[0], size=min(n, rows.shape[0]), replace=False))
    return rows[pick], sal[pick]


def _flat(features: np.ndarray, saliency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features) if not isinstance(features, torch.Tensor) else features
    saliency = np.asarray(saliency, dtype=np.float32)
    if features.ndim != 3 or saliency.shape != tuple(features.shape[:2]):
        raise ValueError(f"features must be h×w×D over saliency h×w, got {tuple(features.shape)} "
                         f"and {saliency.shape}")
    return normalize_features(features).reshape(-1, features.shape[2]), saliency.reshape(-1)


# ---- the three levels ----------------------------------------------------------------------------
def foreground_clusters(assignments: np.ndarray, saliency: np.ndarray, k: int) -> np.ndarray:
    """Which of ``k`` clusters are foreground: those whose members' mean saliency exceeds the mean
    saliency of all ``n`` rows.

    Args:
        assignments: n int cluster ids in 0..k-1 (k-means output, distributed or not).
        saliency: n float, the rows' saliency.
        k: number of clusters.

    Returns:
        k bool. An empty cluster is background. With k = 2 and two populated clusters of different
        mean saliency exactly one is foreground (the overall mean lies strictly between theirs).
    """
    ids = np.asarray(assignments)
    sal = np.asarray(saliency, dtype=np.float64)
    if ids.ndim != 1 or sal.shape != ids.shape or ids.size == 0:
        raise ValueError(f"assignments and saliency must be equal-length vectors, got {ids.shape}, {sal.shape}")
    if ids.min() < 0 or ids.max() >= k:
        raise ValueError(f"assignments must lie in 0..{k - 1}, got {ids.min()}..{ids.max()}")
    counts = np.bincount(ids, minlength=k)
    sums = np.bincount(ids, weights=sal, minlength=k)
    means = np.divide(sums, counts, out=np.full(k, -np.inf), where=counts > 0)
    return means > sal.mean()


def fit_level(rows: np.ndarray, saliency: np.ndarray, k: int, niter: int, seed: int) -> LevelModel:
    """k-means of ``rows`` (n×D float32, normalised) into ``k`` clusters, and which are foreground
    by :func:`foreground_clusters` with the rows' ``saliency`` (n)."""
    centroids, ids = kmeans_in_process(rows, k, niter, seed)
    return LevelModel(centroids, foreground_clusters(ids, saliency, k))


def level_mask(features: np.ndarray, model: LevelModel) -> np.ndarray:
    """h×w bool: the patches whose nearest centroid of ``model`` is a foreground cluster.
    ``features``: h×w×D raw attention features (normalised here)."""
    features = np.asarray(features) if not isinstance(features, torch.Tensor) else features
    if features.ndim != 3:
        raise ValueError(f"features must be h×w×D, got shape {tuple(features.shape)}")
    h, w, d = features.shape
    ids = nearest_centroid(normalize_features(features).reshape(-1, d), model.centroids)
    return np.asarray(model.foreground)[ids].reshape(h, w)


def image_level_mask(features: np.ndarray, saliency: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """h×w bool: k-means of the image's own patches (h×w×D raw features), foreground clusters
    decided against the image's mean ``saliency`` (h×w)."""
    rows, sal = _flat(features, saliency)
    saliency = np.asarray(saliency)
    if rows.shape[0] < k:
        raise ValueError(f"an image of {rows.shape[0]} patches cannot be split into k={k} clusters")
    model = fit_level(rows, sal, k, niter, seed)
    return model.foreground[nearest_centroid(rows, model.centroids)].reshape(saliency.shape)


def fit_category_models(rows: np.ndarray, saliency: np.ndarray, categories: np.ndarray, num_categories: int,
                        k: int, niter: int, seed: int, fallback: LevelModel) -> CategoryModels:
    """One level model per category from the sampled patches of its images.

    Args:
        rows: n×D float32 normalised sampled patches (:func:`sample_patches` of every image).
        saliency: n float, their saliency.
        categories: n int, the category (CLS-token k-means cluster) of each row's image.
        num_categories: Kc.
        k: clusters per category.
        niter, seed: k-means settings.
        fallback: the model of a category with fewer than ``k`` rows (normally the dataset-level
            model, of the same k), so every category has one.

    Returns:
        :class:`CategoryModels` with Kc entries. A stage holding the sample as a distributed
        dataset can instead group it by category, call :func:`fit_level` per group and
        :meth:`CategoryModels.stack` the results; the outcome is the same.
    """
    cats = np.asarray(categories)
    if cats.shape != (rows.shape[0],) or (cats.size and (cats.min() < 0 or cats.max() >= num_categories)):
        raise ValueError(f"categories must be {rows.shape[0]} ids in 0..{num_categories - 1}")
    if fallback.centroids.shape != (k, rows.shape[1]):
        raise ValueError(f"fallback must have k×D = {k}×{rows.shape[1]} centroids, got {fallback.centroids.shape}")
    sal = np.asarray(saliency, dtype=np.float32)
    models = []
    for c in range(num_categories):
        members = np.flatnonzero(cats == c)
        models.append(fit_level(rows[members], sal[members], k, niter, seed) if members.size >= k else fallback)
    return CategoryModels.stack(models)


# ---- consistency and labels ---------------------------------------------------------------------
def consistent_mask(masks: Sequence[np.ndarray], min_votes: int) -> tuple[np.ndarray, np.ndarray]:
    """Combine the levels' patch masks (each h×w bool): ``(mask h×w bool, votes h×w int8)``, the
    mask holding the patches at least ``min_votes`` of them call foreground."""
    stack = np.stack([np.asarray(m, dtype=bool) for m in masks])
    if stack.ndim != 3 or not 1 <= min_votes <= stack.shape[0]:
        raise ValueError(f"need h×w masks and min_votes in 1..{len(masks)}, got {stack.shape}, {min_votes}")
    votes = stack.sum(axis=0, dtype=np.int8)
    return votes >= min_votes, votes


def label_from_mask(mask: np.ndarray, class_id: int | None) -> np.ndarray:
    """H×W int32 label: ``1 + class_id`` on the mask, 0 elsewhere (all 0 when ``class_id`` is None:
    an image without an object has no class)."""
    mask = np.asarray(mask, dtype=bool)
    if class_id is None:
        return np.zeros(mask.shape, dtype=np.int32)
    if class_id < 0:
        raise ValueError(f"class_id must be >= 0 (a k-means cluster id), got {class_id}")
    return np.where(mask, np.int32(class_id + 1), np.int32(0))


def label_vectors(image_cls: np.ndarray, object_cls: np.ndarray | None, has_object: np.ndarray) -> np.ndarray:
    """The vectors the labelling k-means clusters (N×D float32, normalised): an image's object-region
    CLS token where its mask is non-empty (``has_object``, N bool), else its image CLS token;
    ``object_cls`` None = image CLS tokens throughout."""
    vectors = normalize_features(image_cls)
    if object_cls is not None:
        obj = normalize_features(object_cls)
        if obj.shape != vectors.shape:
            raise ValueError(f"object_cls {obj.shape} must match image_cls {vectors.shape}")
        vectors = np.where(np.asarray(has_object, dtype=bool)[:, None], obj, vectors)
    return vectors


# ---- one image, and everything in memory ---------------------------------------------------------
@dataclass
class ImageMasks:
    """One image's masks: ``levels`` 3×h×w bool (the dataset, category and image level's patch
    masks, in that order), ``votes`` h×w int8 (voters calling each patch foreground),
    ``patch_mask`` h×w bool (the consistent mask), ``upsampled`` H×W bool (the consistent mask
    upsampled, before refinement, at 0.5), ``mask`` H×W bool (upsampled and refined)."""

    levels: np.ndarray
    votes: np.ndarray
    patch_mask: np.ndarray
    upsampled: np.ndarray
    mask: np.ndarray


def segment_image(features: np.ndarray, saliency: np.ndarray, image: np.ndarray, state: LightClusterState,
                  category: int, params: LightClusterParams,
                  device: torch.device | str | None = None) -> ImageMasks:
    """The per-image steps: three level masks, consistency, upsampling, refinement, threshold 0.5.

    Args:
        features: h×w×D raw attention features of the image (numpy; keys of the last block).
        saliency: h×w in [0, 1].
        image: H×W×3 uint8 RGB at the output resolution.
        state: the fitted global state.
        category: the image's category id (its CLS-token k-means cluster).
        params: settings.
        device: where upsampling and refinement run (``None`` = CPU).
    """
    features = np.asarray(features)
    masks = (level_mask(features, state.dataset),
             level_mask(features, state.categories.level(category)),
             image_level_mask(features, saliency, params.image_k, params.niter, params.seed))
    patch_mask, votes = consistent_mask([masks[LEVELS.index(v)] for v in params.voters], params.min_votes)
    soft = upsample_mask(patch_mask, np.asarray(image).shape[:2], device)
    upsampled = (soft > 0.5).cpu().numpy()
    soft = refine_mask(image, soft, params.refine_iterations, params.refine_dilations, params.refine_temperature)
    return ImageMasks(np.stack(masks), votes, patch_mask, upsampled, (soft > 0.5).cpu().numpy())


@dataclass
class InMemoryResult:
    """:func:`lightcluster_in_memory`'s outputs for N images: ``labels`` N×H×W int32, ``masks``
    N×H×W bool, ``patch_masks`` N×h×w bool, ``categories`` N int64, ``classes`` N int64 (-1 for an
    image whose refined mask is empty: no object, no class), and the fitted ``state``."""

    labels: np.ndarray
    masks: np.ndarray
    patch_masks: np.ndarray
    categories: np.ndarray
    classes: np.ndarray
    state: LightClusterState


def lightcluster_in_memory(features: np.ndarray, saliency: np.ndarray, cls_tokens: np.ndarray, images: np.ndarray,
                           num_classes: int, params: LightClusterParams = LightClusterParams(),
                           object_cls: Callable[[np.ndarray], np.ndarray] | None = None) -> InMemoryResult:
    """LightCluster end to end on arrays (tests, small data), in the order a streaming run follows.

    Args:
        features: N×h×w×D raw attention features; saliency: N×h×w in [0, 1];
        cls_tokens: N×D image CLS tokens; images: N×H×W×3 uint8 RGB.
        num_classes: C, the number of categories and of classes.
        params: settings.
        object_cls: optional ``patch_masks (N×h×w bool) -> N×D`` CLS tokens of the masked regions
            (``DinoBackbone.attention_features(..., patch_mask=...)``); None labels by image CLS.
    """
    features = np.asarray(features)
    n = features.shape[0]
    shapes_ok = np.asarray(saliency).shape == features.shape[:3] and len(cls_tokens) == n == len(images)
    if features.ndim != 4 or not shapes_ok:
        raise ValueError(f"need N×h×w×D features, N×h×w saliency, N CLS tokens and N images, got "
                         f"{features.shape}, {np.asarray(saliency).shape}, {len(cls_tokens)}, {len(images)}")
    # Pass 1: a patch sample, and categories from the CLS tokens.
    samples = [sample_patches(features[i], saliency[i], params.patches_per_image,
                              np.random.default_rng([params.seed, i])) for i in range(n)]
    rows = np.concatenate([s[0] for s in samples])
    row_sal = np.concatenate([s[1] for s in samples])
    row_image = np.repeat(np.arange(n), [s[0].shape[0] for s in samples])
    cat_centroids, categories = kmeans_in_process(normalize_features(cls_tokens), num_classes,
                                                  params.niter, params.seed)
    # Driver: the dataset-level and category-level models.
    dataset = fit_level(rows, row_sal, params.dataset_k, params.niter, params.seed)
    category_models = fit_category_models(rows, row_sal, categories[row_image], num_classes, params.category_k,
                                          params.niter, params.seed, fallback=dataset)
    state = LightClusterState(dataset, category_models, cat_centroids)
    # Pass 2: per-image masks, then the labelling vectors.
    per_image = [segment_image(features[i], saliency[i], images[i], state, int(categories[i]), params)
                 for i in range(n)]
    patch_masks = np.stack([m.patch_mask for m in per_image])
    has_object = np.array([m.mask.any() for m in per_image])
    vectors = label_vectors(cls_tokens, None if object_cls is None else object_cls(patch_masks), has_object)
    # Driver: the labelling k-means; pass 3: the labels.
    _, clusters = kmeans_in_process(vectors, num_classes, params.niter, params.seed)
    classes = np.where(has_object, clusters, -1)
    labels = np.stack([label_from_mask(m.mask, int(c) if c >= 0 else None) for m, c in zip(per_image, classes)])
    return InMemoryResult(labels, np.stack([m.mask for m in per_image]), patch_masks, categories, classes, state)
