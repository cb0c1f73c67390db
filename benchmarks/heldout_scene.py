"""Backdrops of the held-out world (:mod:`benchmarks.heldout_world`): restyled crops of real
photographs, the supersampled canvas objects are laid on, and clutter that belongs to no class.

Photographs: 18 from scikit-image (``skimage.data``) and 2 from scikit-learn
(``load_sample_images``), grey ones included. A crop takes a random scale, flips and quarter
turns, then a hue rotation about the grey axis (colour photos) or a duotone tint (grey ones),
partial desaturation, gamma and contrast by a lookup table, and sometimes a Gaussian blur; a
background is one crop, or two meeting along a straight line.

Clutter (each ``kind(canvas, rng, photos)``): ``twig`` (a tapering curved stick with side shoots),
``fragment`` (a convex piece of another photograph), ``pebbles`` (a scatter of small irregular
stones) and ``fence`` (thin straight wires across the image). Clutter paints over whatever is
below it and marks those pixels as background, so an occluded object pixel is background.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.colors import hsv_to_rgb
from matplotlib.path import Path as PolygonPath
from PIL import Image, ImageFilter
from scipy.spatial import ConvexHull

from benchmarks.heldout_shapes import in_capsules, pixel_boxes

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "grass", "gravel", "brick", "moon",
                  "hubble_deep_field", "retina", "immunohistochemistry", "coins", "page", "text", "clock",
                  "cell", "cat")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
PHOTO_MAX_SIDE = 512  # photos are shrunk once to this: crops are at most 200 px x 2 anyway
SUPERSAMPLE = 2


# ---- photographs and colours -----------------------------------------------------------------


def load_photos() -> list[np.ndarray]:
    """The 20 photographs: uint8, HxW (grey) or HxWx3, longest side <= PHOTO_MAX_SIDE."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    raw = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    sample = load_sample_images()
    raw += [sample.images[[Path(f).name for f in sample.filenames].index(name)] for name in SKLEARN_PHOTOS]
    photos = []
    for a in raw:
        im = Image.fromarray(np.asarray(a, dtype=np.uint8))
        im.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)
        photos.append(np.asarray(im))
    return photos


def random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n RGB colours (n x 3 float in [0, 1]) with any hue, saturation and brightness, each pair at
    least 0.25 apart (RGB distance) so that textures stay visible."""
    while True:
        hsv = np.stack([rng.uniform(0, 1, n), rng.uniform(0.05, 1.0, n), rng.uniform(0.12, 1.0, n)], axis=1)
        rgb = hsv_to_rgb(hsv)
        gaps = [np.linalg.norm(rgb[i] - rgb[j]) for i in range(n) for j in range(i)]
        if not gaps or min(gaps) >= 0.25:
            return rgb


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _hue_rotation(angle: float) -> np.ndarray:
    """3x3 matrix turning RGB colours by ``angle`` about the grey axis (a hue shift that keeps
    brightness and saturation)."""
    k = np.full(3, 1 / math.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    turn = math.cos(angle) * np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(k, k)
    return turn.astype(np.float32)


def photo_crop(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """An h x w x 3 float32 crop of a random photo, restyled (see the module docstring)."""
    photo = photos[int(rng.integers(len(photos)))]
    if rng.random() < 0.5:
        photo = photo[:, ::-1]
    photo = np.rot90(photo, int(rng.integers(4)))
    ph, pw = photo.shape[:2]
    ch = rng.uniform(0.25, 1.0) * min(ph, pw * h / w)
    cw = ch * w / h
    y0, x0 = rng.uniform(0, ph - ch), rng.uniform(0, pw - cw)
    crop = Image.fromarray(np.ascontiguousarray(photo[int(y0):int(y0 + ch) + 1, int(x0):int(x0 + cw) + 1]))
    crop = crop.resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.6:
        crop = crop.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.6) * SUPERSAMPLE))
    levels = np.arange(256) / 255.0  # gamma and contrast as one lookup table
    table = np.clip(0.5 + rng.uniform(0.6, 1.1) * (levels ** rng.uniform(0.7, 1.4) - 0.5), 0, 1)
    crop = crop.point((table * 255 + 0.5).astype(np.uint8).tolist() * len(crop.getbands()))
    img = np.asarray(crop, dtype=np.float32) * (1 / 255.0)
    if img.ndim == 2:
        if rng.random() < 0.5:  # duotone: the grey levels run between two random colours
            dark, light = random_colours(rng, 2).astype(np.float32)
            img = dark + (light - dark) * img[..., None]
        else:
            img = np.repeat(img[..., None], 3, axis=2)
    elif rng.random() < 0.5:
        img = img @ _hue_rotation(rng.uniform(0, 2 * math.pi)).T
    img += rng.uniform(0, 0.8) * (_luminance(img)[..., None] - img)  # partial desaturation
    return np.clip(img, 0, 1, out=img)


def background(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """An h x w x 3 float32 backdrop: one restyled photo crop, or (one time in five) two split by
    a random straight line."""
    img = photo_crop(rng, photos, h, w)
    if rng.random() < 0.2:  # two photos meet along a straight line
        other = photo_crop(rng, photos, h, w)
        a, c = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.7, 2) * (h, w)
        yy, xx = np.mgrid[0:h, 0:w]
        side = (xx - c[1]) * math.cos(a) + (yy - c[0]) * math.sin(a) > 0
        img[side] = other[side]
    return img


# ---- canvas ----------------------------------------------------------------------------------


class Canvas:
    """The supersampled image being composed: ``rgb`` (H x W x 3 float32) and ``owner`` (H x W
    bool: the pixel shows a class object)."""

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb
        self.owner = np.zeros(rgb.shape[:2], bool)
        self.h, self.w = rgb.shape[:2]

    def window(self, cy: float, cx: float, reach: float) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
        """The canvas part within ``reach`` of (cy, cx): row and column slices and the (y, x)
        coordinates of its pixel centres; None when it misses the canvas."""
        y0, y1 = max(0, int(cy - reach)), min(self.h, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(self.w, int(cx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            return None
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        return slice(y0, y1), slice(x0, x1), yy, xx

    def paint(self, rows: slice, cols: slice, mask: np.ndarray, colour: np.ndarray, is_object: bool) -> None:
        """Lay ``colour`` over the window where ``mask`` (h x w bool): one colour (3,) or one per
        masked pixel (mask.sum() x 3, row-major order); an object or an occluder."""
        self.rgb[rows, cols][mask] = colour
        self.owner[rows, cols][mask] = is_object


# ---- clutter ---------------------------------------------------------------------------------


def _paint_capsules(canvas: Canvas, capsules: np.ndarray, colour: np.ndarray) -> None:
    ys, xs = capsules[:, [1, 3]], capsules[:, [0, 2]]
    pad = capsules[:, 4].max() + 1
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    window = canvas.window(cy, cx, max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 + pad)
    if window is not None:
        rows, cols, yy, xx = window
        canvas.paint(rows, cols, in_capsules(xx, yy, capsules, pixel_boxes(capsules, rows, cols)), colour, False)


def _paint_polygon(canvas: Canvas, points: np.ndarray, colour: np.ndarray) -> None:
    """``points``: (n, 2) (x, y) vertices; ``colour``: 3 floats."""
    c = points.mean(axis=0)
    window = canvas.window(c[1], c[0], np.abs(points - c).max() + 1)
    if window is not None:
        rows, cols, yy, xx = window
        inside = PolygonPath(points).contains_points(np.stack([xx.ravel(), yy.ravel()], 1)).reshape(xx.shape)
        canvas.paint(rows, cols, inside, colour, False)


def twig(canvas: Canvas, rng: np.random.Generator, photos: list[np.ndarray]) -> None:
    """A curved stick (quadratic Bezier) with 0-2 side shoots, tapering, in one dark-ish colour."""
    short = min(canvas.h, canvas.w)
    p0 = rng.uniform(0, 1, 2) * (canvas.w, canvas.h)
    p2 = p0 + rng.normal(0, 0.5, 2) * short
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.2, 2) * short
    t = np.linspace(0, 1, 14)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t * t * p2
    width = rng.uniform(0.6, 2.2) * SUPERSAMPLE * np.linspace(1.0, 0.5, len(pts) - 1)
    capsules = [np.concatenate([pts[:-1], pts[1:], width[:, None]], axis=1)]
    for _ in range(int(rng.integers(3))):
        i = int(rng.integers(2, len(pts) - 2))
        tip = pts[i] + rng.normal(0, 0.15, 2) * short
        capsules.append(np.array([[*pts[i], *tip, 0.6 * width[i]]]))
    colour = random_colours(rng, 1)[0] * rng.uniform(0.3, 1.0)
    _paint_capsules(canvas, np.concatenate(capsules), colour)


def fragment(canvas: Canvas, rng: np.random.Generator, photos: list[np.ndarray]) -> None:
    """A convex piece of another photograph."""
    short = min(canvas.h, canvas.w)
    c = rng.uniform(0, 1, 2) * (canvas.w, canvas.h)
    pts = c + rng.uniform(-0.5, 0.5, (int(rng.integers(5, 9)), 2)) * rng.uniform(0.15, 0.45) * short
    hull = pts[ConvexHull(pts).vertices]
    window = canvas.window(c[1], c[0], np.abs(hull - c).max() + 1)
    if window is not None:
        rows, cols, yy, xx = window
        inside = PolygonPath(hull).contains_points(np.stack([xx.ravel(), yy.ravel()], 1)).reshape(xx.shape)
        canvas.paint(rows, cols, inside, photo_crop(rng, photos, *xx.shape)[inside], False)


def pebbles(canvas: Canvas, rng: np.random.Generator, photos: list[np.ndarray]) -> None:
    """A scatter of small irregular stones, each its own colour."""
    short = min(canvas.h, canvas.w)
    centre = rng.uniform(0, 1, 2) * (canvas.w, canvas.h)
    for _ in range(int(rng.integers(4, 12))):
        c = centre + rng.normal(0, 0.2, 2) * short
        n = int(rng.integers(5, 8))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.5, 1.0, n) * rng.uniform(0.02, 0.06) * short
        _paint_polygon(canvas, c + np.stack([r * np.cos(a), r * np.sin(a)], 1), random_colours(rng, 1)[0])


def fence(canvas: Canvas, rng: np.random.Generator, photos: list[np.ndarray]) -> None:
    """Thin straight wires across the whole image, in one or two directions."""
    short = min(canvas.h, canvas.w)
    colour = np.clip(rng.uniform(0.2, 0.9) + rng.normal(0, 0.05, 3), 0, 1)
    yy, xx = np.mgrid[0:canvas.h, 0:canvas.w] + 0.5
    wires = np.zeros((canvas.h, canvas.w), bool)
    a0 = rng.uniform(0, math.pi)
    for a in (a0, a0 + rng.uniform(0.6, 1.2))[: int(rng.integers(1, 3))]:
        spacing = rng.uniform(0.15, 0.3) * short
        across = (xx * -math.sin(a) + yy * math.cos(a)) / spacing + rng.uniform()
        wires |= np.abs(across - np.round(across)) * spacing < rng.uniform(0.7, 1.2) * SUPERSAMPLE
    canvas.paint(slice(0, canvas.h), slice(0, canvas.w), wires, colour, False)


BEHIND = (twig, fragment, pebbles)
IN_FRONT = ((twig, 0.3), (fragment, 0.15), (pebbles, 0.15), (fence, 0.07))
