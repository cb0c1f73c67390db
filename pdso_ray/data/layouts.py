"""Where a run's images come from: the ``data.layout`` registry (:data:`LAYOUTS`).

- ``imagenet_s``: ``data.root/ImageNetS{C}/{train,validation,test}/<wnid>/<name>``, ground truth
  in ``{split}-segmentation/<wnid>/<name>.png``. Evaluation splits (``data.eval_splits``) and their
  ground truth are optional: an absent one is skipped with a note. The class folders (wnids) are
  the benchmark's classes; the method never reads them, the per-run diagnostics do.
- ``folder``: every image under ``data.root``, recursively (any fsspec URL); ids from relative
  paths; one split, ``all``; no ground truth.

A layout is a small picklable object with the same few methods, so stages never ask which one it
is: :meth:`train_split`, :meth:`eval_splits`, :meth:`list_split`, :meth:`count_images` (a quick
count for the preflight), :meth:`gt_dir`, :attr:`folder_is_class`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdso_ray.config import DataConfig
from pdso_ray.data.imagenet_s import GT_SPLITS, TEST, TRAIN, VALIDATION, dataset_dir, list_split
from pdso_ray.data.listing import SplitListing, count_images, list_tree
from pdso_ray.storage import Storage

ALL = "all"  # the one split of a plain folder of images


@dataclass(frozen=True)
class SplitInfo:
    """What a run finds of one split: ``present`` (its folder exists), ``gt_dir`` (URL of its
    ground-truth folder, None when there is none) and ``note`` (why something is skipped)."""

    split: str
    present: bool
    gt_dir: str | None
    note: str = ""


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


def _imagenet_s(cfg: DataConfig) -> ImageNetSLayout:
    return ImageNetSLayout(cfg.root, cfg.classes, cfg.train_split, tuple(cfg.eval_splits),
                           cfg.max_file_bytes,
                           True if cfg.folder_is_class is None else cfg.folder_is_class)


def _folder(cfg: DataConfig) -> FolderLayout:
    return FolderLayout(cfg.root, cfg.max_file_bytes, bool(cfg.folder_is_class))


# data.layout -> builder from the data section of the config.
LAYOUTS = {"imagenet_s": _imagenet_s, "folder": _folder}


def build_layout(cfg: DataConfig) -> ImageNetSLayout | FolderLayout:
    """The image source ``cfg.layout`` names."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown data.layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[cfg.layout](cfg)
