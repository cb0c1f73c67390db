"""The ImageNet-S dataset layout, its class index, and its label PNG codec.

Layout (one folder per benchmark size C in {50, 300, 919}, or any C for custom data)::

    ImageNetS{C}/
      train/<wnid>/<name>.JPEG
      validation/<wnid>/<name>.JPEG
      validation-segmentation/<wnid>/<name>.png
      test/<wnid>/<name>.JPEG
      test-segmentation/<wnid>/<name>.png      (optional: the official test GT is withheld)

Label PNGs are RGB uint8 with class id = R + 256 * G (B unused); 0 is background, 1..C the
classes, 1000 the ignore label.

Class ids follow the sorted wnids. The benchmark's class-list files
(``ImageNetS_categories_im{C}.txt``, one wnid per line) are not sorted, yet the official ids
still follow sorted wnids (the official 50-class name list, goldfish, tiger shark, goldfinch,
..., is the order of the sorted wnids n01443537, n01491361, n01531178, ...), so a class-list file
selects the classes and sorting numbers them; ``keep_order=True`` numbers them in file order
for custom data that wants it.

Image ids are ``"{split}/{wnid}/{stem}"``. Stages build output paths from them, so an id is only
made from a listing entry that passes :func:`unsafe_reason`; every other image is rejected with
a reason (never dropped), and non-image files are listed apart as ignored.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pdso_ray.storage import Storage

BACKGROUND_ID = 0
IGNORE_ID = 1000
# Ids 1..MAX_CLASSES, so that no class collides with IGNORE_ID.
MAX_CLASSES = IGNORE_ID - 1

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
# Split -> folder of its ground-truth PNGs (the train split has none).
GT_SPLITS = {VALIDATION: "validation-segmentation", TEST: "test-segmentation"}

# Matched case-insensitively against the end of the file name.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LABEL_SUFFIX = ".png"

# Characters allowed in ids; together with the checks in unsafe_reason this keeps every output
# path built from an id inside its folder on any filesystem and object store.
_SAFE_CHARS = re.compile(r"[A-Za-z0-9._-]+")
# Leaves room for a suffix under the common 255-byte file-name limit.
MAX_NAME_LEN = 200


@dataclass(frozen=True)
class ImageRecord:
    """One listed image.

    ``id`` is ``"{split}/{wnid}/{stem}"`` (unique, safe to build output paths from), ``path``
    the image's full URL, ``wnid`` its class folder name.
    """

    id: str
    path: str
    split: str
    wnid: str


@dataclass(frozen=True)
class Rejected:
    """An image file that cannot be given an id: its URL and why."""

    path: str
    reason: str


@dataclass
class SplitListing:
    """Everything found under one split folder, each file in exactly one list.

    ``images``: records to process, sorted by path. ``rejected``: image files refused before
    decoding (unsafe name, outside a class folder, duplicate id). ``ignored``: URLs of files that
    are not images (no image suffix, or hidden such as ``.DS_Store``); report them, do not count
    them as images.
    """

    images: list[ImageRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


# ---- class index -----------------------------------------------------------------------------


def parse_class_list(text: str) -> list[str]:
    """Class names from a class-list file: one per line, blank lines skipped."""
    names = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if len(name.split()) != 1:
            raise ValueError(f"class list line {lineno}: expected one class name, got {line!r}")
        names.append(name)
    return names


def class_index(classes: str | Iterable[str], keep_order: bool = False) -> dict[str, int]:
    """Map each class folder name (wnid) to its id in 1..C.

    ``classes`` is either the text of a class-list file (a ``str``) or an iterable of names.
    Ids follow the sorted names (the ImageNet-S convention, also for its unsorted class-list
    files) unless ``keep_order`` is true, in which case they follow the given order.
    Raises ValueError for an empty list, duplicates, unsafe names or more than 999 classes.
    """
    names = parse_class_list(classes) if isinstance(classes, str) else [str(c) for c in classes]
    if not names:
        raise ValueError("class list is empty")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes: at most {MAX_CLASSES} fit below the ignore id")
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate class name {name!r}")
        seen.add(name)
        problem = unsafe_reason(name)
        if problem is not None or "/" in name:
            raise ValueError(f"class name {name!r} is not a safe folder name ({problem or 'has /'})")
    ordered = names if keep_order else sorted(names)
    return {name: i for i, name in enumerate(ordered, start=1)}


# ---- ids and paths ---------------------------------------------------------------------------


def unsafe_reason(relpath: str) -> str | None:
    """Why ``relpath`` (a ``/``-separated relative path or id) is unsafe, or None if it is safe.

    Safe means: relative, no empty, ``.`` or ``..`` component, only ``[A-Za-z0-9._-]`` in each
    component, each component at most ``MAX_NAME_LEN`` characters.
    """
    if not relpath:
        return "empty name"
    if relpath.startswith("/") or "\\" in relpath or re.match(r"^[A-Za-z]:", relpath):
        return f"absolute or non-POSIX path {relpath!r}"
    for part in relpath.split("/"):
        if part in ("", ".", ".."):
            return f"path component {part!r} in {relpath!r}"
        if not _SAFE_CHARS.fullmatch(part):
            return f"characters outside [A-Za-z0-9._-] in {relpath!r}"
        if len(part) > MAX_NAME_LEN:
            return f"name longer than {MAX_NAME_LEN} characters in {relpath[:60]!r}..."
    return None


def check_id(image_id: str) -> str:
    """Return ``image_id`` if it is safe to build an output path from, else raise ValueError.

    For ids read back from artifacts (Parquet, JSON) before they become paths.
    """
    problem = unsafe_reason(image_id)
    if problem is not None:
        raise ValueError(f"unsafe image id {image_id!r}: {problem}")
    return image_id


def dataset_dir(root_url: str, classes: int) -> str:
    """URL of ``ImageNetS{classes}`` under ``root_url``."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    return Storage.join(root_url, f"ImageNetS{classes}")


def is_image_name(name: str) -> bool:
    """True if the file name ends in one of IMAGE_SUFFIXES (case-insensitive)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def list_split(storage: Storage, root_url: str, classes: int, split: str) -> SplitListing:
    """List ``ImageNetS{classes}/{split}`` under ``root_url``; every file lands in one list.

    Images are expected at ``<wnid>/<name>`` (deeper folders are kept in the id:
    ``split/wnid/sub/stem``). Raises FileNotFoundError when the split folder is missing and
    ValueError for an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    split_url = Storage.join(dataset_dir(root_url, classes), split)
    if not storage.exists(split_url):
        raise FileNotFoundError(f"split folder not found: {split_url}")
    _, base = storage.fs(split_url)
    base = base.rstrip("/") + "/"

    listing = SplitListing()
    taken: dict[str, str] = {}
    for url in storage.list_files(split_url):
        _, fs_path = storage.fs(url)
        if not fs_path.startswith(base):
            raise ValueError(f"listing of {split_url} returned {url}, which is outside it")
        rel = fs_path[len(base):]
        parts = rel.split("/")
        # Hidden files (.DS_Store, AppleDouble ._x.JPEG, our own .tmp-* writes) are not images.
        if any(p.startswith(".") for p in parts) or not is_image_name(parts[-1]):
            listing.ignored.append(url)
            continue
        stem_rel = rel[: rel.rfind(".")]
        problem = unsafe_reason(stem_rel)
        if problem is None and len(parts) < 2:
            problem = "image is not inside a class folder"
        image_id = f"{split}/{stem_rel}"
        if problem is None and image_id in taken:
            # Same stem, different suffix (x.JPEG and x.png): outputs would collide.
            problem = f"duplicate id {image_id!r} (also {taken[image_id]})"
        if problem is not None:
            listing.rejected.append(Rejected(path=url, reason=problem))
            continue
        taken[image_id] = url
        listing.images.append(ImageRecord(id=image_id, path=url, split=split, wnid=parts[0]))
    return listing


def gt_path_for(record: ImageRecord) -> str:
    """URL of the ground-truth PNG of a validation or test image.

    ``.../ImageNetS{C}/validation/<wnid>/<stem>.JPEG`` ->
    ``.../ImageNetS{C}/validation-segmentation/<wnid>/<stem>.png``.
    """
    if record.split not in GT_SPLITS:
        raise ValueError(f"split {record.split!r} of {record.id!r} has no ground truth")
    stem, _ = posixpath.splitext(record.path)
    if not stem.endswith(record.id):
        raise ValueError(f"path {record.path!r} does not end with its id {record.id!r}")
    dataset = stem[: len(stem) - len(record.id)]
    rel = record.id[len(record.split) + 1:]
    return f"{dataset}{GT_SPLITS[record.split]}/{rel}{LABEL_SUFFIX}"


# ---- label PNG codec -------------------------------------------------------------------------


def encode_label(label: np.ndarray) -> bytes:
    """PNG bytes of an HxW integer label map: RGB uint8, R = id % 256, G = id // 256, B = 0.

    Raises ValueError unless ``label`` is 2-D, integer (or bool) and within [0, 65535].
    """
    label = np.asarray(label)
    if label.ndim != 2 or label.shape[0] == 0 or label.shape[1] == 0:
        raise ValueError(f"label must be a non-empty HxW array, got shape {label.shape}")
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == np.bool_):
        raise ValueError(f"label must have an integer dtype, got {label.dtype}")
    lo, hi = int(label.min()), int(label.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"label values must be in [0, 65535], got range [{lo}, {hi}]")
    ids = label.astype(np.uint16)
    rgb = np.zeros(label.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = ids & 0xFF
    rgb[..., 1] = ids >> 8
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes, what: str = "label") -> tuple[str, np.ndarray]:
    """``(PIL mode, pixel array)`` of PNG bytes; ValueError naming ``what`` for unreadable bytes."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            im.load()
            return im.mode, np.asarray(im)
    except Exception as e:  # PIL raises many types for bad bytes
        raise ValueError(f"not a readable {what} PNG: {e}") from None


def decode_label(data: bytes) -> np.ndarray:
    """HxW int32 ids from label PNG bytes: R + 256 * G for RGB(A) (B ignored, as the official
    evaluator does); the value itself for single-channel 8/16-bit PNGs.

    Raises ValueError for bytes that are not a readable PNG or an unsupported mode.
    """
    mode, arr = read_png(data, "label")
    if mode in ("RGB", "RGBA"):
        return arr[..., 0].astype(np.int32) + 256 * arr[..., 1].astype(np.int32)
    if mode in ("L", "I", "I;16", "I;16B", "I;16L"):
        return arr.astype(np.int32)
    raise ValueError(f"unsupported label PNG mode {mode!r}; expected RGB, RGBA, L or 16-bit")
