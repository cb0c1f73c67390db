"""Stages 2–4 (cluster, denoise, purify) at ImageNet-S919 scale on one machine: time, memory, quality.

    python benchmarks/s919_scale.py [--n 1281167 --d 384 --classes 919 --noise 0.3 --out runs/s919_scale]
                                    [--epochs-f E --epochs-g E --epochs-h E | --target-steps 3000] [--cpus 2]

1. **Data.** ``--n`` L2-normalised ``--d``-dim features of ``--classes`` classes, written as the
   ``features`` stage's Parquet (id, path, split, height, width, feat, feat_flip, saliency_peak;
   fake ids ``train/synthetic/img_<row>``) under ``OUT/features`` by a separate process, so the
   driver's peak memory is the pipeline's alone; the true class of every row goes to
   ``OUT/truth.npz``. The model (:class:`NoiseModel`): classes come in families of 20 whose
   centres have cosine 0.5 (dog breeds); each class is anisotropic (Gaussian along 8 axes, the
   first 3 pointing at 3 confuser classes of its family, plus isotropic noise) with its own width
   (a factor in [1/2, 2]). ``--noise`` of the images are *ambiguous*: their feature mixes a sample
   of their class with a sample of a confuser (weight 0.2–0.6 on the confuser) plus clutter. That
   is where k-means #1 goes wrong, and what small-loss selection and the distance filter can find:
   ambiguous images sit far from their cluster's centre and off its class's manifold.
2. **Pipeline.** ``run_pipeline`` with ``data.features=OUT/features`` (stage 1 is then skipped)
   and the stages one at a time, so that each has its own wall time and memory window.
3. **Memory.** A thread samples, every 0.5 s, the peak RSS (Linux ``VmHWM``: exact for every
   process alive at a sample) of the driver and of every process below it: Ray's workers
   (``ray::...``: shard actors, the denoise task, writer tasks) and Ray's own daemons.
4. **Quality.** Purity of a labelling = the fraction of images whose cluster's majority true class
   is their own (computed within the set of images considered). Printed for k-means #1, for DFF's
   relabelling, for S1 and S2 (under the k-means labels), and for the final assignment over all
   images and over the kept (purified) set, next to plain k-means #1 purified by the same rules to
   the kept set's share (:func:`plain_kept_at_share`). The k-means #1 objective (sum of squared distances over all rows) is
   compared with faiss.Kmeans trained on a 10% sample (same k, niter, seed) and evaluated on all
   rows: a ratio below 1 means training on every row paid off.

Denoise epochs: the paper's 15/50/50 epochs over 1.28 M rows are 18.8k/31k/31k Adam steps of 1,024
rows, 70 minutes on one CPU core for f, g and h alone. By default each classifier gets about
``--target-steps`` steps instead (epochs = ceil(steps · batch / rows it trains on), capped at the
paper's): at S919 scale 3/5/5 epochs. What matters to the small-loss selection is that the
classifier fits the clean majority of each cluster; measured at 50k rows, 250 steps left g worse
than the k-means labels it learns from, 1,250 steps did not.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pdso_ray.storage import Storage
from pdso_ray.tables import arrow_to_vectors, iter_row_groups, parquet_files, vectors_to_arrow, write_table

S919_IMAGES = 1_281_167
PAPER_EPOCHS = {"f": 15, "g": 50, "h": 50}
STAGES = ("cluster", "denoise", "purify")


# ---- synthetic features -------------------------------------------------------------------------
@dataclass(frozen=True)
class NoiseModel:
    """Parameters of the synthetic feature distribution (module docstring, step 1)."""

    family_size: int = 20  # classes per family (siblings share a parent direction)
    sibling_cos: float = 0.5  # cosine between the centres of two siblings
    axes: int = 8  # anisotropic axes per class; the first `confusers` point at the confusers
    confusers: int = 3
    spread: float = 0.15  # std along an axis, times the class width and a factor in [0.5, 1.5]
    isotropic: float = 0.2  # norm of the isotropic part, times the class width
    width_range: float = 2.0  # class widths are log-uniform in [1/width_range, width_range]
    mix: tuple[float, float] = (0.2, 0.6)  # weight of the confuser in an ambiguous image
    clutter: float = 0.8  # norm of the extra isotropic noise of an ambiguous image
    flip_noise: float = 0.4  # norm of the perturbation giving feat_flip (cosine ~0.93 with feat)


@dataclass(frozen=True)
class Classes:
    """centres C×D unit float32; axes C×A×D unit float32; scales C×A float32; isotropic (C,)
    float32 per-dimension std; confusers C×M int64 (classes of the same family)."""

    centres: np.ndarray
    axes: np.ndarray
    scales: np.ndarray
    isotropic: np.ndarray
    confusers: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def make_classes(classes: int, dim: int, seed: int, model: NoiseModel = NoiseModel()) -> Classes:
    """The class geometry of :class:`NoiseModel`, deterministic for a seed."""
    if classes < 2 or dim < model.axes:
        raise ValueError(f"need >= 2 classes and dim >= {model.axes}, got classes={classes} dim={dim}")
    rng = np.random.default_rng([seed, 0])
    families = max(1, classes // model.family_size)
    parent = np.arange(classes) % families
    roots = _unit(rng.standard_normal((families, dim)))
    # centre = unit(root + beta * own): siblings have cosine 1 / (1 + beta^2)
    beta = math.sqrt(1 / model.sibling_cos - 1)
    centres = _unit(roots[parent] + beta * _unit(rng.standard_normal((classes, dim))))
    confusers = np.empty((classes, model.confusers), dtype=np.int64)
    for c in range(classes):
        siblings = np.flatnonzero(parent == parent[c])
        siblings = siblings[siblings != c]
        if not len(siblings):  # a family of one: confuse with any other class
            siblings = np.delete(np.arange(classes), c)
        confusers[c] = rng.choice(siblings, model.confusers, replace=len(siblings) < model.confusers)
    axes = _unit(rng.standard_normal((classes, model.axes, dim)))
    axes[:, : model.confusers] = _unit(centres[confusers] - centres[:, None, :])
    width = np.exp(rng.uniform(-math.log(model.width_range), math.log(model.width_range), classes))
    scales = model.spread * width[:, None] * rng.uniform(0.5, 1.5, (classes, model.axes))
    return Classes(centres.astype(np.float32), axes.astype(np.float32), scales.astype(np.float32),
                   (model.isotropic * width / math.sqrt(dim)).astype(np.float32), confusers)


def _class_samples(cls: Classes, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = rng.standard_normal((len(labels), cls.axes.shape[1]), dtype=np.float32) * cls.scales[labels]
    x = cls.centres[labels] + np.einsum("na,nad->nd", g, cls.axes[labels])
    return x + cls.isotropic[labels, None] * rng.standard_normal(x.shape, dtype=np.float32)


def sample_features(cls: Classes, n: int, noise: float, rng: np.random.Generator,
                    model: NoiseModel = NoiseModel()) -> dict[str, np.ndarray]:
    """n rows: ``truth`` (n,) int32, ``ambiguous`` (n,) bool, ``feat`` and ``feat_flip`` n×D
    float32, L2-normalised."""
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    classes, dim = cls.centres.shape
    truth = rng.integers(0, classes, n)
    ambiguous = rng.random(n) < noise
    x = _class_samples(cls, truth, rng)
    idx = np.flatnonzero(ambiguous)
    if len(idx):
        partner = cls.confusers[truth[idx], rng.integers(0, cls.confusers.shape[1], len(idx))]
        w = rng.uniform(*model.mix, len(idx)).astype(np.float32)[:, None]
        clutter = (model.clutter / math.sqrt(dim)) * rng.standard_normal((len(idx), dim), dtype=np.float32)
        x[idx] = (1 - w) * x[idx] + w * _class_samples(cls, partner, rng) + clutter
    x = _unit(x)
    flip = _unit(x + (model.flip_noise / math.sqrt(dim)) * rng.standard_normal(x.shape, dtype=np.float32))
    return {"truth": truth.astype(np.int32), "ambiguous": ambiguous, "feat": x, "feat_flip": flip}


def write_features(out: str, n: int, d: int, classes: int, noise: float, seed: int,
                   rows_per_file: int) -> None:
    """``OUT/features/part-XXXXX.parquet`` in the features stage's schema, ``OUT/truth.npz``
    (truth, ambiguous; by row) and ``OUT/features.json`` (the parameters). File by file: memory
    is one file's rows."""
    storage = Storage()
    cls = make_classes(classes, d, seed)
    truth, ambiguous = [], []
    for f, start in enumerate(range(0, n, rows_per_file)):
        rows = min(rows_per_file, n - start)
        s = sample_features(cls, rows, noise, np.random.default_rng([seed, 1, f]))
        ids = [f"train/synthetic/img_{start + i:08d}" for i in range(rows)]
        table = pa.table({
            "id": pa.array(ids, pa.string()),
            "path": pa.array([f"synthetic://{i}.JPEG" for i in ids], pa.string()),
            "split": pa.array(["train"] * rows, pa.string()),
            "height": pa.array(np.full(rows, 224, dtype=np.int32)),
            "width": pa.array(np.full(rows, 224, dtype=np.int32)),
            "feat": vectors_to_arrow(s["feat"]),
            "feat_flip": vectors_to_arrow(s["feat_flip"]),
            "saliency_peak": vectors_to_arrow(np.full((rows, 2), 0.5, dtype=np.float32)),
        })
        write_table(storage, Storage.join(out, "features", f"part-{f:05d}.parquet"), table)
        truth.append(s["truth"])
        ambiguous.append(s["ambiguous"])
    with storage.open(Storage.join(out, "truth.npz"), "wb") as fh:
        np.savez(fh, truth=np.concatenate(truth), ambiguous=np.concatenate(ambiguous))
    storage.write_json(Storage.join(out, "features.json"), _data_params(n, d, classes, noise, seed, rows_per_file))


def _data_params(n: int, d: int, classes: int, noise: float, seed: int, rows_per_file: int) -> dict[str, Any]:
    return {"n": n, "d": d, "classes": classes, "noise": noise, "seed": seed,
            "rows_per_file": rows_per_file, "model": asdict(NoiseModel())}


def ensure_features(out: str, n: int, d: int, classes: int, noise: float, seed: int = 0,
                    rows_per_file: int = 16_384) -> float:
    """Write the data set in a child process unless ``OUT`` already holds it; returns seconds."""
    storage = Storage()
    meta_url = Storage.join(out, "features.json")
    wanted = json.loads(json.dumps(_data_params(n, d, classes, noise, seed, rows_per_file)))
    if storage.exists(meta_url) and storage.read_json(meta_url) == wanted:
        return 0.0
    storage.remove(Storage.join(out, "features"), recursive=True)
    t0 = time.perf_counter()
    # A child process: the driver's peak memory must be the pipeline's, not the generator's.
    proc = multiprocessing.get_context("spawn").Process(
        target=write_features, args=(out, n, d, classes, noise, seed, rows_per_file))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"writing the synthetic features failed (exit code {proc.exitcode})")
    return time.perf_counter() - t0


def load_truth(out: str) -> tuple[np.ndarray, np.ndarray]:
    with Storage().open(Storage.join(out, "truth.npz"), "rb") as fh:
        z = np.load(fh)
        return z["truth"], z["ambiguous"]


# ---- memory -------------------------------------------------------------------------------------
def _peak_rss(pid: int) -> int:
    """Peak resident set size of a process in bytes (Linux VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for pid {pid}")


class MemorySampler:
    """Peak RSS of this process (the driver) and of every process below it, per phase.

    Every ``interval`` seconds a thread reads each process's VmHWM; an increase seen while phase
    P is current counts towards P's peaks. ``peaks[P]`` = {"driver": bytes, "worker": (bytes,
    title), "other": (bytes, title)}: workers are Ray's ``ray::...`` processes, others its
    daemons (raylet, GCS, dashboard).
    """

    def __init__(self, interval: float = 0.5):
        import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
        import psutil

        self._root = psutil.Process()
        self._psutil = psutil
        self.interval = interval
        self.phase = "setup"
        self.peaks: dict[str, dict[str, Any]] = {}
        self._seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def set_phase(self, phase: str) -> None:
        self.sample()  # whatever grew so far belongs to the previous phase
        self.phase = phase

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        psutil = self._psutil
        try:
            procs = [self._root] + self._root.children(recursive=True)
        except psutil.Error:
            return
        peaks = self.peaks.setdefault(self.phase, {"driver": 0, "worker": (0, ""), "other": (0, "")})
        for proc in procs:
            try:
                hwm = _peak_rss(proc.pid)
                title = " ".join(proc.cmdline())[:60]
            except (OSError, ValueError, psutil.Error):
                continue  # gone between the listing and the read
            if hwm <= self._seen.get(proc.pid, 0):
                continue
            self._seen[proc.pid] = hwm
            if proc.pid == self._root.pid:
                peaks["driver"] = max(peaks["driver"], hwm)
            else:
                role = "worker" if title.startswith("ray::") else "other"
                if hwm > peaks[role][0]:
                    peaks[role] = (hwm, title)

    def overall(self, role: str) -> tuple[int, str]:
        if role == "driver":
            return max((p["driver"] for p in self.peaks.values()), default=0), "driver"
        return max((p[role] for p in self.peaks.values()), default=(0, ""))


# ---- quality ------------------------------------------------------------------------------------
def purity(labels: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of images (within ``mask``) whose cluster's majority true class is their own,
    the majority being taken within ``mask`` too."""
    labels, truth = np.asarray(labels, dtype=np.int64), np.asarray(truth, dtype=np.int64)
    if mask is not None:
        labels, truth = labels[mask], truth[mask]
    if not len(labels):
        return float("nan")
    classes = int(truth.max()) + 1
    pairs = np.bincount(labels * classes + truth, minlength=(int(labels.max()) + 1) * classes)
    return float(pairs.reshape(-1, classes).max(axis=1).sum() / len(labels))


def read_columns(storage: Storage, folder: str, columns: list[str]) -> dict[str, np.ndarray]:
    """Scalar columns of a stage folder (files in order: the row order of the features)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for table in iter_row_groups(storage, folder, columns):
        for c in columns:
            parts[c].append(table.column(c).to_numpy(zero_copy_only=False))
    return {c: np.concatenate(v) for c, v in parts.items()}


def row_numbers(ids: np.ndarray) -> np.ndarray:
    return np.fromiter((int(i.rsplit("_", 1)[1]) for i in ids), dtype=np.int64, count=len(ids))


def quality(storage: Storage, run: str, features: str, truth: np.ndarray, ambiguous: np.ndarray, classes: int,
            alpha: float) -> dict[str, float]:
    """Purity of every labelling the stages wrote (module docstring, step 4), and of plain k-means #1
    purified at the kept set's share (:func:`plain_kept_at_share`)."""
    c = read_columns(storage, Storage.join(run, "cluster"), ["id", "cluster"])
    d = read_columns(storage, Storage.join(run, "denoise"), ["id", "relabel", "subset1", "clean"])
    p = read_columns(storage, Storage.join(run, "purify"), ["id", "cluster", "kept"])
    rows = row_numbers(c["id"])
    if not (np.array_equal(np.sort(rows), np.arange(len(truth)))
            and all(np.array_equal(rows, row_numbers(x["id"])) for x in (d, p))):
        raise RuntimeError("the stage outputs do not cover the feature rows in the same order")
    t, amb = truth[rows], ambiguous[rows]
    kept = p["kept"].astype(bool)
    by_row = np.empty(len(truth), dtype=np.int64)
    by_row[rows] = c["cluster"]
    plain = plain_kept_at_share(storage, features, by_row, classes, alpha, float(kept.mean()))
    return {
        "purity_kmeans1": purity(c["cluster"], t),
        "purity_relabel": purity(d["relabel"], t),
        "purity_S1": purity(c["cluster"], t, d["subset1"].astype(bool)),
        "purity_S2": purity(c["cluster"], t, d["clean"].astype(bool)),
        "purity_final_all": purity(p["cluster"], t),
        "purity_final_kept": purity(p["cluster"], t, kept),
        "kept_fraction": float(kept.mean()),
        "purity_plain_kept_at_share": purity(by_row, truth, plain),
        "ambiguous_all": float(amb.mean()),
        "ambiguous_S2": float(amb[d["clean"].astype(bool)].mean()),
        "ambiguous_kept": float(amb[kept].mean()),
    }


def rules_at_share(dist: np.ndarray, labels: np.ndarray, k: int, alpha: float, share: float) -> np.ndarray:
    """Like for like with the kept set: the purification rules (distance quantile and cap) on
    ``labels`` with the quantile that keeps the share of images closest to ``share`` (bisection;
    the kept share grows with the quantile). Returns the (N,) bool mask."""
    from pdso_ray.method.purify import purification_mask

    lo, hi = 1e-6, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if purification_mask(dist, labels, k, mid, alpha).mean() < share else (lo, mid)
    return min((purification_mask(dist, labels, k, q, alpha) for q in (lo, hi)),
               key=lambda m: abs(m.mean() - share))


def plain_kept_at_share(storage: Storage, features: str, labels: np.ndarray, classes: int, alpha: float,
                        share: float) -> np.ndarray:
    """Like for like with the pipeline's kept set: plain k-means #1 purified by the same rules in
    feature space, each image's distance to its cluster's mean, at the quantile that keeps ``share``
    of the images (:func:`rules_at_share`). ``labels``: (N,)
    k-means #1 cluster by row. Two streaming passes over the features. Returns an (N,) bool mask
    by row."""
    import torch

    def blocks():
        for table in iter_row_groups(storage, features, ["id", "feat"]):
            rows = row_numbers(table.column("id").to_numpy(zero_copy_only=False))
            yield rows, torch.from_numpy(arrow_to_vectors(table.column("feat")).copy()), torch.from_numpy(labels[rows])

    sums = counts = None
    for rows, x, lab in blocks():
        sums = torch.zeros(classes, x.shape[1], dtype=torch.float64) if sums is None else sums
        sums.index_add_(0, lab, x.double())
        counts = np.bincount(lab.numpy(), minlength=classes) + (0 if counts is None else counts)
    means = (sums / torch.from_numpy(np.maximum(counts, 1)).double()[:, None]).float()
    dist = np.zeros(len(labels), dtype=np.float32)
    for rows, x, lab in blocks():
        dist[rows] = ((x - means[lab]) ** 2).sum(1).numpy()
    return rules_at_share(dist, labels, classes, alpha, share)


def faiss_sample_objective(storage: Storage, features: str, k: int, niter: int, seed: int,
                           fraction: float, threads: int) -> dict[str, float]:
    """faiss.Kmeans trained on a random ``fraction`` of the rows; its objective on every row."""
    import faiss

    faiss.omp_set_num_threads(threads)
    files = parquet_files(storage, features)
    n = sum(t.num_rows for t in iter_row_groups(storage, files, ["height"]))
    rng = np.random.default_rng(seed)
    picked = np.zeros(n, dtype=bool)
    picked[rng.choice(n, max(k, int(fraction * n)), replace=False)] = True
    sample, start = [], 0
    for table in iter_row_groups(storage, files, ["feat"]):
        x = arrow_to_vectors(table.column("feat"))
        sample.append(x[picked[start:start + len(x)]])
        start += len(x)
    sample = np.concatenate(sample)
    t0 = time.perf_counter()
    km = faiss.Kmeans(sample.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=len(sample))
    km.train(sample)
    seconds = time.perf_counter() - t0
    objective = 0.0
    for table in iter_row_groups(storage, files, ["feat"]):
        dist, _ = km.index.search(arrow_to_vectors(table.column("feat")), 1)
        objective += float(dist.sum(dtype=np.float64))
    return {"faiss_sample_rows": int(len(sample)), "faiss_sample_seconds": seconds,
            "faiss_sample_objective": objective}


# ---- the run ------------------------------------------------------------------------------------
def denoise_epochs(n: int, target_steps: int, batch_size: int, keep_ratio: float) -> dict[str, int]:
    """Epochs giving f (all rows), g (S1) and h (S2, about keep_ratio of the rows) about
    ``target_steps`` Adam steps each, capped at the paper's epochs."""
    rows = {"f": n, "g": keep_ratio * n, "h": keep_ratio * n}
    return {k: max(1, min(PAPER_EPOCHS[k], math.ceil(target_steps * batch_size / rows[k]))) for k in rows}


def run_stages(out: str, classes: int, epochs: dict[str, int], cpus: int, sampler: MemorySampler,
               extra: list[str] = ()) -> tuple[dict[str, Any], Any]:
    """Stages 2–4 on ``OUT/features`` into ``OUT/run`` (cleared first), one ``run_pipeline`` call
    per stage; returns the last summary and config."""
    from pdso_ray.config import load_config
    from pdso_ray.pipeline import run_pipeline

    storage = Storage()
    run = Storage.join(out, "run")
    storage.remove(run, recursive=True)
    summary: dict[str, Any] = {}
    for stage in STAGES:
        cfg = load_config(None, [
            f"output={run}", f"data.features={Storage.join(out, 'features')}", f"data.classes={classes}",
            f"stages={stage}", f"ray.num_cpus={cpus}", f"denoise.epochs_f={epochs['f']}",
            f"denoise.epochs_g={epochs['g']}", f"denoise.epochs_h={epochs['h']}", *extra])
        sampler.set_phase(stage)
        summary = run_pipeline(cfg, storage)
        sampler.set_phase("after")
    return summary, cfg


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=S919_IMAGES)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--classes", type=int, default=919)
    p.add_argument("--noise", type=float, default=0.3, help="fraction of ambiguous images")
    p.add_argument("--out", default="runs/s919_scale", help="folder for the features and the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-file", type=int, default=16_384)
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs (k-means shards); faiss threads")
    p.add_argument("--target-steps", type=int, default=3000, help="Adam steps per denoise classifier")
    for name in "fgh":
        p.add_argument(f"--epochs-{name}", type=int, help=f"override the epochs of {name}")
    p.add_argument("--set", action="append", default=[], help="extra config overrides key=value")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from pdso_ray.config import DenoiseConfig
    dc = DenoiseConfig()
    epochs = denoise_epochs(args.n, args.target_steps, dc.batch_size, dc.keep_ratio)
    epochs.update({k: getattr(args, f"epochs_{k}") for k in "fgh" if getattr(args, f"epochs_{k}") is not None})
    print(f"n={args.n} d={args.d} classes={args.classes} noise={args.noise} epochs f/g/h="
          f"{epochs['f']}/{epochs['g']}/{epochs['h']} cpus={args.cpus} load average {load_average()}",
          flush=True)
    gen_s = ensure_features(args.out, args.n, args.d, args.classes, args.noise, args.seed, args.rows_per_file)
    print(f"features written in {gen_s:.0f} s" if gen_s else "features reused", flush=True)

    storage = Storage()
    with MemorySampler() as sampler:
        t0 = time.perf_counter()
        summary, cfg = run_stages(args.out, args.classes, epochs, args.cpus, sampler, args.set)
        total_s = time.perf_counter() - t0
    load_after = load_average()
    import ray

    ray.shutdown()
    truth, ambiguous = load_truth(args.out)
    q = quality(storage, Storage.join(args.out, "run"), Storage.join(args.out, "features"), truth, ambiguous,
                args.classes, cfg.purify.alpha)
    f = faiss_sample_objective(storage, Storage.join(args.out, "features"), args.classes, cfg.cluster.niter,
                               cfg.seed_for("cluster"), 0.1, args.cpus)
    objective = summary["stages"]["cluster"]["counts"]["objective"]

    gib = 1024**3
    print(f"\nstage      seconds  driver peak so far  largest worker peak (process)    load avg 1/5/15 after: {load_after}")
    driver_so_far = sampler.peaks.get("setup", {"driver": 0})["driver"]
    for stage in STAGES:
        peaks = sampler.peaks.get(stage, {"driver": 0, "worker": (0, "")})
        driver_so_far = max(driver_so_far, peaks["driver"])
        print(f"{stage:9s} {summary['stages'][stage]['seconds']:8.1f}  {driver_so_far / gib:11.2f} GiB"
              f"  {peaks['worker'][0] / gib:8.2f} GiB ({peaks['worker'][1][:32]})")
    driver, worker, other = sampler.overall("driver")[0], sampler.overall("worker"), sampler.overall("other")
    print(f"stages 2-4: {total_s:.1f} s (target <= 3600); peak RSS driver {driver / gib:.2f} GiB, "
          f"worker {worker[0] / gib:.2f} GiB, Ray daemon {other[0] / gib:.2f} GiB ({other[1][:30]}) "
          f"(target <= 8 GB each)")
    print(f"k-means #1 objective {objective:.6g}; faiss.Kmeans on a {f['faiss_sample_rows']}-row sample "
          f"({f['faiss_sample_seconds']:.0f} s): {f['faiss_sample_objective']:.6g}; ratio "
          f"{objective / f['faiss_sample_objective']:.4f}")
    print(f"purity k-means #1 {q['purity_kmeans1']:.4f} | relabelling {q['purity_relabel']:.4f}, "
          f"S1 {q['purity_S1']:.4f}, S2 {q['purity_S2']:.4f} | final all {q['purity_final_all']:.4f}, "
          f"kept {q['purity_final_kept']:.4f} ({q['kept_fraction']:.1%} kept; plain k-means purified to "
          f"the same share {q['purity_plain_kept_at_share']:.4f})")
    print(f"ambiguous images: {q['ambiguous_all']:.1%} of all, {q['ambiguous_S2']:.1%} of S2, "
          f"{q['ambiguous_kept']:.1%} of the kept set")
    result = {"args": vars(args), "epochs": epochs, "seconds_total": total_s, "load_after": load_after,
              "stages": {s: summary["stages"][s] for s in STAGES},
              "peak_rss": {s: {"driver": v["driver"], "worker": v["worker"][0], "worker_process": v["worker"][1],
                               "other": v["other"][0]} for s, v in sampler.peaks.items()},
              "objective_kmeans1": objective, **f, "objective_ratio": objective / f["faiss_sample_objective"], **q}
    storage.write_json(Storage.join(args.out, "result.json"), result)
    print(f"written {Storage.join(args.out, 'result.json')}")


if __name__ == "__main__":
    main()
