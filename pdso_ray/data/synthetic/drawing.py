"""Drawing helpers shared by the synthetic worlds."""

from __future__ import annotations

import colorsys

import numpy as np
from scipy import ndimage


def border_band(mask: np.ndarray, width: int) -> np.ndarray:
    """H×W bool: pixels within ``width`` 4-neighbour steps of ``mask``'s border, on either side
    (the image edge counts as inside, so a mask cut by the edge has no band along it)."""
    grown = ndimage.binary_dilation(mask, iterations=width)
    shrunk = ndimage.binary_erosion(mask, iterations=width, border_value=1)
    return grown & ~shrunk


def hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    """3 float32 RGB in [0, 255] of hue ``h`` (turns, any real), saturation and value in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0
