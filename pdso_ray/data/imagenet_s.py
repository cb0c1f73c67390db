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

Image ids are ``"{split}/{wnid}/{stem}"`` (:mod:`pdso_ray.run_layout`); :func:`list_split`
lists a split with the rules of :func:`pdso_ray.data.listing.list_tree`: every other image is
rejected with a reason (never dropped), and non-image files are listed apart as ignored.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable

import numpy as np
from PIL import Image

from pdso_ray.data.listing import DEFAULT_MAX_FILE_BYTES, ImageRecord, SplitListing, list_tree
from pdso_ray.data.ids import LABEL_SUFFIX, rel_of, unsafe_reason
from pdso_ray.storage import Storage

BACKGROUND_ID = 0
IGNORE_ID = 1000
# Ids 1..MAX_CLASSES, so that no class collides with IGNORE_ID.
MAX_CLASSES = IGNORE_ID - 1

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
# Split -> folder of its ground-truth PNGs (the train split has none).
GT_SPLITS = {VALIDATION: "validation-segmentation", TEST: "test-segmentation"}

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


# ---- listing ---------------------------------------------------------------------------------


def dataset_dir(root_url: str, classes: int) -> str:
    """URL of ``ImageNetS{classes}`` under ``root_url``."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    return Storage.join(root_url, f"ImageNetS{classes}")


def list_split(storage: Storage, root_url: str, classes: int, split: str,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> SplitListing:
    """List ``ImageNetS{classes}/{split}`` under ``root_url``; every file lands in one list.

    Images are expected at ``<wnid>/<name>`` (deeper folders are kept in the id:
    ``split/wnid/sub/stem``); symlinks must stay inside ``root_url``. Raises FileNotFoundError
    when the split folder is missing and ValueError for an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    split_url = Storage.join(dataset_dir(root_url, classes), split)
    if not storage.exists(split_url):
        raise FileNotFoundError(f"split folder not found: {split_url}")
    return list_tree(storage, split_url, split, class_folders=True, data_root=root_url,
                     max_file_bytes=max_file_bytes)


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
    return f"{dataset}{GT_SPLITS[record.split]}/{rel_of(record.id)}{LABEL_SUFFIX}"


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


def encode_gray_png(values: np.ndarray) -> bytes:
    """PNG bytes of an ``H×W`` uint8 array (mode L): foreground and saliency maps."""
    values = np.asarray(values)
    if values.ndim != 2 or values.dtype != np.uint8:
        raise ValueError(f"expected an H×W uint8 array, got shape {values.shape} dtype {values.dtype}")
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an ``H×W×3`` uint8 RGB image (overlays for people to look at)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_gray_png(data: bytes, what: str = "foreground") -> np.ndarray:
    """HxW uint8 from a single-channel 8-bit PNG; ValueError naming ``what`` for anything else."""
    mode, arr = read_png(data, what)
    if mode != "L":
        raise ValueError(f"{what} PNG must be 8-bit single-channel (mode L), got {mode!r}")
    return arr


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
