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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdso_ray.config import DataConfig
from pdso_ray.data.decode import DecodeResult, decode_image, resize_square
from pdso_ray.data.image_tables import parse_cell_url
from pdso_ray.data.members import read_many
from pdso_ray.stages.base import Batch, BatchStep, Resources
from pdso_ray.storage import Storage, parse_range_url


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

    def fetch(self, urls: Sequence[str]) -> list[bytes | str]:
        """The bytes at each URL, or the reason they cannot be read as an image (unreadable as
        one, :class:`~pdso_ray.storage.UnreadableFile`; gone since it was listed); one request
        per shard or row group where the batch allows."""
        out: list[bytes | str] = []
        for url, data in zip(urls, read_many(self.storage, list(urls), self.max_file_bytes, self.data_root)):
            if isinstance(data, FileNotFoundError):
                out.append(f"{'file' if url == _container(url) else 'its container'} changed or "
                           f"disappeared after listing{where(url)}")
            elif isinstance(data, Exception):  # cells name their row already
                out.append(f"{data}{where(url) if parse_range_url(url) else ''}")
            else:
                out.append(data)
        return out

    def decode(self, url: str, data: bytes | str, target_short_side: int | None = None,
               exif_transpose: bool = True) -> DecodeResult:
        """:meth:`fetch`'s result for ``url`` decoded; a member of a shard or table that does not
        decode gets a reason naming where it is."""
        if isinstance(data, str):
            return DecodeResult(reason=data)
        result = decode_image(data, max_pixels=self.max_pixels, target_short_side=target_short_side,
                              exif_transpose=exif_transpose)
        return result if result.ok else DecodeResult(reason=f"{result.reason}{where(url)}")

    def read_batch(self, urls: Sequence[str], target_short_side: int | None = None,
                   exif_transpose: bool = True) -> list[DecodeResult]:
        """The decoded image at each URL, or a result with a ``reason`` (:meth:`fetch`,
        :meth:`decode`)."""
        return [self.decode(url, data, target_short_side, exif_transpose)
                for url, data in zip(urls, self.fetch(urls))]

    def read(self, url: str, target_short_side: int | None = None,
             exif_transpose: bool = True) -> DecodeResult:
        """One image of :meth:`read_batch` (prefer it for a batch: it groups the requests)."""
        return self.read_batch([url], target_short_side, exif_transpose)[0]


def _container(url: str) -> str:
    parsed = parse_range_url(url) or parse_cell_url(url)
    return url if parsed is None else parsed[0]


def where(url: str) -> str:
    """`` (shard S, member M)`` or `` (table T, row group G, row R)`` for a URL into a container,
    "" for a file (whose URL the rejection names already)."""
    parsed = parse_range_url(url)
    if parsed is not None:
        return f" (shard {parsed[0]}, member {parsed[3]!r})"
    cell = parse_cell_url(url)
    if cell is not None:
        return f" (table {cell[0]}, row group {cell[1]}, row {cell[2]})"
    return ""


class ReadDecode(BatchStep):
    """In: ``id``, ``path``, ``split`` (other columns pass through). Out: the same plus ``image``, ``height``/``width`` (original
    size, 0 where rejected) and ``reason`` ("" when ok).

    ``square`` set: ``image`` is one B×S×S×3 uint8 array (each image resized to S×S; zeros where
    rejected), what a fixed-size backbone wants. Otherwise one H×W×3 array per row (sizes differ;
    1×1 where rejected), JPEG DCT-downscaled towards ``short_side``. ``exif_transpose=False``
    reads images as stored, as the official ImageNet-S tools do (predictions must match their GT).

    ``decode=False``: read only; ``data`` holds each row's encoded bytes (b"" where rejected) for
    the model's actor to decode on its own device (:class:`DeviceDecode`).
    """

    def __init__(self, reader: ImageReader, short_side: int, resources: Resources,
                 square: bool = False, exif_transpose: bool = True, decode: bool = True):
        self.reader = reader
        self.short_side = short_side
        self.resources = resources
        self.square = square
        self.exif_transpose = exif_transpose
        self.decode = decode

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["id"])
        s = self.short_side
        paths = [str(p) for p in batch["path"]]
        if not self.decode:
            fetched = self.reader.fetch(paths)
            return {**batch, "data": _objects([d if isinstance(d, bytes) else b"" for d in fetched]),
                    "reason": _objects([d if isinstance(d, str) else "" for d in fetched])}
        images = np.zeros((n, s, s, 3), dtype=np.uint8) if self.square else _objects([_EMPTY] * n)
        heights = np.zeros(n, dtype=np.int32)
        widths = np.zeros(n, dtype=np.int32)
        reasons = []
        results = self.reader.read_batch(paths, target_short_side=s, exif_transpose=self.exif_transpose)
        for i, result in enumerate(results):
            if not result.ok:
                reasons.append(result.reason)
                continue
            images[i] = resize_square(result.image, s) if self.square else result.image
            heights[i], widths[i] = result.orig_size
            reasons.append("")
        return {**batch, "image": images, "height": heights, "width": widths,
                "reason": np.asarray(reasons, dtype=object)}


_EMPTY = np.zeros((1, 1, 3), dtype=np.uint8)  # the image of a rejected row


@dataclass(frozen=True)
class DeviceDecode:
    """The decode half of :class:`ReadDecode`, run by a model step on its own device (a GPU,
    ``data.gpu_decode``; :func:`pdso_ray.data.batch_decode.decode_batch`): ``data`` → ``image`` (one
    H×W×3 uint8 per row at full size, a tensor on the device where the batched JPEG path took it;
    1×1 where rejected), ``height``/``width`` and ``reason``. Other columns pass through."""

    max_pixels: int
    short_side: int
    exif_transpose: bool = True

    def __call__(self, batch: Batch, device) -> Batch:
        from pdso_ray.data.batch_decode import decode_batch

        n = len(batch["id"])
        reasons = [str(r) for r in batch["reason"]]
        todo = [i for i in range(n) if not reasons[i]]
        images = _objects([_EMPTY] * n)
        heights = np.zeros(n, dtype=np.int32)
        widths = np.zeros(n, dtype=np.int32)
        decoded = decode_batch([batch["data"][i] for i in todo], device, max_pixels=self.max_pixels,
                               exif_transpose=self.exif_transpose, target_short_side=self.short_side)
        for i, result in zip(todo, decoded):
            if not result.ok:
                reasons[i] = f"{result.reason}{where(str(batch['path'][i]))}"
                continue
            images[i] = result.image
            heights[i], widths[i] = result.orig_size
        out = {k: v for k, v in batch.items() if k != "data"}
        return {**out, "image": images, "height": heights, "width": widths, "reason": _objects(reasons)}


def _objects(values: list) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (numpy would stack equal-shaped arrays)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):  # a loop: assigning a list of arrays would broadcast them
        out[i] = v
    return out
