"""DINO pretraining throughput: a full training step against a bare training loop of the same
model and batch, in the same run, interleaved.

    python benchmarks/pretrain_throughput.py [--rounds 5] [--steps 10] [--batch 64] [--threads 1]

The path is :meth:`pdso_ray.models.dino_pretrain.DinoPretrainer.step` on raw uint8 images
(``--input`` px squares, as the ``pretrain`` stage's Ray Data decode delivers them): multi-crop
augmentation of the whole batch on tensors, teacher and student forward, DINO loss, backward,
gradient clipping, last-layer freezing check, AdamW, EMA, collapse diagnostics. The baseline is
the bare loop a hand-written script would run on views made beforehand (teacher and student
forward, DINO loss, backward, AdamW, EMA). The recipe is the stand-in's
(:class:`~pdso_ray.models.dino_pretrain.DinoPretrainConfig` defaults: ``vit_tiny_reg4``, 2 global
views of 64 px, 1024 prototypes). The ratio (path / bare, steps per second) is the median over
``--rounds`` rounds, each running ``--steps`` steps of each in turn (A, B, A, B, ...); the target on
CPU is >= 0.8. A ratio above 1 is flagged: a bare loop cannot be slower than the path.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_train_checks import bare_pretrain_step  # noqa: E402
from timing import bare_loop_flag, interleave, repeat, timed  # noqa: E402

from pdso_ray.data.synthetic.hue import render_sample  # noqa: E402
from pdso_ray.method.multicrop import multicrop  # noqa: E402
from pdso_ray.models.dino_pretrain import DinoPretrainConfig, DinoPretrainer  # noqa: E402
from pdso_ray.stages.read_decode import resize_square  # noqa: E402


def synthetic_batch(batch: int, size: int, seed: int = 0) -> np.ndarray:
    """B×S×S×3 uint8 demo-like images (5 classes)."""
    out = []
    for i in range(batch):
        rng = np.random.default_rng([seed, i])
        image, _ = render_sample(rng, 1 + i % 5, 5, (size + 16, size + 24))
        out.append(resize_square(image, size))
    return np.stack(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps of each contender per round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input", type=int, default=96, help="side of the uint8 input images")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    # One long epoch, no warm-up and no frozen prototypes: every timed step does the full work.
    cfg = DinoPretrainConfig(epochs=1, steps_per_epoch=100_000, warmup_epochs=0.0, freeze_last_layer_epochs=0.0)
    trainer = DinoPretrainer(cfg)
    images = torch.as_tensor(synthetic_batch(args.batch, args.input))
    views = multicrop(images, cfg.crops, torch.Generator().manual_seed(0))

    def steps_per_s(step) -> float:
        return args.steps / timed(lambda: repeat(step, args.steps))[0]

    rounds = interleave({"step": lambda: steps_per_s(lambda: trainer.step(images)),
                         "bare": lambda: steps_per_s(lambda: bare_pretrain_step(trainer, views, bf16=False))}, args.rounds, warmup=True)
    ratio = rounds.ratio("step", "bare")
    print(f"DINO pretraining, {cfg.arch}, batch {args.batch} of {args.input} px uint8, "
          f"{args.threads} thread(s), {rounds.count} rounds of {args.steps} steps")
    print(f"  DinoPretrainer.step  {rounds.median('step'):.3f} steps/s  "
          f"({rounds.median('step') * args.batch:.1f} images/s)")
    print(f"  bare loop            {rounds.median('bare'):.3f} steps/s")
    print(f"  ratio (median over rounds) {ratio:.3f}  per round: "
          + " ".join(f"{r:.3f}" for r in rounds.ratios("step", "bare"))
          + (f"  {bare_loop_flag(ratio)}" if bare_loop_flag(ratio) else ""))


if __name__ == "__main__":
    main()
