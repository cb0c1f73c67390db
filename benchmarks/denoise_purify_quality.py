"""Stages 2–4 (k-means #1, DFF, CSD) on held-out features with known classes: quality of every step.

    python -m benchmarks.denoise_purify_quality [--n 200000 --d 384 --classes 919 --seed 0]
        [--mixed 0.10 --outliers 0.05 --size-spread 0.5] [--epochs 15,50,50] [--threads 1]
        [--generator known | s919 --noise 0.3] [--set denoise.hidden_dim=256 ...] [--json OUT]

Runs the pure method code in this process, as the stages call it: k-means of
:mod:`pdso_ray.kmeans` with ``num_shards=0``, :func:`pdso_ray.method.denoise.denoise` and the
rules of :mod:`pdso_ray.method.purify`, with the pipeline's config defaults (``--set`` overrides
``cluster.*``, ``denoise.*``, ``purify.*``). Prints purity, NMI and Hungarian-matched accuracy
(:mod:`pdso_ray.method.cluster_metrics`) after every step, next to plain k-means on the same
features: plain k-means purified by the same rules in feature space (the kept set a
denoising-free pipeline would get at about the same size), the same rules with the distance
quantile that keeps the kept set's share (like for like: the cap, not only the quantile, decides
which images a plain pipeline keeps), and its ``denoise.keep_ratio`` closest images per cluster (a
subset of S1's and S2's size). Like for like: the full-N rows (k-means #1,
relabelling, k-means #2, final assignment) each label every image; S1 and S2 compare with each
other and with plain k-means's closest half; the kept set with plain k-means's kept set.

Data (``--generator known``, :func:`known_truth_features`): L2-normalised DINO-like features, a
shared mean direction plus a class part. Classes come in superclasses of look-alikes (2–``2m-2``
siblings, centre cosine ``sibling_cos``); each class is a Gaussian stretched along a few axes,
half of them pointing at siblings, with its own width; class sizes are log-normal
(``--size-spread``). ``--mixed`` of the images mix two sibling classes (weight 0.3–0.5 on the
sibling; the truth is the larger part), ``--outliers`` are far outliers (15–35% class signal, the
rest a random direction). The flip feature is the image's feature plus a small perturbation.
``--generator s919`` samples :class:`benchmarks.s919_scale.NoiseModel` instead (``--noise``
ambiguous images), for a check on another distribution.

The behaviour before issue #12 (linear heads, no centring, S2 against g's labels, h on S2,
random k-means #2/#3, one k-means start) is ``--set denoise.head=linear --set denoise.centre=false
--set denoise.s2_labels=relabel --set denoise.h_rows=s2 --set denoise.prototypes=means --set
purify.init=random --set cluster.nredo=1 --set purify.nredo=1``; h on S2 with k-means #2/#3 from
its class means, 20 Lloyd iterations each (the state midway through the issue) is ``--set
denoise.h_rows=s2 --set denoise.prototypes=means --set purify.prototype_niter2=20 --set
purify.prototype_niter3=20``. Measured tables: docs/method.md §4.

Cost (measured on 2 shared, busy cores): 40k × 384, 184 classes, one k-means start: 5–6 min
(65k, 300 classes: 7 min). At the defaults (200k × 384, 919 classes, 15/50/50 epochs) on one
thread: k-means ~1–3 min per start (``cluster.nredo`` = 30 starts of k-means #1 dominate: add
``--set cluster.nredo=1`` for a quick look); DFF took 17–35 min with h on S2 and, estimated,
about twice h's share with h on every image (``denoise.h_rows=all``, the default: ~50 min);
CSD from prototypes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdso_ray.method.cluster_metrics import cluster_scores

KIND_CLEAN, KIND_MIXED, KIND_OUTLIER = 0, 1, 2


# ---- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TruthModel:
    """Parameters of :func:`known_truth_features` (module docstring)."""

    mixed: float = 0.10
    outliers: float = 0.05
    size_spread: float = 0.5  # std of the log class size
    family_mean: int = 10  # mean superclass size
    sibling_cos: float = 0.55  # cosine between the centres of two siblings
    common: float = 0.5  # weight of the direction every feature shares (DINO features are not centred)
    axes: int = 6  # stretched axes per class, half of them towards siblings
    spread: float = 0.22  # std along an axis, times the class width and a factor in [0.5, 1.5]
    isotropic: float = 0.35  # norm of the isotropic part, times the class width
    width_range: tuple[float, float] = (0.6, 1.6)  # class widths, log-uniform
    mix_weight: tuple[float, float] = (0.3, 0.5)  # weight of the sibling in a mixed image
    outlier_signal: tuple[float, float] = (0.15, 0.35)  # weight of the class in a far outlier
    flip_noise: float = 0.3  # norm of the perturbation giving feat_flip (cosine ~0.96)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _superclasses(classes: int, mean: int, rng: np.random.Generator) -> np.ndarray:
    """(classes,) superclass id of every class; superclass sizes uniform in 2..2·mean-2."""
    sizes: list[int] = []
    while sum(sizes) < classes:
        sizes.append(int(rng.integers(2, max(3, 2 * mean - 1))))
    sizes[-1] -= sum(sizes) - classes
    if sizes[-1] < 2 and len(sizes) > 1:  # every class needs a sibling
        sizes[-2] += sizes.pop()
    return np.repeat(np.arange(len(sizes)), sizes)


def known_truth_features(n: int, d: int, classes: int, seed: int,
                         model: TruthModel = TruthModel()) -> dict[str, np.ndarray]:
    """``feat``, ``feat_flip`` (n×d float32, unit rows), ``truth`` (n,) int64 class and ``kind``
    (n,) int8: KIND_CLEAN, KIND_MIXED or KIND_OUTLIER. Deterministic for a seed."""
    if classes < 2 or d < model.axes or n < classes:
        raise ValueError(f"need classes >= 2, d >= {model.axes}, n >= classes; got {n=} {d=} {classes=}")
    if not (0 <= model.mixed and 0 <= model.outliers and model.mixed + model.outliers <= 1):
        raise ValueError(f"mixed ({model.mixed}) and outliers ({model.outliers}) must be fractions summing to <= 1")
    rng = np.random.default_rng([seed, 0])
    family = _superclasses(classes, model.family_mean, rng)
    common = _unit(rng.standard_normal(d))
    roots = _unit(rng.standard_normal((family.max() + 1, d)))
    beta = math.sqrt(1 / model.sibling_cos - 1)  # unit(root + beta·own): sibling cosine 1 / (1 + beta²)
    centres = _unit(roots[family] + beta * _unit(rng.standard_normal((classes, d))))
    siblings = [np.setdiff1d(np.flatnonzero(family == family[c]), [c]) for c in range(classes)]
    axes = _unit(rng.standard_normal((classes, model.axes, d)))
    for c in range(classes):
        axes[c, : model.axes // 2] = _unit(centres[rng.choice(siblings[c], model.axes // 2)] - centres[c])
    width = np.exp(rng.uniform(*np.log(model.width_range), classes))
    scales = model.spread * width[:, None] * rng.uniform(0.5, 1.5, (classes, model.axes))
    p = np.exp(model.size_spread * rng.standard_normal(classes))

    rng = np.random.default_rng([seed, 1])
    truth = rng.choice(classes, n, p=p / p.sum())

    def sample(labels: np.ndarray) -> np.ndarray:
        g = rng.standard_normal((len(labels), model.axes)) * scales[labels]
        x = centres[labels] + np.einsum("na,nad->nd", g, axes[labels])
        return x + (model.isotropic * width[labels] / math.sqrt(d))[:, None] * rng.standard_normal((len(labels), d))

    x = sample(truth)
    kind = rng.choice(3, n, p=[1 - model.mixed - model.outliers, model.mixed, model.outliers]).astype(np.int8)
    mixed = np.flatnonzero(kind == KIND_MIXED)
    partner = np.array([rng.choice(siblings[c]) for c in truth[mixed]], dtype=np.int64)
    w = rng.uniform(*model.mix_weight, len(mixed))[:, None]
    x[mixed] = (1 - w) * x[mixed] + w * sample(partner)
    far = np.flatnonzero(kind == KIND_OUTLIER)
    w = rng.uniform(*model.outlier_signal, len(far))[:, None]
    x[far] = w * x[far] + (1 - w) * _unit(rng.standard_normal((len(far), d)))
    feat = _unit(model.common * common + _unit(x))
    flip = _unit(feat + (model.flip_noise / math.sqrt(d)) * rng.standard_normal(feat.shape))
    return {"feat": feat.astype(np.float32), "feat_flip": flip.astype(np.float32),
            "truth": truth.astype(np.int64), "kind": kind}


def s919_features(n: int, d: int, classes: int, seed: int, noise: float) -> dict[str, np.ndarray]:
    """The same keys from :mod:`benchmarks.s919_scale`'s NoiseModel (ambiguous -> KIND_MIXED)."""
    from benchmarks.s919_scale import make_classes, sample_features

    s = sample_features(make_classes(classes, d, seed), n, noise, np.random.default_rng([seed, 1]))
    return {"feat": s["feat"], "feat_flip": s["feat_flip"], "truth": s["truth"].astype(np.int64),
            "kind": np.where(s["ambiguous"], KIND_MIXED, KIND_CLEAN).astype(np.int8)}


# ---- the chain ----------------------------------------------------------------------------------
@dataclass
class Step:
    """One labelling to score: ``labels`` (N,) on the images where ``mask`` holds (None = all)."""

    name: str
    labels: np.ndarray
    mask: np.ndarray | None = None


def _kmeans(x: np.ndarray, k: int, niter: int, nredo: int, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    """k×d centroids: :func:`pdso_ray.kmeans.kmeans` in-process from random rows (best of
    ``nredo``), or the same Lloyd iterations (:func:`pdso_ray.method.kmeans_math.lloyd`, faiss
    search) from ``init``, which that API does not take yet."""
    from pdso_ray.kmeans import kernels, kmeans
    from pdso_ray.method import kmeans_math as km

    if init is None:
        return kmeans(x, k, niter=niter, nredo=nredo, seed=seed, num_shards=0, progress=False,
                      kernel="faiss").centroids
    search = kernels()["faiss"]
    centroids, _ = km.lloyd(lambda c: km.lloyd_partial(x, c, search), np.asarray(init, np.float32), niter, seed)
    return centroids


def _nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid id (N,) int64 and squared distance (N,) float32 of every row."""
    from pdso_ray.kmeans import kernels
    from pdso_ray.method.kmeans_math import search_blocks

    ids, dist = search_blocks(x, centroids, 1, kernels()["faiss"])
    return ids[:, 0], dist[:, 0]


def _purify_kmeans(x: np.ndarray, k: int, *, seed: int, nredo: int, niter: int, init: np.ndarray | None):
    """The ``kmeans_fn`` of :func:`pdso_ray.method.purify.purify` over :func:`_kmeans`."""
    centroids = _kmeans(x, k, niter, nredo, seed, init)
    return (centroids, *_nearest(x, centroids))


def run_chain(data: dict[str, np.ndarray], classes: int, cfg: Any) -> tuple[list[Step], dict[str, float]]:
    """k-means #1, DFF and CSD on ``data`` with the config's cluster/denoise/purify sections, as
    the stages run them; returns the steps to score and the seconds of each phase."""
    import dataclasses

    from pdso_ray.method.denoise import ChunkedFeatures, denoise
    from benchmarks.s919_scale import rules_at_share
    from pdso_ray.method.purify import distance_filter, fill_missing_prototypes, purification_mask, purify

    x, xf, k = data["feat"], data["feat_flip"], classes
    cc, pc = cfg.cluster, cfg.purify
    dc = dataclasses.replace(cfg.denoise, seed=cfg.seed_for("denoise"))
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    first, dist1 = _nearest(x, _kmeans(x, k, cc.niter, cc.nredo, cfg.seed_for("cluster")))
    seconds["kmeans1"] = time.perf_counter() - t
    # the plain baselines, in feature space: k-means #1 purified by the same rules, and its
    # keep_ratio closest images per cluster (a subset of S1's and S2's size, without DFF)
    plain_kept = purification_mask(dist1, first, k, pc.dist_quantile, pc.alpha)
    plain_half = distance_filter(dist1, first, k, cfg.denoise.keep_ratio)

    t = time.perf_counter()
    result = denoise(ChunkedFeatures.from_arrays(x, xf), first, k, dc)
    emb = result.embed(x)
    seconds["denoise"] = time.perf_counter() - t

    t = time.perf_counter()
    seed = cfg.seed_for("purify")
    init, niter = None, (pc.niter, pc.niter)
    if pc.init == "prototypes":
        init = fill_missing_prototypes(result.prototypes, result.prototype_counts, emb.__getitem__, len(emb), seed)
        niter = (pc.prototype_niter2, pc.prototype_niter3)
    purified = purify(emb, k, _purify_kmeans, dist_quantile=pc.dist_quantile, alpha=pc.alpha,
                      topk=1, seed=seed, nredo=pc.nredo, niter=niter, init=init, kept_distance=pc.kept_distance,
                      apply_rules=pc.filter)
    seconds["purify"] = time.perf_counter() - t

    steps = [
        Step("k-means #1", first),
        Step("S1 (k-means labels)", first, result.subset1),
        Step("relabelling (g where f agrees)", result.labels),
        Step(f"S2 ({dc.s2_labels} labels)", result.clean_labels, result.clean_mask),
        Step("k-means #2 in e(x)", purified.assignments2),
        Step("kept set (final labels)", purified.assignments, purified.kept),
        Step("final assignment", purified.assignments),
        Step("plain k-means, kept by the rules", first, plain_kept),
        Step("plain k-means, rules at kept share", first,
             rules_at_share(dist1, first, k, pc.alpha, float(purified.kept.mean()))),
        Step("plain k-means, closest keep_ratio", first, plain_half),
    ]
    return steps, seconds


def score_steps(steps: list[Step], data: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Scores of every step, plus the share of mixed images and outliers it holds."""
    rows = []
    for s in steps:
        inside = np.ones(len(s.labels), bool) if s.mask is None else s.mask
        scores = cluster_scores(s.labels, data["truth"], s.mask)
        kinds = data["kind"][inside]
        rows.append({"step": s.name, **scores, "fraction": float(inside.mean()),
                     "mixed": float((kinds == KIND_MIXED).mean()), "outliers": float((kinds == KIND_OUTLIER).mean()),
                     "clusters": int(len(np.unique(s.labels[inside])))})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'step':34s} {'images':>8s} {'share':>6s} {'purity':>7s} {'NMI':>7s} {'acc':>7s} "
          f"{'mixed':>6s} {'outl.':>6s} {'clusters':>8s}")
    for r in rows:
        print(f"{r['step']:34s} {r['images']:8d} {r['fraction']:6.1%} {r['purity']:7.4f} {r['nmi']:7.4f} "
              f"{r['accuracy']:7.4f} {r['mixed']:6.1%} {r['outliers']:6.1%} {r['clusters']:8d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--classes", type=int, default=919)
    p.add_argument("--seed", type=int, default=0, help="seed of the data (the method keeps its config seeds)")
    p.add_argument("--generator", choices=("known", "s919"), default="known")
    p.add_argument("--mixed", type=float, default=TruthModel.mixed, help="fraction of images mixing two siblings")
    p.add_argument("--outliers", type=float, default=TruthModel.outliers, help="fraction of far outliers")
    p.add_argument("--size-spread", type=float, default=TruthModel.size_spread, help="std of log class size")
    p.add_argument("--noise", type=float, default=0.3, help="s919 generator: fraction of ambiguous images")
    p.add_argument("--epochs", default="15,50,50", help="epochs of f,g,h (the paper's 15,50,50)")
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    p.add_argument("--set", action="append", default=[], help="config override key=value (cluster/denoise/purify)")
    p.add_argument("--json", help="also write the table and settings to this file")
    args = p.parse_args()

    import faiss
    import torch

    from pdso_ray.config import load_config, to_dict

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ef, eg, eh = (int(e) for e in args.epochs.split(","))
    cfg = load_config(None, [f"data.classes={args.classes}", f"denoise.epochs_f={ef}", f"denoise.epochs_g={eg}",
                             f"denoise.epochs_h={eh}", *args.set])
    t = time.perf_counter()
    if args.generator == "known":
        model = TruthModel(mixed=args.mixed, outliers=args.outliers, size_spread=args.size_spread)
        data = known_truth_features(args.n, args.d, args.classes, args.seed, model)
    else:
        data = s919_features(args.n, args.d, args.classes, args.seed, args.noise)
    sizes = np.bincount(data["truth"], minlength=args.classes)
    print(f"{args.generator} features n={args.n} d={args.d} classes={args.classes} seed={args.seed} "
          f"({time.perf_counter() - t:.0f} s): class sizes {sizes.min()}..{sizes.max()}, "
          f"mixed {np.mean(data['kind'] == KIND_MIXED):.1%}, outliers {np.mean(data['kind'] == KIND_OUTLIER):.1%}",
          flush=True)
    settings = {s: to_dict(getattr(cfg, s)) for s in ("cluster", "denoise", "purify")}
    print("settings " + json.dumps(settings, sort_keys=True), flush=True)
    steps, seconds = run_chain(data, args.classes, cfg)
    rows = score_steps(steps, data)
    print_table(rows)
    print("seconds " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "settings": settings, "seconds": seconds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
