"""Robust image decoding: bytes in, an RGB array or a reason out, never an exception.

At ImageNet scale every odd file shows up: CMYK and grayscale JPEGs, PNGs named ``.JPEG``,
16-bit and palette PNGs, EXIF-rotated photos, truncated downloads, decompression bombs.
:func:`decode_image` turns each into either an HxWx3 uint8 RGB array or a short human-readable
reason that the caller records as a rejection.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Half of PIL's hard limit (2 * Image.MAX_IMAGE_PIXELS), i.e. PIL's default warning threshold:
# ~89 Mpx, an 8-bit RGB image of ~268 MB once decoded.
DEFAULT_MAX_PIXELS = 178_956_970 // 2

# Raster formats we let PIL sniff. Content decides the format, not the file name (ImageNet holds
# PNGs named .JPEG); formats that run external programs or parse documents (EPS, PDF) are not
# allowed. The JPEG opener also yields MPO (multi-picture camera JPEGs), hence _JPEG_FORMATS.
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")
_JPEG_FORMATS = ("JPEG", "MPO")
_MAX_REASON_LEN = 200


@dataclass(frozen=True)
class DecodeResult:
    """Outcome of :func:`decode_image`: exactly one of ``image`` and ``reason`` is set.

    ``image``: HxWx3 uint8 RGB, C-contiguous, EXIF orientation applied (unless disabled); may be
    smaller than the file when JPEG draft scaling was used. ``orig_size``: ``(H, W)`` of the
    full-resolution image in the same orientation as ``image`` (None when rejected).
    ``reason``: why the bytes were rejected.
    """

    image: np.ndarray | None = None
    orig_size: tuple[int, int] | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


def _fail(reason: str) -> DecodeResult:
    return DecodeResult(reason=reason[:_MAX_REASON_LEN])


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    """uint8 from values in [0, 65535], rounded (65535 -> 255, 32896 -> 128)."""
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(a: np.ndarray) -> np.ndarray:
    """uint8 by a linear map of [min, max] to [0, 255], rounded half up; non-finite values -> 0."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.floor((a - lo) * 255.0 / (hi - lo) + 0.5).astype(np.uint8)


def _gray_to_uint8(im: Image.Image) -> np.ndarray:
    """HxW uint8 from a single-channel high-bit-depth image (modes I;16*, I, F).

    16-bit data is scaled (not clipped) to 8 bits. Mode I holds 16-bit PNGs in some PIL
    versions, so values within [0, 65535] are scaled as 16-bit; anything else is stretched.
    Mode F in [0, 1] is scaled by 255; other ranges are stretched.
    """
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        return _scale_16bit(a)
    if im.mode == "I":
        if a.min() >= 0 and a.max() <= 65535:
            return _scale_16bit(a)
        return _stretch(a)
    if np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0:
        return np.floor(a * 255.0 + 0.5).astype(np.uint8)
    return _stretch(a)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB, C-contiguous, from a loaded image of any mode PIL decodes."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _gray_to_uint8(im)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode in ("P", "PA") and ("transparency" in im.info or mode == "PA"):
        # Via RGBA so PIL resolves the transparent palette entry itself; alpha is then dropped.
        im = im.convert("RGBA")
    if im.mode != "RGB":
        # L, LA, 1, P, RGBA, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, LAB, ...
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8, order="C")


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_short_side: int | None = None,
    exif_transpose: bool = True,
) -> DecodeResult:
    """Decode image bytes to RGB; never raises on bad bytes.

    Args:
        data: the whole file.
        max_pixels: reject images whose header claims more pixels (checked before any pixel
            is decoded). PIL's own hard limit, 2 * ``Image.MAX_IMAGE_PIXELS``, also applies.
        target_short_side: when set and the image is a JPEG, decode at the smallest DCT scale
            (1/2, 1/4, 1/8) whose short side is still >= this value; other formats decode
            in full. The caller resizes to its exact size.
        exif_transpose: apply the EXIF orientation tag. The official ImageNet-S tools do not
            (they call ``Image.open(...).convert("RGB")``), so a stage whose output must line up
            with the benchmark's ground truth passes False.

    Returns:
        DecodeResult with ``image`` (HxWx3 uint8 RGB) and ``orig_size`` ``(H, W)``, or with
        ``reason``, e.g. "empty file", "not an image (unrecognised format)",
        "too many pixels: 30000x30000 > 89478485", "truncated or corrupt image: ...".
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if target_short_side is not None and target_short_side < 1:
        raise ValueError(f"target_short_side must be >= 1, got {target_short_side}")
    if not data:
        return _fail("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS; our own max_pixels check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as e:
        return _fail(f"too many pixels: {e}")
    except Image.UnidentifiedImageError:
        return _fail("not an image (unrecognised format)")
    except Exception as e:  # a header PIL recognises but cannot parse
        return _fail(f"corrupt image header: {type(e).__name__}: {e}")

    with im:
        w, h = im.size
        if w < 1 or h < 1:
            return _fail(f"degenerate size {w}x{h}")
        if w * h > max_pixels:
            return _fail(f"too many pixels: {w}x{h} > {max_pixels}")
        try:
            if target_short_side is not None and im.format in _JPEG_FORMATS:
                # A (t, t) request keeps both sides >= t: PIL picks the largest scale s in
                # {8, 4, 2, 1} with s <= min(w, h) // t.
                im.draft("RGB", (target_short_side, target_short_side))
            im.load()  # full decode now, so truncated data fails here and not later
        except Exception as e:
            return _fail(f"truncated or corrupt image: {type(e).__name__}: {e}")

        oriented = im
        if exif_transpose:
            try:
                oriented = ImageOps.exif_transpose(im)
            except Exception:
                # Unreadable EXIF says nothing about the pixels, which decoded fine: keep them
                # as stored rather than lose the image.
                oriented = im
        swapped = oriented.size != im.size
        try:
            rgb = _to_rgb_array(oriented)
        except Exception as e:
            return _fail(f"cannot convert mode {oriented.mode!r} to RGB: {e}")
    orig_size = (w, h) if swapped else (h, w)
    return DecodeResult(image=rgb, orig_size=orig_size)


def shrink_to(image: np.ndarray, limit: int, side: str = "long", resample: int = Image.BILINEAR) -> np.ndarray:
    """``image`` (H×W×3 uint8) scaled down, never up, so that its ``side`` (``"long"`` or
    ``"short"``) is at most ``limit`` px, aspect kept (each side at least 1 px)."""
    h, w = image.shape[:2]
    scale = limit / (max(h, w) if side == "long" else min(h, w))
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, resample))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """HxWx3 uint8 → size×size×3 uint8 (bilinear, antialiased): DINO sees whole images at one size."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, reducing_gap=None))
