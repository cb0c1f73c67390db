"""Silhouettes, parts and textures of the held-out world (:mod:`benchmarks.heldout_world`).

Everything is drawn in an object's *unit frame*: the body fits in a disc of radius ``BODY_RADIUS``
around the origin, parts reach out to about radius 1.1; ``u`` points right, ``v`` down. A family
is a small registry entry:

- a silhouette family has ``draw(rng) -> params`` (the class's shape), ``jitter(params, rng) ->
  params`` (one instance's small deviation) and ``inside(params, u, v) -> bool array``;
- a texture family has ``draw(rng) -> params`` and ``tones(params, u, v, rng) -> float array`` in
  [0, 2]: which of an instance's three random colours each point takes (fractions blend two).

Colour is never a parameter here: the caller gives every instance its own random palette, so a
class is its silhouette, its parts and its texture's structure only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.path import Path as PolygonPath
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

BODY_RADIUS = 0.55
TONES = 3  # colours per instance palette: every texture uses exactly three (see module docstring)
# Noise textures are drawn on a periodic grid covering [-NOISE_EXTENT, NOISE_EXTENT]^2 units (an
# aspect-distorted object's frame reaches ~1.4) and sampled bilinearly.
NOISE_EXTENT = 1.5
NOISE_GRID = 96

Params = dict[str, Any]


@dataclass(frozen=True)
class SilhouetteFamily:
    draw: Callable[[np.random.Generator], Params]
    jitter: Callable[[Params, np.random.Generator], Params]
    inside: Callable[[Params, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TextureFamily:
    draw: Callable[[np.random.Generator], Params]
    tones: Callable[[Params, np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


# ---- geometry helpers ------------------------------------------------------------------------


def in_capsules(u: np.ndarray, v: np.ndarray, capsules: np.ndarray, boxes: np.ndarray | None = None) -> np.ndarray:
    """Whether each point (u, v) lies in the union of capsules (same shape as ``u``).

    ``capsules``: (n, 5) float rows ``x0, y0, x1, y1, halfwidth`` (a disc is a zero-length one).
    ``boxes``: for 2-D ``u``, ``v``, optional (n, 4) int rows ``r0, r1, c0, c1``: capsule i is
    only looked for in ``[r0:r1, c0:c1]`` (its bounding box; see :func:`pixel_boxes`).
    """
    out = np.zeros(u.shape, bool)
    for i, (x0, y0, x1, y1, hw) in enumerate(capsules):
        if boxes is None:
            pu, pv, hit = u, v, out
        else:
            r0, r1, c0, c1 = boxes[i]
            if r0 >= r1 or c0 >= c1:
                continue
            pu, pv, hit = u[r0:r1, c0:c1], v[r0:r1, c0:c1], out[r0:r1, c0:c1]
        dx, dy = x1 - x0, y1 - y0
        px, py = pu - x0, pv - y0
        t = np.clip((px * dx + py * dy) * (1.0 / max(dx * dx + dy * dy, 1e-12)), 0.0, 1.0)
        px -= t * dx
        py -= t * dy
        hit |= px * px + py * py < hw * hw
    return out


def pixel_boxes(capsules: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """(n, 4) int boxes ``r0, r1, c0, c1`` of capsules given in pixel coordinates (x, y; pixel
    (i, j) has its centre at (j + 0.5, i + 0.5)), as indices into the window ``[rows, cols]``."""
    ys, xs, pad = capsules[:, [1, 3]], capsules[:, [0, 2]], capsules[:, 4] + 1
    height, width = rows.stop - rows.start, cols.stop - cols.start
    r = np.stack([np.floor(ys.min(axis=1) - pad), np.ceil(ys.max(axis=1) + pad) + 1], axis=1) - rows.start
    c = np.stack([np.floor(xs.min(axis=1) - pad), np.ceil(xs.max(axis=1) + pad) + 1], axis=1) - cols.start
    return np.concatenate([np.clip(r, 0, height), np.clip(c, 0, width)], axis=1).astype(np.int64)


def _polar_inside(radius: Callable[[Params, np.ndarray], np.ndarray], p: Params, u: np.ndarray,
                  v: np.ndarray) -> np.ndarray:
    """Inside a star-shaped outline given by its radius at each angle, ``radius(p, angles)``."""
    return np.hypot(u, v) < radius(p, np.arctan2(v, u))


def _scaled_to_body(r: np.ndarray) -> float:
    """Factor that brings the largest of sampled radii ``r`` to BODY_RADIUS."""
    return BODY_RADIUS / float(r.max())


ANGLES = np.linspace(0.0, 2.0 * math.pi, 720, endpoint=False)

# ---- silhouettes -----------------------------------------------------------------------------


def _lobes_radius(p: Params, phi: np.ndarray) -> np.ndarray:
    r = np.ones_like(phi)
    for j, (a, ph) in enumerate(zip(p["amps"], p["phases"]), start=2):
        r = r + a * np.cos(j * phi + ph)
    return p["scale"] * r


def _lobes_draw(rng: np.random.Generator) -> Params:
    while True:  # smooth, lobed outlines whose narrowest radius keeps the body in one piece
        p = {"amps": [float(rng.uniform(0, 0.5 / math.sqrt(j))) for j in range(2, 6)],
             "phases": [float(x) for x in rng.uniform(0, 2 * math.pi, 4)], "scale": 1.0}
        r = _lobes_radius(p, ANGLES)
        if r.min() > 0.35 * r.max():
            p["scale"] = _scaled_to_body(r)
            return p


def _lobes_jitter(p: Params, rng: np.random.Generator) -> Params:
    q = {"amps": [a * rng.uniform(0.85, 1.15) for a in p["amps"]],
         "phases": [ph + rng.normal(0, 0.12) for ph in p["phases"]], "scale": 1.0}
    q["scale"] = _scaled_to_body(_lobes_radius(q, ANGLES))
    return q


def _superformula_radius(p: Params, phi: np.ndarray) -> np.ndarray:
    a = p["m"] * phi / 4.0
    r = (np.abs(np.cos(a)) ** p["n2"] + np.abs(np.sin(a)) ** p["n3"]) ** (-1.0 / p["n1"])
    return p["scale"] * r


def _superformula_draw(rng: np.random.Generator) -> Params:
    while True:  # Gielis's superformula: gears, pinched polygons, flowers, cushions
        p = {"m": int(rng.integers(3, 8)), "n1": float(rng.uniform(0.6, 4.0)),
             "n2": float(rng.uniform(0.6, 3.5)), "n3": float(rng.uniform(0.6, 3.5)), "scale": 1.0}
        r = _superformula_radius(p, ANGLES)
        if np.all(np.isfinite(r)) and r.min() > 0.3 * r.max():
            p["scale"] = _scaled_to_body(r)
            return p


def _superformula_jitter(p: Params, rng: np.random.Generator) -> Params:
    q = dict(p, n1=p["n1"] * rng.uniform(0.9, 1.1), n2=p["n2"] * rng.uniform(0.9, 1.1), scale=1.0)
    q["scale"] = _scaled_to_body(_superformula_radius(q, ANGLES))
    return q


def _polygon_draw(rng: np.random.Generator) -> Params:
    n = int(rng.integers(5, 10))  # jagged, concave, star-shaped about the centre
    angles = 2 * math.pi * (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n
    radii = rng.uniform(0.22, 1.0, n)
    radii = np.maximum(radii, 0.3 * radii.max())
    return {"angles": angles.tolist(), "radii": (BODY_RADIUS * radii / radii.max()).tolist()}


def _polygon_jitter(p: Params, rng: np.random.Generator) -> Params:
    n = len(p["angles"])
    return {"angles": (np.asarray(p["angles"]) + rng.normal(0, 0.04, n)).tolist(),
            "radii": (np.asarray(p["radii"]) * rng.uniform(0.9, 1.08, n)).tolist()}


def _polygon_inside(p: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, r = np.asarray(p["angles"]), np.asarray(p["radii"])
    path = PolygonPath(np.stack([r * np.cos(a), r * np.sin(a)], axis=1))
    return path.contains_points(np.stack([u.ravel(), v.ravel()], axis=1)).reshape(u.shape)


# A glyph is a connected walk along the edges of a 3x3 lattice, stroked thick: letter-like bodies.
_LATTICE = [(x, y) for y in (-1, 0, 1) for x in (-1, 0, 1)]


def _glyph_draw(rng: np.random.Generator) -> Params:
    while True:
        at = int(rng.integers(9))
        points, edges = [at], set()
        for _ in range(int(rng.integers(3, 6))):
            x, y = _LATTICE[at]
            options = [i for i, (a, b) in enumerate(_LATTICE)
                       if max(abs(a - x), abs(b - y)) == 1 and frozenset((at, i)) not in edges]
            if not options:
                break
            nxt = int(rng.choice(options))
            edges.add(frozenset((at, nxt)))
            points.append(nxt)
            at = nxt
        xs = {_LATTICE[i][0] for i in points}
        ys = {_LATTICE[i][1] for i in points}
        if len(edges) >= 3 and len(xs) >= 2 and len(ys) >= 2:
            pitch = 0.8 * BODY_RADIUS
            return {"points": [[pitch * _LATTICE[i][0], pitch * _LATTICE[i][1]] for i in points],
                    "halfwidth": float(rng.uniform(0.1, 0.14))}


def _glyph_jitter(p: Params, rng: np.random.Generator) -> Params:
    pts = np.asarray(p["points"]) + rng.normal(0, 0.03, (len(p["points"]), 2))
    return {"points": pts.tolist(), "halfwidth": p["halfwidth"] * rng.uniform(0.9, 1.1)}


def _stroke_capsules(points: np.ndarray, halfwidth: float) -> np.ndarray:
    return np.concatenate([points[:-1], points[1:], np.full((len(points) - 1, 1), halfwidth)], axis=1)


def _glyph_inside(p: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return in_capsules(u, v, _stroke_capsules(np.asarray(p["points"]), p["halfwidth"]))


def _discs_draw(rng: np.random.Generator) -> Params:
    while True:  # a union of 2-3 discs, sometimes bitten by another: beans, crescents, snowmen
        n = int(rng.integers(2, 4))
        discs = np.concatenate([rng.uniform(-0.28, 0.28, (n, 2)), rng.uniform(0.18, 0.33, (n, 1))], axis=1)
        bite = None
        if rng.random() < 0.6:
            host = discs[int(rng.integers(n))]
            a = rng.uniform(0, 2 * math.pi)
            bite = [host[0] + host[2] * math.cos(a), host[1] + host[2] * math.sin(a), rng.uniform(0.13, 0.25)]
        p = {"discs": discs.tolist(), "bite": bite}
        g = np.linspace(-1, 1, 64)
        gu, gv = np.meshgrid(g, g)
        area = _discs_inside(p, gu, gv).mean() * 4
        if 0.25 < area < 0.8:  # neither a sliver nor a plain disc
            return p


def _discs_jitter(p: Params, rng: np.random.Generator) -> Params:
    d = np.asarray(p["discs"])
    d = d + np.concatenate([rng.normal(0, 0.02, (len(d), 2)), np.zeros((len(d), 1))], axis=1)
    d[:, 2] *= rng.uniform(0.93, 1.07, len(d))
    return {"discs": d.tolist(), "bite": p["bite"]}


def _discs_inside(p: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros(u.shape, bool)
    for x, y, r in p["discs"]:
        out |= (u - x) ** 2 + (v - y) ** 2 < r * r
    if p["bite"] is not None:
        x, y, r = p["bite"]
        out &= (u - x) ** 2 + (v - y) ** 2 >= r * r
    return out


def _spiral_points(p: Params) -> np.ndarray:
    t = np.linspace(0.0, 1.0, 40)
    phi = 2 * math.pi * p["turns"] * t
    r = 0.08 + (BODY_RADIUS - p["halfwidth"] - 0.08) * t
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


def _spiral_draw(rng: np.random.Generator) -> Params:
    return {"turns": float(rng.uniform(0.8, 1.25)), "halfwidth": float(rng.uniform(0.08, 0.105))}


def _spiral_jitter(p: Params, rng: np.random.Generator) -> Params:
    return {"turns": p["turns"] + rng.normal(0, 0.06), "halfwidth": p["halfwidth"] * rng.uniform(0.9, 1.1)}


def _spiral_inside(p: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return in_capsules(u, v, _stroke_capsules(_spiral_points(p), p["halfwidth"]))


SILHOUETTES: dict[str, SilhouetteFamily] = {
    "lobes": SilhouetteFamily(_lobes_draw, _lobes_jitter, lambda p, u, v: _polar_inside(_lobes_radius, p, u, v)),
    "superformula": SilhouetteFamily(_superformula_draw, _superformula_jitter,
                                     lambda p, u, v: _polar_inside(_superformula_radius, p, u, v)),
    "polygon": SilhouetteFamily(_polygon_draw, _polygon_jitter, _polygon_inside),
    "glyph": SilhouetteFamily(_glyph_draw, _glyph_jitter, _glyph_inside),
    "discs": SilhouetteFamily(_discs_draw, _discs_jitter, _discs_inside),
    "spiral": SilhouetteFamily(_spiral_draw, _spiral_jitter, _spiral_inside),
}

# ---- parts -----------------------------------------------------------------------------------

PART_KINDS = ("knob", "limb", "antenna", "fork")


@dataclass(frozen=True)
class Part:
    """One appendage: ``kind`` (PART_KINDS), where it leaves the body (``angle``, radians in the
    unit frame), its ``size`` factor and, for limbs, the elbow's ``bend`` (radians)."""

    kind: str
    angle: float
    size: float
    bend: float = 0.0

    def jittered(self, rng: np.random.Generator) -> Part:
        """One instance's pose: the joint angles move a little (articulation)."""
        return Part(self.kind, self.angle + rng.normal(0, 0.1), self.size * rng.uniform(0.9, 1.1),
                    self.bend + rng.normal(0, 0.3))


def body_edge(inside: Callable[[np.ndarray, np.ndarray], np.ndarray], angle: float) -> float:
    """Distance from the centre to the farthest body point along ``angle`` (0 if the ray misses)."""
    t = np.linspace(0.0, 1.0, 80)
    hit = inside(t * math.cos(angle), t * math.sin(angle))
    return float(t[hit].max()) if hit.any() else 0.0


def part_capsules(part: Part, edge: float) -> np.ndarray:
    """(n, 5) capsules (see :func:`in_capsules`) of ``part`` leaving the body at radius ``edge``."""
    d = np.array([math.cos(part.angle), math.sin(part.angle)])
    anchor = edge * d
    s = part.size

    def turned(a: float) -> np.ndarray:
        return np.array([math.cos(part.angle + a), math.sin(part.angle + a)])

    if part.kind == "knob":
        r = 0.14 * s
        c = anchor + 0.5 * r * d
        return np.array([[*c, *c, r]])
    if part.kind == "limb":
        elbow = anchor + 0.24 * s * d
        hand = elbow + 0.2 * s * turned(part.bend)
        return np.array([[*(anchor - 0.06 * d), *elbow, 0.065], [*elbow, *hand, 0.06], [*elbow, *elbow, 0.075]])
    if part.kind == "antenna":
        tip = anchor + 0.3 * s * d
        return np.array([[*(anchor - 0.04 * d), *tip, 0.045], [*tip, *tip, 0.09]])
    if part.kind == "fork":
        split = anchor + 0.16 * s * d
        return np.array([[*(anchor - 0.04 * d), *split, 0.055],
                         [*split, *(split + 0.14 * s * turned(0.6)), 0.05],
                         [*split, *(split + 0.14 * s * turned(-0.6)), 0.05]])
    raise ValueError(f"unknown part kind {part.kind!r}; expected one of {PART_KINDS}")


# ---- textures --------------------------------------------------------------------------------


def _grid_index(x: np.ndarray) -> np.ndarray:
    return (x + NOISE_EXTENT) / (2 * NOISE_EXTENT) * NOISE_GRID


def _filtered_noise(rng: np.random.Generator, spectrum: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """White noise filtered by ``spectrum(fx, fy)`` (cycles per unit), unit std, sampled at (u, v)."""
    f = np.fft.fftfreq(NOISE_GRID, d=2 * NOISE_EXTENT / NOISE_GRID)
    fx, fy = np.meshgrid(f, f)
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((NOISE_GRID, NOISE_GRID))) * spectrum(fx, fy)).real
    field /= max(float(field.std()), 1e-9)
    return map_coordinates(field, [_grid_index(v), _grid_index(u)], order=1, mode="grid-wrap")


def _gabor_tones(p: Params, u, v, rng) -> np.ndarray:
    a = p["orientation"] + rng.normal(0, 0.1)
    f0, bw = p["frequency"], p["bandwidth"] * p["frequency"]
    cx, cy = f0 * math.cos(a), f0 * math.sin(a)

    def spectrum(fx, fy):  # two Gaussian bumps, at +-(cx, cy): a real, oriented band
        return sum(np.exp(-((fx - s * cx) ** 2 + (fy - s * cy) ** 2) / (2 * bw * bw)) for s in (1, -1))

    return 1.0 + np.clip(0.9 * _filtered_noise(rng, spectrum, u, v), -1.0, 1.0)


def _maze_tones(p: Params, u, v, rng) -> np.ndarray:
    f0 = p["frequency"]
    field = _filtered_noise(rng, lambda fx, fy: np.exp(-((np.hypot(fx, fy) - f0) ** 2) / (2 * (0.2 * f0) ** 2)), u, v)
    return np.where(np.abs(field) < p["line"], 2.0, np.where(field > 0, 0.0, 1.0))


def _camo_tones(p: Params, u, v, rng) -> np.ndarray:
    s = p["blob"]
    field = _filtered_noise(rng, lambda fx, fy: np.exp(-(fx * fx + fy * fy) * (2 * math.pi * s) ** 2 / 2), u, v)
    return np.digitize(field, [-0.43, 0.43]).astype(float)


def _seed_cells(seeds: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each point: the distance margin to its second-nearest seed, and its nearest seed."""
    d, idx = cKDTree(seeds).query(np.stack([u.ravel(), v.ravel()], axis=1), k=2)
    return (d[:, 1] - d[:, 0]).reshape(u.shape), idx[:, 0].reshape(u.shape)


def _voronoi_tones(p: Params, u, v, rng) -> np.ndarray:
    n = max(4, int(round(p["density"] * (2 * NOISE_EXTENT) ** 2)))
    margin, cell = _seed_cells(rng.uniform(-NOISE_EXTENT, NOISE_EXTENT, (n, 2)), u, v)
    return np.where(margin < 2 * p["edge"], 2.0, (cell % 2).astype(float))


def _honeycomb_tones(p: Params, u, v, rng) -> np.ndarray:
    s = p["cell"]
    a = p["orientation"] + rng.normal(0, 0.05)
    ax, ay = np.array([math.cos(a), math.sin(a)]), np.array([math.cos(a + math.pi / 3), math.sin(a + math.pi / 3)])
    m = int(math.ceil(2 * NOISE_EXTENT / s)) + 2
    q, r = np.meshgrid(np.arange(-m, m + 1), np.arange(-m, m + 1))
    seeds = s * (q.reshape(-1, 1) * ax + r.reshape(-1, 1) * ay) + rng.uniform(-s, s, 2)
    _, cell = _seed_cells(seeds, u, v)
    colour = (q.ravel() - r.ravel()) % 3  # the three-colouring of a hexagonal tiling
    return colour[cell].astype(float)


def _hatch_tones(p: Params, u, v, rng) -> np.ndarray:
    out = np.zeros(u.shape)
    for tone, a in ((1.0, p["orientation"]), (2.0, p["orientation"] + p["cross"])):
        a = a + rng.normal(0, 0.05)
        x = (u * math.cos(a) + v * math.sin(a)) / p["spacing"] + rng.uniform()
        out[np.abs(x - np.floor(x) - 0.5) > 0.5 - p["width"]] = tone
    return out


def _scales_tones(p: Params, u, v, rng) -> np.ndarray:
    rho = p["radius"]
    a = p["orientation"] + rng.normal(0, 0.05)
    x = u * math.cos(a) + v * math.sin(a) + rng.uniform(0, 2 * rho)
    y = -u * math.sin(a) + v * math.cos(a) + rng.uniform(0, rho)
    step_x, step_y = 1.8 * rho, 0.7 * rho
    out = np.zeros(u.shape)
    row0 = np.floor(y / step_y)
    for dr in (-2, -1, 0):  # later (lower) rows overlap earlier ones, like roof tiles
        row = row0 + dr
        shift = (row % 2) * step_x / 2
        cx = np.round((x - shift) / step_x) * step_x + shift
        dist = np.hypot(x - cx, y - row * step_y)
        covered = dist < rho
        out[covered] = np.where(dist[covered] > rho - p["rim"], 2.0, row[covered] % 2)
    return out


def _gradient_tones(p: Params, u, v, rng) -> np.ndarray:
    if p["kind"] == "radial":
        c = rng.normal(0, 0.1, 2)
        return np.clip(2.0 * np.hypot(u - c[0], v - c[1]) / 0.9, 0.0, 2.0)
    a = p["orientation"] + rng.normal(0, 0.1)
    return np.clip(1.0 + (u * math.cos(a) + v * math.sin(a)) / 0.7, 0.0, 2.0)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


TEXTURES: dict[str, TextureFamily] = {
    "gabor": TextureFamily(lambda rng: {"frequency": _uniform(rng, 1.5, 3.5), "orientation": _uniform(rng, 0, math.pi),
                                        "bandwidth": _uniform(rng, 0.12, 0.25)}, _gabor_tones),
    "maze": TextureFamily(lambda rng: {"frequency": _uniform(rng, 1.4, 3.0), "line": _uniform(rng, 0.25, 0.4)},
                          _maze_tones),
    "camo": TextureFamily(lambda rng: {"blob": _uniform(rng, 0.12, 0.25)}, _camo_tones),
    "voronoi": TextureFamily(lambda rng: {"density": _uniform(rng, 4.0, 12.0), "edge": _uniform(rng, 0.015, 0.035)},
                             _voronoi_tones),
    "honeycomb": TextureFamily(lambda rng: {"cell": _uniform(rng, 0.16, 0.3), "orientation": _uniform(rng, 0, math.pi)},
                               _honeycomb_tones),
    "hatch": TextureFamily(lambda rng: {"orientation": _uniform(rng, 0, math.pi), "cross": _uniform(rng, 0.7, 1.57),
                                        "spacing": _uniform(rng, 0.16, 0.3), "width": _uniform(rng, 0.12, 0.22)},
                           _hatch_tones),
    "scales": TextureFamily(lambda rng: {"radius": _uniform(rng, 0.14, 0.26), "rim": _uniform(rng, 0.025, 0.05),
                                         "orientation": _uniform(rng, 0, 2 * math.pi)}, _scales_tones),
    "gradient": TextureFamily(lambda rng: {"kind": str(rng.choice(["radial", "linear"])),
                                           "orientation": _uniform(rng, 0, 2 * math.pi)}, _gradient_tones),
}
