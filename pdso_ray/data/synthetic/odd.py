"""Odd and corrupt image files a robust loader must handle, each with its expected outcome."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

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
