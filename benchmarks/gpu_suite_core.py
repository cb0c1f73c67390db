"""What the checks of ``benchmarks/gpu_suite.py`` share: the sizes of a run (:class:`Profile`), the
run's state (:class:`Context`), the rows of the result table (:class:`RowSpec`, :class:`Row`) and
the synthetic JPEGs every check reads.

Two profiles: ``gpu`` builds the real architectures at the sizes of the ImageNet-S919 job config
(DINO ViT-S/8 at 224, SAM ViT-B at 1024, k-means 1.28 M × 384 → 919, fine-tuning batch 32 at 224),
``smoke`` the tiny test models at sizes that run in seconds on one CPU core. The checks are the
same code for both.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from timing import Rounds, bare_loop_flag

KMEANS_ROWS = 1_281_167  # ImageNet-1k train: the scale docs/architecture.md §9 quotes


@dataclass(frozen=True)
class Profile:
    """Sizes of one run. ``caps`` maps a check's name to its time cap in seconds."""

    name: str
    budget_s: float
    caps: dict[str, float]
    # synthetic JPEGs (decode, features stage, pretraining input)
    jpeg_hw: tuple[int, int]
    unique_jpegs: int
    # DINO features stage
    dino_arch: str
    dino_size: int
    features_batch: int
    features_images: int  # per stage run
    bare_images: int  # per bare-forward measurement
    decode_images: int  # per GPU-decode measurement
    pil_images: int  # per PIL measurement
    # SAM / SPO
    sam_arch: str
    sam_size: int | None
    spo_images: int
    spo_hw: tuple[int, int]
    spo_classes: int
    spo_components: int
    spo_min_area: int
    # k-means
    kmeans_n: int
    kmeans_d: int
    kmeans_k: int
    kmeans_niter: int
    faiss_niter: int  # faiss-cpu runs fewer iterations; its time is scaled to kmeans_niter
    # fine-tuning
    finetune_classes: int
    finetune_batch: int
    finetune_crop: int
    finetune_steps: int  # per epoch; the second of two epochs is timed
    # DINO pretraining
    pretrain_batch: int
    pretrain_steps: int  # timed steps per measurement
    pretrain_global: int
    pretrain_local: int
    pretrain_num_local: int
    pretrain_out_dim: int
    pretrain_hidden: int
    pretrain_bottleneck: int

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def gpu_profile(job) -> Profile:
    """The real architectures, at the ImageNet-S919 job config's sizes (``job``: its
    :class:`~pdso_ray.config.PipelineConfig`). The caps before compile's sum to 345 s of a default
    450 s budget (8 minutes with start-up and tear-down); the checks typically take half their cap."""
    return Profile(
        name="gpu", budget_s=450.0,
        # The last check, compile, is the optional one: it runs on what the others left.
        caps={"decode": 30, "features": 100, "kmeans": 60, "spo": 45, "finetune": 60,
              "pretrain": 50, "spo_compiled": 150},
        jpeg_hw=(375, 500), unique_jpegs=64,
        dino_arch=job.models.dino.arch, dino_size=job.models.dino.image_size,
        features_batch=job.features.batch_size, features_images=8192, bare_images=2048,
        decode_images=512, pil_images=128,
        sam_arch=job.models.sam.arch, sam_size=job.models.sam.image_size, spo_images=8,
        spo_hw=(375, 500), spo_classes=3, spo_components=2,
        spo_min_area=job.pseudo_labels.refine.min_area,
        kmeans_n=KMEANS_ROWS, kmeans_d=384, kmeans_k=job.data.classes, kmeans_niter=job.cluster.niter,
        faiss_niter=2,
        finetune_classes=job.data.classes, finetune_batch=job.finetune.batch_size,
        finetune_crop=job.finetune.crop_size, finetune_steps=40,
        # DINO's ImageNet recipe: 64 images per GPU, 2 global views at 224, 8 local at 96,
        # 65,536 prototypes behind a 2048-wide head with a 256-d bottleneck.
        pretrain_batch=64, pretrain_steps=6, pretrain_global=224, pretrain_local=96,
        pretrain_num_local=8, pretrain_out_dim=65536, pretrain_hidden=2048, pretrain_bottleneck=256,
    )


def smoke_profile() -> Profile:
    """Tiny models and data: the same code paths in well under a minute on one CPU core."""
    return Profile(
        # Caps stop a hung check; they are generous because a shared 2-core machine can run 3-5x
        # slower than a quiet one (~30 s in all there).
        name="smoke", budget_s=300.0,
        caps={"decode": 20, "features": 120, "kmeans": 20, "spo": 30, "finetune": 60, "pretrain": 20,
              "spo_compiled": 20},
        jpeg_hw=(60, 80), unique_jpegs=8,
        dino_arch="vit_tiny_test", dino_size=32, features_batch=8, features_images=32, bare_images=32,
        decode_images=16, pil_images=16,
        sam_arch="vit_tiny_test", sam_size=None, spo_images=2, spo_hw=(96, 128), spo_classes=2,
        spo_components=1, spo_min_area=50,
        kmeans_n=8192, kmeans_d=32, kmeans_k=16, kmeans_niter=4, faiss_niter=2,
        finetune_classes=3, finetune_batch=4, finetune_crop=32, finetune_steps=3,
        pretrain_batch=4, pretrain_steps=2, pretrain_global=32, pretrain_local=16, pretrain_num_local=2,
        pretrain_out_dim=64, pretrain_hidden=32, pretrain_bottleneck=16,
    )


@dataclass
class Context:
    """One run: its profile, device, scratch folder (local disk; removed at the end), CPU threads
    the all-core baselines may use, rounds per comparison, whether to try ``torch.compile``, and
    the synthetic JPEGs. Ray is started on first use and shared by the checks that need it."""

    profile: Profile
    device: str  # "cuda" or "cpu"
    work: str
    threads: int
    rounds: int
    compile: bool
    jpegs: list[bytes] = field(default_factory=list)
    ray_started: bool = False

    def ray(self) -> None:
        """Start a private local Ray (idempotent). Workers inherit this process's environment, so
        ``PYTHONPATH`` (set by the suite) lets them import ``pdso_ray`` and the benchmark modules."""
        import ray
        import torch

        if self.ray_started and ray.is_initialized():
            return
        gpu = self.device == "cuda"
        # GPUs named, not detected: a GPU actor on a Ray that missed the GPU would wait forever.
        # On the CPU, one CPU for the model actor and one for decode and writers.
        ray.init(address="local", num_cpus=self.threads if gpu else max(2, self.threads),
                 num_gpus=torch.cuda.device_count() if gpu else 0, include_dashboard=False, log_to_driver=False)
        quiet_ray_data()
        self.ray_started = True

    def stop_ray(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self.ray_started = False


def free_gpu() -> None:
    """Drop what the last measurement left on the GPU, so the next one starts with it free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quiet_ray_data() -> None:
    """No progress bars, execution plans or stats in the suite's output."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass(frozen=True)
class RowSpec:
    """What one row of the table compares. ``unit`` is the unit of both values;
    ``lower_is_better`` for durations. ``bare_loop``: the baseline is a bare loop of the same
    work, so a path faster than it is a measurement error (timing.bare_loop_flag)."""

    name: str
    what: str
    path: str
    baseline: str
    unit: str
    lower_is_better: bool = False
    bare_loop: bool = False


@dataclass
class Row:
    """A row of the result table. ``ratio`` is the median over rounds of path speed / baseline
    speed (> 1: the path is faster), ``ratios`` the per-round ones; ``path_value`` and
    ``baseline_value`` are medians in ``spec.unit``. Skipped and failed rows keep None values and
    say why in ``note``."""

    spec: RowSpec
    status: str = "skipped"  # measured | skipped | failed
    path_value: float | None = None
    baseline_value: float | None = None
    ratio: float | None = None
    ratios: list[float] = field(default_factory=list)
    rounds: int = 0
    flag: str | None = None
    seconds: float | None = None  # wall time of its check
    cpu_seconds: float | None = None  # this process's CPU time in it (far below wall: a busy host)
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("spec"))
        return out

    def finite(self) -> bool:
        """Every number of a measured row is finite (what JSON and the table can hold)."""
        numbers = [self.path_value, self.baseline_value, self.ratio, *self.ratios, *self.extra.values()]
        return all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)


@dataclass(frozen=True)
class Check:
    """One sub-benchmark: its ``name`` (the key of its cap, and of ``--only``), the rows it fills
    (``specs``, known before it runs so that a skipped check still has its rows) and ``run``."""

    name: str
    specs: Callable[[Context], list[RowSpec]]
    run: Callable[[Context, list[RowSpec]], list[Row]]


def measured(spec: RowSpec, rounds: Rounds, path: str, baseline: str, key: str = "rate",
             note: str = "", extra: dict[str, float] | None = None) -> Row:
    """A measured row from interleaved rounds of the contenders ``path`` and ``baseline``."""
    # The ratio is always path speed / baseline speed: for durations, baseline / path.
    num, den = (baseline, path) if spec.lower_is_better else (path, baseline)
    ratios = rounds.ratios(num, den, key)
    ratio = rounds.ratio(num, den, key)
    return Row(spec, status="measured", path_value=rounds.median(path, key),
               baseline_value=rounds.median(baseline, key), ratio=ratio, ratios=ratios,
               rounds=rounds.count, flag=bare_loop_flag(ratio) if spec.bare_loop else None,
               note=note, extra=dict(extra or {}))


def synthetic_jpegs(n: int, hw: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``n`` distinct photo-like JPEGs (quality 90) of ``hw`` pixels: a smooth colour field with
    fine noise, so their size (~50-90 kB at 375×500) and decode cost resemble ImageNet's
    rather than those of pure noise (3-4× larger) or flat colour (tiny)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = hw
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        field_ = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field_ + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_imagenet_s(root: str, jpegs: list[bytes], images: int, classes: int = 8) -> str:
    """``root/ImageNetS{classes}/train/<wnid>/img_<i>.JPEG``: ``images`` files cycling through
    ``jpegs`` (the decode work per file is that of a distinct photo; the page cache makes the
    reads cheap on both sides). Returns ``root``."""
    for i in range(images):
        folder = os.path.join(root, f"ImageNetS{classes}", "train", f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"img_{i:06d}.JPEG"), "wb") as f:
            f.write(jpegs[i % len(jpegs)])
    return root
