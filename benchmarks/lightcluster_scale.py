"""LightCluster's driver-side clustering at ImageNet-S919 scale on one machine: time and memory.

    python benchmarks/lightcluster_scale.py [--fraction 0.1 | --n 128117] [--ppi 4] [--nredo 30]
        [--d 384 --classes 919 --cpus 2 --images-per-file 16 --segment-images 8]
        [--parts levels,labelling,segment] [--sequential-read] [--out runs/lightcluster_scale] [--smoke]
    python benchmarks/lightcluster_scale.py --fit [--sequential-read] [--out runs/lightcluster_scale]

Stage ``lightcluster`` streams its per-image passes (DINO on GPUs, cost linear in images); what
grows with the data set and runs on the driver or over Ray actors is measured here, with the
stage's own code (:meth:`LightClusterStage._fit_levels` and ``._label_classes`` on a
:class:`RunContext` whose ``output`` is the synthetic data's folder):

* **dataset** level: the distributed k-means (k = ``lightcluster.dataset_k``, ``nredo``, trained
  on at most ``DATASET_POINTS_PER_CLUSTER`` rows per cluster, every row assigned) over the patch
  sample ``levels/samples/`` (``patches_per_image`` rows per image), and the driver reading its
  saliency column;
* **category** level: ``read_parquet(samples).groupby("category", num_partitions=min(C, files))
  .map_groups(fit_category)``, a hash shuffle of the whole sample (``--sequential-read`` sets Ray
  Data's ``preserve_order``, which reads a task's files one by one instead of one thread each);
* **labelling**: the k-means (K = C, ``nredo``, every row trained on) over one vector per train
  image (``levels/vectors/train/``); **labelling_driver**: the driver building ``{id: class}``
  and placing the evaluation vectors at their nearest centroid;
* **segment** (per image, one CPU thread): the segment pass's work beside the backbone on a
  random ViT-S/8 at 224 — the two forward passes (GPU in production), the image-level k-means
  over 28×28 patches, the dataset/category level masks, upsampling and ``refine_mask`` at
  ``refine_short_side``.

1. **Data.** Written by a separate process (the driver's peak memory is the stage's alone) under
   ``OUT/data/<size>/`` in the stage's formats, one file per ``--images-per-file`` images (the
   stage writes one per batch, ``lightcluster.batch_size`` = 16), named by ``shard_name``:
   ``cluster/centroids.npy`` (C×D), ``lightcluster/levels/samples/`` (id, category int32,
   saliency float32, feat list<float32>) and ``levels/vectors/{train,eval}/`` (id, has_object,
   vector). Patches: foreground or background (probability of foreground per image uniform in
   [0.2, 0.6]); feature = unit(population direction + 0.6 · its category's offset for that
   population + isotropic noise of norm 0.6); saliency N(0.65, 0.15) on foreground, N(0.25, 0.15)
   on background, clipped to [0, 1]. Vectors: unit(class centre + noise of norm 0.8), centres of
   ``s919_scale.make_classes`` (families of siblings); 97% of images have an object; the category
   of an image is its class. Evaluation images: ImageNet-S919's 39,842 (validation + test) times
   the fraction.
2. **Phases.** ``pdso_ray.kmeans.kmeans`` and the stage's ``column_values`` are wrapped (timing
   only; the k-means gets an ``on_iteration`` callback) to cut the wall time into the phases
   above, and each k-means into *load* (shard actors starting and reading their rows), *iterate*
   (``nredo`` × up to ``niter`` Lloyd steps; the median step time is reported) and *assign* (the
   final nearest-centroid pass over every row).
3. **Memory and CPU.** Every 0.5 s: peak RSS (VmHWM, reset at each phase through
   ``/proc/PID/clear_refs``) of the driver and of the largest Ray worker (``ray::...``), the lowest
   MemAvailable of the machine, and the CPU seconds the driver and every process below it spent
   (on a shared machine the wall time grows with the load, the CPU time much less); every 2 s and at each phase change, the sum of the PSS of the driver and every
   process below it (the run's memory: a shared object-store page counts once, split over the
   processes mapping it), whose largest sample is the phase's ``tree`` peak. Below
   ``--min-free-gib`` available, or past ``--max-threads`` threads in one process, the run is
   interrupted and the JSON says where (the machine has no swap: the next step is the OOM killer).
4. **Sanity.** Foreground accuracy of the fitted dataset-level and category-level models on the
   synthetic truth of (up to 200k) sampled patches, and the purity of the labelling.
5. **Output.** A table, and ``OUT/results/<size>.json``. ``--fit`` reads the complete results
   under ``OUT/results/`` of the same D, C, images per file and read variant, fits each part's
   wall seconds, CPU seconds and memory as a + b·size (size: sample rows for the levels, per
   ``patches_per_image``; train images for the labelling, from ``--parts labelling`` runs when
   there are any, per ``nredo`` for its CPU; rows × K for one Lloyd step), gives the log-log
   exponent, extrapolates to S919 and writes ``OUT/fits.json``. The CPU of one Lloyd step comes
   from two runs of the same rows with different ``nredo`` (Δ CPU / Δ steps), scaled by rows × K
   to S919 and multiplied by ``nredo`` × ``niter``.
"""

from __future__ import annotations

import _thread
import argparse
import glob
import json
import logging
import math
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

from s919_scale import S919_IMAGES, load_average, make_classes, purity

from pdso_ray.storage import Storage
from pdso_ray.tables import arrow_to_vectors, iter_row_groups, parquet_files, save_array, shard_name, vectors_to_arrow, write_table

S919_EVAL_IMAGES = 12_419 + 27_423  # validation + test
PHASES = ("dataset", "category", "labelling", "labelling_driver")
SANITY_ROWS = 200_000
GIB = 1024**3
log = logging.getLogger("lightcluster_scale")


# ---- synthetic data -----------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _noise(rng: np.random.Generator, n: int, d: int, norm: float) -> np.ndarray:
    return (norm / math.sqrt(d)) * rng.standard_normal((n, d), dtype=np.float32)


def _files(ids: list[str], per_file: int) -> list[tuple[str, slice]]:
    """(shard_name, rows) of consecutive groups of ``per_file`` ids, sorted by name: the order
    ``parquet_files`` lists them in, so row truths can be kept in that order."""
    groups = [slice(a, min(a + per_file, len(ids))) for a in range(0, len(ids), per_file)]
    return sorted(((shard_name(ids[g]), g) for g in groups), key=lambda t: t[0])


def write_data(folder: str, p: dict[str, Any]) -> None:
    """The stage's inputs for ``p`` (module docstring, step 1) and ``truth.npz``: ``fg`` (sample
    rows in listing order, bool) and ``image_class`` (train images by number, int32)."""
    from pdso_ray.run_layout import RunLayout

    storage, run = Storage(), RunLayout(folder, method="lightcluster")
    n, d, c, ppi, seed = p["n"], p["d"], p["classes"], p["ppi"], p["seed"]
    rng = np.random.default_rng([seed, 0])
    classes = make_classes(c, d, seed)
    save_array(storage, run.centroids_file("cluster"), classes.centres)
    population = _unit(rng.standard_normal((2, d))).astype(np.float32)  # 0 background, 1 foreground
    offsets = _unit(rng.standard_normal((2, c, d))).astype(np.float32)
    image_class = rng.integers(0, c, n).astype(np.int32)
    fg_share = rng.uniform(0.2, 0.6, n)
    train_ids = [f"train/synthetic/img_{i:08d}" for i in range(n)]
    fg_truth = []
    for f, (name, g) in enumerate(_files(train_ids, p["images_per_file"])):
        r = np.random.default_rng([seed, 1, f])
        cls = np.repeat(image_class[g], ppi)
        fg = r.random(len(cls)) < np.repeat(fg_share[g], ppi)
        pop = fg.astype(np.int64)
        feat = _unit(population[pop] + 0.6 * offsets[pop, cls] + _noise(r, len(cls), d, 0.6))
        sal = np.clip(np.where(fg, 0.65, 0.25) + 0.15 * r.standard_normal(len(cls)), 0, 1).astype(np.float32)
        write_table(storage, run.lightcluster_path("samples", name), pa.table({
            "id": pa.array(np.repeat(np.asarray(train_ids[g], dtype=object), ppi), pa.string()),
            "category": pa.array(cls, pa.int32()), "saliency": pa.array(sal, pa.float32()),
            "feat": vectors_to_arrow(feat)}))
        fg_truth.append(fg)
    n_eval = max(1, round(n * S919_EVAL_IMAGES / S919_IMAGES))
    eval_class = rng.integers(0, c, n_eval)
    for split, ids, labels in (("train", train_ids, image_class),
                               ("eval", [f"validation/synthetic/img_{i:08d}" for i in range(n_eval)], eval_class)):
        for f, (name, g) in enumerate(_files(ids, p["images_per_file"])):
            r = np.random.default_rng([seed, 2 if split == "train" else 3, f])
            lab = labels[g]
            vec = _unit(classes.centres[lab] + _noise(r, len(lab), d, 0.8))
            write_table(storage, run.lightcluster_path("vectors", split, name), pa.table({
                "id": pa.array(ids[g], pa.string()), "has_object": pa.array(r.random(len(lab)) < 0.97, pa.bool_()),
                "vector": vectors_to_arrow(vec)}))
    with storage.open(Storage.join(folder, "truth.npz"), "wb") as fh:
        np.savez(fh, fg=np.concatenate(fg_truth), image_class=image_class)
    storage.write_json(Storage.join(folder, "data.json"), p)


def ensure_data(folder: str, p: dict[str, Any]) -> float:
    """Write the data in a child process unless ``folder`` holds it already; returns seconds."""
    storage = Storage()
    meta = Storage.join(folder, "data.json")
    if storage.exists(meta) and storage.read_json(meta) == p:
        return 0.0
    storage.remove(folder, recursive=True)
    t0 = time.perf_counter()
    proc = multiprocessing.get_context("spawn").Process(target=write_data, args=(folder, p))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"writing the synthetic data failed (exit code {proc.exitcode})")
    return time.perf_counter() - t0


# ---- memory -------------------------------------------------------------------------------------
def _status(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields of /proc/PID/status: sizes (VmHWM, ...) in bytes, Threads as a count."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name = line.split(":", 1)[0]
            if name in keys:
                out[name] = int(line.split()[1]) * (1 if name == "Threads" else 1024)
    return out


def _pss(pid: int) -> int:
    """Proportional set size of PID in bytes: its private pages plus its share of each shared page
    (the object store's pages count once over the processes mapping them)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _descendants(root: int) -> dict[int, float]:
    """``root`` and every process below it → its CPU seconds so far (user + system), from
    /proc/*/stat."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
            except OSError:
                continue  # gone between the listing and the read
            pid = int(entry)
            children.setdefault(int(fields[1]), []).append(pid)
            cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        out[pid] = cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return out


def _title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:60]


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class PhaseMemory:
    """Per phase: ``driver`` (peak RSS), ``worker`` (largest peak RSS of a ``ray::`` process, and
    its title), ``cpu`` (CPU seconds of the driver and its descendants, summed over the samples),
    ``tree`` (largest sampled PSS sum of the driver and its descendants: the memory
    the run holds, shared pages counted once; sampled every ``pss_interval`` seconds and at each
    phase change, as reading it walks every mapped page), ``available_min`` (lowest MemAvailable)
    and ``threads`` (most threads seen in one process, and its title), the others every
    ``interval`` seconds; peaks are reset at each :meth:`set_phase`. When MemAvailable drops
    below ``min_free``, or a process has more than ``max_threads`` threads (0: no limit), the
    main thread gets a KeyboardInterrupt and :attr:`tripped` says where."""

    def __init__(self, min_free: int, max_threads: int = 0, interval: float = 0.5, pss_interval: float = 2.0):
        self._root = os.getpid()
        self.min_free, self.max_threads, self.interval = min_free, max_threads, interval
        self.pss_interval, self._pss_at = pss_interval, -math.inf
        self._cpu_seen: dict[int, float] = {}
        self.phase, self.peaks, self.tripped = "setup", {}, None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PhaseMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._sample(pss=True)

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self._sample(pss=True)
            for pid in _descendants(self._root):  # the peaks of the next phase start from the current RSS
                try:
                    with open(f"/proc/{pid}/clear_refs", "w") as f:
                        f.write("5")
                except OSError:
                    pass
            self.phase = phase

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._sample(pss=time.monotonic() - self._pss_at >= self.pss_interval)

    def _sample(self, pss: bool) -> None:
        peaks = self.peaks.setdefault(self.phase, {"driver": 0, "worker": 0, "worker_process": "", "cpu": 0.0,
                                                   "tree": 0, "available_min": math.inf, "threads": 0,
                                                   "threads_process": ""})
        if pss:
            self._pss_at = time.monotonic()
        tree = 0
        for pid, cpu in _descendants(self._root).items():
            # a process born since the last sample spent all of its CPU time in this run
            peaks["cpu"] += cpu - self._cpu_seen.get(pid, 0.0)
            self._cpu_seen[pid] = cpu
            try:
                st = _status(pid, ("VmHWM", "Threads"))
                tree += _pss(pid) if pss else 0
                title = "driver" if pid == self._root else _title(pid)
            except OSError:
                continue  # gone between the listing and the read
            if st.get("Threads", 0) > peaks["threads"]:
                peaks["threads"], peaks["threads_process"] = st["Threads"], title
            if pid == self._root:
                peaks["driver"] = max(peaks["driver"], st.get("VmHWM", 0))
            elif title.startswith("ray::") and st.get("VmHWM", 0) > peaks["worker"]:
                peaks["worker"], peaks["worker_process"] = st["VmHWM"], title
        peaks["tree"] = max(peaks["tree"], tree)
        available = mem_available()
        peaks["available_min"] = min(peaks["available_min"], available)
        if self.tripped is None and (available < self.min_free or 0 < self.max_threads < peaks["threads"]):
            self.tripped = {"phase": self.phase, "available": available, "threads": peaks["threads"]}
            _thread.interrupt_main()


# ---- timing the stage's calls -------------------------------------------------------------------
class Phases:
    """Wall-clock marks between phases, each also switching the memory sampler's phase."""

    def __init__(self, memory: PhaseMemory):
        self.memory, self.marks = memory, []

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.perf_counter()))
        self.memory.set_phase(phase)

    def seconds(self) -> dict[str, float]:
        return {a: t1 - t0 for (a, t0), (_, t1) in zip(self.marks, self.marks[1:]) if a != "idle"}


def kmeans_timing(t0: float, stamps: list[tuple[int, float]], t1: float) -> dict[str, float]:
    """Split one k-means call (entered at ``t0``, left at ``t1``; ``stamps`` = (redo, time) after
    each Lloyd step) into load, iterate and assign seconds."""
    steps = [b - a for (ra, a), (rb, b) in zip(stamps, stamps[1:]) if ra == rb]
    step = statistics.median(steps) if steps else (stamps[0][1] - t0 if stamps else 0.0)
    first, last = (stamps[0][1], stamps[-1][1]) if stamps else (t0, t0)
    return {"seconds": t1 - t0, "load": max(0.0, first - t0 - step), "iterate": last - first + step,
            "assign": t1 - last, "steps": len(stamps), "redos": len({r for r, _ in stamps}), "step": step}


@contextmanager
def instrumented(phases: Phases, timings: dict[str, Any]):
    """Wrap ``pdso_ray.kmeans.kmeans`` (looked up by the stage at call time) and the stage
    module's ``column_values``: each k-means's timing goes to ``timings[<dataset|labelling>]``;
    the dataset phase ends when the saliency is read, the labelling phase when its k-means
    returns."""
    import pdso_ray.kmeans as kmeans_module
    import pdso_ray.stages.lightcluster as stage_module

    real_kmeans, real_column_values = kmeans_module.kmeans, stage_module.column_values

    def kmeans(*args: Any, **kwargs: Any):
        name = "dataset" if kwargs.get("column") == "feat" else "labelling"
        stamps: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        result = real_kmeans(*args, on_iteration=lambda redo, i, obj: stamps.append((redo, time.perf_counter())),
                             progress=False, **kwargs)
        timings[name] = {**kmeans_timing(t0, stamps, time.perf_counter()), "rows": int(len(result.assignments)),
                         "k": int(args[1])}
        if name == "labelling":
            phases.mark("labelling_driver")
        return result

    def column_values(*args: Any, **kwargs: Any):
        t0 = time.perf_counter()
        out = real_column_values(*args, **kwargs)
        timings["saliency_read"] = time.perf_counter() - t0
        phases.mark("category")
        return out

    kmeans_module.kmeans, stage_module.column_values = kmeans, column_values
    try:
        yield
    finally:
        kmeans_module.kmeans, stage_module.column_values = real_kmeans, real_column_values


# ---- sanity -------------------------------------------------------------------------------------
def foreground_accuracy(storage: Storage, folder: str, state: Any, fg_truth: np.ndarray) -> dict[str, float]:
    """Accuracy of the dataset-level and category-level foreground calls on the first
    :data:`SANITY_ROWS` sampled patches (listing order)."""
    from pdso_ray.method.lightcluster import nearest_centroid
    from pdso_ray.run_layout import RunLayout

    files = parquet_files(storage, RunLayout(folder, method="lightcluster").lightcluster_path("samples"))
    feats, cats = [], []
    for table in iter_row_groups(storage, files, ["category", "feat"]):
        feats.append(arrow_to_vectors(table.column("feat")))
        cats.append(table.column("category").to_numpy())
        if sum(map(len, cats)) >= SANITY_ROWS:
            break
    x, cat = np.concatenate(feats), np.concatenate(cats).astype(np.int64)
    truth = fg_truth[:len(x)]
    dataset = state.dataset.foreground[nearest_centroid(x, state.dataset.centroids)]
    category = np.empty(len(x), dtype=bool)
    for a in range(0, len(x), 16_384):  # each row against its own category's k centroids
        cc = state.categories.centroids[cat[a:a + 16_384]]  # rows×k×D
        nearest = ((cc - x[a:a + 16_384, None, :]) ** 2).sum(-1).argmin(1)
        category[a:a + 16_384] = state.categories.foreground[cat[a:a + 16_384], nearest]
    return {"rows": int(len(x)), "dataset_fg_accuracy": float((dataset == truth).mean()),
            "category_fg_accuracy": float((category == truth).mean()), "fg_share": float(truth.mean())}


def labelling_purity(classes: dict[str, int], image_class: np.ndarray) -> dict[str, float]:
    train = [(int(i.rsplit("_", 1)[1]), c) for i, c in classes.items() if i.startswith("train/") and c >= 0]
    rows = np.asarray([r for r, _ in train])
    return {"labelled_train": len(train), "labelling_purity": purity(np.asarray([c for _, c in train]), image_class[rows])}


# ---- per-image segment work ---------------------------------------------------------------------
def segment_costs(state: Any, images: int, d: int, threads: int, seed: int, warmup: bool = True) -> dict[str, Any]:
    """Median seconds per image (wall, and this thread's CPU) of each piece of the segment pass's
    work on ``threads`` CPU threads, random ViT-S/8 at 224 (features are its keys, D = 384), images
    at the stage's ``refine_short_side`` (320×427); ``warmup`` times one image more and drops it."""
    import torch

    from pdso_ray.config import LightClusterConfig
    from pdso_ray.method.features import saliency_from_attention
    from pdso_ray.method.lightcluster import (LightClusterParams, consistent_mask, image_level_mask, level_mask,
                                              segment_image)
    from pdso_ray.method.mask_refine import refine_mask, upsample_mask
    from pdso_ray.models.dino import build_dino, to_model_input

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    lc = LightClusterConfig()
    # The cost of the paper's three-level rule, every level computed (an upper bound: the default
    # votes with the image level alone, but every run still writes all levels for the ablation).
    params = LightClusterParams(image_k=lc.image_k, voters=("dataset", "category", "image"), min_votes=2,
                                niter=lc.niter, refine_iterations=lc.refine_iterations, seed=seed)
    model = build_dino("vit_small_patch8", None, img_size=224).eval()
    if state.dataset.centroids.shape[1] != model.embed_dim:
        raise ValueError(f"the segment costs need --d {model.embed_dim} (ViT-S keys), got {d}")
    rng = np.random.default_rng([seed, 4])
    h, w = lc.refine_short_side, round(lc.refine_short_side * 4 / 3)
    pieces: dict[str, list[tuple[float, float]]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        pieces.setdefault(name, []).append((time.perf_counter() - t0, time.thread_time() - c0))
        return out

    for i in range(images + warmup):
        if warmup and i == 1:  # the first image warmed up (allocator, lazy init)
            pieces.clear()
        # smooth random colour fields: edges for the refinement to follow
        small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        image = np.asarray(torch.nn.functional.interpolate(torch.as_tensor(small).permute(2, 0, 1)[None].float(),
                                                           size=(h, w), mode="bilinear")[0].permute(1, 2, 0).byte())
        x = to_model_input([image], 224)
        with torch.inference_mode():
            out = timed("forward (keys + CLS attention)", lambda: model.attention_features(x, kind="key"))
            feats = out.features[0].numpy()
            sal = saliency_from_attention(out.cls_attention)[0].numpy()
            category = int(rng.integers(0, state.categories.centroids.shape[0]))
            masks = [timed("dataset level mask", lambda: level_mask(feats, state.dataset)),
                     timed("category level mask", lambda: level_mask(feats, state.categories.level(category))),
                     timed("image-level k-means (28x28 patches)",
                           lambda: image_level_mask(feats, sal, params.image_k, params.niter, params.seed))]
            patch = timed("consistency", lambda: consistent_mask(masks, params.min_votes)[0])
            soft = timed(f"upsampling to {h}x{w}", lambda: upsample_mask(patch, (h, w)))
            timed(f"refine_mask at {h}x{w}, {params.refine_iterations} steps",
                  lambda: refine_mask(image, soft, params.refine_iterations, params.refine_dilations,
                                      params.refine_temperature))
            patch_mask = torch.as_tensor(patch)[None]
            timed("masked forward (object CLS)", lambda: model.attention_features(x, kind=None, patch_mask=patch_mask))
            timed("segment_image (all of the CPU work)", lambda: segment_image(feats, sal, image, state, category, params))
    return {"images": images, "threads": threads, "size": [h, w],
            "pieces": {k: {"wall": statistics.median(v[0] for v in vals), "cpu": statistics.median(v[1] for v in vals)}
                       for k, vals in pieces.items()}}


# ---- the run ------------------------------------------------------------------------------------
def run_stage(folder: str, p: dict[str, Any], nredo: int, memory: PhaseMemory, parts: set[str]) -> dict[str, Any]:
    """The stage's driver steps on ``folder``: timings, peaks, sanity and the fitted state."""
    from pdso_ray.config import load_config
    from pdso_ray.stages.base import RunContext
    from pdso_ray.stages.lightcluster import LightClusterStage

    cfg = load_config(None, [f"output={folder}", "method=lightcluster", f"data.classes={p['classes']}",
                             f"lightcluster.patches_per_image={p['ppi']}", f"lightcluster.nredo={nredo}",
                             f"seed={p['seed']}"])
    ctx, stage, storage = RunContext(cfg, Storage()), LightClusterStage(), Storage()
    with storage.open(Storage.join(folder, "truth.npz"), "rb") as fh:
        truth = dict(np.load(fh))
    phases, timings, out = Phases(memory), {}, {"niter": cfg.lightcluster.niter}
    with instrumented(phases, timings):
        if "levels" in parts:
            phases.mark("dataset")
            out["state"] = stage._fit_levels(ctx)
            phases.mark("idle")
            out["sanity"] = foreground_accuracy(storage, folder, out["state"], truth["fg"])
        if "labelling" in parts:
            phases.mark("labelling")
            classes = stage._label_classes(ctx)
            phases.mark("idle")
            out["sanity"] = {**out.get("sanity", {}), **labelling_purity(classes, truth["image_class"]),
                             "classes_assigned": len(classes)}
    out["phases"] = phases.seconds()
    out["kmeans"] = {k: v for k, v in timings.items() if k != "saliency_read"}
    out["saliency_read"] = timings.get("saliency_read")
    return out


def variant(args: argparse.Namespace) -> str:
    """How Ray Data was set up for the category read: ``stage`` = as the stage runs it."""
    return "seq" if args.sequential_read else "stage"


def data_name(p: dict[str, Any]) -> str:
    return f"n{p['n']}_ppi{p['ppi']}_ipf{p['images_per_file']}_c{p['classes']}_d{p['d']}_s{p['seed']}"


def print_run(result: dict[str, Any]) -> None:
    p = result["data"]
    print(f"\nn={p['n']} images ({p['n'] / S919_IMAGES:.1%} of S919), ppi {p['ppi']} ({p['n'] * p['ppi']} sample rows), "
          f"nredo {result['nredo']}, {p['images_per_file']} images per file, {result['shuffle_partitions']} shuffle "
          f"partitions{', sequential read' if result['args'].get('sequential_read') else ''}; load average before "
          f"{result['load_before']}, after {result['load_after']}")
    phases = [phase for phase in PHASES if phase in result["phases"]]
    if phases:
        print(f"{'phase':17s} {'seconds':>8s} {'cpu s':>7s} {'driver GiB':>10s} {'worker GiB':>10s} {'tree GiB':>9s} "
              f"{'avail min GiB':>13s} {'threads':>7s}")
    for phase in phases:
        m = result["memory"].get(phase, {})
        print(f"{phase:17s} {result['phases'][phase]:8.1f} {m.get('cpu', 0):7.1f} {m.get('driver', 0) / GIB:10.2f} "
              f"{m.get('worker', 0) / GIB:10.2f} {m.get('tree', 0) / GIB:9.2f} {m.get('available_min', 0) / GIB:13.2f} "
              f"{m.get('threads', 0):7d} ({m.get('threads_process', '')[:24]})")
    for name, t in result["kmeans"].items():
        print(f"  k-means {name} (k={t['k']}, {t['rows']} rows): load {t['load']:.1f} s, {t['steps']} steps in "
              f"{t['redos']} redos, {t['step'] * 1e3:.1f} ms/step ({t['iterate']:.1f} s), assign {t['assign']:.1f} s")
    if result.get("saliency_read") is not None:
        print(f"  saliency column read on the driver: {result['saliency_read']:.1f} s")
    if result.get("sanity"):
        print("  sanity: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in result["sanity"].items()))
    if result.get("segment"):
        s = result["segment"]
        print(f"  segment pass per image ({s['images']} images, {s['threads']} thread, {s['size'][0]}x{s['size'][1]}):")
        for name, v in s["pieces"].items():
            print(f"    {name:42s} wall {v['wall'] * 1e3:8.1f} ms   cpu {v['cpu'] * 1e3:8.1f} ms")


def main_run(args: argparse.Namespace) -> None:
    import ray
    import ray.data

    n = args.n if args.n is not None else max(1, round(args.fraction * S919_IMAGES))
    p = {"n": n, "ppi": args.ppi, "d": args.d, "classes": args.classes, "seed": args.seed,
         "images_per_file": args.images_per_file}
    parts = set(args.parts.split(","))
    nredo = args.nredo
    if nredo is None:
        from pdso_ray.config import LightClusterConfig

        nredo = LightClusterConfig().nredo
    folder = Storage.join(args.out, "data", data_name(p))
    print(f"n={n} ppi={args.ppi} nredo={nredo} parts={sorted(parts)} cpus={args.cpus} load average {load_average()}",
          flush=True)
    gen = ensure_data(folder, p)
    print(f"data written in {gen:.0f} s" if gen else "data reused", flush=True)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    if args.sequential_read:  # Ray Data then reads a task's files one by one, not one thread per file
        data_context.execution_options.preserve_order = True
    # the stage's groupby("category", num_partitions=...): one partition per sample file, at most C
    p_shuffle = min(args.classes, math.ceil(n / args.images_per_file))
    result: dict[str, Any] = {"args": vars(args), "data": p, "nredo": nredo, "load_before": load_average(),
                              "data_seconds": gen, "shuffle_partitions": p_shuffle, "variant": variant(args)}
    t0 = time.perf_counter()
    with PhaseMemory(int(args.min_free_gib * GIB), args.max_threads) as memory:
        try:
            out = run_stage(folder, p, nredo, memory, parts & {"levels", "labelling"})
        except KeyboardInterrupt:
            if memory.tripped is None:
                raise
            out, result["aborted"] = {"phases": {}, "kmeans": {}}, memory.tripped
        except Exception as e:  # e.g. Ray's memory monitor killing a worker: keep what was measured
            log.exception("the stage failed")
            out, result["aborted"] = {"phases": {}, "kmeans": {}}, {"phase": memory.phase, "error": repr(e)[:500]}
    result["seconds"] = time.perf_counter() - t0
    result["load_after"] = load_average()
    ray.shutdown()
    state = out.pop("state", None)
    result.update(out)
    result["memory"] = {k: v for k, v in memory.peaks.items() if k in PHASES}
    if "segment" in parts and "aborted" not in result:
        if state is None:
            state = _random_state(args.classes, args.d, args.seed)
        result["segment"] = segment_costs(state, args.segment_images, args.d, 1, args.seed, warmup=not args.smoke)
    print_run(result)
    if "aborted" in result:
        a = result["aborted"]
        print(f"ABORTED in phase {a['phase']}: " + (a["error"] if "error" in a else
              f"MemAvailable {a['available'] / GIB:.2f} GiB (limit {args.min_free_gib} GiB), "
              f"{a['threads']} threads in one process (limit {args.max_threads or 'none'})"))
    url = Storage.join(args.out, "results", f"{data_name(p)}_nredo{nredo}_{variant(args)}_{'+'.join(sorted(parts))}.json")
    Storage().write_json(url, result)
    print(f"written {url}")


def _random_state(classes: int, d: int, seed: int):
    """A fitted-looking state for ``--parts segment`` alone (the costs do not depend on it)."""
    from pdso_ray.method.lightcluster import CategoryModels, LevelModel, LightClusterState

    rng = np.random.default_rng([seed, 5])
    level = lambda: LevelModel(_unit(rng.standard_normal((2, d))).astype(np.float32), np.array([False, True]))  # noqa: E731
    return LightClusterState(level(), CategoryModels.stack([level() for _ in range(classes)]),
                             _unit(rng.standard_normal((classes, d))).astype(np.float32))


# ---- fits ---------------------------------------------------------------------------------------
def _fit(x: list[float], y: list[float]) -> dict[str, float]:
    """y = a + b·x by least squares, and the exponent of y ∝ x^e (log-log slope)."""
    x_, y_ = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x_, y_, 1) if len(set(x)) > 1 else (y_.mean() / x_.mean(), 0.0)
    e = float(np.polyfit(np.log(x_), np.log(np.maximum(y_, 1e-9)), 1)[0]) if len(set(x)) > 1 else float("nan")
    return {"a": float(a), "b": float(b), "exponent": e, "points": len(x)}


def main_fit(args: argparse.Namespace) -> None:
    """Growth fits over ``OUT/results/*.json`` (module docstring, step 5)."""
    results = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(args.out, "results", "*.json")))]
    results = [r for r in results if "aborted" not in r and r["data"]["images_per_file"] == args.images_per_file
               and r["data"]["classes"] == args.classes and r["data"]["d"] == args.d
               and r.get("variant") == variant(args)]
    if not results:
        raise SystemExit(f"no complete results with {args.images_per_file} images per file in {args.out}/results")
    fits: dict[str, Any] = {}
    print(f"{'part':34s} {'size measure':24s} {'points':>6s} {'exponent':>8s} {'S919 extrapolation':>20s}")

    def report(name: str, measure: str, xs: list[float], ys: list[float], at: float, unit: str, scale: float = 1.0):
        if len(xs) < 2:
            return
        f = _fit(xs, ys)
        value = (f["a"] + f["b"] * at) / scale
        fits[name] = {**f, "measure": measure, "at": at, "s919": value, "unit": unit}
        print(f"{name:34s} {measure:24s} {f['points']:6d} {f['exponent']:8.2f} {value:14.1f} {unit}")

    for ppi in sorted({r["data"]["ppi"] for r in results}):
        rs = [r for r in results if r["data"]["ppi"] == ppi and "dataset" in r["phases"]]
        rows = [r["data"]["n"] * ppi for r in rs]
        at = S919_IMAGES * ppi
        for phase in ("dataset", "category"):
            report(f"{phase} seconds (ppi {ppi})", "sample rows", rows, [r["phases"][phase] for r in rs], at, "s")
            timed = [r for r in rs if "cpu" in r["memory"][phase]]  # results of before the CPU was sampled
            report(f"{phase} cpu seconds (ppi {ppi})", "sample rows", [r["data"]["n"] * ppi for r in timed],
                   [r["memory"][phase]["cpu"] for r in timed], at, "s")
            for role in ("driver", "worker", "tree"):
                report(f"{phase} {role} peak (ppi {ppi})", "sample rows", rows,
                       [r["memory"][phase][role] for r in rs], at, "GiB", GIB)
        report(f"dataset k-means load (ppi {ppi})", "sample rows", rows, [r["kmeans"]["dataset"]["load"] for r in rs], at, "s")
        report(f"dataset k-means assign (ppi {ppi})", "sample rows", rows,
               [r["kmeans"]["dataset"]["assign"] for r in rs], at, "s")
    rs = [r for r in results if "labelling" in r["kmeans"]]
    # a run that fitted the levels first carries their memory and idle workers into the labelling
    rs = [r for r in rs if "levels" not in r["args"]["parts"].split(",")] or rs
    niter = max((r.get("niter", 20) for r in rs), default=20)
    if rs:
        rows = lambda group: [r["kmeans"]["labelling"]["rows"] for r in group]  # noqa: E731
        report("labelling Lloyd step", "rows x K", [r["kmeans"]["labelling"]["rows"] * r["kmeans"]["labelling"]["k"] for r in rs],
               [r["kmeans"]["labelling"]["step"] for r in rs], S919_IMAGES * args.classes, "s")
        for part in ("load", "assign"):
            report(f"labelling k-means {part}", "rows", rows(rs), [r["kmeans"]["labelling"][part] for r in rs], S919_IMAGES, "s")
        timed = [r for r in rs if "cpu" in r["memory"]["labelling"]]
        for nredo in sorted({r["nredo"] for r in timed}):
            group = [r for r in timed if r["nredo"] == nredo]
            report(f"labelling cpu seconds (nredo {nredo})", "rows", rows(group),
                   [r["memory"]["labelling"]["cpu"] for r in group], S919_IMAGES, "s")
        report("labelling driver ({id: class})", "rows", rows(rs), [r["phases"]["labelling_driver"] for r in rs],
               S919_IMAGES, "s")
        for role in ("driver", "worker", "tree"):
            report(f"labelling {role} peak", "rows", rows(rs), [r["memory"]["labelling"][role] for r in rs],
                   S919_IMAGES, "GiB", GIB)
        # CPU of one Lloyd step: between two runs of the same rows and different step counts (nredo)
        per_step = []
        for n in sorted(set(rows(timed))):
            same = sorted((r["kmeans"]["labelling"]["steps"], r["memory"]["labelling"]["cpu"], r["kmeans"]["labelling"]["k"])
                          for r in timed if r["kmeans"]["labelling"]["rows"] == n)
            if same[-1][0] > same[0][0]:
                per_step.append((n * same[0][2], (same[-1][1] - same[0][1]) / (same[-1][0] - same[0][0])))
        if per_step:
            x, y = zip(*per_step)
            step = statistics.mean(y) / statistics.mean(x) * S919_IMAGES * args.classes  # linear in rows x K
            fits["labelling cpu per Lloyd step"] = {"points": len(per_step), "measure": "rows x K", "s919": step, "unit": "s"}
            for nredo in (1, 30):
                print(f"labelling k-means at S919: {step:.1f} CPU s per Lloyd step; nredo {nredo} x {niter} steps: "
                      f"{nredo * niter * step / 3600:.2f} CPU h")
    Storage().write_json(Storage.join(args.out, "fits.json"), fits)
    print(f"written {Storage.join(args.out, 'fits.json')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--fraction", type=float, default=0.05, help="of S919's 1,281,167 train images")
    size.add_argument("--n", type=int, help="train images (overrides --fraction)")
    p.add_argument("--ppi", type=int, default=4, help="lightcluster.patches_per_image")
    p.add_argument("--nredo", type=int, help="lightcluster.nredo (default: the config's, 30)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--classes", type=int, default=919)
    p.add_argument("--images-per-file", type=int, default=16, help="as the stage: lightcluster.batch_size")
    p.add_argument("--parts", default="levels,labelling,segment", help="comma-separated: levels,labelling,segment")
    p.add_argument("--segment-images", type=int, default=8, help="images timed for the per-image costs")
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs (k-means shards, Ray Data tasks)")
    p.add_argument("--sequential-read", action="store_true",
                   help="Ray Data's execution_options.preserve_order (the category read then uses no thread per file)")
    p.add_argument("--min-free-gib", type=float, default=2.0, help="interrupt below this MemAvailable")
    p.add_argument("--max-threads", type=int, default=0,
                   help="interrupt when a process has more threads (0: no limit; protects a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/lightcluster_scale")
    p.add_argument("--fit", action="store_true", help="fit and extrapolate the results under OUT/results")
    p.add_argument("--smoke", action="store_true", help="a tiny run (< 1 minute): 1,000 images, 8 classes, nredo 2")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.smoke:
        args.n, args.classes, args.nredo, args.segment_images = 1000, 8, 2, 1
    if args.fit:
        main_fit(args)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
