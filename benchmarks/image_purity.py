"""How far colour, an untrained backbone and a given backbone go: image-level k-means purity
against the folder classes.

    python -m benchmarks.image_purity DATA_ROOT --classes C [--split train] [--restarts 30]
        [--seed 0] [--backbone ARCH[=CHECKPOINT]]... [--image-size 64] [--json OUT]

Reads ``DATA_ROOT/ImageNetS{C}/{split}/<wnid>/*`` (class = folder, ids as
:func:`pdso_ray.data.imagenet_s.class_index` numbers them) and describes every image by

- each colour statistic of :data:`pdso_ray.method.colour_stats.COLOUR_STATISTICS` (a
  saturation-weighted hue histogram; a coarse joint HSV histogram), and
- for each ``--backbone``: the pipeline's image feature (patch tokens pooled by the CLS-attention
  saliency, :func:`pdso_ray.method.features.pooled_feature`) of DINO ``ARCH`` loaded from
  ``CHECKPOINT``, or randomly initialised (seeded) when no checkpoint is given;

then runs k-means with k = C (best of ``--restarts`` random starts by objective, the pipeline's
k-means #1 rule) and prints purity and NMI (:mod:`pdso_ray.method.cluster_metrics`) beside what
clusters of the same sizes drawn at random score (``chance``: the purity of a clustering that
knows nothing, well above 1/C for few images per class). A world where colour is not the class
puts the colour statistics near ``chance``; a backbone that has learned shape lifts purity above it.
:func:`image_scores` is the same measurement on images in memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
import torch

from pdso_ray.data.decode import decode_image
from pdso_ray.data.imagenet_s import SPLITS, class_index, list_split
from pdso_ray.method import kmeans_math as km
from pdso_ray.method.cluster_metrics import nmi, purity
from pdso_ray.method.colour_stats import COLOUR_STATISTICS
from pdso_ray.method.features import pooled_feature, saliency_from_attention
from pdso_ray.models.dino import DinoBackbone, build_dino, to_model_input
from pdso_ray.models.loading import seeded_init
from pdso_ray.storage import Storage

NITER = 50
CHANCE_DRAWS = 200
BATCH = 64


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


@torch.no_grad()
def backbone_features(images: Sequence[np.ndarray], arch: str, checkpoint: str | None, image_size: int,
                      seed: int = 0) -> np.ndarray:
    """N×D float32 image features of DINO ``arch`` (``checkpoint`` or, when None, random weights
    drawn from ``seed``) on ``images`` (H×W×3 uint8 RGB each), resized to ``image_size`` squared:
    patch tokens pooled by the CLS-attention saliency, as stage ``features`` computes them."""
    with seeded_init(seed):
        model = build_dino(arch, checkpoint, img_size=image_size)
    return model_features(model, images, image_size)


@torch.no_grad()
def model_features(model: DinoBackbone, images: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """N×D float32 image features of ``model`` as it is (train or eval mode) on ``images`` (H×W×3
    uint8 RGB each) resized to ``image_size`` squared: patch tokens pooled by the CLS-attention
    saliency, as stage ``features`` computes them."""
    rows = []
    for i in range(0, len(images), BATCH):
        tokens, attention = model(to_model_input(images[i:i + BATCH], image_size))
        rows.append(pooled_feature(tokens, saliency_from_attention(attention)).numpy())
    return np.concatenate(rows).astype(np.float32)


def scores_of(features: np.ndarray, labels: np.ndarray, classes: int, restarts: int, seed: int) -> dict[str, float]:
    """``{"purity", "nmi", "chance", "chance95"}`` of k-means (k = ``classes``) on ``features``
    (N×D) against ``labels`` (N ints)."""
    clusters = kmeans_best_of(features, classes, restarts, seed)
    mean, p95 = chance_purity(clusters, labels, seed=seed)
    return {"purity": purity(clusters, labels), "nmi": nmi(clusters, labels), "chance": mean, "chance95": p95}


def image_scores(images: Sequence[np.ndarray], labels: np.ndarray, classes: int, restarts: int = 30, seed: int = 0,
                 backbones: Sequence[tuple[str, str | None]] = (), image_size: int = 64) -> dict[str, dict[str, float]]:
    """Scores (:func:`scores_of`) of each colour statistic (keyed by its COLOUR_STATISTICS name) and
    of each ``(arch, checkpoint)`` backbone (keyed ``arch`` for random weights, ``arch=checkpoint``
    otherwise) on ``images`` (H×W×3 uint8 RGB each) against ``labels`` (N ints)."""
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    out = {name: scores_of(statistic(images), labels, classes, restarts, seed)
           for name, statistic in COLOUR_STATISTICS.items()}
    for arch, checkpoint in backbones:
        name = arch if checkpoint is None else f"{arch}={checkpoint}"
        out[name] = scores_of(backbone_features(images, arch, checkpoint, image_size, seed), labels, classes,
                              restarts, seed)
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


def _backbone(text: str) -> tuple[str, str | None]:
    arch, _, checkpoint = text.partition("=")
    return arch, checkpoint or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.image_purity", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", help="folder holding ImageNetS{C}/")
    parser.add_argument("--classes", type=int, required=True, help="C: also k of k-means")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--restarts", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="k-means starts and random backbone weights")
    parser.add_argument("--backbone", action="append", type=_backbone, default=[], metavar="ARCH[=CHECKPOINT]",
                        help="also score this DINO backbone (random weights without =CHECKPOINT); repeatable")
    parser.add_argument("--image-size", type=int, default=64, help="backbone input side (default 64, the stand-in's)")
    parser.add_argument("--json", default=None, help="also write the scores here")
    args = parser.parse_args(argv)
    try:
        images, labels = load_split(args.data_root, args.classes, args.split)
        scores = image_scores(images, labels, args.classes, args.restarts, args.seed, args.backbone, args.image_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(images)} {args.split} images, {len(set(labels.tolist()))} classes, k = {args.classes}, "
          f"best of {args.restarts} k-means starts")
    width = max(len(name) for name in scores)
    print(f"{'features':<{width}} {'purity':>7} {'NMI':>6} {'chance':>7} {'chance95':>8}")
    for name, s in scores.items():
        print(f"{name:<{width}} {s['purity']:7.3f} {s['nmi']:6.3f} {s['chance']:7.3f} {s['chance95']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": len(images), "classes": args.classes, "scores": scores}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
