"""Images/s of the batched SPO refiner against a naive per-prompt loop, same model, same run.

    python benchmarks/sam_refine.py [--arch vit_tiny_test] [--img-size N] [--images 10] [--repeat 3]

Model: random-init SAM of ``--arch`` built by :func:`pdso_ray.models.sam.build_sam` (no weights
are needed to time it; masks are meaningless but the work is the same). Data: ``--images``
synthetic ``--height``×``--width`` images (textured background, ``--classes`` classes ×
``--components`` coloured shapes each) with a raw label holding those components and a
saliency map peaking inside the main class.

What is compared (same prompts from :func:`build_prompts`, same merge rule):

* **batched** — :func:`pdso_ray.method.refiners.refine_spo` with :class:`SamMaskPredictor`
  (bf16 autocast on CUDA, fp32 on CPU): one ``set_image`` per image, then per pass one decoder
  call over all box-only prompts of all classes plus one for the box carrying the saliency peak.
* **naive** — the loop one writes without thinking about batching, in fp32 everywhere:
  for each class, ``set_image`` again (the image is re-embedded once per class), then for each
  box of that class one pass-1 call (3 masks, best by predicted IoU) and one pass-2 call
  (``mask_input`` = the best low-res logits); a class's mask is the union of its boxes' masks,
  merged main class first exactly like ``refine_spo``.

With C classes and B boxes per image, batched runs 1 encoder pass and 4 decoder calls (2 when
no box holds the peak), naive C encoder passes and 2·B decoder calls; batched also skips pass
1's full-resolution masks (``return_masks=False``), which naive code computes and drops.
Printed: images/s of both by wall clock and by process CPU time, measured in ``--repeat``
interleaved rounds (naive, batched, naive, batched, ...; one pass over all images each, after one
warm-up image; benchmarks/timing.py), their medians, the speed-ups (the median of the per-round
ratios), the call counts, and the share of pixels where both labels agree (100% in fp32:
batching changes no prompt).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import ndimage

from pdso_ray.method.prompts import build_prompts
from pdso_ray.method.refiners import RefineContext, RefineParams, merge_class_masks, refine_spo
from pdso_ray.models.sam import SamMaskPredictor, build_sam
from timing import MIN_ROUNDS, interleave, timed


def synthetic_scenes(n: int, height: int, width: int, classes: int, components: int, seed: int):
    """``n`` (image H×W×3 uint8, raw label H×W int32, saliency H×W float) triples; class 1 is the
    largest (main) class, the saliency peak lies in its first component."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    scenes = []
    for _ in range(n):
        image = rng.integers(0, 60, size=(height, width, 3)).astype(np.uint8)
        raw = np.zeros((height, width), np.int32)
        for cls in range(1, classes + 1):
            color = rng.integers(80, 256, size=3)
            for _ in range(components):
                for _attempt in range(20):
                    cy = rng.integers(height // 8, height - height // 8)
                    cx = rng.integers(width // 8, width - width // 8)
                    ry = rng.integers(height // 16, height // 7) + (classes - cls) * 2
                    rx = rng.integers(width // 16, width // 7) + (classes - cls) * 2
                    shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                    if not (raw[shape] != 0).any():
                        break
                shape &= raw == 0
                raw[shape] = cls
                image[shape] = np.clip(color + rng.integers(-20, 20, size=(int(shape.sum()), 3)), 0, 255)
        first = ndimage.label(raw == 1)[0] == 1
        sal = ndimage.gaussian_filter((raw > 0).astype(float), 3) + 0.5 * first
        scenes.append((image, raw, sal / sal.max()))
    return scenes


def naive_spo(image, raw_label, saliency, context, predictor):
    """SPO written as a per-class, per-box loop (see the module docstring)."""
    prompts = build_prompts(raw_label, saliency, context.classes, context.params.min_area)
    class_masks = []
    for p in prompts:
        predictor.set_image(image)
        union = np.zeros(raw_label.shape, bool)
        for j, box in enumerate(p.boxes):
            pts = lab = None
            if p.point_box == j:
                pts = np.array([[p.point]], np.float32)
                lab = np.array([[1]])
            _, iou, low = predictor.predict(box[None], pts, lab, None, multimask=True)
            best = low[:, int(np.argmax(iou[0]))][:, None]
            masks, _, _ = predictor.predict(box[None], pts, lab, best, multimask=False)
            union |= masks[0, 0]
        class_masks.append((p.class_id, union))
    return merge_class_masks(raw_label.shape, class_masks)


class CallCounter:
    """Counts forward calls of the image encoder and mask decoder."""

    def __init__(self, model):
        self.encoder = self.decoder = 0
        model.image_encoder.register_forward_hook(lambda *a: self._hit("encoder"))
        model.mask_decoder.register_forward_hook(lambda *a: self._hit("decoder"))

    def _hit(self, name):
        setattr(self, name, getattr(self, name) + 1)


def rates(fns, scenes, contexts, rounds, device):
    """Images/s of each function over all scenes, by wall clock and by this process's CPU time,
    in interleaved rounds (:func:`timing.interleave`), plus each one's labels from its last
    round. CPU time is the steadier measure on a shared CPU machine (with ``--threads 1``), wall
    clock the one that counts on a GPU."""
    labels = {}

    def contender(name, fn):
        def run():
            wall, cpu, labels[name] = timed(lambda: [fn(*s, c) for s, c in zip(scenes, contexts)], device)
            return {"wall": len(scenes) / wall, "cpu": len(scenes) / cpu}
        return run

    return interleave({name: contender(name, fn) for name, fn in fns.items()}, rounds), labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="vit_tiny_test")
    ap.add_argument("--img-size", type=int, default=None, help="SAM input side (default: the arch's)")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--components", type=int, default=2)
    ap.add_argument("--min-area", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=MIN_ROUNDS, help="interleaved rounds (>= 3)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (batched side)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a loaded machine, 1 avoids OpenMP spin-wait noise)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_sam(args.arch, None, img_size=args.img_size)
    counter = CallCounter(model)
    fast = SamMaskPredictor(model, device=args.device, compile=args.compile)
    naive = SamMaskPredictor(model, device=args.device, bf16=False)
    scenes = synthetic_scenes(args.images, args.height, args.width, args.classes, args.components, args.seed)
    params = RefineParams(min_area=args.min_area)
    contexts = [RefineContext(1, tuple(range(2, args.classes + 1)), params=params) for _ in scenes]
    boxes = sum(len(p.boxes) for (_, raw, sal), ctx in zip(scenes, contexts)
                for p in build_prompts(raw, sal, ctx.classes, args.min_area))

    def run_fast(image, raw, sal, ctx):
        return refine_spo(image, raw, sal, ctx, fast).label

    def run_naive(image, raw, sal, ctx):
        return naive_spo(image, raw, sal, ctx, naive)

    calls = {}
    for name, fn in (("batched", run_fast), ("naive", run_naive)):  # also the warm-up
        counter.encoder = counter.decoder = 0
        fn(*scenes[0], contexts[0])
        calls[name] = (counter.encoder, counter.decoder)
    rounds, labels = rates({"naive": run_naive, "batched": run_fast}, scenes, contexts, args.repeat, fast.device)
    ips = {name: rounds.median(name, "wall") for name in ("naive", "batched")}
    ips_cpu = {name: rounds.median(name, "cpu") for name in ("naive", "batched")}
    agree = np.mean([np.mean(a == b) for a, b in zip(labels["batched"], labels["naive"])])

    print(f"device {fast.device}, torch threads {torch.get_num_threads()}, arch {args.arch}, "
          f"SAM input {model.image_encoder.img_size} px, {args.images} images {args.height}x{args.width}, "
          f"{boxes / len(scenes):.1f} boxes/image over {args.classes} classes")
    print(f"calls per image (encoder, decoder): batched {calls['batched']}, naive {calls['naive']}")
    precision = "bf16" if fast.device.type == "cuda" else "fp32"
    print(f"{'':8s}{'wall img/s':>12s}{'CPU img/s':>12s}")
    print(f"{'naive':8s}{ips['naive']:12.2f}{ips_cpu['naive']:12.2f}  (fp32, set_image per class, calls per box)")
    print(f"{'batched':8s}{ips['batched']:12.2f}{ips_cpu['batched']:12.2f}  ({precision}"
          f"{', compiled encoder' if args.compile else ''})")
    print(f"speed-up {rounds.ratio('batched', 'naive', 'wall'):.2f}x wall, "
          f"{rounds.ratio('batched', 'naive', 'cpu'):.2f}x CPU time (medians of {rounds.count} rounds: "
          + " ".join(f"{v:.2f}" for v in rounds.ratios("batched", "naive", "wall")) + " wall); "
          f"labels agree on {100 * agree:.2f}% of pixels")

if __name__ == "__main__":
    main()
