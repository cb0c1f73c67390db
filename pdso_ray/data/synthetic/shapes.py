"""The hard synthetic world: a class is a shape, a texture and a structure, never a colour.

A class (:class:`ShapeClass`) is a *body* silhouette, a two-tone *texture* on the body (with its
own period and orientation in the object's frame), and *parts*: small shapes attached to the body
at class-specific directions (an arrangement: a head, ears, legs, a tail, a crown of spikes...).
Every instance draws its colours at random (the two tones of the texture, the parts' colour), its
size (20-80% of the image's short side), rotation, aspect distortion and position (sometimes cut
by the image border), and sits on a crop of a real photograph (:mod:`.photos`) with no-class
clutter around it and sometimes over it. A colour statistic of the image says nothing about the
class; the stand-in models must see shape, texture and structure.

Classes come in look-alike groups of three (:func:`class_set`): a base class and two siblings that
each change one of its three attributes (body, texture, arrangement), as sibling classes of
ImageNet share most of their look. Class combinations are split into two disjoint *pools* by a
hash of the combination: ``eval`` (every demo, test and benchmark set) and ``pretrain`` (the data
the stand-in DINO learns from), so the stand-in is always measured on classes it never saw.

Conventions: object coordinates ``(u, v)`` with the body's nominal radius 1, ``u`` to the
object's right and ``v`` down; directions in degrees from ``+u`` towards ``+v`` (-90 = top).
Images are H×W×3 uint8 RGB; labels H×W int32 in the ImageNet-S codec (class id on the visible
object, 0 elsewhere, IGNORE_ID on a band along the visible object's border).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pdso_ray.data.imagenet_s import BACKGROUND_ID, IGNORE_ID
from pdso_ray.data.synthetic.drawing import border_band, hsv_colour
from pdso_ray.data.synthetic.photos import background

BODIES = ("ellipse", "rectangle", "triangle", "star", "diamond", "hexagon", "cross", "crescent",
          "heart", "ring", "arrow", "trapezoid")
TEXTURES = ("stripes", "checker", "dots", "rings", "zigzag", "waves", "grid", "spiral", "plain")
# Part directions per arrangement (degrees, -90 = top of the body).
ARRANGEMENTS: dict[str, tuple[float, ...]] = {
    "none": (),
    "head": (-90.0,),
    "ears": (-55.0, -125.0),
    "legs": (55.0, 125.0),
    "tripod": (-90.0, 30.0, 150.0),
    "four": (45.0, 135.0, 225.0, 315.0),
    "tail": (160.0,),
    "crown": (-60.0, -90.0, -120.0),
}
PARTS = ("disk", "square", "spike")
POOLS = ("eval", "pretrain")
# Sibling attributes: each sibling of a group changes exactly one of these.
_ATTRIBUTES = ("body", "texture", "arrangement")


@dataclass(frozen=True)
class ShapeClass:
    """What defines one class: ``body`` (a :data:`BODIES` name), ``texture`` (:data:`TEXTURES`),
    its ``period`` (in units of the body radius) and ``angle`` (degrees, in the object frame),
    ``arrangement`` (an :data:`ARRANGEMENTS` name) and the ``part`` shape (:data:`PARTS`)."""

    body: str
    texture: str
    period: float
    angle: float
    arrangement: str
    part: str

    @property
    def combination(self) -> tuple[str, str, str, str]:
        """The discrete identity of the class (what the pools split on)."""
        return self.body, self.texture, self.arrangement, self.part


def pool_of(cls: ShapeClass) -> str:
    """The pool of a class's combination: a quarter of all combinations are ``eval``."""
    digest = hashlib.sha256("/".join(cls.combination).encode()).digest()
    return "eval" if digest[0] % 4 == 0 else "pretrain"


def _draw_class(rng: np.random.Generator) -> ShapeClass:
    return ShapeClass(
        body=BODIES[int(rng.integers(len(BODIES)))],
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        period=float(rng.uniform(0.35, 0.6)),
        angle=float(rng.uniform(0, 180)),
        arrangement=tuple(ARRANGEMENTS)[int(rng.integers(len(ARRANGEMENTS)))],
        part=PARTS[int(rng.integers(len(PARTS)))],
    )


def _sibling(rng: np.random.Generator, base: ShapeClass, attribute: str) -> ShapeClass:
    if attribute == "body":
        return ShapeClass(BODIES[int(rng.integers(len(BODIES)))], base.texture, base.period, base.angle,
                          base.arrangement, base.part)
    if attribute == "texture":
        return ShapeClass(base.body, TEXTURES[int(rng.integers(len(TEXTURES)))], float(rng.uniform(0.35, 0.6)),
                          float(rng.uniform(0, 180)), base.arrangement, base.part)
    return ShapeClass(base.body, base.texture, base.period, base.angle,
                      tuple(ARRANGEMENTS)[int(rng.integers(len(ARRANGEMENTS)))], base.part)


def class_set(classes: int, style_seed: int = 0, pool: str = "eval") -> list[ShapeClass]:
    """``classes`` distinct classes of ``pool``, in look-alike groups of three.

    Group g is classes ``3g .. 3g+2``: a base drawn from ``(style_seed, pool)`` and two siblings,
    each changing one attribute of the base (body, texture or arrangement; the group's two siblings
    change different ones, cycling over groups). Every class's combination belongs to ``pool``
    (:func:`pool_of`) and no two classes share a combination. Deterministic in its arguments; the
    first classes of a larger set are the classes of a smaller one.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown class pool {pool!r}; known: {', '.join(POOLS)}")
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    rng = np.random.default_rng([style_seed, POOLS.index(pool)])
    out: list[ShapeClass] = []
    seen: set[tuple[str, ...]] = set()

    def fresh(candidate: ShapeClass, taken: list[ShapeClass]) -> bool:
        return (pool_of(candidate) == pool and candidate.combination not in seen
                and all(candidate.combination != t.combination for t in taken))

    group = 0
    while len(out) < classes:
        base = _draw_class(rng)
        if not fresh(base, []):
            continue
        members = [base]
        for attribute in (_ATTRIBUTES[group % 3], _ATTRIBUTES[(group + 1) % 3]):
            for _ in range(50):
                sibling = _sibling(rng, base, attribute)
                if fresh(sibling, members):
                    members.append(sibling)
                    break
        if len(members) < 3:  # this base has no free sibling in the pool for one attribute
            continue
        out.extend(members)
        seen.update(m.combination for m in members)
        group += 1
    return out[:classes]


# ---- geometry ------------------------------------------------------------------------------------


def body_mask(body: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean silhouette of ``body`` in object coordinates (about [-1, 1]^2)."""
    rho = np.hypot(u, v)
    if body == "ellipse":
        return u**2 + (v / 0.7) ** 2 <= 1.0
    if body == "rectangle":
        return (np.abs(u) <= 0.95) & (np.abs(v) <= 0.6)
    if body == "triangle":
        return (v <= 0.75) & (v >= -0.95 + 1.7 * np.abs(u))
    if body == "star":
        return rho <= 0.62 + 0.36 * np.cos(5 * np.arctan2(v, u))
    if body == "diamond":
        return np.abs(u) / 0.75 + np.abs(v) <= 1.0
    if body == "hexagon":
        return (np.abs(v) <= 0.85) & (0.866 * np.abs(u) + 0.5 * np.abs(v) <= 0.85)
    if body == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    if body == "crescent":
        return (rho <= 0.95) & (np.hypot(u - 0.5, v) > 0.72)
    if body == "heart":
        x, y = u / 0.95, -(v + 0.15) / 0.95
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if body == "ring":
        return (rho <= 0.95) & (rho >= 0.5)
    if body == "arrow":
        shaft = (np.abs(v) <= 0.22) & (u >= -0.95) & (u <= 0.15)
        head = (u >= 0.0) & (u <= 0.95) & (np.abs(v) <= 0.75 * (0.95 - u) / 0.95)
        return shaft | head
    if body == "trapezoid":
        return (np.abs(v) <= 0.6) & (np.abs(u) <= 0.5 + 0.45 * (v + 0.6) / 1.2)
    raise ValueError(f"unknown body {body!r}; expected one of {BODIES}")


def texture_pattern(cls: ShapeClass, u: np.ndarray, v: np.ndarray, body: np.ndarray, radius_px: float) -> np.ndarray:
    """Boolean two-tone pattern of the class's texture (True = the first tone); ``body`` and
    ``radius_px`` (pixels per body unit) size the outline of ``plain``."""
    a = np.deg2rad(cls.angle)
    x = (u * np.cos(a) + v * np.sin(a)) / cls.period
    y = (-u * np.sin(a) + v * np.cos(a)) / cls.period
    t = cls.texture
    if t == "stripes":
        return np.floor(x) % 2 == 0
    if t == "checker":
        return (np.floor(x) + np.floor(y)) % 2 == 0
    if t == "dots":
        return np.hypot(x - np.round(x), y - np.round(y)) < 0.3
    if t == "rings":
        return np.floor(np.hypot(u, v) / cls.period) % 2 == 0
    if t == "zigzag":
        return np.floor(y + np.abs((x % 2) - 1)) % 2 == 0
    if t == "waves":
        return np.floor(y + 0.35 * np.sin(np.pi * x)) % 2 == 0
    if t == "grid":
        return ((x % 1) > 0.3) & ((y % 1) > 0.3)
    if t == "spiral":
        return (np.hypot(u, v) / cls.period - np.arctan2(v, u) / (2 * np.pi)) % 1 < 0.5
    if t == "plain":  # a solid body with an outline in the second tone
        return ndimage.distance_transform_edt(body) > max(1.0, 0.5 * cls.period * radius_px)
    raise ValueError(f"unknown texture {t!r}; expected one of {TEXTURES}")


def _body_radius(body: str, direction: float) -> float:
    """How far the body reaches from its centre in ``direction`` (degrees), in body units."""
    rho = np.linspace(0.0, 1.3, 131)
    a = np.deg2rad(direction)
    inside = body_mask(body, rho * np.cos(a), rho * np.sin(a))
    return float(rho[np.flatnonzero(inside)[-1]]) if inside.any() else 0.5


def part_mask(part: str, u: np.ndarray, v: np.ndarray, body: str, direction: float, size: float) -> np.ndarray:
    """Boolean mask of one part attached at the body's rim in ``direction`` (degrees), pointing
    outwards; ``size`` is its radius in body units."""
    a = np.deg2rad(direction)
    reach = _body_radius(body, direction)
    cu, cv = (reach + 0.35 * size) * np.cos(a), (reach + 0.35 * size) * np.sin(a)
    p = ((u - cu) * np.cos(a) + (v - cv) * np.sin(a)) / size  # outwards
    q = (-(u - cu) * np.sin(a) + (v - cv) * np.cos(a)) / size
    if part == "disk":
        return p**2 + q**2 <= 1.0
    if part == "square":
        return (np.abs(p) <= 0.8) & (np.abs(q) <= 0.8)
    if part == "spike":
        return (p >= -0.8) & (p <= 1.6) & (np.abs(q) <= 0.75 * (1.6 - p) / 2.4)
    raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


# ---- colours -------------------------------------------------------------------------------------


def _two_tones(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours that differ in brightness by 0.3-0.7 (so the texture shows in any
    colour), hues independent half the time and equal otherwise."""
    h1 = rng.random()
    h2 = rng.random() if rng.random() < 0.5 else h1
    v1 = rng.uniform(0.3, 1.0)
    gap = rng.uniform(0.3, 0.7)
    v2 = v1 - gap if v1 - gap >= 0.05 else min(1.0, v1 + gap)
    return hsv_colour(h1, rng.uniform(0.1, 1.0), v1), hsv_colour(h2, rng.uniform(0.1, 1.0), v2)


# ---- clutter -------------------------------------------------------------------------------------


def _smooth_blob(rng: np.random.Generator, h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """An irregular blob: a disk whose radius wobbles with a few random harmonics."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.full_like(theta, radius)
    for harmonic in range(2, 6):
        r += radius * rng.uniform(0.0, 0.25) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= r


def _stick(rng: np.random.Generator, h: int, w: int, short: float) -> np.ndarray:
    """A thick straight stroke across part of the image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
    a = rng.uniform(0, np.pi)
    length = rng.uniform(0.4, 1.0) * short
    along = (xx - x0) * np.cos(a) + (yy - y0) * np.sin(a)
    across = -(xx - x0) * np.sin(a) + (yy - y0) * np.cos(a)
    return (np.abs(along) <= length / 2) & (np.abs(across) <= rng.uniform(0.015, 0.04) * short)


def _clutter(rng: np.random.Generator, h: int, w: int, pool: str) -> tuple[np.ndarray, np.ndarray]:
    """One no-class clutter item: (mask H×W bool, its pixels H×W×3 float32). Blobs carry a patch
    of another photo or a flat random colour; sticks a flat colour."""
    short = min(h, w)
    if rng.random() < 0.6:
        mask = _smooth_blob(rng, h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.08, 0.22) * short)
    else:
        mask = _stick(rng, h, w, short)
    if rng.random() < 0.7:
        pixels = background(rng, h, w, pool)
    else:
        pixels = np.broadcast_to(hsv_colour(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.15, 0.95)), (h, w, 3))
    return mask, pixels


# ---- one image -----------------------------------------------------------------------------------


def render(rng: np.random.Generator, cls: ShapeClass, k: int, size: tuple[int, int], ignore_border: int = 1,
           pool: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """One image of class ``cls`` (label id ``k``) and its label.

    Args:
        rng: every random draw of the image comes from it.
        cls: the class.
        k: the class's id in the label.
        size: ``(H, W)``.
        ignore_border: width of the IGNORE_ID band along the visible object's border (0: none).
        pool: the photo pool of the background and of photo clutter (:mod:`.photos`).

    Returns:
        ``(image, label)``: H×W×3 uint8 RGB and H×W int32 (k on the visible object, 0 elsewhere,
        IGNORE_ID on the border band). Clutter never hides more than 30% of the object.
    """
    h, w = size
    short = min(h, w)
    img = background(rng, h, w, pool)
    clutter = [_clutter(rng, h, w, pool) for _ in range(int(rng.integers(0, 3)))]
    over = [rng.random() < 0.35 for _ in clutter]
    for (mask, pixels), on_top in zip(clutter, over):
        if not on_top:
            img[mask] = pixels[mask]

    # The object's extent (body and parts) spans 20-80% of the short side, mostly the upper half
    # of that range (the mean is 60%: object photos frame their object): about 2 body radii
    # without parts, 2.8 with.
    extent = 2.8 if ARRANGEMENTS[cls.arrangement] else 2.0
    radius = (0.2 + 0.6 * np.sqrt(rng.random())) * short / extent
    aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
    if rng.random() < 0.2:  # cut by the border: the centre anywhere in the image
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    else:
        margin = 0.9 * radius
        cy = rng.uniform(min(margin, h / 2), max(h - margin, h / 2))
        cx = rng.uniform(min(margin, w / 2), max(w - margin, w / 2))
    rot = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    u = (dx * np.cos(rot) + dy * np.sin(rot)) * aspect
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect

    body = body_mask(cls.body, u, v)
    part_size = rng.uniform(0.38, 0.48)
    parts = np.zeros_like(body)
    for direction in ARRANGEMENTS[cls.arrangement]:
        parts |= part_mask(cls.part, u, v, cls.body, direction + rng.uniform(-8, 8), part_size)
    parts &= ~body
    if not (body | parts).any():  # too small to hit a pixel centre: keep one pixel
        body[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))] = True

    tone1, tone2 = _two_tones(rng)
    pattern = texture_pattern(cls, u, v, body, radius)
    img[body & pattern] = tone1
    img[body & ~pattern] = tone2
    part_colour = hsv_colour(rng.random(), rng.uniform(0.1, 1.0), rng.uniform(0.2, 1.0))
    if rng.random() < 0.5:  # parts in a third colour, or textured like the body
        img[parts] = part_colour
    else:
        img[parts & pattern] = tone1
        img[parts & ~pattern] = tone2

    visible = body | parts
    for (mask, pixels), on_top in zip(clutter, over):
        if on_top and np.count_nonzero(visible & ~mask) >= 0.7 * np.count_nonzero(body | parts):
            img[mask] = pixels[mask]
            visible &= ~mask

    shade = 1 + rng.uniform(-0.25, 0.25) * ((xx / w - 0.5) * np.cos(rot) + (yy / h - 0.5) * np.sin(rot))
    img = img * shade[..., None] + rng.normal(0.0, rng.uniform(2.0, 6.0), size=img.shape)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    label = np.where(visible, k, BACKGROUND_ID).astype(np.int32)
    if ignore_border > 0:
        label[border_band(visible, ignore_border)] = IGNORE_ID
    return image, label
