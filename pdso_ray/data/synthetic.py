"""Synthetic data: a small ImageNet-S-shaped dataset, and odd or corrupt image files.

:func:`make_demo_dataset` writes ``ImageNetS{C}/`` in the layout of :mod:`imagenet_s`. Class k
is one object appearance: a hue, a texture (stripes, checker, dots, rings) and a shape (ellipse,
rectangle, triangle, star, diamond), drawn at a random position, scale and rotation on a
low-saturation background (gradients or smooth noise, plus plain grey-ish clutter that looks like
no class). Validation and test images come with ground truth in the label PNG codec: object
pixels are k, the rest 0, and a thin band along the object's border is IGNORE_ID, as ImageNet-S
marks uncertain borders.

Every image is a function of ``(seed, split, class, index)`` only, so the output is
byte-identical for a seed, and adding images leaves the existing ones unchanged.

:func:`odd_and_corrupt_samples` gives files that a robust loader must handle: valid but unusual
encodings, and corrupt ones, each with its expected outcome.
"""

from __future__ import annotations

import colorsys
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pdso_ray.data.imagenet_s import (
    BACKGROUND_ID,
    GT_SPLITS,
    IGNORE_ID,
    MAX_CLASSES,
    SPLITS,
    dataset_dir,
    encode_label,
)
from pdso_ray.storage import Storage

# Written in the dataset folder: the parameters that made it. Its presence tells a re-run that
# the folder is ours (safe to replace) and, with "complete": true, that it is whole.
MARKER_NAME = "synthetic.json"
# The sorted class names, one per line (the format of the benchmark's class-list files).
CLASS_LIST_NAME = "classes.txt"
# Bump when the images change for the same parameters, so existing folders are regenerated.
GENERATOR_VERSION = 1

TEXTURES = ("stripes", "checker", "dots", "rings")
SHAPES = ("ellipse", "rectangle", "triangle", "star", "diamond")
_JPEG_QUALITY = 90


def wnid_for(k: int) -> str:
    """WordNet-id-shaped folder name of synthetic class k (1-based): ``n00000001``, ..."""
    return f"n{k:08d}"


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


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


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
    c0 = _rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.9))
    c1 = _rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.9))
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
        img[blob] = _rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.9))
    return img


def _border_band(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` 4-neighbour steps of the mask's border, on either side."""
    grown, shrunk = mask.copy(), mask.copy()
    for _ in range(width):
        g, s = grown.copy(), shrunk.copy()
        g[1:] |= grown[:-1]
        g[:-1] |= grown[1:]
        g[:, 1:] |= grown[:, :-1]
        g[:, :-1] |= grown[:, 1:]
        s[1:] &= shrunk[:-1]
        s[:-1] &= shrunk[1:]
        s[:, 1:] &= shrunk[:, :-1]
        s[:, :-1] &= shrunk[:, 1:]
        grown, shrunk = g, s
    return grown & ~shrunk


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
    light = _rgb(hue, rng.uniform(0.75, 0.95), rng.uniform(0.85, 1.0))
    dark = _rgb(hue, rng.uniform(0.8, 1.0), rng.uniform(0.35, 0.5))
    pattern = _texture(style.texture, u, v, style.period)
    img[mask & pattern] = light
    img[mask & ~pattern] = dark

    img += rng.normal(0.0, 4.0, size=img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    label = np.where(mask, k, BACKGROUND_ID).astype(np.int32)
    if ignore_border > 0:
        label[_border_band(mask, ignore_border)] = IGNORE_ID
    return image, label


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def make_demo_dataset(
    out_dir: str,
    classes: int = 5,
    train_per_class: int = 20,
    val_per_class: int = 4,
    test_per_class: int = 4,
    image_size: tuple[int, int] = (96, 128),
    seed: int = 0,
    storage: Storage | None = None,
    ignore_border: int = 1,
    style_seed: int | None = None,
) -> str:
    """Write a synthetic ``ImageNetS{classes}/`` under ``out_dir`` and return its URL.

    Files: ``{train,validation,test}/<wnid>/<wnid>_<i>.JPEG`` (a split with 0 images per class
    is not written), ``{validation,test}-segmentation/<wnid>/<wnid>_<i>.png`` (label codec of
    :mod:`imagenet_s`), ``classes.txt`` (sorted wnids, one per line) and ``synthetic.json``
    (the parameters). wnids are ``n00000001``.. so class k has id k. Each image side is drawn
    from ``image_size`` = (min, max), inclusive. ``style_seed`` set: class appearances are drawn
    at random from it (see :func:`class_style`) instead of the demo's fixed ones, e.g. for
    pretraining data with other classes than the evaluation's.

    Re-running with the same parameters returns at once; a folder made with other parameters
    is replaced; a non-empty folder that this function did not make raises FileExistsError.
    """
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in [1, {MAX_CLASSES}], got {classes}")
    counts = {"train": train_per_class, "validation": val_per_class, "test": test_per_class}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"{split} images per class must be >= 0, got {n}")
    lo, hi = image_size
    if not 8 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 8 <= min <= max, got {image_size}")
    if ignore_border < 0:
        raise ValueError(f"ignore_border must be >= 0, got {ignore_border}")

    storage = storage or Storage()
    root = dataset_dir(out_dir, classes)
    params = {
        "generator": "pdso_ray.data.synthetic",
        "version": GENERATOR_VERSION,
        "classes": classes,
        "per_class": counts,
        "image_size": [lo, hi],
        "seed": seed,
        "ignore_border": ignore_border,
    }
    if style_seed is not None:  # only when set, so folders made before the option stay valid
        params["style_seed"] = style_seed
    marker_url = Storage.join(root, MARKER_NAME)
    if storage.exists(marker_url):
        if storage.read_json(marker_url) == {**params, "complete": True}:
            return root
        storage.remove(root, recursive=True)
    elif storage.list_files(root):
        raise FileExistsError(
            f"{root} exists and was not made by make_demo_dataset; remove it or choose another folder"
        )

    storage.write_json(marker_url, {**params, "complete": False})
    wnids = [wnid_for(k) for k in range(1, classes + 1)]
    storage.write_text(Storage.join(root, CLASS_LIST_NAME), "".join(f"{w}\n" for w in wnids))
    for split_index, split in enumerate(SPLITS):
        for k, wnid in enumerate(wnids, start=1):
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_index, k, i])
                size = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
                image, label = render_sample(rng, k, classes, size, ignore_border, style_seed)
                name = f"{wnid}_{i}"
                storage.write_bytes(Storage.join(root, split, wnid, f"{name}.JPEG"), _jpeg_bytes(image))
                if split in GT_SPLITS:
                    gt_url = Storage.join(root, GT_SPLITS[split], wnid, f"{name}.png")
                    storage.write_bytes(gt_url, encode_label(label))
    storage.write_json(marker_url, {**params, "complete": True})
    return root


# ---- odd and corrupt files -------------------------------------------------------------------


@dataclass(frozen=True)
class OddSample:
    """A test file for the decoder.

    ``valid``: whether :func:`pdso_ray.data.decode.decode_image` (default arguments) must
    return an image. ``shape``: the ``(H, W)`` it must return (None when invalid).
    ``note``: what is odd about the file.
    """

    data: bytes
    valid: bool
    shape: tuple[int, int] | None
    note: str


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB but holds almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def odd_and_corrupt_samples() -> dict[str, OddSample]:
    """File name -> sample, for building datasets with hard cases.

    Valid: grayscale / CMYK / EXIF-rotated (orientation 6) / 1x1 / 4000x20 JPEGs, a PNG named
    ``.JPEG``, palette-with-transparency, gray+alpha, RGBA and 16-bit grayscale PNGs.
    Invalid: truncated JPEG, empty file, text named ``.JPEG``, and two decompression bombs (PNG
    headers claiming 30000x30000, past PIL's hard limit, and 10000x10000, past the default
    ``max_pixels``). Names carry image suffixes, so a listing counts every one as an image.
    Deterministic: the same bytes on every call.
    """
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (24, 1))  # 24x32
    noisy = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)

    palette = Image.new("P", (8, 6))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0, 0, 0] * 253)
    palette.putdata([i % 3 for i in range(48)])

    rotated = np.zeros((16, 32, 3), dtype=np.uint8)  # stored 16x32; displays as 32x16
    rotated[:8, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display

    full_noisy_jpeg = _encode(Image.fromarray(noisy), "JPEG", quality=90)
    gray16 = (np.arange(6 * 8, dtype=np.uint16).reshape(6, 8) * 1393).astype(np.uint16)

    return {
        "grayscale.JPEG": OddSample(_encode(Image.fromarray(ramp), "JPEG"), True, (24, 32), "mode L JPEG"),
        "cmyk.JPEG": OddSample(
            _encode(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG"), True, (24, 32), "CMYK JPEG (red)"
        ),
        "exif_rotated.JPEG": OddSample(
            _encode(Image.fromarray(rotated), "JPEG", exif=exif), True, (32, 16), "EXIF orientation 6"
        ),
        "one_pixel.JPEG": OddSample(
            _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "JPEG"), True, (1, 1), "1x1 image"
        ),
        "very_wide.JPEG": OddSample(
            _encode(Image.new("RGB", (4000, 20), (90, 90, 200)), "JPEG"), True, (20, 4000), "4000x20 image"
        ),
        "png_named_jpeg.JPEG": OddSample(
            _encode(Image.fromarray(noisy[:20, :30]), "PNG"), True, (20, 30), "PNG bytes with a .JPEG name"
        ),
        "palette_transparent.png": OddSample(
            _encode(palette, "PNG", transparency=2), True, (6, 8), "palette PNG, entry 2 transparent"
        ),
        "gray_alpha.png": OddSample(
            _encode(Image.fromarray(ramp).convert("LA"), "PNG"), True, (24, 32), "mode LA PNG"
        ),
        "rgba.png": OddSample(
            _encode(Image.fromarray(noisy[:10, :12]).convert("RGBA"), "PNG"), True, (10, 12), "RGBA PNG"
        ),
        "sixteen_bit.png": OddSample(_encode(Image.fromarray(gray16), "PNG"), True, (6, 8), "16-bit grayscale PNG"),
        "truncated.JPEG": OddSample(
            full_noisy_jpeg[: len(full_noisy_jpeg) // 2], False, None, "JPEG cut in half"
        ),
        "empty.JPEG": OddSample(b"", False, None, "zero bytes"),
        "text.JPEG": OddSample(b"this is a text file, not an image\n", False, None, "text named .JPEG"),
        "bomb.png": OddSample(_png_header_only(30000, 30000), False, None, "header claims 30000x30000"),
        "large_header.png": OddSample(_png_header_only(10000, 10000), False, None, "header claims 10000x10000"),
    }
