"""Reading input images: bounded reads, robust decoding, and the first step of every
image-streaming stage.

:class:`ImageReader` is how every stage reads an input image (features, pseudo labels, fine-tuning,
prediction): a bounded read (regular files only, ``data.max_file_bytes``, never through a symlink
out of the data root; :meth:`pdso_ray.storage.Storage.read_image_bytes`) and
:func:`pdso_ray.data.decode.decode_image`. A bad file becomes a reason string, never an exception,
so one file cannot fail a job; a storage error that persists after retries propagates (it names
the URL) rather than silently dropping the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdso_ray.config import DataConfig
from pdso_ray.data.decode import DecodeResult, decode_image, resize_square
from pdso_ray.stages.base import Batch, BatchStep, Resources
from pdso_ray.storage import Storage, UnreadableFile


@dataclass(frozen=True)
class ImageReader:
    """Reads and decodes input images of one data root (picklable: actors get a copy)."""

    storage: Storage
    data_root: str
    max_file_bytes: int
    max_pixels: int

    @classmethod
    def from_config(cls, storage: Storage, data: DataConfig) -> ImageReader:
        return cls(storage, data.root, data.max_file_bytes, data.max_pixels)

    def read(self, url: str, target_short_side: int | None = None,
             exif_transpose: bool = True) -> DecodeResult:
        """The decoded image at ``url``, or a result with a ``reason``: unreadable as an image
        (:class:`~pdso_ray.storage.UnreadableFile`), gone since it was listed, or not decodable."""
        try:
            data = self.storage.read_image_bytes(url, self.max_file_bytes, root=self.data_root)
        except FileNotFoundError:
            return DecodeResult(reason="file disappeared after listing")
        except UnreadableFile as e:
            return DecodeResult(reason=str(e))
        return decode_image(data, max_pixels=self.max_pixels, target_short_side=target_short_side,
                            exif_transpose=exif_transpose)


class ReadDecode(BatchStep):
    """In: ``id``, ``path``, ``split`` (other columns pass through). Out: the same plus ``image``, ``height``/``width`` (original
    size, 0 where rejected) and ``reason`` ("" when ok).

    ``square`` set: ``image`` is one B×S×S×3 uint8 array (each image resized to S×S; zeros where
    rejected), what a fixed-size backbone wants. Otherwise one H×W×3 array per row (sizes differ;
    1×1 where rejected), JPEG DCT-downscaled towards ``short_side``. ``exif_transpose=False``
    reads images as stored, as the official ImageNet-S tools do (predictions must match their GT).
    """

    def __init__(self, reader: ImageReader, short_side: int, resources: Resources,
                 square: bool = False, exif_transpose: bool = True):
        self.reader = reader
        self.short_side = short_side
        self.resources = resources
        self.square = square
        self.exif_transpose = exif_transpose

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        s = self.short_side
        if self.square:
            images = np.zeros((n, s, s, 3), dtype=np.uint8)
        else:
            images = np.empty(n, dtype=object)
            for i in range(n):  # a loop: assigning a list of arrays would broadcast them
                images[i] = np.zeros((1, 1, 3), dtype=np.uint8)
        heights = np.zeros(n, dtype=np.int32)
        widths = np.zeros(n, dtype=np.int32)
        reasons = []
        for i, path in enumerate(batch["path"]):
            result = self.reader.read(str(path), target_short_side=s,
                                      exif_transpose=self.exif_transpose)
            if not result.ok:
                reasons.append(result.reason)
                continue
            images[i] = resize_square(result.image, s) if self.square else result.image
            heights[i], widths[i] = result.orig_size
            reasons.append("")
        return {**batch, "image": images, "height": heights, "width": widths,
                "reason": np.asarray(reasons, dtype=object)}
