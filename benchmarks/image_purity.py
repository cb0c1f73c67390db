"""How far colour alone goes: image-level k-means of colour histograms against the folder classes.

    python -m benchmarks.colour_baseline DATA_ROOT --classes C [--split train] [--restarts 30]
        [--seed 0] [--json OUT]

Reads ``DATA_ROOT/ImageNetS{C}/{split}/<wnid>/*`` (class = folder, ids as
:func:`pdso_ray.data.imagenet_s.class_index` numbers them), describes every image by

- ``hue16``: a saturation-weighted hue histogram (16 bins; each pixel adds its saturation to its
  hue's bin, so grey pixels add nothing), and
- ``hsv444``: a coarse joint HSV histogram (4 x 4 x 4 bins),

each normalised to sum 1, runs k-means with k = C (best of ``--restarts`` random starts by
objective, :mod:`pdso_ray.method.kmeans_math`) and prints purity and NMI
(:mod:`pdso_ray.method.cluster_metrics`) beside what clusters of the same sizes drawn at random
score (``chance``: the purity a clustering that knows nothing reaches, which is well above 1/C
for few images per class). A world where colour is not the class scores near ``chance`` here.
:func:`colour_scores` is the same measurement on images in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from pdso_ray.data.decode import decode_image
from pdso_ray.data.imagenet_s import SPLITS, class_index, list_split
from pdso_ray.method import kmeans_math as km
from pdso_ray.method.cluster_metrics import nmi, purity
from pdso_ray.storage import Storage

HUE_BINS = 16
HSV_BINS = 4
NITER = 50
CHANCE_DRAWS = 200


def _hsv(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> (HW, 3) float H, S, V in [0, 1) (PIL's conversion, hue 0..255 / 256)."""
    hsv = np.asarray(Image.fromarray(image, mode="RGB").convert("HSV"), dtype=np.float32)
    return hsv.reshape(-1, 3) / 256.0


def hue_histogram(image: np.ndarray, bins: int = HUE_BINS) -> np.ndarray:
    """Saturation-weighted hue histogram of an HxWx3 uint8 RGB image: (bins,) float32, sum 1
    (all zeros for an image without any saturated pixel)."""
    hsv = _hsv(image)
    hist = np.bincount((hsv[:, 0] * bins).astype(np.int64), weights=hsv[:, 1], minlength=bins)
    total = hist.sum()
    return (hist / total if total > 0 else hist).astype(np.float32)


def hsv_histogram(image: np.ndarray, bins: int = HSV_BINS) -> np.ndarray:
    """Joint HSV histogram of an HxWx3 uint8 RGB image, ``bins`` per channel: (bins**3,) float32,
    sum 1."""
    q = (_hsv(image) * bins).astype(np.int64)
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    hist = np.bincount(cell, minlength=bins ** 3).astype(np.float32)
    return hist / hist.sum()


FEATURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"hue16": hue_histogram, "hsv444": hsv_histogram}


def kmeans_best_of(x: np.ndarray, k: int, restarts: int, seed: int, niter: int = NITER) -> np.ndarray:
    """n int64 cluster ids of the rows of ``x`` (n x d) by Lloyd k-means: the best of ``restarts``
    random starts by final objective (the pipeline's k-means #1 rule), in this process."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in 1..{x.shape[0]} (the number of rows), got {k}")
    best: tuple[float, np.ndarray] | None = None
    for redo in range(restarts):
        start = x[km.init_indices(x.shape[0], k, seed, redo)]
        centroids, _ = km.lloyd(lambda c: km.lloyd_partial(x, c), start, niter, seed, redo)
        objective = km.lloyd_partial(x, centroids).objective
        if best is None or objective < best[0]:
            best = (objective, centroids)
    ids, _ = km.search_blocks(x, best[1], 1)
    return ids[:, 0]


def chance_purity(clusters: np.ndarray, truth: np.ndarray, draws: int = CHANCE_DRAWS,
                  seed: int = 0) -> tuple[float, float]:
    """(mean, 95th percentile) purity of ``clusters`` after shuffling which image is in which
    cluster: the score of a clustering with these sizes that knows nothing about the classes."""
    rng = np.random.default_rng([seed, 0xC4A7])
    scores = [purity(rng.permutation(clusters), truth) for _ in range(draws)]
    return float(np.mean(scores)), float(np.percentile(scores, 95))


def colour_scores(images: Sequence[np.ndarray], labels: np.ndarray, classes: int, restarts: int = 30,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """For each of FEATURES: ``{"purity", "nmi", "chance", "chance95"}`` of k-means (k =
    ``classes``) on that colour statistic of ``images`` (HxWx3 uint8 RGB each) against
    ``labels`` (n ints)."""
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    out = {}
    for name, feature in FEATURES.items():
        clusters = kmeans_best_of(np.stack([feature(im) for im in images]), classes, restarts, seed)
        mean, p95 = chance_purity(clusters, labels, seed=seed)
        out[name] = {"purity": purity(clusters, labels), "nmi": nmi(clusters, labels), "chance": mean, "chance95": p95}
    return out


def load_split(root: str, classes: int, split: str = "train") -> tuple[list[np.ndarray], np.ndarray]:
    """Every image of ``root/ImageNetS{classes}/{split}`` (HxWx3 uint8 RGB) and its folder's class
    id. Raises ValueError naming the first image that does not decode."""
    storage = Storage()
    listing = list_split(storage, root, classes, split)
    if listing.rejected:
        bad = listing.rejected[0]
        raise ValueError(f"{bad.path}: {bad.reason}")
    ids = class_index(sorted({r.wnid for r in listing.images}))
    images, labels = [], []
    for record in listing.images:
        decoded = decode_image(storage.read_bytes(record.path))
        if not decoded.ok:
            raise ValueError(f"{record.path}: {decoded.reason}")
        images.append(decoded.image)
        labels.append(ids[record.wnid])
    return images, np.asarray(labels, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.colour_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", help="folder holding ImageNetS{C}/")
    parser.add_argument("--classes", type=int, required=True, help="C: also k of k-means")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--restarts", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the scores here")
    args = parser.parse_args(argv)
    try:
        images, labels = load_split(args.data_root, args.classes, args.split)
        scores = colour_scores(images, labels, args.classes, args.restarts, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(images)} {args.split} images, {len(set(labels.tolist()))} classes, k = {args.classes}, "
          f"best of {args.restarts} k-means starts")
    print(f"{'feature':<8} {'purity':>7} {'NMI':>6} {'chance':>7} {'chance95':>8}")
    for name, s in scores.items():
        print(f"{name:<8} {s['purity']:7.3f} {s['nmi']:6.3f} {s['chance']:7.3f} {s['chance95']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": len(images), "classes": args.classes, "scores": scores}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
