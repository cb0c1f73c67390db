"""Label colours and colour overlays: the one palette of the project (a fixed colour per class
id), a label map in those colours (:func:`colorize`) and a photo with its label map blended in
(:func:`overlay`). The report's pictures, the colour previews and overlays written beside every
label PNG (docs/architecture.md, "Previews") and ``pdso-ray segment --overlay`` all use them.

Colours come from :func:`class_colors`: golden-ratio hues, background 0 black, ignore 1000 white,
ids above it grey, so the same id looks the same in every picture, report and preview alike.
"""

from __future__ import annotations

import numpy as np

from pdso_ray.method.metrics import IGNORE_ID, resize_nearest

_GOLDEN = 0.6180339887
OUT_OF_RANGE_COLOR = (128, 128, 128)  # ids above IGNORE_ID (not labels of this project)


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


def colorize(label: np.ndarray) -> np.ndarray:
    """H×W integer ids → H×W×3 uint8 RGB in :func:`class_colors`: what a label PNG (id = R + 256·G,
    near black to the eye) looks like to a person. Ids above ``IGNORE_ID`` are grey, negative
    ids raise ValueError."""
    label = np.asarray(label)
    if label.ndim != 2 or not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise ValueError(f"label must be an H×W integer array, got {label.shape} {label.dtype}")
    if label.size and int(label.min()) < 0:
        raise ValueError(f"label ids must be >= 0, got {int(label.min())}")
    lut = np.vstack([class_colors(), [OUT_OF_RANGE_COLOR]]).astype(np.uint8)
    return lut[np.minimum(label, IGNORE_ID + 1)]


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
    # only the painted pixels, by flat index (faster than a boolean mask over H×W×3): a photo is
    # mostly background, and this runs once per label written
    ids = np.asarray(label).ravel()
    painted = np.flatnonzero((ids > 0) & (ids < IGNORE_ID))
    out = image.copy()
    pixels = out.reshape(-1, 3)
    colours = class_colors()[ids[painted]].astype(np.float32)
    pixels[painted] = np.rint((1.0 - alpha) * pixels[painted].astype(np.float32) + alpha * colours).astype(np.uint8)
    return out


def palette_indices(label: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``label`` (H×W ids 0..IGNORE_ID) as ``(H×W uint8 indices, K×3 uint8 palette)`` with K ≤ 256,
    index k standing for the :func:`class_colors` colour of the k-th id present: a paletted image
    that looks like :func:`colorize` and encodes several times faster. None when more than 256
    ids are present, or an id lies outside 0..IGNORE_ID."""
    label = np.asarray(label)
    if label.size == 0 or int(label.min()) < 0 or int(label.max()) > IGNORE_ID:
        return None
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=1))
    if present.size > 256:
        return None
    index = np.zeros(int(present[-1]) + 1, dtype=np.uint8)
    index[present] = np.arange(present.size, dtype=np.uint8)
    return index[label], class_colors()[present]
