"""Stage-1 throughput against a bare model forward, measured in the same run.

The pipeline side is the real ``features`` stage (list → read bytes → decode → DINO → Parquet) on
a synthetic ImageNet-S folder of JPEGs; the baseline is the same model doing the same model work in
one process on pre-made tensors (each batch of B images plus their B flips, as the stage does).
Printed: images/s of both and their ratio (pipeline / bare). The pipeline time includes actor
start-up and model load (not ``ray.init``), as a user would see it. The bare forward is measured
just before and just after the stage and averaged, so that drift in the machine's speed (a shared
host) does not land on one side only; both values are printed.

    python benchmarks/features_throughput.py                  # ViT-S/8 at 224, random init, CPU
    python benchmarks/features_throughput.py --images 64 --arch vit_tiny_test   # quick check

On a GPU host the stage uses bf16 autocast; pass ``--gpu`` to run the baseline the same way.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def bare_forward(arch: str, size: int, images: int, batch: int, device: str) -> float:
    from pdso_ray.models.dino import build_dino

    model = build_dino(arch, None, img_size=size).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    x2 = torch.cat([x, torch.flip(x, dims=[3])])
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        model(x2)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        done = 0
        while done < images:
            model(x2)
            done += batch
        if device == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--bare-images", type=int, default=64,
                        help="images per bare-forward measurement (one before, one after the stage)")
    parser.add_argument("--arch", default="vit_small_patch8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    import ray

    from pdso_ray.config import load_config
    from pdso_ray.data.synthetic import make_demo_dataset
    from pdso_ray.pipeline import run_pipeline

    device = "cuda" if args.gpu else "cpu"
    torch.set_num_threads(args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        classes = 4
        per_class = -(-args.images // classes)
        make_demo_dataset(os.path.join(tmp, "data"), classes=classes, train_per_class=per_class,
                          val_per_class=1, test_per_class=1, image_size=(375, 500))
        n = classes * per_class
        bare_before = bare_forward(args.arch, args.size, args.bare_images, args.batch, device)

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        # One model actor using every core (decode fuses into it on a CPU-only node); on a GPU
        # node, decode runs in separate CPU tasks feeding the GPU actor.
        overrides = [f"data.root={tmp}/data", f"output={tmp}/run", f"data.classes={classes}",
                     "stages=features", f"models.dino.arch={args.arch}",
                     f"models.dino.image_size={args.size}", "models.allow_random_init=true",
                     f"features.batch_size={args.batch}", "features.min_actors=1",
                     "features.max_actors=1", "ray.num_cpus=null"]
        if not args.gpu:
            overrides += [f"features.cpus_per_actor={args.cpus}", f"features.decode_cpus={args.cpus}"]
        cfg = load_config(None, overrides)
        start = time.perf_counter()
        summary = run_pipeline(cfg)
        seconds = time.perf_counter() - start
        ray.shutdown()
        bare_after = bare_forward(args.arch, args.size, args.bare_images, args.batch, device)
    assert summary["images_ok"] == n, summary
    bare = (bare_before + bare_after) / 2
    pipeline = n / seconds
    print(f"images: {n} ({args.arch} at {args.size}px, batch {args.batch}, {device}, "
          f"{args.cpus} CPUs)")
    print(f"bare forward (image + flip): {bare:7.2f} img/s (before {bare_before:.2f}, after {bare_after:.2f})")
    print(f"features stage end to end:   {pipeline:7.2f} img/s ({seconds:.1f} s, actor start-up included)")
    print(f"ratio pipeline / bare: {pipeline / bare:.3f}")


if __name__ == "__main__":
    main()
