"""Pixel pseudo labels from patch embeddings and centroids (docs/method.md §5), and the candidate
classes of an image (step 6).

Id spaces: centroids and k-means clusters are numbered 0..C-1; label maps use 1..C for classes
(cluster id + 1) and 0 for background.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-12


def raw_pseudo_label(
    patch_emb: np.ndarray,
    saliency: np.ndarray,
    candidate_centroids: np.ndarray,
    candidate_ids: np.ndarray,
    threshold: float,
    out_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Raw pixel pseudo label of one image.

    Each pixel takes the candidate centroid of highest cosine similarity to its embedded patch
    feature, as label ``1 + cluster id``; pixels with ``saliency < threshold`` become 0.

    Resolution choice: the ``K`` per-patch cosine-similarity maps are upsampled bilinearly
    (``align_corners=False``) to ``out_hw`` *before* the argmax, rather than upsampling the
    per-patch argmax with nearest neighbour. Class boundaries then fall where two similarities
    cross, between patch centres, instead of on the patch grid's staircase; inside a patch whose
    neighbours agree the result is the same.

    Args:
        patch_emb: ``h×w×D'`` float per-patch features already passed through ``e(x)``
            (need not be normalised: cosine similarity normalises them).
        saliency: ``H×W`` float in [0, 1], already upsampled to the output size.
        candidate_centroids: ``K×D'`` float centroids of the image's candidate clusters.
        candidate_ids: ``K`` integer cluster ids (0-based) of those centroids.
        threshold: saliency threshold ``t``.
        out_hw: output ``(H, W)``; defaults to the saliency's shape, which it must equal.

    Returns:
        ``H×W`` int32 label: 0 background, ``1 + candidate_ids[k]`` elsewhere.
    """
    patch_emb = np.asarray(patch_emb)
    saliency = np.asarray(saliency)
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
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be H×W, got shape {saliency.shape}")
    out_hw = tuple(saliency.shape) if out_hw is None else tuple(out_hw)
    if out_hw != saliency.shape:
        raise ValueError(f"out_hw {out_hw} != saliency shape {saliency.shape}: upsample saliency first")

    emb = torch.from_numpy(np.ascontiguousarray(patch_emb, dtype=np.float32))
    cen = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    cen = cen / cen.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sim = torch.einsum("hwd,kd->khw", emb, cen)[None]  # 1×K×h×w
    sim = F.interpolate(sim, size=out_hw, mode="bilinear", align_corners=False)[0]
    best = sim.argmax(dim=0).numpy()
    label = (ids.astype(np.int64)[best] + 1).astype(np.int32)
    label[saliency < threshold] = 0
    return label


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
