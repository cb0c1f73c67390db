"""Colour statistics of whole images: the baseline a learned representation must beat.

If a colour histogram alone clusters a data set into its classes, image-level purity says nothing
about whether a backbone sees shapes. Two statistics, both pure numpy on H×W×3 uint8 RGB images:

- :func:`hue_histogram`: ``bins`` hue bins, each pixel weighted by its saturation (grey pixels have
  no hue), normalised to sum 1 (all zeros for an image without saturated pixels);
- :func:`hsv_histogram`: a coarse joint histogram of hue, saturation and value, ``bins`` per axis,
  normalised to sum 1.

Both return N×B float32 rows, one per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 RGB → H×W×3 float32 HSV, each channel in [0, 1] (hue in turns; 0 for greys)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H×W×3 uint8 RGB, got {image.shape} {image.dtype}")
    rgb = image.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=2)
    chroma = value - rgb.min(axis=2)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(value == r, ((g - b) / safe) % 6.0,
                   np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    hue = np.where(chroma > 0, hue, 0.0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1.0), 0.0)
    return np.stack([hue, saturation, value], axis=2).astype(np.float32)


def hue_histogram(images: Sequence[np.ndarray], bins: int = 16) -> np.ndarray:
    """Saturation-weighted hue histogram of each image: N×``bins`` float32."""
    rows = []
    for image in images:
        hsv = rgb_to_hsv(image).reshape(-1, 3)
        index = np.minimum((hsv[:, 0] * bins).astype(np.int64), bins - 1)
        hist = np.bincount(index, weights=hsv[:, 1], minlength=bins)
        rows.append(hist / hist.sum() if hist.sum() > 0 else hist)
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), bins)


def hsv_histogram(images: Sequence[np.ndarray], bins: int = 4) -> np.ndarray:
    """Joint hue × saturation × value histogram of each image: N×``bins``³ float32."""
    rows = []
    for image in images:
        q = np.minimum((rgb_to_hsv(image) * bins).astype(np.int64), bins - 1).reshape(-1, 3)
        hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins**3)
        rows.append(hist / hist.sum())
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), bins**3)


COLOUR_STATISTICS = {"hue_histogram": hue_histogram, "hsv_histogram": hsv_histogram}
