"""Image ids: the one mapping between an image's place in the data and the names of its outputs.

An id is ``"{split}/{rel}"``: the split (``train``, ``validation``, ``test``, or ``all`` for a
plain folder of images) and the image's path below its split folder without the file suffix
(ImageNet-S: ``<wnid>/<stem>``). Every per-image output is ``<folder>/<id>.png``, so
``predictions/validation/<wnid>/<stem>.png`` sits at the same relative name as its ground truth
``validation-segmentation/<wnid>/<stem>.png``. :func:`image_id`, :func:`split_of`,
:func:`rel_of`, :func:`png_rel` and :func:`id_from_png_rel` are the one mapping between ids and
relative paths; :func:`unsafe_reason` decides which listed names may become ids, and
:func:`check_id` guards ids read back from artifacts before they become paths.

Ids of precomputed features (``data.features``) are whatever their maker chose: an id need not
have a split prefix or a class folder (:func:`class_folder` returns None then).
"""

from __future__ import annotations

import re
import unicodedata

LABEL_SUFFIX = ".png"


def image_id(split: str, rel: str) -> str:
    """The id of the image at ``rel`` (relative path without suffix) below ``split``'s folder."""
    return f"{split}/{rel}"


def split_of(image_id_: str) -> str:
    """``"validation"`` for ``"validation/n01443537/x"``."""
    return image_id_.split("/", 1)[0]


def rel_of(image_id_: str) -> str:
    """The id without its split: ``"n01443537/x"`` for ``"validation/n01443537/x"``."""
    return image_id_.split("/", 1)[1]


def png_rel(image_id_: str) -> str:
    """The relative name of the id's PNGs inside a split folder: ``"<rel>.png"``."""
    return rel_of(image_id_) + LABEL_SUFFIX


def id_from_png_rel(split: str, rel_png: str) -> str:
    """Inverse of :func:`png_rel`: the id of ``split``'s image whose PNG is ``rel_png``."""
    if not rel_png.endswith(LABEL_SUFFIX):
        raise ValueError(f"{rel_png!r} is not a {LABEL_SUFFIX} name")
    return image_id(split, rel_png[: -len(LABEL_SUFFIX)])


# Longest file-name component of an id, in UTF-8 bytes: leaves room for ".png" and for the
# ".tmp-<32 hex>-" prefix of an atomic write under the common 255-byte file-name limit.
MAX_NAME_BYTES = 200
# Bidirectional-text controls: legal in file names, but they make a name display as another one.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe_reason(relpath: str) -> str | None:
    """Why ``relpath`` (a ``/``-separated relative path or id) cannot become a path inside the run
    folder, or None if it can.

    Spaces, punctuation and non-ASCII letters are normal in people's folders and are accepted.
    Refused: an empty name, absolute or non-POSIX paths (leading ``/``, a drive letter, ``\\``),
    empty, ``.`` or ``..`` components, control characters and bidirectional-text controls, text
    that is not valid Unicode (undecodable bytes in a listing), and components longer than
    ``MAX_NAME_BYTES`` UTF-8 bytes.
    """
    if not relpath:
        return "empty name"
    if relpath.startswith("/") or "\\" in relpath or re.match(r"^[A-Za-z]:(/|$)", relpath):
        return f"absolute or non-POSIX path {relpath!r}"
    for part in relpath.split("/"):
        if part in ("", ".", ".."):
            return f"path component {part!r} in {relpath!r}"
        for ch in part:
            category = unicodedata.category(ch)
            if category == "Cc" or ch in _BIDI_CONTROLS:
                return f"control character {ch!r} in {relpath!r}"
            if category == "Cs":
                return f"name is not valid Unicode (undecodable bytes) in {relpath!r}"
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return f"name longer than {MAX_NAME_BYTES} bytes in {relpath[:60]!r}..."
    return None


def check_id(image_id_: str) -> str:
    """Return ``image_id_`` if it is safe to build an output path from, else raise ValueError.

    For ids read back from artifacts (Parquet, JSON) before they become paths.
    """
    problem = unsafe_reason(image_id_)
    if problem is not None:
        raise ValueError(f"unsafe image id {image_id_!r}: {problem}")
    if "/" not in image_id_:
        raise ValueError(f"image id {image_id_!r} has no split prefix")
    return image_id_


def class_folder(image_id_: str) -> str | None:
    """The first folder below the split (an ImageNet-S class folder, ``wnid``): ``"n01"`` for
    ``"train/n01/x"``; None when the id has no folder between its split and its name
    (``"all/x"``, or a precomputed feature's ``"img00000001"``): no class truth."""
    parts = image_id_.split("/")
    return parts[1] if len(parts) >= 3 else None
