"""Label colours and colour overlays: a fixed colour per class id, and a photo with its label map
blended in (the report's mosaics, ``pdso-ray segment --overlay``).

Colours come from :func:`class_colors`: golden-ratio hues, background 0 black, ignore 1000 white,
so the same id looks the same in every picture, report and overlay alike.
"""

from __future__ import annotations

import numpy as np

from pdso_ray.method.metrics import IGNORE_ID, resize_nearest

_GOLDEN = 0.6180339887


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """N×3 HSV in [0, 1] → N×3 RGB in [0, 1] (the standard six-sector formula)."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.astype(int) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros_like(hsv)
    for i, (r, g, b) in enumerate(choices):
        pick = sector == i
        rgb[pick] = np.stack([r[pick], g[pick], b[pick]], 1)
    return rgb


def class_colors(max_id: int = IGNORE_ID) -> np.ndarray:
    """(max_id + 1)×3 uint8 RGB lookup table: id 0 black, id ``IGNORE_ID`` white, every other id
    a fixed colour (hue k·0.618 mod 1 keeps neighbouring ids far apart; saturation and value
    cycle so that ids with close hues still differ)."""
    k = np.arange(max_id + 1)
    hsv = np.stack([(k * _GOLDEN) % 1.0, 0.55 + 0.15 * (k % 3), 0.95 - 0.2 * ((k // 3) % 2)], 1)
    lut = np.round(_hsv_to_rgb(hsv) * 255).astype(np.uint8)
    lut[0] = 0
    if max_id >= IGNORE_ID:
        lut[IGNORE_ID] = 255
    return lut


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` (H×W×3 uint8 RGB) with each labelled pixel blended towards its class colour:
    ``(1 − alpha)·pixel + alpha·colour`` where ``label`` is a class (1..999), the pixel as it was
    on background (0) and ignore (1000). ``label`` (h×w int) is resized to H×W by nearest
    neighbour when the sizes differ. Returns H×W×3 uint8."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H×W×3 uint8, got {image.shape} {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if label.shape != image.shape[:2]:
        label = resize_nearest(label, image.shape[:2])
    colours = class_colors()[np.clip(label, 0, IGNORE_ID)].astype(np.float32)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    keep = ((label == 0) | (label >= IGNORE_ID))[..., None]
    return np.where(keep, image, np.rint(blended).astype(np.uint8))
