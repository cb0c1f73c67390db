"""Training augmentation for segmentation: a random resized crop and horizontal flip applied
identically to an image and its label map, for a whole batch at once (docs/method.md §7).

Ray Data tasks bring each image and label to a fixed-size canvas (:func:`pad_to_canvas`); the
training worker crops the batch with one ``grid_sample`` (:func:`random_resized_crop_batch`),
on its GPU when it has one, from a generator seeded by the run's seed, the epoch and the rank: the
same seed gives the same crops, and each epoch new ones.

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


def seeded_generator(*seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a tuple of ints (e.g. run seed, epoch, rank) through
    numpy's ``SeedSequence``, so that nearby tuples give unrelated streams."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))


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


def pad_to_canvas(image: np.ndarray, label: np.ndarray, canvas: int,
                  ignore_id: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Resize an image and its label so the longer side is ``canvas`` (aspect kept; bilinear for
    the image, nearest for the label) and pad both to ``canvas×canvas`` (image with 0, label with
    ``ignore_id``). Returns ``(image canvas×canvas×3 uint8, label canvas×canvas, (h, w))``, ``(h,
    w)`` the size of the valid top-left region: fixed-size rows that a training worker can batch
    and crop, without losing the aspect ratio."""
    if canvas < 1:
        raise ValueError(f"canvas must be >= 1, got {canvas}")
    if image.ndim != 3 or label.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and label {label.shape} must share H×W")
    scale = canvas / max(image.shape[:2])
    h = max(1, min(canvas, int(round(image.shape[0] * scale))))
    w = max(1, min(canvas, int(round(image.shape[1] * scale))))
    out_image = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    out_label = np.full((canvas, canvas), ignore_id, dtype=label.dtype)
    out_image[:h, :w] = resize_image_bilinear(image, (h, w))
    out_label[:h, :w] = resize_label_nearest(label, (h, w))
    return out_image, out_label, (h, w)


def sample_crop_boxes(valid_hw: torch.Tensor, generator: torch.Generator,
                      scale: tuple[float, float] = DEFAULT_SCALE,
                      ratio: tuple[float, float] = DEFAULT_RATIO) -> torch.Tensor:
    """One random crop box per image, vectorised, with torchvision's ``RandomResizedCrop`` rule:
    area fraction uniform in ``scale``, aspect ``w/h`` log-uniform in ``ratio``, the first of
    ``_MAX_TRIES`` draws that fits, else the largest centred box inside ``ratio``; for a B×2
    (height, width) int tensor of valid sizes.
    Returns B×4 float64 ``(top, left, h, w)`` in pixels. Draws come from ``generator`` only."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    if valid_hw.ndim != 2 or valid_hw.shape[1] != 2:
        raise ValueError(f"valid_hw must be B×2, got shape {tuple(valid_hw.shape)}")
    hw = valid_hw.to(torch.float64).cpu()
    b = hw.shape[0]
    height, width = hw[:, 0:1], hw[:, 1:2]
    area = height * width
    frac = torch.empty(b, _MAX_TRIES, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b, _MAX_TRIES, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * frac * aspect))
    h = torch.round(torch.sqrt(area * frac / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1, dtype=torch.int64))
    pos = torch.rand(b, 2, dtype=torch.float64, generator=generator)
    rows = torch.arange(b)
    pick = first.clamp(min=0)
    bh, bw = h[rows, pick], w[rows, pick]
    # fallback: the largest centred box with an aspect ratio inside `ratio`
    in_ratio = width[:, 0] / height[:, 0]
    fh = torch.where(in_ratio < ratio[0], torch.round(width[:, 0] / ratio[0]), height[:, 0])
    fw = torch.where(in_ratio > ratio[1], torch.round(height[:, 0] * ratio[1]), width[:, 0])
    fh, fw = fh.clamp(1, None).minimum(height[:, 0]), fw.clamp(1, None).minimum(width[:, 0])
    use_fallback = first < 0
    bh, bw = torch.where(use_fallback, fh, bh), torch.where(use_fallback, fw, bw)
    top = torch.where(use_fallback, torch.floor((height[:, 0] - bh) / 2),
                      torch.floor(pos[:, 0] * (height[:, 0] - bh + 1)))
    left = torch.where(use_fallback, torch.floor((width[:, 0] - bw) / 2),
                       torch.floor(pos[:, 1] * (width[:, 0] - bw + 1)))
    return torch.stack([top, left, bh, bw], dim=1)


def random_resized_crop_batch(images: torch.Tensor, labels: torch.Tensor, valid_hw: torch.Tensor,
                              out_size: int, generator: torch.Generator,
                              scale: tuple[float, float] = DEFAULT_SCALE,
                              ratio: tuple[float, float] = DEFAULT_RATIO,
                              flip_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A random resized crop and horizontal flip per image of a batch, one ``grid_sample`` for all
    (on the batch's device: the GPU when training runs there).

    Args:
        images: B×S×S×3 uint8 canvases (:func:`pad_to_canvas`).
        labels: B×S×S integer labels of the same canvases.
        valid_hw: B×2 sizes of the valid top-left regions: crops stay inside them.
        out_size: side of the square output.
        generator: a CPU ``torch.Generator``, the only source of randomness (seeded per epoch and
            rank by the trainer: the same seed gives the same crops on any device).

    Returns:
        ``(B×out×out×3 uint8 images, B×out×out labels of the labels' dtype)``: the image resampled
        bilinearly, the label by nearest neighbour at the same points (the geometry convention of
        the module docstring), so ids are never blended.
    """
    if out_size < 1:
        raise ValueError(f"out_size must be >= 1, got {out_size}")
    if images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:3]:
        raise ValueError(f"images must be B×S×S×3 and labels B×S×S, got {tuple(images.shape)}, "
                         f"{tuple(labels.shape)}")
    b, canvas_h, canvas_w = labels.shape
    boxes = sample_crop_boxes(valid_hw, generator, scale, ratio)
    flip = torch.rand(b, generator=generator, dtype=torch.float64) < flip_prob
    # Output pixel j samples the input coordinate left + (j + 0.5) * w / out - 0.5, flipped with
    # j -> out - 1 - j; grid_sample(align_corners=False) wants (x + 0.5) / W * 2 - 1.
    j = (torch.arange(out_size, dtype=torch.float64) + 0.5) / out_size  # out
    top, left, h, w = boxes.unbind(1)
    xs = left[:, None] + torch.where(flip[:, None], 1 - j[None], j[None]) * w[:, None]  # B×out
    ys = top[:, None] + j[None] * h[:, None]
    gx = (xs / canvas_w * 2 - 1)[:, None, :].expand(b, out_size, out_size)
    gy = (ys / canvas_h * 2 - 1)[:, :, None].expand(b, out_size, out_size)
    grid = torch.stack([gx, gy], dim=-1).to(device=images.device, dtype=torch.float32)
    x = images.permute(0, 3, 1, 2).float()
    out_images = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border",
                               align_corners=False)[:, 0]
    out_images = out_images.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out_images, out_labels.round_().to(labels.dtype)
