"""Can a backbone architecture learn a world at all? A supervised probe, before any self-supervision.

    python -m benchmarks.learnability WORKDIR [--arch vit_tiny_reg4 --arch vit_tiny_convstem_reg4]
        [--steps 1000] [--seeds 0 1 2] [--train-classes 128] [--train-per-class 40]
        [--eval-classes 12] [--eval-style-seeds 100 101 102] [--eval-root ROOT]... [--input-size 64]

A stand-in DINO that stays at chance on a world can fail for two reasons: the self-supervised
objective learns something else (the background, the colours), or the architecture cannot learn
the world in the steps it gets even when told the classes. This benchmark measures the second, as
an upper bound on the first. Each ``--arch`` (a :data:`pdso_ray.models.dino.DINO_SPECS` name,
random init from ``--seed``) with a linear head on its CLS token is trained by cross-entropy on
the *labelled* ``pretrain`` pool of the ``shapes`` world (``--train-classes`` classes × 
``--train-per-class`` images, written under ``WORKDIR/train``), with the augmentations that keep
colour out (random crops, flips, channel permutation, saturation 0-1.5). Every quarter of the run
its pipeline feature (patch tokens pooled by CLS-attention saliency, as stage ``features``) of
*unseen* classes — the ``eval`` pool, ``--eval-classes`` classes per style seed under
``WORKDIR/eval-S``, or the ImageNet-S trees ``--eval-root`` of another generator — goes through
image-level k-means (k = classes, the pipeline's k-means #1 rule) and is scored by purity against
the folder classes, beside the purity of random clusters of the same sizes (``chance``).

Prints one Markdown table: per architecture and step, transfer purity as mean ± sd over the
``--seeds`` (each seed averaged over the evaluation sets), and the last training loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.image_purity import load_split, model_features, scores_of
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.method.augment import resize_image_bilinear
from pdso_ray.method.multicrop import normalize
from pdso_ray.models.dino import DinoBackbone, create_vit

BATCH = 64
RESTARTS = 10
TRAIN_STYLE_SEED, TRAIN_IMAGE_SEED = 4242, 777  # the stand-in's pretraining data (dino_pretraining)
CROP_MARGIN = 8 / 64  # training images are resized to input·(1 + margin), then cropped to input


def world_sets(workdir: str, args: argparse.Namespace) -> tuple[tuple[list, np.ndarray], list[tuple[list, np.ndarray]]]:
    """The labelled training set and the evaluation sets (images, labels), written once."""
    train_root = os.path.join(workdir, "train")
    if not os.path.isdir(os.path.join(train_root, f"ImageNetS{args.train_classes}")):
        make_demo_dataset(train_root, classes=args.train_classes, train_per_class=args.train_per_class,
                          val_per_class=0, test_per_class=0, seed=TRAIN_IMAGE_SEED, style_seed=TRAIN_STYLE_SEED,
                          world="shapes", pool="pretrain")
    train = load_split(train_root, args.train_classes)
    if args.eval_root:
        return train, [load_split(root, args.eval_classes) for root in args.eval_root]
    sets = []
    for style in args.eval_style_seeds:
        root = os.path.join(workdir, f"eval-{style}")
        if not os.path.isdir(os.path.join(root, f"ImageNetS{args.eval_classes}")):
            make_demo_dataset(root, classes=args.eval_classes, train_per_class=40, val_per_class=0,
                              test_per_class=0, seed=style, style_seed=style, world="shapes", pool="eval")
        sets.append(load_split(root, args.eval_classes))
    return train, sets


def colour_free_views(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random ``size``² crops of B×3×S×S float [0, 1] images, flipped half the time, their
    channels permuted and their saturation scaled by U(0, 1.5): views whose colours say nothing."""
    b, _, s, _ = batch.shape
    top, left = (int(v) for v in torch.randint(0, s - size + 1, (2,), generator=generator))
    x = batch[:, :, top:top + size, left:left + size]
    if torch.rand(1, generator=generator) < 0.5:
        x = x.flip(3)
    x = x[:, torch.randperm(3, generator=generator)]
    grey = x.mean(1, keepdim=True)
    return grey + (x - grey) * 1.5 * torch.rand(b, 1, 1, 1, generator=generator)


def transfer_scores(backbone: DinoBackbone, sets: list[tuple[list, np.ndarray]], size: int,
                    seed: int) -> dict[str, float]:
    """``{"purity", "chance"}``: means over ``sets`` of the k-means purity of the pipeline's image
    feature and of the purity of random clusters of the same sizes."""
    backbone.eval()
    scores = [scores_of(model_features(backbone, images, size), labels, int(labels.max()) + 1, RESTARTS, seed)
              for images, labels in sets]
    backbone.train()
    return {key: float(np.mean([score[key] for score in scores])) for key in ("purity", "chance")}


def probe(arch: str, seed: int, train: tuple[list, np.ndarray], sets: list, args: argparse.Namespace) -> list[dict]:
    """Train one (arch, seed); its transfer purity at step 0 and every quarter of the run."""
    size = args.input_size
    stored = round(size * (1 + CROP_MARGIN))
    images = torch.as_tensor(np.stack([resize_image_bilinear(im, (stored, stored)) for im in train[0]]))
    images = images.permute(0, 3, 1, 2).float() / 255
    labels = torch.as_tensor(train[1])
    torch.manual_seed(seed)
    backbone = DinoBackbone(create_vit(arch, size), arch, pretrained=False).train()
    head = torch.nn.Linear(backbone.embed_dim, int(labels.max()) + 1)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps)
    generator = torch.Generator().manual_seed(seed)
    rows = [{"step": 0, "loss": float("nan"), **transfer_scores(backbone, sets, size, seed)}]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(images), (BATCH,), generator=generator)
        x = normalize(colour_free_views(images[index], size, generator))
        cls = backbone.vit.forward_features(x)[:, 0]
        loss = F.cross_entropy(head(cls), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            rows.append({"step": step, "loss": loss.item(), **transfer_scores(backbone, sets, size, seed)})
            print(f"{arch} seed {seed} step {step}: loss {loss.item():.3f} transfer purity "
                  f"{rows[-1]['purity']:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learnability", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--arch", action="append", help="DINO_SPECS name (repeatable)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-classes", type=int, default=128)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--eval-classes", type=int, default=12)
    parser.add_argument("--eval-style-seeds", type=int, nargs="+", default=[100, 101, 102])
    parser.add_argument("--eval-root", action="append",
                        help="evaluate on this ImageNet-S tree's train split instead (repeatable)")
    parser.add_argument("--input-size", type=int, default=64)
    args = parser.parse_args(argv)
    archs = args.arch or ["vit_tiny_reg4", "vit_tiny_convstem_reg4"]
    train, sets = world_sets(os.path.abspath(args.workdir), args)
    print(f"train: {len(train[1])} labelled images of {args.train_classes} pretrain-pool classes; evaluated on "
          f"{len(sets)} set(s) of {args.eval_classes} unseen classes")
    print("\n| architecture | step | transfer purity (mean ± sd over seeds) | chance | last loss |\n|---|---|---|---|---|")
    for arch in archs:
        runs = [probe(arch, seed, train, sets, args) for seed in args.seeds]
        for i, row in enumerate(runs[0]):
            values = [run[i]["purity"] for run in runs]
            chance = np.mean([run[i]["chance"] for run in runs])
            loss = np.mean([run[i]["loss"] for run in runs])
            print(f"| {arch} | {row['step']} | {np.mean(values):.3f} ± {np.std(values):.3f} | {chance:.3f} "
                  f"| {loss:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
