"""Box-prompted mask IoU of a SAM checkpoint on held-out scenes of both synthetic worlds and on the
ground truth of any ImageNet-S tree (another generator's, the demo's).

    python -m pdso_ray.standins.sam_evaluation [--checkpoint pdso_ray/standins/assets/sam_tiny.pth]
        [--arch A] [--scenes 100] [--root TREE ...] [--split validation]

What is measured: :func:`pdso_ray.standins.sam_training.evaluate` under the protocols ``box``
(the object's tight box, one pass), ``box_spo`` (SPO's two passes) and ``jittered_box_spo`` (a
box cut from a degraded copy of the mask, as raw pseudo labels give SPO), on

* ``--scenes`` held-out scenes per world of :func:`~pdso_ray.standins.sam_training.heldout_scenes`
  (``shapes``: the ``eval`` pool's classes and photographs, which training never draws;
  ``hue``: the held-out stream);
* every ``--root`` tree's ``--split`` images: an object is a connected part of one class's
  pixels (8-connected after closing 2 px gaps, at least 40 pixels), its mask the class's pixels
  in that part; ignore-band pixels count in no IoU (:func:`tree_scenes`).

Printed: per set and protocol the mean and median IoU and the object count.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from pdso_ray.data.decode import decode_image
from pdso_ray.data.imagenet_s import GT_SPLITS, IGNORE_ID, decode_label
from pdso_ray.models.sam import SamMaskPredictor, build_sam
from pdso_ray.standins import SAM_ARCH, SAM_ASSET
from pdso_ray.standins.sam_training import WORLDS, Scene, evaluate, heldout_scenes
from pdso_ray.storage import Storage

PROTOCOLS = ("box", "box_spo", "jittered_box_spo")
MIN_OBJECT_PIXELS = 40


def objects(gt: np.ndarray) -> list[np.ndarray]:
    """The objects of a ground-truth label (H×W ids, 0 background, IGNORE_ID ignored): per class,
    each connected part (8-connected after closing 2 px gaps) of at least
    :data:`MIN_OBJECT_PIXELS` pixels, as an H×W bool mask of that class's pixels in the part."""
    masks = []
    for k in np.unique(gt[(gt > 0) & (gt != IGNORE_ID)]):
        pixels = gt == k
        parts, n = ndimage.label(ndimage.binary_closing(pixels, iterations=2), structure=np.ones((3, 3)))
        masks += [m for m in (pixels & (parts == i) for i in range(1, n + 1)) if m.sum() >= MIN_OBJECT_PIXELS]
    return masks


def tree_scenes(root: str, split: str = "validation", storage: Storage | None = None) -> list[Scene]:
    """The ``split`` images of the ImageNet-S tree at ``root`` (the ``ImageNetS{C}`` folder, any
    URL) with their :func:`objects`, in sorted path order; images decode as the official tools
    read them (no EXIF rotation).

    Returns:
        Scenes with ``masks`` the objects (K ≥ 1; images without one are skipped) and ``valid``
        the pixels outside the ignore band.

    Raises:
        ValueError: an unknown split, or an image that does not decode (named).
    """
    if split not in GT_SPLITS:
        raise ValueError(f"split must be one of {sorted(GT_SPLITS)}, got {split!r}")
    storage = storage or Storage()
    scenes = []
    for rel, url in sorted(storage.list_relative(storage.join(root, split)).items()):
        decoded = decode_image(storage.read_bytes(url), exif_transpose=False)
        if decoded.image is None:
            raise ValueError(f"{url}: {decoded.reason}")
        gt = decode_label(storage.read_bytes(storage.join(root, GT_SPLITS[split], rel.rsplit(".", 1)[0] + ".png")))
        masks = objects(gt)
        if masks:
            scenes.append(Scene(decoded.image, np.stack(masks), gt != IGNORE_ID))
    return scenes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdso_ray.standins.sam_evaluation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=SAM_ASSET, help="SAM state dict (path or URL)")
    parser.add_argument("--arch", default=SAM_ARCH)
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes per synthetic world")
    parser.add_argument("--root", action="append", default=[],
                        help="an ImageNetS{C} folder with ground truth (repeatable)")
    parser.add_argument("--split", default="validation", choices=sorted(GT_SPLITS))
    args = parser.parse_args(argv)
    predictor = SamMaskPredictor(build_sam(args.arch, args.checkpoint), device="cpu")
    sets = [(f"held-out {world} scenes", heldout_scenes(args.scenes, world=world)) for world in WORLDS]
    sets += [(f"{root} {args.split}", tree_scenes(root, args.split)) for root in args.root]
    for name, scenes in sets:
        for protocol in PROTOCOLS:
            ious = evaluate(predictor, scenes, protocol)
            print(f"{name}: {protocol} mean IoU {ious.mean():.3f} median {np.median(ious):.3f} "
                  f"over {len(ious)} objects", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
