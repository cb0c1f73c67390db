"""Synthetic data: small ImageNet-S-shaped datasets with exact ground truth, and odd or corrupt
image files.

:func:`make_demo_dataset` writes ``ImageNetS{C}/`` in the layout of :mod:`pdso_ray.data.imagenet_s`
from one of two worlds (:data:`WORLDS`):

- ``shapes`` (the default, :mod:`.shapes`): a class is a body shape, a texture and an arrangement of
  parts, in look-alike groups of three; every instance has random colours, size, rotation, aspect
  and position, on a crop of a real photograph with no-class clutter that may occlude it. Colour
  statistics cluster it near chance: a model has to see shape and texture.
- ``hue`` (:mod:`.hue`): the first world, where each class has its own hue. A colour histogram
  separates it; tests that need no learning use it.

Validation and test images come with ground truth in the label PNG codec: object pixels are k, the
rest 0, and a thin band along the object's border is IGNORE_ID, as ImageNet-S marks uncertain
borders. Every image is a function of ``(seed, split, class, index)`` and the class set, so the
output is byte-identical for the same parameters, and adding images leaves the others unchanged.

:func:`odd_and_corrupt_samples` gives files that a robust loader must handle.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pdso_ray.data.imagenet_s import GT_SPLITS, MAX_CLASSES, SPLITS, dataset_dir, encode_label
from pdso_ray.data.synthetic import hue, shapes
from pdso_ray.data.synthetic.odd import OddSample, odd_and_corrupt_samples
from pdso_ray.storage import Storage

__all__ = ["CLASS_LIST_NAME", "MARKER_NAME", "WORLDS", "OddSample", "make_demo_dataset",
           "odd_and_corrupt_samples", "wnid_for"]

# Written in the dataset folder: the parameters that made it. Its presence tells a re-run that
# the folder is ours (safe to replace) and, with "complete": true, that it is whole.
MARKER_NAME = "synthetic.json"
# The sorted class names, one per line (the format of the benchmark's class-list files).
CLASS_LIST_NAME = "classes.txt"
# World -> generator version. Bump a world's version when its images change for the same
# parameters, so existing folders are regenerated.
WORLDS = {"shapes": 1, "hue": 1}
DEFAULT_IMAGE_SIZE = {"shapes": (96, 160), "hue": (96, 128)}
_JPEG_QUALITY = 90


def wnid_for(k: int) -> str:
    """WordNet-id-shaped folder name of synthetic class k (1-based): ``n00000001``, ..."""
    return f"n{k:08d}"


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _renderer(world: str, classes: int, style_seed: int | None, pool: str, ignore_border: int):
    """``render(rng, k, size) -> (image, label)`` for class k of the world's class set."""
    if world == "hue":
        return lambda rng, k, size: hue.render_sample(rng, k, classes, size, ignore_border, style_seed)
    class_list = shapes.class_set(classes, 0 if style_seed is None else style_seed, pool)
    return lambda rng, k, size: shapes.render(rng, class_list[k - 1], k, size, ignore_border, pool)


def make_demo_dataset(
    out_dir: str,
    classes: int = 5,
    train_per_class: int = 20,
    val_per_class: int = 4,
    test_per_class: int = 4,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    storage: Storage | None = None,
    ignore_border: int = 1,
    style_seed: int | None = None,
    world: str = "hue",
    pool: str = "eval",
) -> str:
    """Write a synthetic ``ImageNetS{classes}/`` under ``out_dir`` and return its URL.

    Files: ``{train,validation,test}/<wnid>/<wnid>_<i>.JPEG`` (a split with 0 images per class
    is not written), ``{validation,test}-segmentation/<wnid>/<wnid>_<i>.png`` (label codec of
    :mod:`pdso_ray.data.imagenet_s`), ``classes.txt`` (sorted wnids, one per line) and
    ``synthetic.json`` (the parameters). wnids are ``n00000001``.. so class k has id k. Each image
    side is drawn from ``image_size`` = (min, max), inclusive (default: the world's,
    :data:`DEFAULT_IMAGE_SIZE`).

    ``world``: a :data:`WORLDS` name; ``hue`` by default, the world the stand-in models know and
    the pipeline's tests exercise its plumbing on (``pdso-ray make-demo-data`` defaults to
    ``shapes``). ``style_seed``: which classes. In the ``shapes`` world it
    picks the class set (:func:`.shapes.class_set`; None = 0) and ``pool`` (``eval``, the default,
    or ``pretrain``) the disjoint pool of class combinations and background photos it draws from.
    In the ``hue`` world None gives the demo's evenly spaced hues and a seed random appearances
    (``pool`` is ignored there).

    Re-running with the same parameters returns at once; a folder made with other parameters
    is replaced; a non-empty folder that this function did not make raises FileExistsError.
    """
    if world not in WORLDS:
        raise ValueError(f"unknown synthetic world {world!r}; known: {', '.join(WORLDS)}")
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in [1, {MAX_CLASSES}], got {classes}")
    counts = {"train": train_per_class, "validation": val_per_class, "test": test_per_class}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"{split} images per class must be >= 0, got {n}")
    lo, hi = image_size or DEFAULT_IMAGE_SIZE[world]
    if not 8 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 8 <= min <= max, got {image_size}")
    if ignore_border < 0:
        raise ValueError(f"ignore_border must be >= 0, got {ignore_border}")
    if world == "shapes" and pool not in shapes.POOLS:
        raise ValueError(f"unknown pool {pool!r}; known: {', '.join(shapes.POOLS)}")

    storage = storage or Storage()
    root = dataset_dir(out_dir, classes)
    params = {
        "generator": "pdso_ray.data.synthetic",
        "world": world,
        "version": WORLDS[world],
        "classes": classes,
        "per_class": counts,
        "image_size": [lo, hi],
        "seed": seed,
        "ignore_border": ignore_border,
        "style_seed": style_seed,
    }
    if world == "shapes":
        params["pool"] = pool
    marker_url = Storage.join(root, MARKER_NAME)
    if storage.exists(marker_url):
        if storage.read_json(marker_url) == {**params, "complete": True}:
            return root
        storage.remove(root, recursive=True)
    elif storage.list_files(root):
        raise FileExistsError(
            f"{root} exists and was not made by make_demo_dataset; remove it or choose another folder"
        )

    render = _renderer(world, classes, style_seed, pool, ignore_border)  # fails early (photos)
    storage.write_json(marker_url, {**params, "complete": False})
    wnids = [wnid_for(k) for k in range(1, classes + 1)]
    storage.write_text(Storage.join(root, CLASS_LIST_NAME), "".join(f"{w}\n" for w in wnids))
    for split_index, split in enumerate(SPLITS):
        for k, wnid in enumerate(wnids, start=1):
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_index, k, i])
                size = (int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)))
                image, label = render(rng, k, size)
                name = f"{wnid}_{i}"
                storage.write_bytes(Storage.join(root, split, wnid, f"{name}.JPEG"), _jpeg_bytes(image))
                if split in GT_SPLITS:
                    gt_url = Storage.join(root, GT_SPLITS[split], wnid, f"{name}.png")
                    storage.write_bytes(gt_url, encode_label(label))
    storage.write_json(marker_url, {**params, "complete": True})
    return root
