"""Where a run's images come from: the ``data.layout`` registry (:data:`LAYOUTS`).

- ``imagenet_s``: ``data.root/ImageNetS{C}/{train,validation,test}/<wnid>/<name>``, ground truth
  in ``{split}-segmentation/<wnid>/<name>.png``. Evaluation splits (``data.eval_splits``) and their
  ground truth are optional: an absent one is skipped with a note. The class folders (wnids) are
  the benchmark's classes; the method never reads them, the per-run diagnostics do.
- ``folder``: every image under ``data.root``, recursively (any fsspec URL); ids from relative
  paths; one split, ``all``; no ground truth.
- ``webdataset``: WebDataset tar shards (:mod:`pdso_ray.data.webdataset`): ids
  ``{split}/{shard}/{key}``, classes from ``cls`` members, ground truth from ``seg.png`` members.
- ``parquet``: Parquet tables of image bytes or paths (:mod:`pdso_ray.data.image_tables`): ids
  from an ``id`` column (or derived), classes from ``cls``, ground truth from ``seg``.

A layout is a small object with the same few methods, so stages never ask which one it is:

- :meth:`train_split` → the split the method learns from (``all`` without splits);
- :meth:`list_split` ``(storage, split)`` → a :class:`~pdso_ray.data.listing.SplitListing`: every
  image as an :class:`~pdso_ray.data.listing.ImageRecord` (``id``, ``path`` — a URL that
  :func:`pdso_ray.data.members.read_many` reads, ``split``, ``wnid`` — its class or ""), every
  rejection with its reason, every ignored file;
- :meth:`eval_splits` ``(storage)`` → one :class:`~pdso_ray.data.listing.SplitInfo` per evaluation
  split (present or not, its ground truth, a note);
- :meth:`count_images` ``(storage, split, enough)`` → how many images the split holds, counted
  no further than ``enough`` (the preflight's quick check);
- :meth:`gt_dir` ``(storage, split)`` → the split's ground truth: a folder URL of label PNGs, or a
  mapping ``{<rel>.png: URL}`` (:func:`pdso_ray.data.png_sets.png_files` reads either), None when
  there is none;
- :meth:`split_url` ``(split)`` → where the split's files are; :attr:`folder_is_class` → whether
  the images' classes (``wnid``) are scored by the per-run diagnostics;
- :meth:`source_name` ``(image_id)`` → the image's name in its source, below its split (the id
  without the split; for shards, without the shard's name as well: the sample's key).

Build one with :func:`build_layout` ``(cfg.data, storage)``: the container layouts find their
files and splits then (one listing of the root). Listings of container layouts are kept by the
layout object for its life (they read every shard's headers or table's columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pdso_ray.config import DataConfig
from pdso_ray.data.image_tables import TABLE_SUFFIX, ParquetLayout, TableColumns
from pdso_ray.data.imagenet_s import GT_SPLITS, TEST, TRAIN, VALIDATION, dataset_dir, list_split
from pdso_ray.data.listing import SplitInfo, SplitListing, count_images, list_tree
from pdso_ray.data.sources import ALL, ContainerLayout, find_sources
from pdso_ray.data.webdataset import SHARD_SUFFIX, WebDatasetLayout
from pdso_ray.data.ids import rel_of
from pdso_ray.storage import Storage


@dataclass(frozen=True)
class ImageNetSLayout:
    """ImageNet-S (docs/architecture.md, "Data"): see the module docstring."""

    root: str
    classes: int
    train: str = TRAIN
    evaluation: tuple[str, ...] = (VALIDATION, TEST)
    max_file_bytes: int = 256 * 1024 * 1024
    class_folders_are_classes: bool = True

    name = "imagenet_s"

    @property
    def folder_is_class(self) -> bool:
        return self.class_folders_are_classes

    @property
    def dataset_url(self) -> str:
        return dataset_dir(self.root, self.classes)

    def train_split(self) -> str:
        return self.train

    def split_url(self, split: str) -> str:
        return Storage.join(self.dataset_url, split)

    def list_split(self, storage: Storage, split: str) -> SplitListing:
        return list_split(storage, self.root, self.classes, split, self.max_file_bytes)

    def count_images(self, storage: Storage, split: str, enough: int) -> int:
        """Images of ``split`` as far as ``enough`` (:func:`~pdso_ray.data.listing.count_images`)."""
        return count_images(storage, self.split_url(split), class_folders=True, data_root=self.root, enough=enough)

    def split_info(self, storage: Storage, split: str) -> SplitInfo:
        if not storage.exists(self.split_url(split)):
            return SplitInfo(split, False, None, f"no {split} split ({self.split_url(split)} not found): skipped")
        gt = Storage.join(self.dataset_url, GT_SPLITS[split]) if split in GT_SPLITS else None
        if gt is not None and not storage.exists(gt):
            return SplitInfo(split, True, None,
                             f"{split} has no ground truth ({gt} not found): predicted, not evaluated")
        return SplitInfo(split, True, gt)

    def eval_splits(self, storage: Storage) -> list[SplitInfo]:
        """The configured evaluation splits, each with what exists of it."""
        return [self.split_info(storage, s) for s in self.evaluation]

    def gt_dir(self, storage: Storage, split: str) -> str | None:
        return self.split_info(storage, split).gt_dir if split in GT_SPLITS else None

    def source_name(self, image_id: str) -> str:
        return rel_of(image_id)


@dataclass(frozen=True)
class FolderLayout:
    """Any tree of images (see the module docstring). ``folder_is_class``: the first folder below
    the root names each image's class (images must then sit in a folder), which the per-run
    diagnostics score against."""

    root: str
    max_file_bytes: int = 256 * 1024 * 1024
    folder_is_class: bool = False

    name = "folder"

    def train_split(self) -> str:
        return ALL

    def split_url(self, split: str) -> str:
        if split != ALL:
            raise ValueError(f"a plain folder of images has one split, {ALL!r}, not {split!r}")
        return self.root

    def list_split(self, storage: Storage, split: str) -> SplitListing:
        return list_tree(storage, self.split_url(split), ALL, class_folders=self.folder_is_class,
                         data_root=self.root, max_file_bytes=self.max_file_bytes)

    def count_images(self, storage: Storage, split: str, enough: int) -> int:
        """Images of ``split`` as far as ``enough`` (:func:`~pdso_ray.data.listing.count_images`)."""
        return count_images(storage, self.split_url(split), class_folders=self.folder_is_class,
                            data_root=self.root, enough=enough)

    def split_info(self, storage: Storage, split: str) -> SplitInfo:
        return SplitInfo(split, storage.exists(self.split_url(split)), None,
                         "a plain folder of images has no ground truth: not evaluated")

    def eval_splits(self, storage: Storage) -> list[SplitInfo]:
        """The folder itself: every image is predicted; none can be evaluated."""
        return [self.split_info(storage, ALL)]

    def gt_dir(self, storage: Storage, split: str) -> str | None:
        return None

    def source_name(self, image_id: str) -> str:
        return rel_of(image_id)


def _imagenet_s(cfg: DataConfig, storage: Storage | None) -> ImageNetSLayout:
    return ImageNetSLayout(cfg.root, cfg.classes, cfg.train_split, tuple(cfg.eval_splits),
                           cfg.max_file_bytes,
                           True if cfg.folder_is_class is None else cfg.folder_is_class)


def _folder(cfg: DataConfig, storage: Storage | None) -> FolderLayout:
    return FolderLayout(cfg.root, cfg.max_file_bytes, bool(cfg.folder_is_class))


def _split_names(cfg: DataConfig) -> tuple[str, ...]:
    return (cfg.train_split, *cfg.eval_splits)


def _webdataset(cfg: DataConfig, storage: Storage | None) -> WebDatasetLayout:
    sources = find_sources(_needs(storage, cfg), cfg.root, SHARD_SUFFIX, _split_names(cfg))
    compressed = [u for u in sources.ignored if u.lower().endswith((".tar.gz", ".tgz"))]
    if compressed and not sources.splits:
        raise FileNotFoundError(f"{cfg.root} holds compressed shards ({compressed[0]}, ...), which cannot be "
                                "read by byte range: unpack them (gunzip) or convert them with pdso-ray make-shards")
    return WebDatasetLayout(cfg.root, sources, cfg.train_split, tuple(cfg.eval_splits), cfg.max_file_bytes,
                            cfg.folder_is_class is not False)


def _parquet(cfg: DataConfig, storage: Storage | None) -> ParquetLayout:
    storage = _needs(storage, cfg)
    sources = find_sources(storage, cfg.root, TABLE_SUFFIX, _split_names(cfg))
    by_column = False
    if set(sources.splits) == {ALL}:
        # A split column spreads every table over the splits: peek at the first table's schema.
        first = sources.splits[ALL][0].url
        try:
            with storage.open(first, "rb") as f:
                by_column = TableColumns.of(pq.read_schema(f)).split is not None
        except (OSError, ValueError, pa.ArrowException):
            by_column = False  # the listing rejects the table with its reason
        if by_column:
            sources.splits = {s: sources.splits[ALL] for s in _split_names(cfg)}
    return ParquetLayout(cfg.root, sources, cfg.train_split, tuple(cfg.eval_splits), cfg.max_file_bytes,
                         cfg.folder_is_class is not False, split_column=by_column)


def _needs(storage: Storage | None, cfg: DataConfig) -> Storage:
    if storage is None:
        raise ValueError(f"data.layout={cfg.layout} finds its files when it is built: pass a Storage")
    return storage


# data.layout -> builder from the data section of the config (and the storage to find files with).
LAYOUTS = {"imagenet_s": _imagenet_s, "folder": _folder, "webdataset": _webdataset, "parquet": _parquet}

Layout = ImageNetSLayout | FolderLayout | ContainerLayout


def build_layout(cfg: DataConfig, storage: Storage | None = None) -> Layout:
    """The image source ``cfg.layout`` names (module docstring). ``storage`` is needed by the
    container layouts, which find their files now; raises FileNotFoundError when ``data.root``
    does not exist for them."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown data.layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[cfg.layout](cfg, storage)
