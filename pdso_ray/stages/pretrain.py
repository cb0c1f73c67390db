"""Stage 0 (optional), ``pretrain``: DINO self-distillation of the backbone on the run's own train
images, on Ray Train (docs/method.md §10).

For a domain with no DINO weights that fit (aerial, medical, industrial images), and for the demo's
learned stand-in. Runs only when ``stages`` names it; when ``models.dino.checkpoint`` is unset, the
stages after it load its teacher (:func:`pdso_ray.pipeline.resolve_checkpoints`).

Data: the train split's listing (driver) → Ray Data: read, decode, resize to a square of
``pretrain.input_size`` (CPU tasks, :class:`~pdso_ray.stages.read_decode.ReadDecode`) → streamed
to the workers every epoch (``get_dataset_shard("train")``, equal shares, the last partial batch
dropped so that every DDP rank takes the same number of steps). An image that does not decode is
skipped here (``images_per_epoch`` in the counts says how many trained); ``features`` records it
in ``rejected/`` with its reason.

Training: :func:`train_loop_per_worker` under a ``TorchTrainer`` (DDP): a
:class:`~pdso_ray.models.dino_pretrain.DinoPretrainer` per worker (student + EMA teacher, DINO loss
with centering and sharpening, multi-crop on the worker's device, cosine schedules, gradient
clipping, last layer frozen early; bf16 autocast on GPU), the loss centres averaged over ranks.
Each epoch every rank takes the collapse diagnostics (teacher entropy, H(mean output), their
difference ``kl_div``, prototypes used) and the saliency probe (share of fixed probe images whose
CLS attention is higher on the border ring than inside), averaged over ranks; rank 0 logs them
and checkpoints (``state.pt``: trainer state, epoch, history) to ``pretrain/train/epoch_NNNN/``.
Re-running the stage resumes after the last finished epoch; ``FailureConfig(max_failures)``
restarts failed workers from it. A collapsed teacher (``kl_div`` below ``pretrain.min_kl_div``
from epoch ``collapse_after_epochs`` on) stops the run with :class:`PretrainCollapsed`.

Output: ``pretrain/dino_teacher.pth`` (the teacher backbone, keyed as the official DINO release
files) and ``pretrain/history.json`` (one record per epoch; the report draws it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from pdso_ray.config import PipelineConfig
from pdso_ray.stages.base import (Needs, PipelineError, Resources, RunContext, Stage, WorkerGroup,
                                  checkpoint_state, ddp_wrap, fit, map_step, ordered_ingest, report_epoch,
                                  resume_training, shuffled_batches, stage_tracker, train_storage)
from pdso_ray.stages.read_decode import ImageReader, ReadDecode
from pdso_ray.stages.streaming import from_rows
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")

TRAIN_RUN_NAME = "train"  # Ray Train's run folder inside pretrain/
COLLAPSE_NAME = "collapsed.json"  # the collapsed epoch's record, written by rank 0
# PretrainConfig fields that are DinoPretrainConfig fields of the same name (None = its default).
_RECIPE_FIELDS = ("lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "momentum",
                  "momentum_end", "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs",
                  "clip_grad", "freeze_last_layer_epochs", "out_dim", "head_hidden_dim",
                  "head_bottleneck_dim", "patch_loss_weight")
_CROP_FIELDS = ("num_local", "brightness", "contrast", "saturation", "hue")
# The per-epoch record's scalars averaged over ranks, in this order.
_MEAN_KEYS = ("loss", "teacher_entropy", "mean_output_entropy", "kl_div", "border_ring_share")


class PretrainCollapsed(RuntimeError):
    """The teacher's outputs stopped depending on the image."""


def input_size(cfg: PipelineConfig) -> int:
    """Side of the square training images: ``pretrain.input_size``, or 1.5× the backbone's input
    rounded to a multiple of 8 (room for the global crops' scale and position to vary)."""
    if cfg.pretrain.input_size:
        return cfg.pretrain.input_size
    return int(round(1.5 * cfg.models.dino.image_size / 8) * 8)


def pretrain_recipe(cfg: PipelineConfig, steps_per_epoch: int):
    """The :class:`~pdso_ray.models.dino_pretrain.DinoPretrainConfig` of this run: architecture
    and input size of ``models.dino``, global crops at that size, ``pretrain``'s epochs and seed,
    every recipe field ``pretrain`` sets, the defaults for the rest (the warm-up at most
    ``epochs``)."""
    from pdso_ray.method.multicrop import CropSpec
    from pdso_ray.models.dino_pretrain import DinoPretrainConfig

    pc = cfg.pretrain
    base = DinoPretrainConfig()
    size = cfg.models.dino.image_size
    crops = base.crops
    global_scale = tuple(pc.global_scale) if pc.global_scale else crops.global_crop.scale
    local = crops.local_crop
    crops = dataclasses.replace(
        crops,
        global_crop=dataclasses.replace(crops.global_crop, size=size, scale=global_scale),
        local_crop=CropSpec(pc.local_size or local.size, tuple(pc.local_scale) if pc.local_scale else local.scale,
                            local.flip_p, local.jitter_p, local.blur_p),
        **{k: getattr(pc, k) for k in _CROP_FIELDS if getattr(pc, k) is not None})
    recipe = {k: getattr(pc, k) for k in _RECIPE_FIELDS if getattr(pc, k) is not None}
    # A run shorter than the warm-up (a smoke test) warms up over all of it.
    recipe["warmup_epochs"] = min(recipe.get("warmup_epochs", base.warmup_epochs), pc.epochs)
    return dataclasses.replace(base, arch=cfg.models.dino.arch, img_size=size, epochs=pc.epochs,
                               steps_per_epoch=steps_per_epoch, seed=cfg.seed_for("pretrain"),
                               crops=crops, **recipe)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    return (f"pretrain: epoch {record['epoch']}/{epochs} loss {record['loss']:.4f} teacher entropy "
            f"{record['teacher_entropy']:.3f} kl_div {record['kl_div']:.3f} prototypes "
            f"{record['prototypes_used']} border share {record['border_ring_share']:.2f} "
            f"({record['images']} images, {record['seconds']:.1f} s)")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function.

    ``config``: ``recipe`` (``dataclasses.asdict`` of the DinoPretrainConfig), ``pretrain`` (the
    PretrainConfig), ``probe`` (P×S×S×3 uint8 probe images), ``storage``, ``collapse_file`` and
    ``tracker`` (the training curves: rank 0 logs each epoch's record).
    Resumes from ``ray.train.get_checkpoint()``; reports once per epoch on every rank the epoch's
    record (``epoch, loss, teacher_entropy, mean_output_entropy, kl_div, prototypes_used,
    border_ring_share, images, seconds, start_epoch, collapsed``); rank 0 attaches the checkpoint
    (``state.pt``: trainer state, epoch, history, start_epoch), except for a collapsed epoch,
    whose record rank 0 writes to ``collapse_file`` before every rank stops.
    """
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pdso_ray.models.dino_pretrain import DinoPretrainConfig, DinoPretrainer

    recipe = DinoPretrainConfig.from_dict(config["recipe"])
    pc = config["pretrain"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()

    def reduce_mean(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / world

    trainer = DinoPretrainer(recipe, device, reduce_mean if distributed else None, rank)
    if distributed:
        trainer.wrap_student(ddp_wrap(device))

    history, start_epoch = resume_training(trainer, "trainer")
    if start_epoch > 1 and rank == 0:
        log.info("pretrain: resuming after epoch %d of %d", start_epoch - 1, recipe.epochs)

    curves = config["tracker"].open({"arch": recipe.arch, "epochs": recipe.epochs, "lr": recipe.lr,
                                     "batch_size": pc.batch_size, "workers": world}) \
        if rank == 0 and config.get("tracker") else None
    probe = torch.from_numpy(np.array(config["probe"]))  # a writable copy of the shipped array
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, recipe.epochs + 1):
        started = time.perf_counter()
        losses, images = [], 0
        for batch in shuffled_batches(shard, pc.batch_size, (recipe.seed, epoch, rank), drop_last=True,
                                      dtypes={"image": torch.uint8}):
            losses.append(trainer.step(batch["image"])["loss"])
            images += int(batch["image"].shape[0])
        diagnostics = trainer.end_epoch()
        diagnostics.update(trainer.saliency_probe(probe))
        values = torch.tensor([float(np.mean(losses))] + [diagnostics[k] for k in _MEAN_KEYS[1:]]
                              + [images, time.perf_counter() - started], dtype=torch.float64)
        if distributed:
            values = values.to(device)
            dist.all_reduce(values)
            values = values.cpu() / world
        record = dict(zip(_MEAN_KEYS, (round(float(v), 5) for v in values[:len(_MEAN_KEYS)])))
        record.update(epoch=epoch, prototypes_used=int(diagnostics["prototypes_used"]),
                      images=int(round(float(values[-2]) * world)), seconds=round(float(values[-1]), 2))
        collapsed = epoch >= pc.collapse_after_epochs and record["kl_div"] < pc.min_kl_div
        history.append(record)
        metrics = {**record, "start_epoch": start_epoch, "collapsed": collapsed}
        if rank == 0:
            log.info("%s", _epoch_line(record, recipe.epochs))
        if curves is not None:
            curves.log(epoch, {f"pretrain/{k}": record[k] for k in (*_MEAN_KEYS, "prototypes_used")})
            curves.flush()
        if collapsed:
            # Said through the run folder: Ray Train's result only carries checkpointed metrics.
            if rank == 0:
                config["storage"].write_json(config["collapse_file"], metrics)
            if curves is not None:
                curves.close()
            ray.train.report(metrics)
            return
        report_epoch(metrics, epoch, (lambda epoch=epoch: {"trainer": trainer.state_dict(), "epoch": epoch,
                                                            "history": history, "start_epoch": start_epoch})
                     if rank == 0 else None)
    if curves is not None:
        curves.close()


class PretrainStage(Stage):
    name = "pretrain"
    config_sections = ("pretrain", "models.dino.arch", "models.dino.image_size", "data.root",
                       "data.layout", "data.classes", "data.train_split", "data.limit", "data.max_pixels",
                       "data.max_file_bytes", "seed")

    # The worker function; a class attribute so a test can wrap it (kill a run mid-way).
    train_loop = staticmethod(train_loop_per_worker)

    @classmethod
    def needs(cls, cfg: PipelineConfig) -> Needs:
        pc = cfg.pretrain
        return Needs(images=("train",), groups=(WorkerGroup(
            "pretraining (Ray Train)", "pretrain.num_workers", pc.num_workers, "pretrain.cpus_per_worker",
            pc.cpus_per_worker, gpus=1.0 if pc.use_gpu else 0.0, feed_cpus=pc.decode_cpus),))

    def extra_outputs(self, run) -> tuple[str, ...]:
        return (run.tensorboard_dir(self.name),)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Train (or resume) and write the teacher and the history. Counts: ``images`` (listed),
        ``images_per_epoch`` (trained on in the last epoch: the decodable ones, less each
        worker's last partial batch), ``epochs``, ``start_epoch``
        (> 1 after a resume), ``steps_per_epoch``, ``workers``, the last epoch's ``final_loss``,
        ``kl_div`` and ``border_ring_share``; ``diagnostics.pretrain`` holds the history."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from pdso_ray.models.loading import save_weights

        cfg, storage, pc = ctx.cfg, ctx.storage, ctx.cfg.pretrain
        listing = ctx.data.list_split(storage, ctx.data.train_split())
        images = listing.images[: cfg.data.limit] if cfg.data.limit else listing.images
        steps_per_epoch = (len(images) // pc.num_workers) // pc.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"pretrain: {len(images)} train images cannot fill one batch of "
                             f"pretrain.batch_size={pc.batch_size} on each of pretrain.num_workers="
                             f"{pc.num_workers} workers; lower the batch size")
        recipe = pretrain_recipe(cfg, steps_per_epoch)
        size = input_size(cfg)
        reader = ImageReader.from_config(storage, cfg.data)
        probe = self._probe_images(reader, images, size, pc.probe_images)

        rows = [{"id": r.id, "path": r.path, "split": r.split} for r in images]
        ds = map_step(from_rows(rows, pc.batch_size),
                      ReadDecode(reader, size, Resources(batch_size=pc.batch_size, num_cpus=pc.decode_cpus,
                                                         stateful=False), square=True),
                      ctx.cluster_has_gpu)
        ds = ds.filter(lambda row: row["reason"] == "").select_columns(["image"])

        storage_path, storage_fs = train_storage(storage, ctx.run.pretrain_dir)
        collapse_file = Storage.join(ctx.run.pretrain_dir, COLLAPSE_NAME)
        storage.remove(collapse_file)  # from an earlier attempt of the same recipe
        trainer = TorchTrainer(
            self.train_loop,
            train_loop_config={"recipe": dataclasses.asdict(recipe), "pretrain": pc, "probe": probe,
                               "storage": storage, "collapse_file": collapse_file,
                               "tracker": stage_tracker(ctx, self.name)},
            scaling_config=ScalingConfig(num_workers=pc.num_workers, use_gpu=pc.use_gpu and ctx.cluster_has_gpu,
                                         resources_per_worker={"CPU": pc.cpus_per_worker}),
            run_config=RunConfig(storage_path=storage_path, storage_filesystem=storage_fs, name=TRAIN_RUN_NAME,
                                 failure_config=FailureConfig(max_failures=pc.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=pc.keep_checkpoints or None)),
            datasets={"train": ds},
            dataset_config=ordered_ingest(),
        )
        log.info("pretrain: %s on %d images (%d px), %d epochs x %d steps of %d on %d worker(s)",
                 recipe.arch, len(images), size, recipe.epochs, steps_per_epoch, pc.batch_size, pc.num_workers)
        result = fit(trainer)
        if storage.exists(collapse_file):
            last = storage.read_json(collapse_file)
            raise PretrainCollapsed(
                f"pretrain: the teacher collapsed at epoch {last['epoch']}: its outputs carry "
                f"{last['kl_div']:.3f} nats about the image (pretrain.min_kl_div={pc.min_kl_div}), "
                f"{last['prototypes_used']} prototypes in use. Lower pretrain.lr, raise "
                "pretrain.teacher_temp or pretrain.momentum, or change pretrain.seed (a new recipe "
                "starts afresh; the same one resumes into the same collapse)")
        if result.checkpoint is None:
            raise PipelineError(f"pretrain: training under {ctx.run.pretrain_dir} left no checkpoint")
        state = checkpoint_state(result.checkpoint)
        history = state["history"]
        teacher = {k.removeprefix("backbone.vit."): v for k, v in state["trainer"]["teacher"].items()
                   if k.startswith("backbone.vit.")}
        save_weights(storage, ctx.run.pretrain_teacher, teacher)
        storage.write_json(ctx.run.pretrain_history, history)
        final = history[-1]
        if final["border_ring_share"] > 0.6:
            log.warning("pretrain: on %.0f%% of the probe images the teacher attends more to the border "
                        "ring than to the centre: its saliency may sit on the background (good runs: "
                        "0.2-0.4); check the report's pretraining curve", 100 * final["border_ring_share"])
        return {"images": len(images), "images_per_epoch": final["images"], "epochs": int(state["epoch"]),
                "start_epoch": int(state["start_epoch"]), "steps_per_epoch": steps_per_epoch,
                "workers": pc.num_workers, "final_loss": final["loss"], "kl_div": final["kl_div"],
                "border_ring_share": final["border_ring_share"],
                "diagnostics": {"pretrain": {"history": history}}}

    @staticmethod
    def _probe_images(reader: ImageReader, images, size: int, count: int) -> np.ndarray:
        """Up to ``count`` listed images that decode, evenly spaced over the (sorted) listing so
        that every class folder shows up, as P×S×S×3 uint8 (the saliency probe)."""
        from pdso_ray.stages.read_decode import resize_square

        out = []
        for record in images[:: max(1, len(images) // count)]:
            if len(out) == count:
                break
            decoded = reader.read(record.path, target_short_side=size)
            if decoded.ok:
                out.append(resize_square(decoded.image, size))
        if not out:
            raise ValueError(f"pretrain: none of the first train images decodes (e.g. {images[0].path})")
        return np.stack(out)
