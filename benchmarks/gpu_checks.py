"""The inference checks of ``benchmarks/gpu_suite.py``: JPEG decode, the features stage, k-means
and SPO, each interleaved with its baseline (:func:`timing.interleave`).

Every check is a :class:`gpu_suite_core.Check`: the rows it fills, and a function that measures
them on the run's device with the run's profile. Ray workers import this module by name (the suite
puts ``benchmarks/`` on ``PYTHONPATH``) for :class:`TimedDinoFeatures`.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from gpu_suite_core import Check, Context, Row, RowSpec, measured, write_imagenet_s
from pdso_ray.stages.features import DinoFeatures, FeaturesStage
from timing import interleave, repeat, timed


# ---- decode ---------------------------------------------------------------------------------------
def decode_specs(ctx: Context) -> list[RowSpec]:
    p = ctx.profile
    h, w = p.jpeg_hw
    where = "nvJPEG" if ctx.device == "cuda" else "libjpeg, CPU"
    return [RowSpec("decode", f"JPEG {h}×{w} decode + resize to {p.dino_size}², bytes in memory",
                    path=f"data.batch_decode.decode_batch ({where}: header check, one batched decode_jpeg, "
                    f"CPU fallback) + resize on the device, batches of {p.decode_images}",
                    baseline="PIL (decode_image + resize_square, as the stage's CPU path), one core", unit="img/s")]


def run_decode(ctx: Context, specs: list[RowSpec]) -> list[Row]:
    from pdso_ray.data.batch_decode import decode_batch
    from pdso_ray.data.decode import decode_image, resize_square

    p, size = ctx.profile, ctx.profile.dino_size
    blobs = [ctx.jpegs[i % len(ctx.jpegs)] for i in range(p.decode_images)]

    def torchvision_decode() -> float:
        def work():
            for decoded in decode_batch(blobs, ctx.device):
                image = torch.as_tensor(decoded.image, device=ctx.device).permute(2, 0, 1)
                F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        return len(blobs) / timed(work, ctx.device)[0]

    def pil_decode() -> float:
        def work():
            for blob in blobs[: p.pil_images]:
                resize_square(decode_image(blob, target_short_side=size).image, size)
        return p.pil_images / timed(work)[0]

    # the same pixels within JPEG tolerance: the device's full-size decode against PIL's
    checked = decode_batch(ctx.jpegs, ctx.device)
    diffs = [np.abs(torch.as_tensor(d.image).cpu().numpy().astype(np.int16) - decode_image(b).image)
             for d, b in zip(checked, ctx.jpegs)]
    fallbacks = sum(bool(d.fallback) for d in checked)
    rounds = interleave({"torchvision": torchvision_decode, "pil": pil_decode}, ctx.rounds, warmup=True)
    kb = float(np.mean([len(b) for b in ctx.jpegs])) / 1000
    return [measured(specs[0], rounds, "torchvision", "pil",
                     extra={"jpeg_kb": kb, "pil_all_cores_img_s": rounds.median("pil") * ctx.threads,
                            "pixel_diff_mean": float(np.mean([d.mean() for d in diffs])),
                            "pixel_diff_max": int(max(d.max() for d in diffs)), "cpu_fallbacks": fallbacks})]


# ---- features stage -------------------------------------------------------------------------------
class TimedDinoFeatures(DinoFeatures):
    """The stage's DINO step, appending after each batch the wall clock and the batch's size to
    ``<run folder>.stamps``: on a local Ray the driver reads the file after the stage and takes
    the rate over batches 2..n, which leaves out actor start-up, model load and the first batch."""

    def __init__(self, cfg, storage, device_decode=None):
        super().__init__(cfg, storage, device_decode)
        self.stamps = cfg.output.rstrip("/") + ".stamps"

    def setup(self) -> None:
        super().setup()
        os.makedirs(os.path.dirname(self.stamps), exist_ok=True)

    def __call__(self, batch):
        out = super().__call__(batch)  # ends with a copy to the CPU: the batch's GPU work is done
        with open(self.stamps, "a") as f:
            f.write(f"{time.time():.6f} {len(batch['id'])}\n")
        return out


class TimedFeaturesStage(FeaturesStage):
    feature_step = TimedDinoFeatures


def steady_rate(stamps_file: str) -> tuple[float, int]:
    """(images/s over batches 2..n, number of batches) from :class:`TimedDinoFeatures` stamps."""
    with open(stamps_file) as f:
        stamps = sorted((float(t), int(n)) for t, n in (line.split() for line in f if line.strip()))
    if len(stamps) < 3:
        raise RuntimeError(f"{stamps_file}: {len(stamps)} batches; the steady rate needs >= 3")
    return sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0]), len(stamps)


def features_specs(ctx: Context) -> list[RowSpec]:
    p = ctx.profile
    h, w = p.jpeg_hw
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    return [RowSpec(
        "features", f"features stage, DINO {p.dino_arch} at {p.dino_size} px, batch {p.features_batch}, "
                    f"{p.features_images} JPEGs {h}×{w} per run",
        path="FeaturesStage on local Ray (read, decode, DINO, Parquet), batches 2..n",
        baseline=f"bare {precision} forward of the same model and batch (image + flip)",
        unit="img/s", bare_loop=True)]


def run_features(ctx: Context, specs: list[RowSpec]) -> list[Row]:
    from pdso_ray.config import load_config
    from pdso_ray.models.loading import DinoSource
    from pdso_ray.stages.base import RunContext
    from pdso_ray.storage import Storage

    p = ctx.profile
    gpu = ctx.device == "cuda"
    data = write_imagenet_s(os.path.join(ctx.work, "features_data"), ctx.jpegs, p.features_images)
    ctx.ray()

    def config(output: str):
        return load_config(None, [
            f"data.root={data}", f"output={output}", "data.classes=8", "stages=features",
            f"models.dino.arch={p.dino_arch}", f"models.dino.image_size={p.dino_size}",
            "models.allow_random_init=true", f"features.batch_size={p.features_batch}",
            "features.min_actors=1", "features.max_actors=1", "features.cpus_per_actor=1",
            "features.decode_cpus=1", f"ray.use_gpu={'true' if gpu else 'false'}"])

    runs = itertools.count()

    def stage() -> dict[str, float]:
        output = os.path.join(ctx.work, "features", f"run{next(runs)}")
        cfg = config(output)
        wall, _, counts = timed(lambda: TimedFeaturesStage().run(RunContext(cfg, Storage(), cluster_has_gpu=gpu)))
        if counts["images_ok"] != p.features_images:
            raise RuntimeError(f"features stage wrote {counts['images_ok']} of {p.features_images} images: {counts}")
        rate, batches = steady_rate(output + ".stamps")
        return {"rate": rate, "end_to_end": p.features_images / wall, "seconds": wall, "batches": batches}

    # The same weights as the stage's actor (DinoSource draws them from the config's seed).
    model = DinoSource.from_config(config(os.path.join(ctx.work, "unused"))).build().to(ctx.device).eval()
    x = torch.randn(p.features_batch, 3, p.dino_size, p.dino_size, device=ctx.device)
    x2 = torch.cat([x, torch.flip(x, dims=[3])])
    steps = math.ceil(p.bare_images / p.features_batch)

    def bare() -> float:
        with torch.inference_mode(), torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=gpu):
            model(x2)  # warm-up after the stage had the GPU
            wall = timed(lambda: repeat(lambda: model(x2), steps), ctx.device)[0]
        return steps * p.features_batch / wall

    rounds = interleave({"stage": stage, "bare": bare}, ctx.rounds)
    return [measured(specs[0], rounds, "stage", "bare", extra={
        "end_to_end_img_s": rounds.median("stage", "end_to_end"),
        "end_to_end_ratio": rounds.ratio("stage", "bare", "end_to_end", "rate"),
        "stage_s": rounds.median("stage", "seconds"), "batches": rounds.median("stage", "batches")})]


# ---- k-means --------------------------------------------------------------------------------------
def clustered_rows(n: int, d: int, k: int, device: str, seed: int = 0) -> np.ndarray:
    """n×d float32 L2-normalised rows around k random centres with heavy noise (like
    benchmarks/kmeans_vs_faiss.py's), drawn on ``device`` (seconds on a GPU at 1.28 M rows)."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(k, d, generator=g, device=device)
    labels = torch.randint(0, k, (n,), generator=g, device=device)
    x = centres[labels] + 1.5 * torch.randn(n, d, generator=g, device=device)
    return F.normalize(x, dim=1).cpu().numpy()


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def kmeans_specs(ctx: Context) -> list[RowSpec]:
    p = ctx.profile
    what = f"k-means {p.kmeans_n:,} × {p.kmeans_d} → {p.kmeans_k}, {p.kmeans_niter} iterations"
    baseline = (f"faiss-cpu Kmeans on all rows, {ctx.threads} thread(s) ({p.faiss_niter} iterations, "
                f"time × {p.kmeans_niter}/{p.faiss_niter})")
    unit = f"s / {p.kmeans_niter} it."
    return [RowSpec("kmeans_torch", what, path=f"pdso_ray.kmeans, torch kernel on {ctx.device} "
                    "(one in-process shard; + final assignment)", baseline=baseline, unit=unit,
                    lower_is_better=True),
            RowSpec("kmeans_faiss_gpu", what, path="faiss-gpu Kmeans on all rows", baseline=baseline,
                    unit=unit, lower_is_better=True)]


def run_kmeans(ctx: Context, specs: list[RowSpec]) -> list[Row]:
    import faiss

    from pdso_ray.kmeans import KMeansShards, kmeans

    p = ctx.profile
    gpu = ctx.device == "cuda"
    x = clustered_rows(p.kmeans_n, p.kmeans_d, p.kmeans_k, ctx.device)
    faiss.omp_set_num_threads(ctx.threads)

    def faiss_seconds(niter: int, on_gpu: bool) -> float:
        km = faiss.Kmeans(p.kmeans_d, p.kmeans_k, niter=niter, seed=0, gpu=on_gpu,
                          max_points_per_centroid=p.kmeans_n, verbose=False)  # no subsampling
        return timed(lambda: km.train(x))[0]

    with KMeansShards.create(x, num_shards=0, use_gpu=gpu, kernel="torch") as shards:
        kmeans(shards, p.kmeans_k, niter=1, seed=0, progress=False)  # warm-up: cuBLAS, allocator
        contenders = {
            "ours": lambda: {"seconds": timed(lambda: kmeans(shards, p.kmeans_k, niter=p.kmeans_niter, seed=0,
                                                             progress=False), ctx.device)[0]},
            "faiss_cpu": lambda: {"seconds": faiss_seconds(p.faiss_niter, False) * p.kmeans_niter / p.faiss_niter},
        }
        faiss_gpu = gpu and _faiss_gpus() > 0
        if faiss_gpu:
            contenders["faiss_gpu"] = lambda: {"seconds": faiss_seconds(p.kmeans_niter, True)}
        rounds = interleave(contenders, ctx.rounds)
    target = {"target_s": 1.0} if gpu else {}
    rows = [measured(specs[0], rounds, "ours", "faiss_cpu", key="seconds", extra=target,
                     note="target on GPU: <= 1 s per 20 iterations" if gpu else "")]
    if faiss_gpu:
        rows.append(measured(specs[1], rounds, "faiss_gpu", "faiss_cpu", key="seconds"))
    else:
        rows.append(Row(specs[1], note="faiss-gpu not installed (faiss.get_num_gpus() == 0)" if gpu
                        else "needs a CUDA device"))
    return rows


# ---- SPO ------------------------------------------------------------------------------------------
def _spo_inputs(ctx: Context):
    """(random-init SAM, scenes, refine contexts) for the SPO checks: benchmarks/sam_refine.py's
    synthetic scenes (image, raw label, saliency) at the profile's size."""
    import sam_refine

    from pdso_ray.method.refiners import RefineContext, RefineParams
    from pdso_ray.models.sam import build_sam

    p = ctx.profile
    torch.manual_seed(0)
    model = build_sam(p.sam_arch, None, img_size=p.sam_size)
    scenes = sam_refine.synthetic_scenes(p.spo_images, *p.spo_hw, p.spo_classes, p.spo_components, seed=0)
    params = RefineParams(min_area=p.spo_min_area)
    contexts = [RefineContext(1, tuple(range(2, p.spo_classes + 1)), params=params) for _ in scenes]
    return model, scenes, contexts


def _spo_functions(ctx: Context, model, **predictors):
    """name -> ``fn(image, raw, saliency, context) -> label``: ``refine_spo`` with each batched
    predictor given, plus ``naive`` (benchmarks/sam_refine.py's loop on an fp32 predictor)."""
    import sam_refine

    from pdso_ray.method.refiners import refine_spo
    from pdso_ray.models.sam import SamMaskPredictor

    naive = SamMaskPredictor(model, device=ctx.device, bf16=False)
    fns = {name: (lambda i, r, s, c, pr=pr: refine_spo(i, r, s, c, pr).label) for name, pr in predictors.items()}
    fns["naive"] = lambda i, r, s, c: sam_refine.naive_spo(i, r, s, c, naive)
    return fns


def _images_per_s(fn, scenes, contexts, device: str, keep: list):
    """A contender: ``fn`` over every scene, in images/s; its labels replace ``keep``'s content."""
    def run() -> float:
        wall, _, labels = timed(lambda: [fn(*s, c) for s, c in zip(scenes, contexts)], device)
        keep[:] = labels
        return len(scenes) / wall
    return run


def _interleave_spo(ctx: Context, fns, scenes, contexts, warmup: bool):
    labels: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    contenders = {name: _images_per_s(fn, scenes, contexts, ctx.device, labels[name]) for name, fn in fns.items()}
    return interleave(contenders, ctx.rounds, warmup=warmup), labels


def _agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([np.mean(x == y) for x, y in zip(a, b)]))


def spo_specs(ctx: Context) -> list[RowSpec]:
    from pdso_ray.models.sam import SAM_REGISTRY

    p = ctx.profile
    size = p.sam_size or SAM_REGISTRY[p.sam_arch].img_size
    what = (f"SPO, SAM {p.sam_arch} at {size} px, {p.spo_images} images {p.spo_hw[0]}×{p.spo_hw[1]}, "
            f"{p.spo_classes} classes")
    baseline = "naive loop (decoder call per prompt, set_image per class, fp32; sam_refine.naive_spo)"
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    return [RowSpec("spo", what, path=f"refine_spo batched, {precision}", baseline=baseline, unit="img/s")]


def run_spo(ctx: Context, specs: list[RowSpec]) -> list[Row]:
    import sam_refine

    from pdso_ray.models.sam import SamMaskPredictor

    model, scenes, contexts = _spo_inputs(ctx)
    counter = sam_refine.CallCounter(model)
    fns = _spo_functions(ctx, model, batched=SamMaskPredictor(model, device=ctx.device))
    calls = {}
    for name, fn in fns.items():  # model calls per image, on the first scene (also the warm-up)
        counter.encoder = counter.decoder = 0
        fn(*scenes[0], contexts[0])
        calls[name] = (counter.encoder, counter.decoder)
    rounds, labels = _interleave_spo(ctx, fns, scenes, contexts, warmup=False)
    return [measured(specs[0], rounds, "batched", "naive", extra={
        "encoder_calls_batched": calls["batched"][0], "decoder_calls_batched": calls["batched"][1],
        "encoder_calls_naive": calls["naive"][0], "decoder_calls_naive": calls["naive"][1],
        "label_agreement": _agreement(labels["batched"], labels["naive"])})]


def spo_compiled_specs(ctx: Context) -> list[RowSpec]:
    spec = spo_specs(ctx)[0]
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    return [RowSpec("spo_compiled", spec.what, path=f"refine_spo batched, {precision}, torch.compile encoder",
                    baseline=spec.baseline, unit="img/s")]


def run_spo_compiled(ctx: Context, specs: list[RowSpec]) -> list[Row]:
    from pdso_ray.models.sam import SamMaskPredictor

    if not ctx.compile:
        return [Row(specs[0], note="torch.compile not attempted on CPU (--compile on tries it)")]
    model, scenes, contexts = _spo_inputs(ctx)  # no call-counting hooks: dynamo would trace them
    eager = SamMaskPredictor(model, device=ctx.device)
    compiled = SamMaskPredictor(model, device=ctx.device, compile=True)
    image = scenes[0][0]
    eager.set_image(image)
    eager_s = float(np.median([timed(lambda: eager.set_image(image), ctx.device)[0] for _ in range(3)]))
    try:
        first_s = timed(lambda: compiled.set_image(image), ctx.device)[0]
    except Exception as e:  # noqa: BLE001 - no compiler, no Triton, an unsupported op: report, go on
        return [Row(specs[0], note=f"torch.compile failed: {type(e).__name__}: {e}"[:300])]
    fns = _spo_functions(ctx, model, compiled=compiled, batched=eager)
    rounds, labels = _interleave_spo(ctx, fns, scenes, contexts, warmup=True)
    return [measured(specs[0], rounds, "compiled", "naive", note="compile time not in the rates", extra={
        "compile_s": first_s - eager_s, "vs_batched_eager": rounds.ratio("compiled", "batched"),
        "label_agreement": _agreement(labels["compiled"], labels["naive"])})]


CHECKS = [
    Check("decode", decode_specs, run_decode),
    Check("features", features_specs, run_features),
    Check("kmeans", kmeans_specs, run_kmeans),
    Check("spo", spo_specs, run_spo),
]
COMPILE_CHECK = Check("spo_compiled", spo_compiled_specs, run_spo_compiled)
