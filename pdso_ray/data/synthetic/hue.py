"""The hue world: the first synthetic world, kept for tests that need no learning.

Class k is one object appearance: a hue, a texture (stripes, checker, dots, rings) and a shape
(ellipse, rectangle, triangle, star, diamond), drawn at a random position, scale and rotation on
a low-saturation background (gradients or smooth noise, plus plain grey-ish clutter that looks
like no class). A colour histogram separates its classes: a model measured on it measures a
colour detector. The default world is :mod:`.shapes`, where colour is never the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pdso_ray.data.imagenet_s import BACKGROUND_ID, IGNORE_ID
from pdso_ray.data.synthetic.drawing import border_band, hsv_colour

TEXTURES = ("stripes", "checker", "dots", "rings")
SHAPES = ("ellipse", "rectangle", "triangle", "star", "diamond")


@dataclass(frozen=True)
class ClassStyle:
    """Appearance of one synthetic class: hue in [0, 1), texture, shape, texture period
    (in units of the object's half size)."""

    hue: float
    texture: str
    shape: str
    period: float


def class_style(k: int, classes: int, style_seed: int | None = None) -> ClassStyle:
    """Style of class k in 1..classes.

    ``style_seed`` None (the demo's classes): evenly spaced hues; textures and shapes cycle with
    coprime lengths (4 and 5), so 20 consecutive classes never share both. Otherwise the style is
    drawn from ``(style_seed, k)`` alone: a uniform hue, texture and shape, and a period in
    [0.3, 0.55] — classes unlike any demo set's, e.g. to pretrain a backbone on data the
    evaluation never shows.
    """
    i = k - 1
    if style_seed is not None:
        rng = np.random.default_rng([style_seed, k])
        return ClassStyle(
            hue=float(rng.random()),
            texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            period=float(rng.uniform(0.3, 0.55)),
        )
    return ClassStyle(
        hue=i / classes,
        texture=TEXTURES[i % len(TEXTURES)],
        shape=SHAPES[i % len(SHAPES)],
        period=0.35 + 0.12 * ((i // 20) % 3),
    )


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in object coordinates (the object spans about [-1, 1]^2)."""
    if shape == "ellipse":
        return u**2 + (v / 0.7) ** 2 <= 1.0
    if shape == "rectangle":
        return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.6)
    if shape == "triangle":
        return (v <= 0.7) & (v >= -0.9 + 1.78 * np.abs(u))
    if shape == "star":
        rho, theta = np.hypot(u, v), np.arctan2(v, u)
        return rho <= 0.6 + 0.35 * np.cos(5 * theta)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Boolean two-tone pattern in object coordinates."""
    if texture == "stripes":
        return np.floor(u / period) % 2 == 0
    if texture == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if texture == "dots":
        du = u / period - np.round(u / period)
        dv = v / period - np.round(v / period)
        return np.hypot(du, dv) < 0.32
    if texture == "rings":
        return np.floor(np.hypot(u, v) / period) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _smooth_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxW float32 in [0, 1]: bilinear upsampling of a coarse random grid."""
    cells = int(rng.integers(3, 9))
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(coarse, mode="L").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float32 low-saturation background (saturation <= 0.3, never a class's look)."""
    c0 = hsv_colour(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.9))
    c1 = hsv_colour(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.9))
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    else:
        t = _smooth_noise(rng, h, w)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(0, 4))):  # plain clutter blobs
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.2) * h, rng.uniform(0.05, 0.2) * w
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img[blob] = hsv_colour(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.9))
    return img


def render_sample(
    rng: np.random.Generator,
    k: int,
    classes: int,
    size: tuple[int, int],
    ignore_border: int = 1,
    style_seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image of class k and its label.

    Returns ``(image, label)``: HxWx3 uint8 RGB and HxW int32 with k on the object,
    BACKGROUND_ID elsewhere and IGNORE_ID on a band of ``ignore_border`` pixels each side of
    the object's border (0 disables it). ``size`` is ``(H, W)``; ``style_seed`` as in
    :func:`class_style`.
    """
    h, w = size
    style = class_style(k, classes, style_seed)
    img = _background(rng, h, w)

    half = rng.uniform(0.18, 0.35) * min(h, w)  # half of the object's extent, in pixels
    cy = rng.uniform(0.6 * half, h - 0.6 * half)
    cx = rng.uniform(0.6 * half, w - 0.6 * half)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = (yy - cy) / half, (xx - cx) / half
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = _shape_mask(style.shape, u, v)
    if not mask.any():  # a sliver too small to hit a pixel centre: keep the object visible
        mask[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))] = True

    hue = style.hue + rng.uniform(-0.015, 0.015)
    light = hsv_colour(hue, rng.uniform(0.75, 0.95), rng.uniform(0.85, 1.0))
    dark = hsv_colour(hue, rng.uniform(0.8, 1.0), rng.uniform(0.35, 0.5))
    pattern = _texture(style.texture, u, v, style.period)
    img[mask & pattern] = light
    img[mask & ~pattern] = dark

    img += rng.normal(0.0, 4.0, size=img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    label = np.where(mask, k, BACKGROUND_ID).astype(np.int32)
    if ignore_border > 0:
        label[border_band(mask, ignore_border)] = IGNORE_ID
    return image, label
