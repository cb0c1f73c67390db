"""What the previews (config ``previews``) add to writing a label PNG: the label written alone
against the label plus its colour preview and its overlay (:class:`~pdso_ray.stages.previews.PreviewWriter`),
on label maps of ImageNet's typical size with a few blob-shaped classes and a photo-like image,
to local disk. Prints labels/s of both and their ratio (interleaved rounds, :mod:`benchmarks.timing`).

    python -m benchmarks.preview_cost --images 200 --height 375 --width 500

The ratio is what a writer that does nothing else would lose; the stages that write previews also
run DINO, SAM or a segmentation model per image, so their own loss is smaller.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.timing import interleave
from pdso_ray.data.imagenet_s import encode_label
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.previews import PreviewWriter
from pdso_ray.storage import Storage


def _samples(n: int, height: int, width: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (label, image) pairs: 1–3 elliptic objects of ids 1..50 on background; a smooth
    image with noise (JPEG-encodes like a photo, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    out = []
    for _ in range(n):
        label = np.zeros((height, width), np.int32)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.1, 0.4) * height, rng.uniform(0.1, 0.4) * width
            label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = rng.integers(1, 51)
        base = rng.uniform(60, 200, 3) + 40 * np.sin(xx / rng.uniform(20, 80))[..., None]
        image = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        out.append((label, image))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    samples = _samples(args.images, args.height, args.width)
    storage = Storage()
    with tempfile.TemporaryDirectory() as tmp:
        run = RunLayout(tmp)
        writer = PreviewWriter(storage, run)

        def labels(previews: bool) -> float:
            t0 = time.perf_counter()
            for i, (label, image) in enumerate(samples):
                image_id = f"train/n{i % 10:08d}/img_{i}"
                if previews:
                    writer.write("refined", image_id, label, image)
                storage.write_bytes(run.label_png("refined", image_id), encode_label(label))
            return len(samples) / (time.perf_counter() - t0)

        rounds = interleave({"labels": lambda: labels(False), "labels + previews": lambda: labels(True)},
                            rounds=args.rounds, warmup=True)
    alone, both = rounds.median("labels"), rounds.median("labels + previews")
    print(f"{args.images} labels of {args.height}x{args.width}, {rounds.count} rounds")
    print(f"labels alone:      {alone:8.1f} labels/s ({1000 / alone:.1f} ms each)")
    print(f"labels + previews: {both:8.1f} labels/s ({1000 / both:.1f} ms each)")
    print(f"ratio (with previews / alone): {rounds.ratio('labels + previews', 'labels'):.2f}; "
          f"previews add {1000 / both - 1000 / alone:.1f} ms per label")


if __name__ == "__main__":
    main()
