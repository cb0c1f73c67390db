"""Listing a tree of images: every file found ends in exactly one list (docs/architecture.md,
"Reliability").

:func:`list_tree` walks one folder (local or any fsspec URL) and sorts each file into

- ``images``: records to process — an image suffix, a name that can become an id
  (:func:`pdso_ray.run_layout.unsafe_reason`), a regular file within the size cap;
- ``rejected``: image files that cannot be used, each with a reason (unsafe name, not inside a
  class folder where one is required, a duplicate id, a FIFO or device, a symlink out of the data
  root, too large), and symlinked folders that are not read (pointing out of the data root, or
  at a folder listed already), one record each;
- ``ignored``: files that are not images (no image suffix, hidden names such as ``.DS_Store`` or
  our own ``.tmp-*`` writes); reported, never counted as images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from pdso_ray.data.ids import image_id, unsafe_reason
from pdso_ray.storage import Storage, is_hidden

# Matched case-insensitively against the end of the file name. GIFs are decoded (first frame).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Default of data.max_file_bytes: no photograph comes near it; a device file would.
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ImageRecord:
    """One listed image.

    ``id`` is ``"{split}/{rel}"`` (unique, safe to build output paths from; see
    :mod:`pdso_ray.data.ids`), ``path`` the image's full URL (a range URL for a member of a tar
    shard, a cell URL for a Parquet table's image), ``wnid`` its class: the class folder (the
    first folder below the split) or the sample's class value; "" when it has none; ``version``
    what changes when the file is replaced (size and modification stamp; "" when unknown).
    """

    id: str
    path: str
    split: str
    wnid: str
    version: str = ""


@dataclass(frozen=True)
class Rejected:
    """An image file that cannot be used: its URL, why, the id it would have had (None when its
    name cannot form one) and its path below the split folder without suffix (``rel``; a string to
    match names with, e.g. its ground truth's, never a path to write to)."""

    path: str
    reason: str
    image_id: str | None = None
    rel: str | None = None


@dataclass(frozen=True)
class SplitInfo:
    """What a run finds of one split: ``present`` (it exists), ``gt_dir`` (its ground truth: the URL
    of a folder of label PNGs, or a mapping ``{<rel>.png: URL}``; None when there is none) and
    ``note`` (why something is skipped or left out)."""

    split: str
    present: bool
    gt_dir: Any
    note: str = ""


@dataclass
class SplitListing:
    """Everything found under one split folder, each file in exactly one list (module docstring).
    ``images`` are sorted by path."""

    split: str = ""
    images: list[ImageRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Image files found: used plus rejected (ignored files are not images)."""
        return len(self.images) + len(self.rejected)

    def fingerprint(self) -> str:
        """16 hex digits over every image's id, path and stamp, every refused file's reason and
        the number of ignored files: an image added, removed or replaced changes it."""
        digest = hashlib.sha256()
        for r in self.images:
            digest.update(f"{r.id}\0{r.path}\0{r.version}\n".encode())
        for r in self.rejected:
            digest.update(f"{r.path}\0{r.reason}\n".encode())
        digest.update(f"ignored {len(self.ignored)}".encode())
        return digest.hexdigest()[:16]


def is_image_name(name: str) -> bool:
    """True if the file name ends in one of IMAGE_SUFFIXES (case-insensitive)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def list_tree(storage: Storage, base_url: str, split: str, *, class_folders: bool,
              data_root: str | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
              ) -> SplitListing:
    """List every file under ``base_url`` as images of ``split`` (see the module docstring).

    Ids are ``split/<path below base_url without its suffix>``. ``class_folders``: an image must
    sit inside a folder (ImageNet-S ``<wnid>/``), whose name becomes the record's ``wnid``.
    ``data_root``: local symlinks must resolve inside it (default ``base_url``).
    Raises FileNotFoundError when ``base_url`` does not exist.
    """
    if not storage.exists(base_url):
        raise FileNotFoundError(f"folder not found: {base_url}")
    _, base = storage.fs(base_url)
    base = base.rstrip("/") + "/"
    root_real = os.path.realpath(storage.fs(data_root or base_url)[1])

    listing = SplitListing(split=split)
    taken: dict[str, str] = {}
    for entry in storage.list_entries(base_url, follow_links_within=data_root or base_url):
        url = entry.url
        _, fs_path = storage.fs(url)
        if not fs_path.startswith(base):
            raise ValueError(f"listing of {base_url} returned {url}, which is outside it")
        rel = fs_path[len(base):]
        parts = rel.split("/")
        if entry.folder_link and not any(is_hidden(p) for p in parts):
            where = ("outside the data root " + root_real if not _inside(entry.link_target, root_real)
                     else "a folder listed already")
            listing.rejected.append(Rejected(path=url, reason=f"symlinked folder to {entry.link_target}, "
                                             f"{where}: its images are not read", rel=rel))
            continue
        if any(is_hidden(p) for p in parts) or not is_image_name(parts[-1]):
            listing.ignored.append(url)
            continue
        stem_rel = rel[: rel.rfind(".")]
        problem = unsafe_reason(stem_rel)
        candidate = image_id(split, stem_rel) if problem is None else None
        if problem is None and class_folders and len(parts) < 2:
            problem = "image is not inside a class folder"
        if problem is None and candidate in taken:
            # Same stem, different suffix (x.JPEG and x.png): outputs would collide.
            problem = f"duplicate id {candidate!r} (also {taken[candidate]})"
            candidate = None
        if problem is None:
            problem = _file_problem(entry, root_real, max_file_bytes)
        if problem is not None:
            listing.rejected.append(Rejected(path=url, reason=problem, image_id=candidate, rel=stem_rel))
            continue
        taken[candidate] = url
        listing.images.append(ImageRecord(id=candidate, path=url, split=split,
                                          wnid=parts[0] if class_folders else "",
                                          version=f"{entry.size}:{entry.version}"))
    return listing


def count_images(storage: Storage, base_url: str, *, class_folders: bool, data_root: str | None = None,
                 enough: int | None = None) -> int:
    """How many files under ``base_url`` look like images to :func:`list_tree` (an image suffix, no
    hidden name, inside a class folder when ``class_folders``), counting no further than
    ``enough``: a quick check that a tree is not empty and holds at least so many images, without
    listing all of it. (Names and sizes are not checked: the listing may still reject some.)"""
    _, base = storage.fs(base_url)
    base = base.rstrip("/") + "/"
    found = 0
    for url in storage.walk_files(base_url, follow_links_within=data_root or base_url):
        parts = storage.fs(url)[1][len(base):].split("/")
        in_class_folder = len(parts) > 1 or not class_folders
        if is_image_name(parts[-1]) and not any(is_hidden(p) for p in parts) and in_class_folder:
            found += 1
            if enough is not None and found >= enough:
                break
    return found


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _file_problem(entry, root_real: str, max_file_bytes: int) -> str | None:
    """Why a listed file must not be read (checked again when it is read), or None."""
    if entry.link_target is not None:
        if not _inside(entry.link_target, root_real):
            return f"symlink to {entry.link_target}, outside the data root {root_real}"
    if not entry.regular:
        return "not a regular file (a device, FIFO, socket or dangling symlink)"
    if entry.size > max_file_bytes:
        return f"file larger than {max_file_bytes} bytes (data.max_file_bytes)"
    return None
