"""Pixel pseudo labels from patch embeddings and centroids (docs/method.md §5), and the candidate
classes of an image (step 6).

Id spaces: centroids and k-means clusters are numbered 0..C-1; label maps use 1..C for classes
(cluster id + 1) and 0 for background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-12


def class_map(
    patch_emb: np.ndarray,
    candidate_centroids: np.ndarray,
    candidate_ids: np.ndarray,
    out_hw: tuple[int, int],
    prune_to: int | None = 2,
) -> np.ndarray:
    """Per-pixel class of one image before the saliency threshold: ``1 + id`` of the candidate
    centroid of highest cosine similarity to the embedded patch feature.

    Resolution: the per-patch cosine-similarity maps are upsampled bilinearly
    (``align_corners=False``) to ``out_hw`` *before* the argmax, so class boundaries fall where
    two similarities cross, between patch centres, instead of on the patch grid's staircase.

    ``prune_to``: with many candidates (all C centroids, the official rule), upsampling C maps
    to the image's size would take C·H·W floats (689 MB for C = 919 at 500×375). Only the classes
    among the ``prune_to`` most similar of at least one patch are upsampled; the argmax is
    exact at every patch centre, and between them can differ only where a class that is third or
    worse at every neighbouring patch centre would win the interpolation. None upsamples all.

    Args:
        patch_emb: ``h×w×D'`` per-patch features already passed through the embedding (need
            not be normalised: cosine similarity normalises them).
        candidate_centroids: ``K×D'`` centroids of the candidate clusters.
        candidate_ids: ``K`` non-negative cluster ids (0-based) of those centroids.
        out_hw: output ``(H, W)``.

    Returns:
        ``H×W`` int32, values ``1 + candidate_ids[k]``.
    """
    patch_emb = np.asarray(patch_emb)
    centroids = np.asarray(candidate_centroids)
    ids = np.asarray(candidate_ids)
    if patch_emb.ndim != 3:
        raise ValueError(f"patch_emb must be h×w×D', got shape {patch_emb.shape}")
    if centroids.ndim != 2 or centroids.shape[0] == 0 or centroids.shape[1] != patch_emb.shape[2]:
        raise ValueError(
            f"candidate_centroids must be K×{patch_emb.shape[2]} with K >= 1, got shape {centroids.shape}"
        )
    if ids.shape != (centroids.shape[0],) or not np.issubdtype(ids.dtype, np.integer) or np.any(ids < 0):
        raise ValueError(f"candidate_ids must be {centroids.shape[0]} non-negative integers, got {ids!r}")
    if len(out_hw) != 2 or min(out_hw) < 1:
        raise ValueError(f"out_hw must be (H, W) with positive sides, got {out_hw!r}")
    if prune_to is not None and prune_to < 1:
        raise ValueError(f"prune_to must be >= 1 or None, got {prune_to}")

    emb = torch.from_numpy(np.ascontiguousarray(patch_emb, dtype=np.float32))
    cen = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    cen = cen / cen.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sim = torch.einsum("hwd,kd->khw", emb, cen)  # K×h×w
    keep = np.arange(len(ids))
    if prune_to is not None and len(ids) > prune_to:
        top = sim.topk(prune_to, dim=0).indices  # prune_to×h×w
        keep = torch.unique(top).numpy()
        sim = sim[torch.from_numpy(keep)]
    sim = F.interpolate(sim[None], size=tuple(int(s) for s in out_hw), mode="bilinear",
                        align_corners=False)[0]
    best = keep[sim.argmax(dim=0).numpy()]
    return (ids.astype(np.int64)[best] + 1).astype(np.int32)


def apply_saliency_threshold(classes: np.ndarray, saliency: np.ndarray, threshold: float) -> np.ndarray:
    """``classes`` (H×W) with every pixel whose ``saliency`` (H×W in [0, 1]) is below
    ``threshold`` set to background 0."""
    classes, saliency = np.asarray(classes), np.asarray(saliency)
    if classes.shape != saliency.shape:
        raise ValueError(f"saliency shape {saliency.shape} != class map shape {classes.shape}")
    return np.where(saliency < threshold, 0, classes).astype(np.int32)


def raw_pseudo_label(
    patch_emb: np.ndarray,
    saliency: np.ndarray,
    candidate_centroids: np.ndarray,
    candidate_ids: np.ndarray,
    threshold: float,
    out_hw: tuple[int, int] | None = None,
    prune_to: int | None = 2,
) -> np.ndarray:
    """Raw pixel pseudo label of one image: :func:`class_map`, then pixels with
    ``saliency < threshold`` become 0 (background).

    Args:
        saliency: ``H×W`` float in [0, 1], already upsampled to the output size.
        out_hw: output ``(H, W)``; defaults to the saliency's shape, which it must equal.
        The others: see :func:`class_map`.

    Returns:
        ``H×W`` int32 label: 0 background, ``1 + candidate_ids[k]`` elsewhere.
    """
    saliency = np.asarray(saliency)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be H×W, got shape {saliency.shape}")
    out_hw = tuple(saliency.shape) if out_hw is None else tuple(out_hw)
    if out_hw != saliency.shape:
        raise ValueError(f"out_hw {out_hw} != saliency shape {saliency.shape}: upsample saliency first")
    return apply_saliency_threshold(class_map(patch_emb, candidate_centroids, candidate_ids, out_hw,
                                              prune_to), saliency, threshold)


def main_and_secondary_classes(
    topk_ids: np.ndarray, topk_dist: np.ndarray, sigma: float
) -> tuple[int, list[int]]:
    """Main and secondary classes of an image from its top-k centroids (docs/method.md §6).

    Args:
        topk_ids: ``k`` integer cluster ids (0-based), as stored by the purify stage.
        topk_dist: ``k`` float distances to those centroids (any order).
        sigma: secondary classes are the other candidates with distance ``<= sigma``.

    Returns:
        ``(main, secondary)`` in the same 0-based id space: ``main`` the nearest centroid's id,
        ``secondary`` the others within ``sigma`` by increasing distance (ties keep input order),
        without repeats and never containing ``main``.
    """
    ids = np.asarray(topk_ids)
    dist = np.asarray(topk_dist, dtype=np.float64)
    if ids.ndim != 1 or ids.size == 0 or dist.shape != ids.shape:
        raise ValueError(
            f"topk_ids and topk_dist must be equal-length non-empty vectors, got {ids.shape}, {dist.shape}"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"topk_ids must be integers, got dtype {ids.dtype}")
    if not np.all(np.isfinite(dist)):
        raise ValueError(f"topk_dist holds non-finite values: {dist}")
    order = np.argsort(dist, kind="stable")
    main = int(ids[order[0]])
    secondary: list[int] = []
    for i in order[1:]:
        cid = int(ids[i])
        if dist[i] <= sigma and cid != main and cid not in secondary:
            secondary.append(cid)
    return main, secondary


def second_nearest_distances(topk_dist: np.ndarray) -> np.ndarray:
    """Each row's second-smallest distance: ``topk_dist`` is N×k float (k >= 2; any order within
    a row), the distances of N images to their k nearest final centroids. Returns N float64: how
    far each image's nearest *secondary* candidate is."""
    dist = np.asarray(topk_dist, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[1] < 2:
        raise ValueError(f"topk_dist must be N×k with k >= 2, got shape {dist.shape}")
    return np.partition(dist, 1, axis=1)[:, 1]


def sigmas_at_quantiles(second_distances: np.ndarray, quantiles: Sequence[float]) -> list[tuple[float, float]]:
    """SPO's σ values that give a secondary class to given shares of the images.

    Args:
        second_distances: N float distances of each image to its second-nearest centroid
            (:func:`second_nearest_distances`), in the space SPO compares σ with.
        quantiles: shares in [0, 1].

    Returns:
        ``(sigma, share)`` pairs, ascending and without repeated σ: ``sigma`` the quantile of the
        distances (4 significant digits: it names a sweep folder), ``share`` the measured share
        of the images with a second candidate within it (an image's secondary classes are those
        within σ, :func:`main_and_secondary_classes`).
    """
    d = np.asarray(second_distances, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"second_distances must be a non-empty vector of finite values, got shape {d.shape}")
    q = np.asarray(quantiles, dtype=np.float64)
    if q.size == 0 or np.any((q < 0) | (q > 1)):
        raise ValueError(f"quantiles must be a non-empty list of values in [0, 1], got {list(quantiles)}")
    sigmas = sorted({float(f"{v:.4g}") for v in np.quantile(d, q)})
    return [(sigma, float(np.mean(d <= sigma))) for sigma in sigmas]
