"""A held-out hard synthetic world in the ImageNet-S layout, made apart from
:mod:`pdso_ray.data.synthetic` so that what is measured on that generator can be checked on
another one (issue 21): other shapes, other textures, other backgrounds and crops.

    python -m benchmarks.heldout_world OUT [--classes 12] [--train-per-class 40]
        [--val-per-class 10] [--test-per-class 10] [--seed 0] [--class-seed S]

writes ``OUT/ImageNetS{C}/{train,validation,test}/<wnid>/<wnid>_<i>.JPEG``,
``{validation,test}-segmentation/<wnid>/<wnid>_<i>.png`` (label codec of
:mod:`pdso_ray.data.imagenet_s`: object pixels = class id, background 0, an ignore band of about
2 px (one each side) on every object border), ``classes.txt`` (sorted wnids) and ``world.json``
(parameters and every class's recipe). wnids are ``n90000001``.. so class k has id k.

What a class is (:func:`class_recipes`): a *silhouette* family with class-fixed parameters
(Fourier lobes, superformula, jagged polygon, lattice glyph, bitten disc unions, thick spiral;
:mod:`benchmarks.heldout_shapes`), 2-4 articulated *parts* (knobs, elbowed limbs, antennae,
forks) at class-specific angles around the body, a *texture* family with class-fixed scale and
orientation in the object's frame (Gabor noise, labyrinth, camouflage, Voronoi cells, 3-coloured
honeycomb, cross-hatching, fish scales, gradients), whether the parts carry the texture and a
contrasting rim. Never a colour: every object draws three random colours. Classes come in
look-alike groups of four: a base, the same body and parts with another texture, the same
texture and parts on another body, and the same body and texture with the parts rearranged.

An image (:func:`render_image`, a function of ``(seed, split, k, index)`` and the recipes): a
restyled crop of one of 20 real photographs from scikit-image and scikit-learn, or two meeting
along a line (:mod:`benchmarks.heldout_scene`), 0-3 clutter items behind (twigs, photo-filled
convex fragments, pebbles), one object or, in one image of five, two of the class, its body
20-80% (two: 20-50%) of the short side across (parts reach beyond), rotated, mirrored, stretched
0.7-1.4x, in three images of ten placed anywhere (so sometimes cut by the border), then occluders
in front (twigs, fragments, pebbles, a wire fence). Object pixels that clutter covers are
background. Sides are 80-200 px, never square. Rendering is 2x supersampled; a pixel is the
object's when at least half its subsamples are.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt, maximum_filter, minimum_filter
from tqdm import tqdm

from benchmarks.heldout_scene import BEHIND, IN_FRONT, SUPERSAMPLE, Canvas, background, load_photos, random_colours
from benchmarks.heldout_shapes import (
    BODY_RADIUS, PART_KINDS, SILHOUETTES, TEXTURES, TONES, Params, Part, body_edge, in_capsules, part_capsules,
    pixel_boxes,
)
from pdso_ray.data.imagenet_s import BACKGROUND_ID, GT_SPLITS, IGNORE_ID, SPLITS, dataset_dir, encode_label

SIDE_RANGE = (80, 200)
SIBLINGS = ("base", "texture", "shape", "arrangement")  # a look-alike group, in class order
SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}
MARKER_NAME = "world.json"
MAX_ATTEMPTS = 30


def wnid_for(k: int) -> str:
    """Folder name of held-out class k (1-based): ``n90000001``, ... (never a demo wnid)."""
    return f"n{90_000_000 + k:08d}"


# ---- classes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassRecipe:
    """What one class is; colours are absent on purpose (drawn per instance)."""

    group: int
    sibling: str
    silhouette: str
    silhouette_params: Params
    texture: str
    texture_params: Params
    parts: tuple[Part, ...]
    parts_textured: bool
    rim: float  # width of a contrasting rim in units of the object frame (0: none)


def _gaps(angles: np.ndarray) -> np.ndarray:
    a = np.sort(np.mod(angles, 2 * math.pi))
    return np.diff(np.append(a, a[0] + 2 * math.pi))


def arrangement_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far two part layouts (angles, radians) are apart once rotated and mirrored onto each
    other: the smallest, over cyclic shifts and reversal, of the largest difference of the gaps
    between consecutive parts."""
    ga, gb = _gaps(a), _gaps(b)
    candidates = [np.roll(g, s) for g in (gb, gb[::-1]) for s in range(len(gb))]
    return float(min(np.abs(ga - c).max() for c in candidates))


def _part_angles(rng: np.random.Generator, n: int) -> np.ndarray:
    while True:
        angles = rng.uniform(0, 2 * math.pi, n)
        if _gaps(angles).min() > 0.6:
            return angles


def class_recipes(classes: int, class_seed: int) -> list[ClassRecipe]:
    """Recipes of classes 1..``classes`` (list index k-1), in look-alike groups of four (SIBLINGS;
    the last group may be cut short). Deterministic for ``class_seed``; the first C recipes do
    not depend on ``classes``."""
    order = np.random.default_rng([class_seed, 0x0DE5])
    shapes = [str(s) for s in order.permutation(sorted(SILHOUETTES))]
    textures = [str(t) for t in order.permutation(sorted(TEXTURES))]
    recipes: list[ClassRecipe] = []
    for group in range(math.ceil(classes / len(SIBLINGS))):
        rng = np.random.default_rng([class_seed, group, 0x6E0])
        shape, other_shape = shapes[group % len(shapes)], shapes[(group + 3) % len(shapes)]
        texture, other_texture = textures[group % len(textures)], textures[(group + 5) % len(textures)]
        n = int(rng.integers(2, 5))
        kinds = [str(k) for k in rng.choice(PART_KINDS, n)]
        sizes = rng.uniform(0.8, 1.2, n)
        bends = rng.choice([-1, 1], n) * rng.uniform(0.5, 1.3, n)
        angles = _part_angles(rng, n)
        moved = _part_angles(rng, n)
        while arrangement_distance(angles, moved) < 0.7:
            moved = _part_angles(rng, n)
        base = dict(group=group, silhouette=shape, silhouette_params=SILHOUETTES[shape].draw(rng),
                    texture=texture, texture_params=TEXTURES[texture].draw(rng),
                    parts=tuple(Part(k, float(a), float(s), float(b))
                                for k, a, s, b in zip(kinds, angles, sizes, bends)),
                    parts_textured=bool(rng.random() < 0.5), rim=float(rng.choice([0.0, 0.07], p=[0.65, 0.35])))
        variants = {
            "base": {},
            "texture": dict(texture=other_texture, texture_params=TEXTURES[other_texture].draw(rng)),
            "shape": dict(silhouette=other_shape, silhouette_params=SILHOUETTES[other_shape].draw(rng)),
            "arrangement": dict(parts=tuple(Part(p.kind, float(a), p.size, -p.bend)
                                            for p, a in zip(base["parts"], moved))),
        }
        recipes += [ClassRecipe(**{**base, **variants[s], "sibling": s}) for s in SIBLINGS]
    return recipes[:classes]


# ---- objects ---------------------------------------------------------------------------------


def draw_object(canvas: Canvas, recipe: ClassRecipe, rng: np.random.Generator, body_extent: float,
                anywhere: bool) -> tuple[int, float]:
    """Paint one instance of ``recipe`` whose body is ``body_extent`` px across before stretching
    (parts reach beyond), centred at random: anywhere on the canvas when ``anywhere`` (it may then
    be cut by the border), else where it fits whole if it can. Returns (canvas pixels it covers
    before anything is laid over it, its whole area in pixels, also what lies beyond the border)."""
    family = SILHOUETTES[recipe.silhouette]
    params = family.jitter(recipe.silhouette_params, rng)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return family.inside(params, u, v)

    parts = [p.jittered(rng) for p in recipe.parts]
    capsules = np.concatenate([part_capsules(p, body_edge(inside, p.angle)) for p in parts])
    ends = np.hypot(capsules[:, [0, 2]], capsules[:, [1, 3]]).max(axis=1) + capsules[:, 4]
    reach = max(BODY_RADIUS, float(ends.max()))
    grid = np.linspace(-reach, reach, 48)
    gu, gv = np.meshgrid(grid, grid)
    unit_area = (inside(gu, gv) | in_capsules(gu, gv, capsules)).mean() * (2 * reach) ** 2
    scale = body_extent / (2 * BODY_RADIUS)
    stretch = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    sx, sy = scale * math.sqrt(stretch), scale / math.sqrt(stretch)
    theta, mirror = rng.uniform(0, 2 * math.pi), rng.choice([-1.0, 1.0])
    palette = random_colours(rng, TONES)
    rim_tone, part_tone = rng.integers(TONES, size=2)
    light = rng.normal(0, 0.15, 2)
    full_area = float(unit_area * sx * sy)
    radius = reach * max(sx, sy)
    if anywhere:
        cy, cx = rng.uniform(0, canvas.h), rng.uniform(0, canvas.w)
    else:
        my, mx = min(radius, canvas.h / 2), min(radius, canvas.w / 2)
        cy, cx = rng.uniform(my, canvas.h - my), rng.uniform(mx, canvas.w - mx)
    window = canvas.window(cy, cx, radius + 2)
    if window is None:
        return 0, full_area
    rows, cols, yy, xx = window
    cos, sin = math.cos(theta), math.sin(theta)
    dx, dy = xx - cx, yy - cy
    u = mirror * (dx * cos + dy * sin) / sx
    v = (-dx * sin + dy * cos) / sy
    body = inside(u, v)
    # each part is looked for only in its own bounding box: the capsules in canvas pixels
    ends_u, ends_v = mirror * capsules[:, [0, 2]] * sx, capsules[:, [1, 3]] * sy
    on_canvas = np.concatenate([cx + ends_u * cos - ends_v * sin, cy + ends_u * sin + ends_v * cos,
                                capsules[:, 4:] * max(sx, sy)], axis=1)[:, [0, 2, 1, 3, 4]]
    mask = body | in_capsules(u, v, capsules, pixel_boxes(on_canvas, rows, cols))
    # colour only the object's own points (a fraction of its window)
    pu, pv = u[mask], v[mask]
    tones = TEXTURES[recipe.texture].tones(recipe.texture_params, pu, pv, rng)
    low = np.clip(np.floor(tones).astype(int), 0, TONES - 2)
    frac = (tones - low)[:, None]
    colour = (1 - frac) * palette[low] + frac * palette[low + 1]
    if not recipe.parts_textured:
        colour[~body[mask]] = palette[part_tone]
    if recipe.rim > 0:
        rim = distance_transform_edt(body) < recipe.rim * min(sx, sy)
        colour[(body & rim)[mask]] = palette[rim_tone]
    colour = np.clip(colour * (1 + light[0] * pu + light[1] * pv)[:, None], 0, 1)
    canvas.paint(rows, cols, mask, colour, True)
    return int(mask.sum()), full_area


# ---- images ----------------------------------------------------------------------------------


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(H, W) with short side 80-160 and long side 1.15-1.75x as long (at most 200): never square."""
    short = int(rng.integers(SIDE_RANGE[0], 161))
    long = min(SIDE_RANGE[1], int(round(short * rng.uniform(1.15, 1.75))))
    return (short, long) if rng.random() < 0.6 else (long, short)


def render_image(recipe: ClassRecipe, k: int, rng: np.random.Generator,
                 photos: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One image of class ``k`` and its label map: (H x W x 3 uint8 RGB, H x W int32 with k,
    BACKGROUND_ID and IGNORE_ID). A placement of objects and occluders that hides half of what
    was drawn, leaves less than 30% of an object inside the image or shows under 1% of the
    image is redrawn over the same background from the same ``rng``."""
    h, w = image_size(rng)
    scene = Canvas(background(rng, photos, h * SUPERSAMPLE, w * SUPERSAMPLE))
    for _ in range(int(rng.integers(0, 4))):
        BEHIND[int(rng.integers(len(BEHIND)))](scene, rng, photos)
    short = min(scene.h, scene.w)
    for _ in range(MAX_ATTEMPTS):
        canvas = Canvas(scene.rgb.copy())
        count = 2 if rng.random() < 0.2 else 1
        drawn, whole = 0, 0.0
        for _ in range(count):
            extent = rng.uniform(0.2, 0.8 if count == 1 else 0.5) * short
            inside, area = draw_object(canvas, recipe, rng, extent, anywhere=rng.random() < 0.3)
            drawn, whole = drawn + inside, whole + area
        for kind, p in IN_FRONT:
            if rng.random() < p:
                kind(canvas, rng, photos)
        visible = int(canvas.owner.sum())
        if visible >= 0.5 * drawn and drawn >= 0.3 * whole and visible >= 0.01 * canvas.owner.size:
            break
    else:
        raise RuntimeError(f"class {k}: no visible placement in {MAX_ATTEMPTS} attempts")
    blocks = (h, SUPERSAMPLE, w, SUPERSAMPLE)
    rgb = canvas.rgb.reshape(*blocks, 3).mean(axis=(1, 3))
    rgb = rgb + rng.normal(0, 0.012, rgb.shape)
    image = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)
    label = np.where(canvas.owner.reshape(blocks).mean(axis=(1, 3)) >= 0.5, k, BACKGROUND_ID).astype(np.int32)
    border = maximum_filter(label, size=3, mode="nearest") != minimum_filter(label, size=3, mode="nearest")
    label[border] = IGNORE_ID
    return image, label


def sample(recipes: list[ClassRecipe], photos: list[np.ndarray], seed: int, split: str, k: int,
           index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Image ``index`` of class ``k`` in ``split``: (image, label, JPEG quality), a function of
    ``(seed, split, k, index)`` and the recipes only."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], k, index])
    image, label = render_image(recipes[k - 1], k, rng, photos)
    return image, label, int(rng.integers(80, 96))


# ---- the dataset -----------------------------------------------------------------------------


def make_heldout_world(out_dir: str | Path, classes: int = 12, train_per_class: int = 40, val_per_class: int = 10,
                       test_per_class: int = 10, seed: int = 0, class_seed: int | None = None,
                       progress: bool = True) -> Path:
    """Write ``ImageNetS{classes}/`` under ``out_dir`` (module docstring) and return its path.

    ``class_seed`` (default: ``seed``) draws the classes; ``seed`` the images. Re-running with the
    same parameters returns at once; a folder made with other parameters, or not by this
    function, raises FileExistsError.
    """
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    counts = dict(zip(SPLITS, (train_per_class, val_per_class, test_per_class)))
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"{split} images per class must be >= 0, got {n}")
    class_seed = seed if class_seed is None else class_seed
    root = Path(dataset_dir(str(out_dir), classes))
    recipes = class_recipes(classes, class_seed)
    marker = {"generator": "benchmarks.heldout_world", "classes": classes, "per_class": counts, "seed": seed,
              "class_seed": class_seed, "recipes": [asdict(r) for r in recipes]}
    marker = json.loads(json.dumps(marker))  # tuples -> lists, as they read back
    marker_path = root / MARKER_NAME
    if root.exists() and any(root.iterdir()):
        if not marker_path.exists():
            raise FileExistsError(f"{root} exists and was not made by this generator")
        if json.loads(marker_path.read_text()) == marker:
            return root
        raise FileExistsError(f"{root} holds a world made with other parameters; remove it first")
    photos = load_photos()
    wnids = [wnid_for(k) for k in range(1, classes + 1)]
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = [(split, k, i) for split in SPLITS for k in range(1, classes + 1) for i in range(counts[split])]
    for split, k, i in tqdm(jobs, desc=f"held-out world {classes} classes", disable=not progress):
        image, label, quality = sample(recipes, photos, seed, split, k, i)
        name = f"{wnids[k - 1]}_{i}"
        path = tmp / split / wnids[k - 1] / f"{name}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, format="JPEG", quality=quality)
        if split in GT_SPLITS:
            gt = tmp / GT_SPLITS[split] / wnids[k - 1] / f"{name}.png"
            gt.parent.mkdir(parents=True, exist_ok=True)
            gt.write_bytes(encode_label(label))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "classes.txt").write_text("".join(f"{w}\n" for w in wnids))
    (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1))
    if root.exists():
        root.rmdir()
    tmp.rename(root)
    return root


def contact_sheet(recipes: list[ClassRecipe], photos: list[np.ndarray], seed: int, per_class: int,
                  cell: int = 128) -> Image.Image:
    """A grid, one row per class: ``per_class`` train images, each beside its label map (object
    white, ignore band grey), every tile letterboxed into ``cell`` x ``cell``."""
    sheet = Image.new("RGB", (2 * per_class * cell, len(recipes) * cell), (32, 32, 32))
    for k in range(1, len(recipes) + 1):
        for i in range(per_class):
            image, label, _ = sample(recipes, photos, seed, "train", k, i)
            shown = np.where(label == k, 255, np.where(label == IGNORE_ID, 110, 0)).astype(np.uint8)
            for j, tile in enumerate((Image.fromarray(image), Image.fromarray(shown).convert("RGB"))):
                tile.thumbnail((cell - 2, cell - 2))
                sheet.paste(tile, ((2 * i + j) * cell, (k - 1) * cell))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heldout_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write ImageNetS{C}/ under")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="draws the images (and the classes unless --class-seed)")
    parser.add_argument("--class-seed", type=int, default=None, help="draws the classes (default: --seed)")
    parser.add_argument("--sheet", default=None, help="also save a PNG grid of 4 train images per class here")
    args = parser.parse_args(argv)
    try:
        root = make_heldout_world(args.out, args.classes, args.train_per_class, args.val_per_class,
                                  args.test_per_class, args.seed, args.class_seed)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.sheet:
        class_seed = args.seed if args.class_seed is None else args.class_seed
        contact_sheet(class_recipes(args.classes, class_seed), load_photos(), args.seed, 4).save(args.sheet)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
