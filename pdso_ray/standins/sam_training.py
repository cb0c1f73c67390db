"""Training of the class-agnostic SAM stand-in on synthetic object masks (torch/numpy/scipy only).

Data (:func:`render_scene`): one to ``max_objects`` objects of one synthetic world pasted over
each other, so masks are the *visible* parts (occlusion); most images go through a JPEG round trip
as the demo's files do. Three training scenes in four are of the ``shapes`` world
(:mod:`pdso_ray.data.synthetic.shapes`: any class of its ``pretrain`` pool, random colours, on a
crop of a ``pretrain``-pool photograph with no-class clutter), one in four of the ``hue`` world
(:mod:`pdso_ray.data.synthetic.hue`: any hue, texture and shape, on its backgrounds with their
grey clutter), which the demo runs on. Held-out ``shapes`` scenes (:func:`heldout_scenes`) come
from the ``eval`` pool: the measured IoU is on classes and photographs training never saw. No class
id reaches the model: a target is "the object under this prompt".

Prompts (:func:`sample_box`, :func:`sample_point`): boxes cut from degraded copies of the mask
(blocky patch-grid masks, eroded or dilated ones: the imperfect raw pseudo labels SPO boxes come
from) plus coordinate noise; positive points drawn uniformly inside the visible mask. Per image
one prompt kind for all its objects: box, box + point, or point alone.

Losses (SAM's): 20 × focal + 1 × dice per mask, at the original image resolution after SAM's own
postprocessing; the single-mask output (token 0) and the best of the three multimask outputs
(the one of lowest loss) are both trained; MSE between each predicted IoU and the IoU of its
thresholded mask. A second pass trains what SPO runs (docs/method.md §6): the same prompt plus
the low-res logits of pass 1's mask of highest *predicted* IoU as ``mask_input``, single mask,
same losses.

Every random draw comes from ``np.random.default_rng([seed, stream, ...])`` with a stream per
purpose (training scenes, held-out scenes), and the model's initialisation from
``torch.manual_seed(seed)``: for a seed and a thread count the trained weights are identical.
"""

from __future__ import annotations

import argparse
import functools
import io
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from pdso_ray.data.synthetic import hue, shapes

# Classes each pool's scenes draw from (the look-alike groups of shapes.class_set, many of them).
SCENE_CLASSES = 240
# hue.render_sample's class k of this many classes: hues spaced 1/999 apart and every texture ×
# shape × period combination.
STYLE_CLASSES = 999
WORLDS = ("shapes", "hue")
TRAIN_STREAM, HELDOUT_STREAM = 0, 1
PROMPT_KINDS = ("box", "box+point", "point")


@dataclass(frozen=True)
class Scene:
    """A synthetic image and the visible masks of its objects.

    Attributes:
        image: ``H×W×3`` uint8 RGB.
        masks: ``K×H×W`` bool, pairwise disjoint, K >= 1 (:func:`render_scene`'s have at least
            ``min_area`` pixels each).
        valid: ``H×W`` bool pixels that count in IoU (False on ground truth's ignore band), or
            None for all.
    """

    image: np.ndarray
    masks: np.ndarray
    valid: np.ndarray | None = None


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@functools.lru_cache(maxsize=None)
def _scene_classes(pool: str) -> list[shapes.ShapeClass]:
    return shapes.class_set(SCENE_CLASSES, 0, pool)


def _draw_object(rng: np.random.Generator, size: tuple[int, int], world: str, pool: str):
    """One object of ``world`` on its own background: ``(H×W×3 uint8 image, H×W bool mask)``."""
    if world == "hue":
        k = int(rng.integers(1, STYLE_CLASSES + 1))
        image, label = hue.render_sample(rng, k, STYLE_CLASSES, size, ignore_border=0)
        return image, label == k
    classes = _scene_classes(pool)
    image, label = shapes.render(rng, classes[int(rng.integers(len(classes)))], 1, size, ignore_border=0, pool=pool)
    return image, label == 1


def render_scene(
    rng: np.random.Generator,
    size_range: tuple[int, int] = (64, 160),
    max_objects: int = 3,
    min_area: int = 40,
    world: str = "shapes",
    pool: str = "pretrain",
) -> Scene:
    """A random scene of ``world`` (``shapes``: ``pool``'s classes on ``pool``'s photographs;
    ``hue``: any of its appearances): each side in ``size_range`` (inclusive), 1..``max_objects``
    objects.

    The first object is drawn on the full image (with its background and clutter); each further
    one on a canvas of 35–90 % of the image's sides, its object pixels pasted at a random place.
    Objects left with fewer than ``min_area`` visible pixels stay in the image as clutter but are
    no targets.
    """
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {WORLDS}")
    h, w = (int(s) for s in rng.integers(size_range[0], size_range[1] + 1, size=2))
    canvas, first = _draw_object(rng, (h, w), world, pool)
    canvas = canvas.copy()
    masks = [first]
    for _ in range(int(rng.integers(0, max_objects))):
        ph = max(16, int(h * rng.uniform(0.35, 0.9)))
        pw = max(16, int(w * rng.uniform(0.35, 0.9)))
        patch, patch_mask = _draw_object(rng, (ph, pw), world, pool)
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        full = np.zeros((h, w), dtype=bool)
        full[y0:y0 + ph, x0:x0 + pw] = patch_mask
        canvas[full] = patch[patch_mask]
        masks = [m & ~full for m in masks] + [full]
    if rng.random() < 0.8:
        canvas = _jpeg(canvas, int(rng.integers(60, 96)))
    masks = [m for m in masks if m.sum() >= min_area]
    if not masks:  # every object buried: draw again from the same stream
        return render_scene(rng, size_range, max_objects, min_area, world, pool)
    return Scene(canvas, np.stack(masks))


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``4`` float32 XYXY box with inclusive maxima (the convention of :mod:`pdso_ray.method.prompts`)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def degrade_mask(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A raw-pseudo-label-like copy of ``mask``: blocky (mean over a 4–12 px grid, thresholded
    at 0.25–0.75), eroded or dilated by 1–4 px, or unchanged; never empty."""
    u = rng.random()
    if u < 0.4:
        cell = int(rng.integers(4, 13))
        h, w = mask.shape
        gh, gw = -(-h // cell), -(-w // cell)
        padded = np.zeros((gh * cell, gw * cell), dtype=np.float32)
        padded[:h, :w] = mask
        frac = padded.reshape(gh, cell, gw, cell).mean(axis=(1, 3))
        out = np.repeat(np.repeat(frac > rng.uniform(0.25, 0.75), cell, 0), cell, 1)[:h, :w]
    elif u < 0.7:
        radius = int(rng.integers(1, 5))
        op = ndimage.binary_erosion if rng.random() < 0.5 else ndimage.binary_dilation
        out = op(mask, iterations=radius)
    else:
        out = mask
    return out if out.any() else mask


def sample_box(rng: np.random.Generator, mask: np.ndarray, noise: float = 0.1) -> np.ndarray:
    """A jittered box prompt of ``mask``: the box of :func:`degrade_mask`'s copy, each coordinate
    moved by N(0, ``noise`` × the box side) clipped to ±2σ, kept inside the image and ordered."""
    box = mask_box(degrade_mask(rng, mask))
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float32) + 1
    box = box + np.clip(rng.normal(0, 1, 4), -2, 2).astype(np.float32) * noise * side
    h, w = mask.shape
    box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
    return np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])],
                    dtype=np.float32)


def sample_point(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A ``2`` float32 ``(x, y)`` pixel drawn uniformly from ``mask``."""
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(ys)))
    return np.array([xs[i], ys[i]], dtype=np.float32)


# ---- model side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults (with seed 0, one thread) made the shipped
    asset, and the CLI prints them at the start of its log.

    ``prompt_mix``: probabilities of an image's prompt kind (box, box + point, point);
    ``box_noise``: σ of a box coordinate's jitter as a fraction of the box side;
    ``hue_share``: probability that a training scene is of the ``hue`` world (else ``shapes``)."""

    seed: int = 0
    steps: int = 6000
    images_per_step: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    size_range: tuple[int, int] = (64, 160)
    max_objects: int = 3
    box_noise: float = 0.1
    prompt_mix: tuple[float, float, float] = (0.4, 0.35, 0.25)
    hue_share: float = 0.25


def _focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per mask (mean over pixels): ``logits``/``target`` ``N×M×H×W`` → ``N×M``."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * ce * (1 - p_t) ** gamma).flatten(2).mean(-1)


def _dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft dice loss per mask: ``N×M×H×W`` → ``N×M``."""
    p = torch.sigmoid(logits).flatten(2)
    t = target.flatten(2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def _hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with the target: ``N×M×H×W`` → ``N×M`` (1 when both are empty)."""
    pred = (logits > 0).flatten(2)
    t = target.flatten(2) > 0.5
    inter = (pred & t).sum(-1).float()
    union = (pred | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


class SceneBatch:
    """Scenes prepared for SAM as ``SamMaskPredictor`` prepares them: ``images`` the resized
    ``3×h×w`` float tensors (``ResizeLongestSide``; ``Sam.preprocess`` pads them later),
    ``items`` per scene ``(boxes N×4 | None, points (N×1×2, N×1 labels) | None, target N×H×W
    float, input size (h, w), original size (H, W))``, prompts drawn from ``rng`` and mapped
    into the model's input frame."""

    def __init__(self, scenes: list[Scene], rng: np.random.Generator, cfg: TrainConfig, img_size: int):
        transform = ResizeLongestSide(img_size)
        self.items = []
        self.images = []
        for scene in scenes:
            resized = transform.apply_image(scene.image)
            self.images.append(torch.as_tensor(resized).permute(2, 0, 1).float())
            kind = PROMPT_KINDS[int(rng.choice(3, p=cfg.prompt_mix))]
            size = scene.image.shape[:2]
            boxes = points = None
            if kind != "point":
                raw = np.stack([sample_box(rng, m, cfg.box_noise) for m in scene.masks])
                boxes = torch.as_tensor(transform.apply_boxes(raw.astype(np.float64), size), dtype=torch.float)
            if kind != "box":
                raw = np.stack([sample_point(rng, m) for m in scene.masks])[:, None]
                coords = torch.as_tensor(transform.apply_coords(raw.astype(np.float64), size), dtype=torch.float)
                points = (coords, torch.ones(coords.shape[:2], dtype=torch.int))
            target = torch.as_tensor(scene.masks, dtype=torch.float32)
            self.items.append((boxes, points, target, tuple(resized.shape[:2]), size))


def _decode(model: Sam, emb: torch.Tensor, boxes, points, mask_input, input_size, size, outputs: slice):
    """SAM's decoder for the prompts of one image, all four output tokens (0: single mask,
    1..3: multimask): logits at the original resolution of the ``outputs`` tokens ``N×m×H×W``
    (SAM's postprocessing, the costly part), low-res logits ``N×4×L×L``, predicted IoU ``N×4``."""
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    low_res, iou = model.mask_decoder.predict_masks(
        image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
    return model.postprocess_masks(low_res[:, outputs], input_size, size), low_res, iou


def batch_loss(model: Sam, batch: SceneBatch, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch (mean over prompts) and, for the log, per-prompt means of
    its parts: ``mask`` (pass 1: token 0 + best multimask token), ``iou`` (pass 1 IoU MSE, four
    tokens), ``pass2`` (pass 2 mask loss) and ``iou_multi`` (true IoU of the multimask output
    SPO would pick, by predicted IoU)."""
    x = torch.stack([model.preprocess(img[None])[0] for img in batch.images])
    embeddings = model.image_encoder(x)
    totals = {"mask": 0.0, "iou": 0.0, "pass2": 0.0, "iou_multi": 0.0}
    loss = torch.zeros(())
    n_prompts = 0
    for b, (boxes, points, target, input_size, size) in enumerate(batch.items):
        emb = embeddings[b:b + 1]
        tgt = target[:, None]

        def mask_losses(logits):
            return cfg.focal_weight * _focal(logits, tgt.expand_as(logits)) + cfg.dice_weight * _dice(
                logits, tgt.expand_as(logits))

        logits, low_res, iou_pred = _decode(model, emb, boxes, points, None, input_size, size, slice(0, 4))
        per_mask = mask_losses(logits)  # N×4: token 0 single, tokens 1..3 multimask
        with torch.no_grad():
            iou_true = _hard_iou(logits, tgt.expand_as(logits))
        mask_term = per_mask[:, 0] + per_mask[:, 1:].min(dim=1).values
        iou_term = ((iou_pred - iou_true) ** 2).sum(dim=1)

        # Pass 2 as SPO runs it: pass 1's multimask output of highest predicted IoU as mask_input.
        best = 1 + iou_pred[:, 1:].argmax(dim=1)
        mask_input = low_res[torch.arange(len(best)), best][:, None].detach()
        logits2, _, iou_pred2 = _decode(model, emb, boxes, points, mask_input, input_size, size, slice(0, 1))
        per_mask2 = mask_losses(logits2)[:, 0]
        with torch.no_grad():
            iou_true2 = _hard_iou(logits2, tgt)[:, 0]
        pass2_term = per_mask2 + cfg.iou_weight * (iou_pred2[:, 0] - iou_true2) ** 2

        loss = loss + (mask_term + cfg.iou_weight * iou_term + pass2_term).sum()
        n_prompts += len(best)
        totals["mask"] += float(mask_term.detach().sum())
        totals["iou"] += float(iou_term.detach().sum())
        totals["pass2"] += float(per_mask2.detach().sum())
        totals["iou_multi"] += float(iou_true[torch.arange(len(best)), best].sum())
    return loss / n_prompts, {k: v / n_prompts for k, v in totals.items()}


def train(model: Sam, cfg: TrainConfig, log_every: int = 100, log=print) -> list[float]:
    """Train ``model`` in place for ``cfg.steps`` AdamW steps (linear warm-up, cosine decay);
    returns the loss of every step. The model is left in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    img_size = model.image_encoder.img_size

    def lr_at(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + np.cos(np.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, step])
        scenes = [render_scene(rng, cfg.size_range, cfg.max_objects,
                               world="hue" if rng.random() < cfg.hue_share else "shapes")
                  for _ in range(cfg.images_per_step)]
        loss, parts = batch_loss(model, SceneBatch(scenes, rng, cfg, img_size), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
        if log_every and (step + 1) % log_every == 0:
            recent = np.mean(losses[-log_every:])
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" lr {sched.get_last_lr()[0]:.2e} wall {time.perf_counter() - start:.0f}s"
                + f" cpu {time.process_time() - cpu_start:.0f}s")
    model.eval()
    return losses


def heldout_scenes(n: int, seed: int = 0, **scene_kwargs) -> list[Scene]:
    """``n`` scenes (of :func:`render_scene`'s ``world``, default ``shapes``) from the held-out
    stream, which no training run draws from; ``shapes`` scenes of the ``eval`` pool's classes and
    photographs, none of which training sees."""
    rng = np.random.default_rng([seed, HELDOUT_STREAM])
    return [render_scene(rng, pool="eval", **scene_kwargs) for _ in range(n)]


# ---- evaluation ------------------------------------------------------------------------------

EVAL_PROTOCOLS = ("box", "box_spo", "point", "jittered_box", "jittered_box_spo")


def _interior_point(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from the background, ``(x, y)`` (a saliency peak's stand-in)."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), mask.shape)
    return np.array([x, y], dtype=np.float32)


def _two_pass(predictor, boxes: np.ndarray) -> np.ndarray:
    """SPO's passes (``refine_spo``): multimask, best by predicted IoU, its low-res logits as
    ``mask_input`` for a single-mask pass. Returns ``N×H×W`` bool."""
    _, iou, low_res = predictor.predict(boxes=boxes, multimask=True, return_masks=False)
    mask_input = low_res[np.arange(len(boxes)), np.argmax(iou, axis=1)][:, None]
    masks, _, _ = predictor.predict(boxes=boxes, mask_input=mask_input, multimask=False)
    return masks[:, 0]


def evaluate(predictor, scenes: list[Scene], protocol: str, seed: int = 0) -> np.ndarray:
    """IoU of the predicted mask of every object of ``scenes`` under a prompt protocol.

    ``predictor`` is a :class:`pdso_ray.models.sam.SamMaskPredictor` (any ``MaskPredictor``).
    Protocols: ``box`` (tight box, single mask), ``box_spo`` (tight box, SPO's two passes),
    ``point`` (the mask's most interior pixel, multimask, best by predicted IoU),
    ``jittered_box`` / ``jittered_box_spo`` (a :func:`sample_box` box from
    ``default_rng([seed, HELDOUT_STREAM, 1])``, one pass / two passes). IoU counts only
    ``scene.valid`` pixels.

    Returns:
        ``K`` float64 IoUs, objects in scene order.
    """
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {EVAL_PROTOCOLS}")
    rng = np.random.default_rng([seed, HELDOUT_STREAM, 1])
    ious = []
    for scene in scenes:
        predictor.set_image(scene.image)
        if protocol.startswith("jittered"):
            boxes = np.stack([sample_box(rng, m) for m in scene.masks])
        else:
            boxes = np.stack([mask_box(m) for m in scene.masks])
        if protocol in ("box", "jittered_box"):
            pred = predictor.predict(boxes=boxes, multimask=False)[0][:, 0]
        elif protocol == "point":
            points = np.stack([_interior_point(m) for m in scene.masks])[:, None]
            masks, iou, _ = predictor.predict(points=points, point_labels=np.ones(points.shape[:2], np.int64))
            pred = masks[np.arange(len(masks)), np.argmax(iou, axis=1)]
        else:
            pred = _two_pass(predictor, boxes)
        valid = np.ones(scene.image.shape[:2], bool) if scene.valid is None else scene.valid
        for p, m in zip(pred, scene.masks):
            inter = np.count_nonzero(p & m & valid)
            union = np.count_nonzero((p | m) & valid)
            ious.append(inter / union if union else 1.0)
    return np.asarray(ious, dtype=np.float64)


def main(argv: list[str] | None = None) -> None:
    """``python -m pdso_ray.standins.sam_training --out PATH [--seed N] [--steps N] [--threads N]``:
    train the stand-in from scratch, write its official-layout checkpoint, print held-out IoUs."""
    from pdso_ray.models.sam import SamMaskPredictor, build_sam, save_sam_checkpoint
    from pdso_ray.standins import SAM_ARCH

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint path or URL to write")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the weights are reproducible for a seed and thread count")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(seed=args.seed, steps=args.steps)
    print(f"config {asdict(cfg)} arch {SAM_ARCH} threads {args.threads}", flush=True)
    torch.manual_seed(cfg.seed)
    model = build_sam(SAM_ARCH, None)
    start, cpu_start = time.perf_counter(), time.process_time()
    train(model, cfg, log=lambda line: print(line, flush=True))
    print(f"trained in {time.perf_counter() - start:.0f}s wall, {time.process_time() - cpu_start:.0f}s CPU",
          flush=True)
    save_sam_checkpoint(model, args.out)
    predictor = SamMaskPredictor(model, device="cpu")
    for world in WORLDS:
        scenes = heldout_scenes(100, seed=cfg.seed, world=world)
        for protocol in EVAL_PROTOCOLS:
            ious = evaluate(predictor, scenes, protocol)
            print(f"held-out {world} {protocol}: mean IoU {ious.mean():.3f} over {len(ious)} objects", flush=True)


if __name__ == "__main__":
    main()
