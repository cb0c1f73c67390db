"""The training checks of ``benchmarks/gpu_suite.py``: fine-tuning and DINO pretraining steps/s,
each interleaved with a bare loop of the same model and batch (:func:`timing.interleave`).

Fine-tuning runs the stage's own ``train_loop_per_worker`` under Ray Train's local mode
(``ScalingConfig(num_workers=0)``: the loop runs in this process, with Ray Data feeding
``get_dataset_shard``), so a round costs no worker start-up; with one GPU worker the loop would
be the same (DDP does not wrap a single worker). Its steps/s come from the second epoch: the
dataset shard is wrapped to stamp the first and the last batch of each epoch (GPU synchronised),
and the stamps travel back in the reported metrics, as tests/stages/test_finetune.py wraps
``ray.train.report``.
"""

from __future__ import annotations

import functools
import itertools
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from gpu_suite_core import Check, Context, Row, RowSpec, free_gpu, measured
from pdso_ray.data.imagenet_s import IGNORE_ID
from timing import cuda_sync, interleave, repeat, timed

IGNORE_SHARE = 0.1  # share of label pixels set to ignore (1000), as crops of pseudo labels have


# ---- fine-tuning ----------------------------------------------------------------------------------
def synthetic_pairs(batch: dict[str, np.ndarray], canvas: int, classes: int) -> dict[str, np.ndarray]:
    """Ray Data map: for each ``id``, the row ``LoadTrainPairs`` yields for a 3:4 photo — a
    ``canvas``² uint8 RGB canvas and int16 label holding a random image and label (ids
    0..classes, ``IGNORE_SHARE`` of the pixels IGNORE_ID) in their top-left
    (3/4·canvas)×canvas region, the rest padding (0 and IGNORE_ID), and ``valid`` = that size."""
    n = len(batch["id"])
    rng = np.random.default_rng(int(batch["id"][0]))
    h, w = round(0.75 * canvas), canvas
    images = np.zeros((n, canvas, canvas, 3), dtype=np.uint8)
    labels = np.full((n, canvas, canvas), IGNORE_ID, dtype=np.int16)
    images[:, :h, :w] = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    inside = rng.integers(0, classes + 1, (n, h, w)).astype(np.int16)
    inside[rng.random((n, h, w)) < IGNORE_SHARE] = IGNORE_ID
    labels[:, :h, :w] = inside
    return {"image": images, "label": labels, "valid": np.tile(np.array([[h, w]], dtype=np.int32), (n, 1))}


class _StampedShard:
    """A dataset shard whose ``iter_torch_batches`` appends ``(steps, seconds)`` per epoch to
    ``spans``: from the arrival of the first batch to the end of the last step."""

    def __init__(self, shard, spans: list[list[float]]):
        self.shard = shard
        self.spans = spans

    def iter_torch_batches(self, **kwargs):
        device = kwargs.get("device")
        start, steps = None, 0
        for batch in self.shard.iter_torch_batches(**kwargs):
            if start is None:
                cuda_sync(device)
                start = time.perf_counter()
            yield batch
            steps += 1
        cuda_sync(device)
        self.spans.append([steps, time.perf_counter() - start])


def stamped_train_loop(config: dict) -> None:
    """``train_loop_per_worker`` with its dataset shard stamped (:class:`_StampedShard`); every
    report carries the spans so far as ``bench_spans``."""
    import ray.train

    from pdso_ray.stages.finetune import train_loop_per_worker

    spans: list[list[float]] = []
    get_shard, report = ray.train.get_dataset_shard, ray.train.report

    def stamped_report(metrics, **kwargs):
        report({**metrics, "bench_spans": [list(s) for s in spans]}, **kwargs)

    ray.train.get_dataset_shard = lambda name: _StampedShard(get_shard(name), spans)
    ray.train.report = stamped_report
    try:
        train_loop_per_worker(config)
    finally:
        ray.train.get_dataset_shard, ray.train.report = get_shard, report


def finetune_specs(ctx: Context) -> list[RowSpec]:
    p = ctx.profile
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    return [RowSpec(
        "finetune", f"fine-tuning, Segmenter(DINO {p.dino_arch}) {precision}, batch {p.finetune_batch} at "
                    f"{p.finetune_crop} px, {p.finetune_classes} + 1 classes, cross-entropy",
        path="train_loop_per_worker (Ray Train local mode, Ray Data canvases, crops on the device), epoch 2",
        baseline="bare loop: same model, AdamW, schedule and loss on a cropped batch already on the device",
        unit="steps/s", bare_loop=True)]


def run_finetune(ctx: Context, specs: list[RowSpec]) -> list[Row]:
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pdso_ray.config import load_config
    from pdso_ray.models.dino import to_model_input
    from pdso_ray.models.heads import build_segmenter, segmenter_meta
    from pdso_ray.models.loading import DinoSource
    from pdso_ray.stages.finetune import cosine_factor
    from pdso_ray.storage import Storage

    p = ctx.profile
    gpu = ctx.device == "cuda"
    ctx.ray()
    cfg = load_config(None, [
        f"data.classes={p.finetune_classes}", f"models.dino.arch={p.dino_arch}",
        f"models.dino.image_size={p.dino_size}", "models.allow_random_init=true", "finetune.backbone=dino",
        "finetune.epochs=2", f"finetune.batch_size={p.finetune_batch}", f"finetune.crop_size={p.finetune_crop}",
        "finetune.num_workers=1", "finetune.loss=ce"])
    fc = cfg.finetune
    rows = p.finetune_steps * p.finetune_batch
    ds = ray.data.range(rows, override_num_blocks=max(1, min(rows // p.finetune_batch, 64))).map_batches(
        # canvases of twice the crop size, as FinetuneStage asks LoadTrainPairs for
        synthetic_pairs, fn_kwargs={"canvas": 2 * p.finetune_crop, "classes": p.finetune_classes}).materialize()
    dino = DinoSource.from_config(cfg)
    loop_config = {"cfg": cfg, "storage": Storage(), "dino": dino, "num_classes": p.finetune_classes,
                   "meta": segmenter_meta(cfg, p.finetune_classes), "steps_per_epoch": p.finetune_steps}
    fits = itertools.count()

    def real() -> float:
        trainer = TorchTrainer(stamped_train_loop, train_loop_config=loop_config,
                               scaling_config=ScalingConfig(num_workers=0),
                               run_config=RunConfig(storage_path=os.path.join(ctx.work, "finetune"),
                                                    name=f"fit{next(fits)}"),
                               datasets={"train": ds})
        spans = trainer.fit().metrics["bench_spans"]
        free_gpu()
        steps, seconds = spans[-1]
        return steps / seconds

    torch.manual_seed(cfg.seed_for("finetune"))
    model = build_segmenter("dino", p.finetune_classes, dino).to(ctx.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=fc.lr, weight_decay=fc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(cosine_factor, total_steps=10**6))
    images = torch.randint(0, 256, (p.finetune_batch, p.finetune_crop, p.finetune_crop, 3), dtype=torch.uint8,
                           device=ctx.device)
    target = torch.randint(0, p.finetune_classes + 1, (p.finetune_batch, p.finetune_crop, p.finetune_crop),
                           device=ctx.device)
    target[torch.rand(target.shape, device=ctx.device) < IGNORE_SHARE] = IGNORE_ID

    def step() -> None:  # the body of train_loop_per_worker's batch loop, less the crop
        x = to_model_input(images, p.finetune_crop, device=ctx.device)
        with torch.autocast(ctx.device, dtype=torch.bfloat16, enabled=gpu):
            logits = model(x)
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_ID, reduction="sum")
        loss = loss / (target != IGNORE_ID).sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    def bare() -> float:
        repeat(step, 2)  # warm-up, as the real loop's first epoch is
        return p.finetune_steps / timed(lambda: repeat(step, p.finetune_steps), ctx.device)[0]

    rounds = interleave({"loop": real, "bare": bare}, ctx.rounds)
    return [measured(specs[0], rounds, "loop", "bare", extra={"images_per_s": rounds.median("loop") * p.finetune_batch,
                                                               "batch": p.finetune_batch})]


# ---- DINO pretraining -----------------------------------------------------------------------------
def pretrain_config(ctx: Context):
    from pdso_ray.method.multicrop import CropSpec, MultiCropConfig
    from pdso_ray.models.dino_pretrain import DinoPretrainConfig

    p = ctx.profile
    crops = MultiCropConfig(global_crop=CropSpec(p.pretrain_global, (0.4, 1.0), blur_p=0.5),
                            local_crop=CropSpec(p.pretrain_local, (0.05, 0.4), blur_p=0.5),
                            num_local=p.pretrain_num_local)
    # One long epoch, no warm-up and no frozen prototypes: every timed step does the full work.
    return DinoPretrainConfig(arch=p.dino_arch, img_size=p.pretrain_global, epochs=1, steps_per_epoch=100_000,
                              out_dim=p.pretrain_out_dim, head_hidden_dim=p.pretrain_hidden,
                              head_bottleneck_dim=p.pretrain_bottleneck, crops=crops, warmup_epochs=0.0,
                              freeze_last_layer_epochs=0.0)


def pretrain_specs(ctx: Context) -> list[RowSpec]:
    p = ctx.profile
    precision = "bf16" if ctx.device == "cuda" else "fp32"
    return [RowSpec(
        "pretrain", f"DINO pretraining, {p.dino_arch}, batch {p.pretrain_batch} ({p.jpeg_hw[0]}×{p.jpeg_hw[1]} "
                    f"uint8), 2×{p.pretrain_global} + {p.pretrain_num_local}×{p.pretrain_local} px views, "
                    f"{p.pretrain_out_dim} prototypes, {precision}",
        path="DinoPretrainer.step (multi-crop on the device, loss, clipping, EMA, diagnostics)",
        baseline="bare loop: teacher + student forward, DINO loss, backward, AdamW, EMA on pre-made views",
        unit="steps/s", bare_loop=True)]


def bare_pretrain_step(trainer, views, bf16: bool) -> None:
    """The bare loop's DINO step a :class:`DinoPretrainer` is judged against: teacher and student
    forward on views made beforehand, DINO loss, backward, AdamW, EMA (no augmentation,
    clipping, freezing or diagnostics)."""
    from pdso_ray.method.self_distillation import ema_update

    sched = trainer.schedule()
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            teacher, _ = trainer.teacher(views.global_crops)
        student, _ = trainer.student(views.global_crops, views.local_crops)
    loss = trainer.dino_loss(student, teacher, sched["teacher_temp"])
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    ema_update(trainer.teacher, trainer.student, sched["momentum"])


def run_pretrain(ctx: Context, specs: list[RowSpec]) -> list[Row]:
    from pdso_ray.data.decode import decode_image
    from pdso_ray.method.multicrop import multicrop
    from pdso_ray.models.dino_pretrain import DinoPretrainer

    p = ctx.profile
    gpu = ctx.device == "cuda"
    cfg = pretrain_config(ctx)
    trainer = DinoPretrainer(cfg, device=ctx.device)
    images = torch.as_tensor(np.stack([decode_image(ctx.jpegs[i % len(ctx.jpegs)]).image
                                       for i in range(p.pretrain_batch)])).to(ctx.device)
    views = multicrop(images, cfg.crops, torch.Generator().manual_seed(0))

    def bare_step() -> None:
        bare_pretrain_step(trainer, views, bf16=gpu)

    def steps_per_s(fn) -> float:
        return p.pretrain_steps / timed(lambda: repeat(fn, p.pretrain_steps), ctx.device)[0]

    rounds = interleave({"trainer": lambda: steps_per_s(lambda: trainer.step(images)),
                         "bare": lambda: steps_per_s(bare_step)}, ctx.rounds, warmup=True)
    return [measured(specs[0], rounds, "trainer", "bare",
                     extra={"images_per_s": rounds.median("trainer") * p.pretrain_batch, "batch": p.pretrain_batch})]


CHECKS = [
    Check("finetune", finetune_specs, run_finetune),
    Check("pretrain", pretrain_specs, run_pretrain),
]
