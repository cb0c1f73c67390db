"""Stage-1 throughput against a bare model forward, measured in the same run.

The pipeline side is the real ``features`` stage (list → read bytes → decode → DINO → Parquet) on
a synthetic ImageNet-S folder of JPEGs; the baseline is the same model doing the same model work in
one process on pre-made tensors (each batch of B images plus their B flips, as the stage does).
The two take turns for ``--rounds`` rounds (stage, bare, stage, bare, ...; benchmarks/timing.py):
each round starts Ray, runs the stage on all images into a fresh run folder, stops Ray, then
times ``--bare-images`` images of bare forward. The pipeline time includes actor start-up and
model load (not ``ray.init``), as a user would see it. Printed: both rates per round, their
medians, and the ratio pipeline / bare = the median of the per-round ratios, so drift in the
machine's speed (a shared host) moves one round, not the result; a ratio above 1 is flagged as a
measurement error (the stage does the bare forward's work and more).

    python benchmarks/features_throughput.py                  # ViT-S/8 at 224, random init, CPU
    python benchmarks/features_throughput.py --images 64 --arch vit_tiny_test   # quick check

On a GPU host the stage uses bf16 autocast; pass ``--gpu`` to run the baseline the same way.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import torch

from timing import MIN_ROUNDS, bare_loop_flag, interleave, repeat, timed


def bare_forward(arch: str, size: int, images: int, batch: int, device: str) -> float:
    """Images/s of the model alone on one pre-made batch (+ its flips), after one warm-up forward."""
    from pdso_ray.models.dino import build_dino

    model = build_dino(arch, None, img_size=size).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    x2 = torch.cat([x, torch.flip(x, dims=[3])])
    steps = -(-images // batch)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        model(x2)  # warm-up
        seconds = timed(lambda: repeat(lambda: model(x2), steps), device)[0]
    return steps * batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--bare-images", type=int, default=64, help="images per bare-forward measurement")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="interleaved rounds (>= 3)")
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
        # One model actor using every core (decode fuses into it on a CPU-only node); on a GPU
        # node, decode runs in separate CPU tasks feeding the GPU actor.
        overrides = [f"data.root={tmp}/data", f"data.classes={classes}",
                     "stages=features", f"models.dino.arch={args.arch}",
                     f"models.dino.image_size={args.size}", "models.allow_random_init=true",
                     f"features.batch_size={args.batch}", "features.min_actors=1",
                     "features.max_actors=1", "ray.num_cpus=null"]
        if not args.gpu:
            overrides += [f"features.cpus_per_actor={args.cpus}", f"features.decode_cpus={args.cpus}"]
        runs = itertools.count()

        def stage() -> dict[str, float]:
            # Ray runs only while the stage does: the bare forward has the machine to itself.
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            try:
                cfg = load_config(None, [*overrides, f"output={tmp}/run{next(runs)}"])
                start = time.perf_counter()
                summary = run_pipeline(cfg)
                seconds = time.perf_counter() - start
            finally:
                ray.shutdown()
            assert summary["images_ok"] == n, summary
            return {"rate": n / seconds, "seconds": seconds}

        rounds = interleave({"stage": stage,
                             "bare": lambda: bare_forward(args.arch, args.size, args.bare_images, args.batch, device)},
                            args.rounds)
    ratio = rounds.ratio("stage", "bare")
    print(f"images: {n} ({args.arch} at {args.size}px, batch {args.batch}, {device}, "
          f"{args.cpus} CPUs), {rounds.count} interleaved rounds")
    print("bare forward (image + flip):  " + " ".join(f"{v:7.2f}" for v in rounds.values("bare"))
          + f"  img/s, median {rounds.median('bare'):.2f}")
    print("features stage end to end:    " + " ".join(f"{v:7.2f}" for v in rounds.values("stage"))
          + f"  img/s, median {rounds.median('stage'):.2f} ({rounds.median('stage', 'seconds'):.1f} s, "
          "actor start-up included)")
    print("per-round ratios:             " + " ".join(f"{v:7.3f}" for v in rounds.ratios("stage", "bare")))
    print(f"ratio pipeline / bare: {ratio:.3f} (median of the rounds)")
    flag = bare_loop_flag(ratio)
    if flag:
        print(flag)


if __name__ == "__main__":
    main()
