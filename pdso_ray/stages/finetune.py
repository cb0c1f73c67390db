"""Stage 6, ``finetune``: train the segmentation model on the refined pseudo labels with Ray Train
(docs/method.md §7).

Data: the rows of ``labels/stats/`` with a refined label, in a seeded row order
(:func:`seeded_row_order`) → Ray Data (CPU tasks): read image and label (a PNG file, or a member of
a PNG shard) through :class:`Storage`, decode, resize onto a fixed-size canvas
(twice the crop size, aspect kept, padded with ignore) → ``uint8`` images and ``int16`` labels,
streamed to the workers as ``get_dataset_shard("train")``; the expensive decode scales with the
cluster's CPUs instead of running inside the GPU workers. Each worker then crops and flips the
whole batch at once on its device (:func:`pdso_ray.method.augment.random_resized_crop_batch`),
from a generator seeded by the run's seed, the epoch and its rank: a run is reproducible, and
every epoch sees new crops.

Training: :func:`train_loop_per_worker` under a ``TorchTrainer`` (DDP), cross-entropy ignoring
1000 (``finetune.loss: agmm`` adds the AGMM terms of :mod:`pdso_ray.method.agmm`), AdamW with a
per-step cosine schedule, bf16 autocast on GPU. Every epoch rank 0 reports a checkpoint
(``state.pt``: model, optimizer, scheduler, epoch, and with AGMM the running mixture) to
``finetune/train/epoch_NNNN/``
(the newest ``finetune.keep_checkpoints`` are kept);
``FailureConfig(max_failures)`` restarts failed workers from the latest one, and re-running the
stage resumes from it too (finished epochs are skipped). At the end the driver writes the weights
and their meta to ``finetune/model.pt`` (:func:`pdso_ray.models.heads.segmenter_bytes` format).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from pdso_ray.data.imagenet_s import IGNORE_ID, decode_label
from pdso_ray.data.members import read_many
from pdso_ray.plan import LABEL_STAGE
from pdso_ray.stages.base import (Batch, BatchStep, Needs, PipelineError, Resources, RunContext, Stage,
                                  WorkerGroup, checkpoint_state, dino_need, fit, map_step, ordered_ingest,
                                  report_epoch, resume_state, shuffled_batches, stage_tracker, train_storage)
from pdso_ray.stages.read_decode import ImageReader
from pdso_ray.storage import Storage
from pdso_ray.tables import parquet_files

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("pdso_ray")

TRAIN_RUN_NAME = "train"  # Ray Train's run folder inside finetune/
LOADER_CPUS = 1.0  # per task of LoadTrainPairs, which feeds the trainer


class LoadTrainPairs(BatchStep):
    """Read and decode one batch of (image, refined label) pairs onto fixed-size canvases.

    In: ``id``, ``path`` (image URL), ``label_refined`` (label PNG URL), and ``label_raw`` with
    ``unlabelled="disagreement"``. Out: ``image`` (B×S×S×3 uint8 RGB), ``label`` (B×S×S int16, ids
    0..C, 1000 and, by the ``unlabelled`` rule, 1001: :func:`pdso_ray.method.agmm.mark_unlabelled`,
    on the label at its own size) and ``valid`` (B×2 int32: the
    height and width of the image inside its canvas), S = ``canvas``: each image resized so its
    longer side is S, padded with ignore (:func:`pdso_ray.method.augment.pad_to_canvas`). JPEGs
    are decoded DCT-downscaled when much larger. Deterministic: the random crop and flip happen in
    the training worker, whose generator knows the epoch (Ray Data gives a map none).

    An image or label that cannot be read fails the batch with its URL: both were readable when
    the labels were made, so a failure here is a changed or damaged file, not data to drop.
    """

    def __init__(self, reader: ImageReader, canvas: int, batch_size: int, unlabelled: str = "none",
                 unlabelled_width: int = 2):
        self.reader = reader
        self.storage = reader.storage
        self.canvas = canvas
        self.unlabelled, self.unlabelled_width = unlabelled, unlabelled_width
        self.resources = Resources(batch_size=batch_size, num_cpus=LOADER_CPUS, stateful=False)

    def __call__(self, batch: Batch) -> Batch:
        from pdso_ray.method.agmm import mark_unlabelled
        from pdso_ray.method.augment import pad_to_canvas, resize_label_nearest

        n, s = len(batch["id"]), self.canvas
        images = np.zeros((n, s, s, 3), dtype=np.uint8)
        labels = np.zeros((n, s, s), dtype=np.int16)
        valid = np.zeros((n, 2), dtype=np.int32)
        paths = [str(p) for p in batch["path"]]
        label_urls = [str(u) for u in batch["label_refined"]]
        decoded_images = self.reader.read_batch(paths, target_short_side=s)
        # labels in PNG shards: one request per shard for the whole batch
        label_bytes = read_many(self.storage, label_urls)
        raw_urls = [str(u) for u in batch["label_raw"]] if self.unlabelled == "disagreement" else []
        raw_bytes = read_many(self.storage, raw_urls) if raw_urls else [None] * n
        for i, (path, decoded, label_url, data) in enumerate(zip(paths, decoded_images, label_urls, label_bytes)):
            if not decoded.ok:
                raise ValueError(f"training image {path} no longer decodes: {decoded.reason}")
            if isinstance(data, Exception):
                raise ValueError(f"label {label_url} cannot be read: {data}")
            label = decode_label(data)
            if label.shape != tuple(decoded.orig_size):
                raise ValueError(f"label {label_url} is {label.shape[0]}×{label.shape[1]}, its image "
                                 f"{path} {decoded.orig_size[0]}×{decoded.orig_size[1]}")
            if isinstance(raw_bytes[i], Exception):
                raise ValueError(f"label {raw_urls[i]} cannot be read: {raw_bytes[i]}")
            if self.unlabelled != "none":  # the default path keeps the label as decoded, no copy
                raw = None if raw_bytes[i] is None else decode_label(raw_bytes[i])
                label = mark_unlabelled(label, raw, self.unlabelled, self.unlabelled_width)
            label = resize_label_nearest(label.astype(np.int16), decoded.image.shape[:2])  # DCT-downscaled
            images[i], labels[i], valid[i] = pad_to_canvas(decoded.image, label, s, IGNORE_ID)
        return {"image": images, "label": labels, "valid": valid}


def cosine_factor(step: int, total_steps: int) -> float:
    """Learning-rate multiplier: cosine from 1 at step 0 to 0 at ``total_steps`` (then 0)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _with_features(segmenter):
    """The segmenter as a module whose ``forward`` is ``features_and_logits``: DDP syncs the
    gradients of what ``forward`` computes, so the AGMM path must go through it."""
    from torch import nn

    class FeaturesAndLogits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.segmenter = inner

        def forward(self, x):
            return self.segmenter.features_and_logits(x)

    return FeaturesAndLogits(segmenter)


def _agmm_terms(features, logits, target, mixture, fc, weights):
    """One step of the AGMM loss: E-step statistics of the batch, summed over all ranks (so every
    rank's mixture, and the one rank 0 checkpoints, stay identical), the running mixture's
    update, then the AGMM terms (a scalar to add to the cross-entropy)."""
    import torch.distributed as dist

    from pdso_ray.method import agmm

    labels = agmm.cell_labels(target, tuple(features.shape[-2:]), logits.shape[1])
    stats = agmm.em_statistics(features, labels, mixture)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    mixture.update(stats, fc.agmm_momentum)
    return agmm.agmm_loss(features.float(), logits, labels, mixture, weights).total


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function.

    ``config``: ``cfg`` (PipelineConfig), ``storage``, ``dino`` (the DinoSource of the backbone),
    ``num_classes``, ``meta`` (the model meta), ``steps_per_epoch`` (per worker, for the schedule),
    ``tracker`` (optional: the training curves; rank 0 logs each step's loss and learning rate,
    and each epoch's mean loss). Resumes from ``ray.train.get_checkpoint()``
    when there is one; reports ``{"epoch", "loss", "start_epoch", "images"}`` once per epoch on
    every rank (rank 0 attaches the checkpoint). ``loss`` is the mean over all ranks of the
    per-batch losses, ``start_epoch`` the first epoch this attempt trained, ``images`` the rows
    seen in the epoch by all ranks. With ``finetune.loss: agmm`` the loss adds the AGMM terms and
    the running mixture travels in the checkpoint (key ``agmm``), so a resume continues it.
    """
    import functools

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from pdso_ray.method.agmm import UNLABELLED, AgmmWeights, GaussianMixture
    from pdso_ray.method.augment import random_resized_crop_batch, seeded_generator
    from pdso_ray.models.dino import to_model_input
    from pdso_ray.models.heads import build_segmenter, with_native_grid

    cfg, storage = config["cfg"], config["storage"]
    fc = cfg.finetune
    use_agmm = fc.loss == "agmm"  # finetune.* values were checked when the config was loaded
    if use_agmm:
        weights = AgmmWeights(fc.agmm_soft_target, fc.agmm_response, fc.agmm_repulsion,
                              fc.agmm_absent, fc.agmm_likelihood)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed_for("finetune"))  # same initial head on every rank (DDP also broadcasts rank 0's)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    model = build_segmenter(fc.backbone, config["num_classes"], config["dino"], storage)
    meta = with_native_grid(config["meta"], model)
    if use_agmm:
        model = _with_features(model)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    if use_agmm:
        core = core.segmenter
        mixture = GaussianMixture(config["num_classes"] + 1, core.backbone.out_channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=fc.lr, weight_decay=fc.weight_decay)
    total_steps = max(1, config["steps_per_epoch"] * fc.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(cosine_factor, total_steps=total_steps))

    start_epoch = 1
    history: list[dict[str, float]] = []  # {"epoch", "loss"} of every epoch so far, resumes included
    state = resume_state()
    if state is not None:
        history = list(state.get("history", []))
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if use_agmm:
            if "agmm" not in state:
                raise ValueError("finetune.loss=agmm, but the checkpoint to resume from has no AGMM "
                                 "mixture (it was trained with finetune.loss=ce)")
            mixture.load_state_dict(state["agmm"])
        start_epoch = int(state["epoch"]) + 1
        if rank == 0:
            log.info("finetune: resuming after epoch %d of %d", start_epoch - 1, fc.epochs)

    curves = config["tracker"].open({"backbone": fc.backbone, "loss": fc.loss, "lr": fc.lr, "epochs": fc.epochs,
                                     "batch_size": fc.batch_size, "workers": fc.num_workers}) \
        if rank == 0 and config.get("tracker") else None
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, fc.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        batches = torch.zeros((), device=device)
        images = torch.zeros((), device=device)
        # Crops from the seed, the epoch and the rank: reproducible, and new every epoch.
        crops = seeded_generator(cfg.seed_for("finetune"), epoch, rank)
        for batch in shuffled_batches(shard, fc.batch_size, (cfg.seed_for("finetune"), epoch, rank), device=device,
                                      dtypes={"image": torch.uint8, "label": torch.int64, "valid": torch.int64}):
            image, target = random_resized_crop_batch(batch["image"], batch["label"], batch["valid"],
                                                      fc.crop_size, crops)
            x = to_model_input(image, fc.crop_size, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                if use_agmm:
                    features, logits = model(x)
                else:
                    logits = model(x)
            logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
            # Sum over labelled pixels / their count: a crop that is all ignore adds 0, not NaN.
            # Unlabelled pixels (finetune.unlabelled) have no class to fit: only AGMM sees them.
            labelled = target.masked_fill(target == UNLABELLED, IGNORE_ID)
            loss = F.cross_entropy(logits, labelled, ignore_index=IGNORE_ID, reduction="sum")
            loss = loss / (labelled != IGNORE_ID).sum().clamp(min=1)
            if use_agmm:
                loss = loss + _agmm_terms(features, logits, target, mixture, fc, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            batches += 1
            images += target.shape[0]
            if curves is not None:
                curves.log(scheduler.last_epoch, {"train/loss": float(loss.detach()),
                                                  "train/lr": scheduler.get_last_lr()[0]})
        totals = torch.stack([loss_sum, batches, images])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        metrics = {"epoch": epoch, "loss": float(totals[0] / totals[1].clamp(min=1)),
                   "start_epoch": start_epoch, "images": int(totals[2])}
        history.append({"epoch": epoch, "loss": metrics["loss"]})
        if rank == 0:
            log.info("finetune: epoch %d/%d loss %.4f", epoch, fc.epochs, metrics["loss"])
        if curves is not None:
            curves.log(epoch, {"epoch/loss": metrics["loss"], "epoch/images": metrics["images"]})
            curves.flush()

        def state(epoch=epoch, metrics=metrics, history=list(history)):
            out = {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "epoch": epoch, "meta": meta, "metrics": metrics,
                   "history": history}
            if use_agmm:
                out["agmm"] = mixture.state_dict()
            return out

        report_epoch(metrics, epoch, state if rank == 0 else None)
    if curves is not None:
        curves.close()


def training_dataset(storage: Storage, stats_dir: str) -> "ray.data.Dataset":
    """Ray Dataset of ``{id, path, label_refined, label_raw}`` for every row of ``labels/stats/``
    that has a refined label, read in parallel (the driver never holds the rows)."""
    import ray.data

    files = parquet_files(storage, stats_dir)
    if not files:
        raise FileNotFoundError(f"finetune: no label statistics in {stats_dir}; run pseudo_labels first")
    fs, _ = storage.arrow_fs(stats_dir)
    ds = ray.data.read_parquet([storage.arrow_fs(u)[1] for u in files], filesystem=fs,
                               columns=["id", "path", "label_refined", "label_raw"])
    return ds.filter(expr="label_refined != ''")


def _order_keys(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    import hashlib

    keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") >> 1
            for i in batch["id"]]
    return {**batch, "_order": np.asarray(keys, dtype=np.int64)}


def seeded_row_order(ds: "ray.data.Dataset", seed: int) -> "ray.data.Dataset":
    """``ds`` (rows with a unique ``id``) sorted by a hash of (seed, id): a seeded random order
    that depends only on the rows, not on how they were split into blocks or files."""
    return (ds.map_batches(_order_keys, fn_kwargs={"seed": seed}, batch_format="numpy")
            .sort("_order").drop_columns(["_order"]))


class FinetuneStage(Stage):
    name = "finetune"
    config_sections = ("finetune", "models.dino", "data.classes", "data.max_pixels",
                       "data.max_file_bytes", "seed")
    depends_on = ("pseudo_labels",)

    @classmethod
    def needs(cls, cfg) -> Needs:
        fc = cfg.finetune
        trainer = WorkerGroup("fine-tuning (Ray Train)", "finetune.num_workers", fc.num_workers,
                              "finetune.cpus_per_worker", fc.cpus_per_worker, gpus=1.0 if fc.use_gpu else 0.0,
                              feed_cpus=LOADER_CPUS)
        models = (dino_need(cfg),) if fc.backbone == "dino" else ()
        return Needs(images=("train",), models=models, groups=(trainer,))

    @classmethod
    def upstream(cls, cfg) -> tuple[str, ...]:
        """The stage that wrote the method's train labels (``labels/stats/``)."""
        return (LABEL_STAGE[cfg.method],)

    # The worker function; a class attribute so a subclass can wrap it (fault-injection tests).
    train_loop = staticmethod(train_loop_per_worker)

    def extra_outputs(self, run) -> tuple[str, ...]:
        return (run.tensorboard_dir(self.name),)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Train (or resume) and write ``finetune/model.pt``. Counts: ``images`` (labelled training
        images), ``epochs`` (of the final checkpoint), ``start_epoch`` (the first epoch trained by
        the attempt that wrote it: > 1 after a resume), ``final_loss`` (its epoch's mean loss),
        ``workers``."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from pdso_ray.models.heads import segmenter_bytes, segmenter_meta
        from pdso_ray.models.loading import DinoSource

        cfg, storage = ctx.cfg, ctx.storage
        fc = cfg.finetune
        if fc.epochs < 1:
            raise ValueError(f"finetune.epochs={fc.epochs}: must be >= 1")
        if fc.crop_size < 1:
            raise ValueError(f"finetune.crop_size={fc.crop_size}: must be >= 1")
        stats_dir = ctx.run.label_stats_dir
        ds = training_dataset(storage, stats_dir)
        images = ds.count()
        if images < fc.num_workers:
            raise ValueError(f"finetune: {images} labelled images in {stats_dir} "
                             f"for finetune.num_workers={fc.num_workers}")
        num_classes = cfg.data.classes
        meta = segmenter_meta(cfg, num_classes)
        # streaming_split(equal=True) gives each worker floor(n / workers) rows.
        steps_per_epoch = math.ceil((images // fc.num_workers) / fc.batch_size)

        # A seeded order of the rows themselves, kept through the map (which re-blocks them into
        # batches) and the split (ordered_ingest): the same seed gives the same batches (with one
        # worker; several take blocks as they come). Ordering the *blocks* is not enough: how
        # pseudo_labels grouped rows into stats files varies from run to run under load.
        ds = seeded_row_order(ds, cfg.seed_for("finetune"))
        ds = map_step(ds, LoadTrainPairs(ImageReader.from_config(storage, cfg.data), 2 * fc.crop_size,
                                         fc.batch_size, fc.unlabelled, fc.unlabelled_width), ctx.cluster_has_gpu)

        out = ctx.run.finetune_dir
        storage_path, storage_fs = train_storage(storage, out)
        dino = DinoSource.from_config(cfg) if fc.backbone == "dino" else None
        trainer = TorchTrainer(
            self.train_loop,
            train_loop_config={"cfg": cfg, "storage": storage, "dino": dino, "num_classes": num_classes,
                               "meta": meta, "steps_per_epoch": steps_per_epoch,
                               "tracker": stage_tracker(ctx, self.name)},
            scaling_config=ScalingConfig(num_workers=fc.num_workers,
                                         use_gpu=fc.use_gpu and ctx.cluster_has_gpu,
                                         resources_per_worker={"CPU": fc.cpus_per_worker}),
            run_config=RunConfig(storage_path=storage_path, storage_filesystem=storage_fs,
                                 name=TRAIN_RUN_NAME,
                                 failure_config=FailureConfig(max_failures=fc.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=fc.keep_checkpoints or None)),
            datasets={"train": ds},
            dataset_config=ordered_ingest(),
        )
        result = fit(trainer)
        if result.checkpoint is None:
            raise PipelineError(f"finetune: training under {out} left no checkpoint")
        state = checkpoint_state(result.checkpoint)
        if int(state["epoch"]) != fc.epochs:
            log.warning("finetune: the latest checkpoint is from epoch %d, finetune.epochs is %d",
                        state["epoch"], fc.epochs)
        final_meta = {**state["meta"], "epochs": int(state["epoch"])}
        storage.write_bytes(ctx.run.finetune_model, segmenter_bytes(state["model"], final_meta))
        metrics = state["metrics"]
        history = state.get("history", [])
        storage.write_json(ctx.run.finetune_history, history)
        if history:  # the workers' per-epoch lines went to the log file: the curve, once, here
            log.info("finetune: loss by epoch %s", " ".join(f"{h['loss']:.4f}" for h in history))
        return {"images": images, "epochs": int(state["epoch"]),
                "start_epoch": int(metrics["start_epoch"]), "final_loss": float(metrics["loss"]),
                "workers": fc.num_workers}
