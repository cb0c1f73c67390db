"""Batched multi-crop augmentation for DINO self-distillation: 2 global + N local views per image.

Everything runs on tensors, for the whole batch at once, on the batch's device (CPU or GPU): one
``torchvision.ops.roi_align`` call per crop size cuts and resizes every random box (bilinear, with
several samples per output pixel when a box is larger than the output, so downscaling is
anti-aliased), then flips, colour jitter and blur are per-crop parameters applied as broadcast
tensor ops. Random parameters are drawn on the CPU from a ``torch.Generator``, so a seed gives the
same views on every device. On one shared CPU thread the views of a 64-image batch take 19-22% of
a training step of the 2-block demo backbone (a PIL pipeline took ~60%); on a GPU, a negligible
share.

Conventions: input B×H×W×3 uint8 RGB (the layout of decoded images); output crops are
ImageNet-normalised float32, *crop-major*: rows ``[c·B, (c+1)·B)`` of ``global_crops`` are view
``c`` of images ``0..B-1`` (DINO's layout, so ``chunk(2)`` splits the views). Crop boxes follow
torchvision's ``RandomResizedCrop`` rule (area fraction uniform in ``scale``, aspect log-uniform in
``ratio``, 10 tries, then the whole image), but stay continuous: a box need not sit on pixel edges.

The defaults are mild; a recipe sets DINO's photometric augmentations (hue rotation, conversion to
grey, blur, solarisation) where colour must not be learnt: they are what makes a DINO encode
shape and texture rather than colour statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Rec. 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
_CROP_TRIES = 10


@dataclass(frozen=True)
class CropSpec:
    """One kind of view: output side in pixels, box area fraction range, and per-view
    probabilities of a horizontal flip, of colour jitter, of Gaussian blur, of conversion to
    grey and of solarisation (pixels above mid-grey inverted), applied in that order."""

    size: int
    scale: tuple[float, float]
    flip_p: float = 0.5
    jitter_p: float = 0.8
    blur_p: float = 0.0
    grayscale_p: float = 0.0
    solarize_p: float = 0.0


@dataclass(frozen=True)
class MultiCropConfig:
    """Views per image and their augmentation strengths.

    ``brightness``/``contrast``/``saturation`` ``s``: factors drawn uniformly from ``[1-s, 1+s]``;
    ``channel_gain`` ``g``: an independent factor in ``[1-g, 1+g]`` per colour channel (a white
    balance change: it tints grey, low-saturation pixels far more than it moves the hue of
    saturated ones); ``hue``: a rotation of the chroma plane by up to ``±hue`` turns;
    ``blur_sigma``: Gaussian σ range in output pixels. ``ratio``: aspect range (w/h) of the crop
    boxes.
    """

    global_crop: CropSpec = CropSpec(64, (0.4, 1.0))
    local_crop: CropSpec = CropSpec(32, (0.1, 0.4))
    num_local: int = 4
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.2
    channel_gain: float = 0.0
    hue: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self):
        for name, spec in (("global_crop", self.global_crop), ("local_crop", self.local_crop)):
            if spec.size < 1 or not 0 < spec.scale[0] <= spec.scale[1] <= 1:
                raise ValueError(f"{name} needs size >= 1 and 0 < scale min <= max <= 1, got {spec}")
        if self.num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {self.num_local}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")


@dataclass
class MultiCrops:
    """``global_crops``: 2B×3×G×G, ``local_crops``: NB×3×L×L (N = num_local; 0 rows when N = 0);
    float32, ImageNet-normalised, crop-major."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def sample_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """``n`` random crop boxes inside a ``height×width`` image: n×4 float32 (x1, y1, x2, y2) in
    pixel-edge coordinates (0 = left edge of the first pixel, ``width`` = right edge of the last).

    Per box, up to 10 candidates (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first
    that fits wins, else the whole image. Drawn on the CPU from ``gen``.
    """
    area = height * width * _uniform(n * _CROP_TRIES, *scale, gen).view(n, _CROP_TRIES)
    log_r = _uniform(n * _CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), gen).view(n, _CROP_TRIES)
    w = torch.sqrt(area * log_r.exp())
    h = torch.sqrt(area / log_r.exp())
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1)  # index of the first True (0 when none fits)
    rows = torch.arange(n)
    w, h, ok = w[rows, first], h[rows, first], fits[rows, first]
    w = torch.where(ok, w, torch.full_like(w, float(width)))
    h = torch.where(ok, h, torch.full_like(h, float(height)))
    x1 = torch.rand(n, generator=gen, dtype=torch.float64) * (width - w)
    y1 = torch.rand(n, generator=gen, dtype=torch.float64) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1).float()


def _colour_jitter(x: torch.Tensor, on: torch.Tensor, cfg: MultiCropConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation, channel gain and hue changes of K×3×S×S images in
    [0, 1], in that order, clamped to [0, 1] once at the end; rows where ``on`` is False are
    unchanged (factors 1, angle 0).

    Every one of these is affine in RGB (contrast blends with the crop's mean grey level), so they
    compose into one 3×3 matrix and offset per crop, applied in a single pass over the pixels.
    """
    k = x.shape[0]
    one = torch.ones(k, dtype=torch.float64)

    def factor(strength: float) -> torch.Tensor:
        return torch.where(on, _uniform(k, 1 - strength, 1 + strength, gen), one)

    b, c, s = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    angle = torch.where(on, _uniform(k, -cfg.hue, cfg.hue, gen) * 2 * math.pi, torch.zeros(k, dtype=torch.float64))
    luma = torch.tensor(_LUMA, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    # saturation: grey + (x - grey)·s, grey = luma·x
    mat = s.view(k, 1, 1) * eye + (1 - s).view(k, 1, 1) * luma.view(1, 1, 3).expand(k, 3, 3)
    offset_dir = torch.ones(k, 3, dtype=torch.float64)  # the contrast offset is grey, which saturation keeps
    if cfg.channel_gain > 0:
        gains = _uniform(3 * k, 1 - cfg.channel_gain, 1 + cfg.channel_gain, gen).view(k, 3)
        gains = torch.where(on[:, None], gains, torch.ones_like(gains))
        mat = gains[:, :, None] * mat
        offset_dir = gains * offset_dir
    if cfg.hue > 0:
        # A hue shift as a rotation of the (I, Q) chroma plane of YIQ.
        rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                               dtype=torch.float64)
        rot = torch.zeros(k, 3, 3, dtype=torch.float64)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        hue = torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq
        mat = hue @ mat
        offset_dir = (hue @ offset_dir[:, :, None])[:, :, 0]
    # brightness b then contrast c around the mean grey m of the brightened crop:
    # c·b·x + (1 - c)·m, with m = b·mean(luma·x)
    dev = x.device
    mean_grey = torch.einsum("c,kchw->k", luma.to(dev, torch.float32), x) / (x.shape[2] * x.shape[3])
    mat = (mat * (c * b).view(k, 1, 1)).to(dev, torch.float32)
    offset = offset_dir.to(dev, torch.float32) * ((1 - c) * b).to(dev, torch.float32)[:, None] * mean_grey[:, None]
    return (torch.einsum("kij,kjhw->kihw", mat, x) + offset.view(k, 3, 1, 1)).clamp_(0, 1)


def _gaussian_blur(x: torch.Tensor, on: torch.Tensor, sigma: tuple[float, float],
                   gen: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with a per-crop σ (in pixels); rows where ``on`` is False are
    unchanged. One grouped convolution per axis for the whole batch (reflect padding)."""
    k, ch, hh, ww = x.shape
    sig = _uniform(k, *sigma, gen).float()
    radius = max(1, min(int(math.ceil(3 * sigma[1])), (min(hh, ww) - 1) // 2))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / sig[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (taps == 0).float().expand(k, -1)
    kernel = torch.where(on[:, None], kernel, identity).to(x.device)
    weight = kernel.repeat_interleave(ch, dim=0)  # (K·3)×taps
    y = x.reshape(1, k * ch, hh, ww)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), weight[:, None, None, :], groups=k * ch)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), weight[:, None, :, None], groups=k * ch)
    return y.reshape(k, ch, hh, ww)


def _views(images: torch.Tensor, spec: CropSpec, copies: int, cfg: MultiCropConfig,
           gen: torch.Generator) -> torch.Tensor:
    """``copies`` views of every image of B×3×H×W float [0, 1] ``images``: (copies·B)×3×S×S."""
    b, _, height, width = images.shape
    n = copies * b
    if n == 0:
        return images.new_zeros((0, 3, spec.size, spec.size))
    boxes = sample_boxes(n, height, width, spec.scale, cfg.ratio, gen)
    index = torch.arange(b, dtype=torch.float32).repeat(copies)  # crop-major
    rois = torch.cat([index[:, None], boxes], dim=1).to(images.device)
    x = roi_align(images, rois, output_size=(spec.size, spec.size), spatial_scale=1.0,
                  sampling_ratio=-1, aligned=True)
    flip = (torch.rand(n, generator=gen) < spec.flip_p).to(images.device)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    jitter = torch.rand(n, generator=gen) < spec.jitter_p
    x = _colour_jitter(x, jitter, cfg, gen)
    if spec.blur_p > 0:
        blur = torch.rand(n, generator=gen) < spec.blur_p
        x = _gaussian_blur(x, blur, cfg.blur_sigma, gen)
    if spec.grayscale_p > 0:
        grey = (torch.rand(n, generator=gen) < spec.grayscale_p).to(images.device)
        luma = torch.einsum("c,kchw->khw", torch.tensor(_LUMA, device=x.device), x)[:, None]
        x = torch.where(grey.view(n, 1, 1, 1), luma.expand_as(x), x)
    if spec.solarize_p > 0:
        solarize = (torch.rand(n, generator=gen) < spec.solarize_p).to(images.device)
        x = torch.where(solarize.view(n, 1, 1, 1) & (x >= 0.5), 1 - x, x)
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of N×3×H×W float images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def multicrop(images: torch.Tensor, cfg: MultiCropConfig, gen: torch.Generator) -> MultiCrops:
    """Two global and ``cfg.num_local`` local views of every image.

    Args:
        images: B×H×W×3 uint8 RGB on any device (one size for the batch: resize first).
        cfg: crop sizes, scales and augmentation strengths.
        gen: CPU generator for every random draw (its state advances).

    Returns:
        :class:`MultiCrops` on ``images``' device.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be B×H×W×3 uint8, got {tuple(images.shape)} {images.dtype}")
    if gen.device.type != "cpu":
        raise ValueError(f"the generator must live on the CPU (same draws on every device), got {gen.device}")
    x = images.permute(0, 3, 1, 2).float().div_(255)
    global_crops = _views(x, cfg.global_crop, 2, cfg, gen)
    local_crops = _views(x, cfg.local_crop, cfg.num_local, cfg, gen)
    return MultiCrops(normalize(global_crops), normalize(local_crops))
