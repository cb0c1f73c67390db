"""Training augmentation for segmentation: one random resized crop and horizontal flip applied
identically to an image and its label map (docs/method.md §7).

Geometry convention: a crop box is ``(top, left, height, width)`` in pixels of the input; both
resizes map output pixel ``i`` to the input coordinate ``(i + 0.5) * in / out - 0.5``
(``align_corners=False``). The image is resampled bilinearly at that coordinate; the label takes
the input pixel that contains it (nearest), so image and label stay aligned to within half a
pixel and label ids are never blended.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# torchvision's RandomResizedCrop aspect range; the area range keeps at least a quarter of the
# image, because a segmentation crop must still hold enough of the object to be labelled.
DEFAULT_SCALE = (0.25, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
_MAX_TRIES = 10


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
    """A random crop box ``(top, left, h, w)`` inside a ``height×width`` image.

    The box covers a fraction of the area drawn uniformly from ``scale`` with an aspect ratio
    ``w/h`` drawn log-uniformly from ``ratio``; after ``_MAX_TRIES`` boxes that do not fit, the
    largest centred box with an aspect ratio inside ``ratio`` is used (torchvision's rule).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_MAX_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def resize_label_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``H×W`` integer label map to ``size = (h, w)`` by nearest neighbour.

    Output pixel ``i`` takes input pixel ``floor((i + 0.5) * H / h)``: the one containing the
    output pixel's centre. dtype is kept.
    """
    label = np.asarray(label)
    if label.ndim != 2 or label.size == 0:
        raise ValueError(f"label must be a non-empty H×W array, got shape {label.shape}")
    out_h, out_w = size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    in_h, in_w = label.shape
    if (in_h, in_w) == (out_h, out_w):
        return label
    rows = np.minimum(((np.arange(out_h) + 0.5) * in_h / out_h).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * in_w / out_w).astype(np.int64), in_w - 1)
    return label[rows[:, None], cols[None, :]]


def resize_image_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``H×W×3`` uint8 image to ``size = (h, w)``: bilinear, antialiased when shrinking,
    rounded back to uint8."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H×W×3 uint8, got shape {image.shape} dtype {image.dtype}")
    if tuple(image.shape[:2]) == tuple(size):
        return image
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def random_resized_crop_pair(
    image: np.ndarray,
    label: np.ndarray,
    out_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop the same random box out of ``image`` and ``label``, resize both to
    ``out_size×out_size`` and flip both horizontally with probability ``flip_prob``.

    Args:
        image: ``H×W×3`` uint8 RGB.
        label: ``H×W`` integer ids (same H, W as the image), e.g. 0..C and 1000 for ignore.
        out_size: side of the square output.
        rng: the only source of randomness (seed it for reproducible crops).

    Returns:
        ``(image out×out×3 uint8, label out×out with the label's dtype)``.
    """
    if out_size < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if image.ndim != 3 or label.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and label {label.shape} must share H×W")
    top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    img = resize_image_bilinear(image[top:top + h, left:left + w], (out_size, out_size))
    lab = resize_label_nearest(label[top:top + h, left:left + w], (out_size, out_size))
    if rng.random() < flip_prob:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)
