"""Decoding a batch of images on the device that will use them: JPEGs in one batched call of
torchvision's ``decode_jpeg`` (nvJPEG on a GPU), every other image on the CPU.

A stage whose actors hold a GPU (``features``, ``predict``; ``data.gpu_decode``) moves the encoded
bytes to its actors and decodes there (docs/architecture.md §9: a CPU core decodes ~370 JPEGs/s,
nvJPEG thousands). Per image, :func:`fast_path_problem` decides from the header alone whether the
batched path can take it: baseline or progressive JPEG in YCbCr or grayscale, within
``max_pixels``, and (when EXIF orientation is applied) without a rotation tag. Everything else —
PNGs (also those named ``.jpg``), CMYK/YCCK JPEGs, rotated photos, and any JPEG the batched call
fails on — goes to :func:`pdso_ray.data.decode.decode_image` on the CPU, which also gives the
reason for bytes that are not an image. Both paths give H×W×3 uint8 RGB at full resolution; they
agree within JPEG decoder tolerance (IDCT and chroma upsampling differ between libjpeg-turbo and
nvJPEG by a few levels; on the CPU, torchvision and PIL both use libjpeg-turbo).

:func:`decode_batch` runs on any device, so the tests exercise the batched path, its fallbacks and
its equivalence with PIL on the CPU; ``benchmarks/gpu_suite.py`` measures it on a GPU.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pdso_ray.data.decode import DEFAULT_MAX_PIXELS, decode_image

_JPEG_MAGIC = b"\xff\xd8\xff"
_ORIENTATION = 0x0112  # EXIF tag
FAST_MODES = ("RGB", "L")  # PIL's modes of YCbCr and grayscale JPEGs


@dataclass
class Decoded:
    """One image of :func:`decode_batch`: ``image`` (H×W×3 uint8 RGB: a tensor on the device from
    the batched path, a numpy array from the CPU), ``orig_size`` ``(H, W)``, ``reason`` when
    rejected (then ``image`` is None), and ``fallback``: why it was decoded on the CPU ("" when the
    batched path took it)."""

    image: Any = None
    orig_size: tuple[int, int] | None = None
    reason: str | None = None
    fallback: str = ""

    @property
    def ok(self) -> bool:
        return self.image is not None


def fast_path_problem(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = True) -> str | None:
    """Why the batched JPEG path cannot take ``data`` (from its header; no pixel is decoded), or
    None when it can."""
    if not data.startswith(_JPEG_MAGIC):
        return "not a JPEG"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
                mode, (w, h) = im.mode, im.size
                orientation = im.getexif().get(_ORIENTATION) if exif_transpose else None
    except Exception as e:  # noqa: BLE001 - the CPU path gives the reason
        return f"unreadable header ({type(e).__name__})"
    if mode not in FAST_MODES:
        return f"{mode} JPEG"
    if w * h > max_pixels:
        return "too many pixels"
    if orientation not in (None, 1):
        return f"EXIF orientation {orientation}"
    return None


def decode_batch(datas: Sequence[bytes], device: Any = "cpu", *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 exif_transpose: bool = True, target_short_side: int | None = None) -> list[Decoded]:
    """Decode ``datas`` (whole encoded files) in order: the JPEGs :func:`fast_path_problem`
    accepts in one batched ``decode_jpeg`` call on ``device`` (if the call fails, each is tried
    alone), the rest with :func:`~pdso_ray.data.decode.decode_image` on the CPU
    (``target_short_side``: its JPEG DCT downscaling; ``exif_transpose``: as there). Never raises
    on bad bytes: a rejected image has a ``reason``."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out = [Decoded() for _ in datas]
    fast = []
    for k, data in enumerate(datas):
        problem = fast_path_problem(data, max_pixels, exif_transpose)
        if problem is None:
            fast.append(k)
        else:
            out[k].fallback = problem
    encoded = [torch.tensor(np.frombuffer(datas[k], dtype=np.uint8)) for k in fast]
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if encoded else []
    except Exception:  # noqa: BLE001 - one bad image fails the whole call: find it alone
        images = [_decode_one(decode_jpeg, t, ImageReadMode.RGB, device) for t in encoded]
    for k, image in zip(fast, images):
        if isinstance(image, Exception):
            out[k].fallback = f"decode_jpeg failed ({type(image).__name__})"
        else:
            out[k].image = image.permute(1, 2, 0)
            out[k].orig_size = (int(image.shape[1]), int(image.shape[2]))
    for k, data in enumerate(datas):
        if out[k].fallback:
            result = decode_image(data, max_pixels=max_pixels, target_short_side=target_short_side,
                                  exif_transpose=exif_transpose)
            out[k].image, out[k].orig_size, out[k].reason = result.image, result.orig_size, result.reason
    return out


def _decode_one(decode_jpeg, encoded, mode, device):
    try:
        return decode_jpeg(encoded, mode=mode, device=device)
    except Exception as e:  # noqa: BLE001 - handed back for the CPU fallback
        return e
