"""Image features from DINO outputs (docs/method.md §1): saliency, its peak, saliency-pooled features.

Pure torch; tensors stay on the caller's device. Conventions: saliency maps are B×h×w float32 in
[0, 1] on the patch grid; relative coordinates are (y, x) in [0, 1] of the image height/width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def _check_maps(name: str, maps: torch.Tensor) -> None:
    if maps.ndim != 3:
        raise ValueError(f"{name} must be B×h×w, got shape {tuple(maps.shape)}")


def saliency_from_attention(attention: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each image's CLS attention map to [0, 1].

    Args:
        attention: B×h×w CLS->patch attention (any float dtype).

    Returns:
        B×h×w float32; per image, the smallest value maps to 0 and the largest to 1. A constant map
        (no contrast) becomes all zeros.
    """
    _check_maps("attention", attention)
    a = attention.float()
    lo = a.amin(dim=(1, 2), keepdim=True)
    hi = a.amax(dim=(1, 2), keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(_EPS)


def pooled_feature(patch_tokens: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """Saliency-weighted mean of patch tokens, L2-normalised.

    Args:
        patch_tokens: B×h×w×D.
        saliency: B×h×w non-negative weights (normally :func:`saliency_from_attention`'s output).

    Returns:
        B×D float32 with unit L2 norm: normalize(Σ s_i t_i / Σ s_i). An image whose weights are all
        zero (a constant attention map) gets the plain mean of its tokens, so it still has a feature.
    """
    _check_maps("saliency", saliency)
    if patch_tokens.ndim != 4 or patch_tokens.shape[:3] != saliency.shape:
        raise ValueError(f"patch_tokens {tuple(patch_tokens.shape)} must be B×h×w×D over saliency "
                         f"{tuple(saliency.shape)}")
    weights = saliency.float().flatten(1)  # B×hw
    if (weights < 0).any():
        raise ValueError(f"saliency weights must be >= 0, got min {weights.min().item()}")
    empty = weights.sum(dim=1, keepdim=True) <= 0
    weights = torch.where(empty, torch.ones_like(weights), weights)
    weights = weights / weights.sum(dim=1, keepdim=True)
    pooled = torch.einsum("bn,bnd->bd", weights, patch_tokens.float().flatten(1, 2))
    return F.normalize(pooled, dim=1)


def saliency_peak(saliency: torch.Tensor) -> torch.Tensor:
    """Where each saliency map peaks, as relative coordinates.

    Args:
        saliency: B×h×w.

    Returns:
        B×2 float32 (y, x) in (0, 1): the centre of the highest cell, ((row + 0.5) / h,
        (col + 0.5) / w); the first cell in row-major order wins ties. Multiply by the image's
        height and width to get pixels.
    """
    _check_maps("saliency", saliency)
    _, h, w = saliency.shape
    idx = saliency.flatten(1).argmax(dim=1)
    rows = torch.div(idx, w, rounding_mode="floor")
    cols = idx - rows * w
    return torch.stack([(rows.float() + 0.5) / h, (cols.float() + 0.5) / w], dim=1)


def upsample_saliency(saliency: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of B×h×w saliency maps to B×H×W (``out_hw`` = (H, W)), kept in [0, 1]."""
    _check_maps("saliency", saliency)
    if len(out_hw) != 2 or min(out_hw) < 1:
        raise ValueError(f"out_hw must be (H, W) with positive sides, got {out_hw!r}")
    up = F.interpolate(saliency.float()[:, None], size=tuple(int(s) for s in out_hw),
                       mode="bilinear", align_corners=False)
    return up[:, 0].clamp_(0.0, 1.0)
