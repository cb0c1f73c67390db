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
CLS attention is higher on the border ring than inside), averaged over ranks; rank 0 writes the
teacher (``pretrain/dino_teacher.pth``, atomically, and every ``pretrain.teacher_every`` epochs a
copy ``pretrain/teachers/epoch_NNNN.pth``), the history so far (the driver, polling it, logs one
line per epoch with the time left) and checkpoints (``state.pt``: trainer state, epoch, history)
to ``pretrain/train/epoch_NNNN/``.
Re-running the stage resumes after the last finished epoch; ``FailureConfig(max_failures)``
restarts failed workers from it. A collapsed teacher (``kl_div`` below ``pretrain.min_kl_div``
from epoch ``collapse_after_epochs`` on) stops the run with :class:`PretrainCollapsed`.

Output: ``pretrain/dino_teacher.pth`` (the teacher backbone, keyed as the official DINO release
files: the latest epoch's while training, the last one's when the stage is done),
``pretrain/teachers/epoch_NNNN.pth`` (kept epochs) and ``pretrain/history.json`` (one record per
epoch; the report draws it).

Key: the recipe (``pretrain``, ``models.dino.arch`` and ``image_size``, the seed), which images
(the data keys that choose them) and the listing of the train images itself
(:meth:`~pdso_ray.data.listing.SplitListing.fingerprint`); not ``data.classes`` or anything a
later stage reads, so trying another C keeps the pretraining. New images start it afresh
(``restarts_on_new_inputs``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from pdso_ray.config import PipelineConfig, PretrainConfig
from pdso_ray.stages.base import (MinImages, Needs, PipelineError, Resources, RunContext, Stage, WorkerGroup,
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


# The settings fit_to_machine sizes (unless the user gave them).
FITTED_KEYS = ("pretrain.num_workers", "pretrain.cpus_per_worker", "pretrain.use_gpu", "pretrain.batch_size")


# Share of the available memory a CPU pretraining may plan to use (Ray kills workers at 95% of
# the machine's; the driver, Ray Data's decoding and other programs need the rest).
MEMORY_SHARE = 0.7


def fit_to_machine(cfg: PipelineConfig, images: int, cpus: float, gpus: int, given: set[str],
                   memory: tuple[float, int, int] | None = None) -> list[str]:
    """Size ``cfg.pretrain`` (in place) for one machine of ``cpus`` CPUs and ``gpus`` GPUs and a
    train split of ``images`` images (at least), leaving the keys in ``given`` as they are; return
    one line per value changed (``"pretrain.batch_size: 64 -> 30 (30 train images on 1 worker(s))"``).

    - ``num_workers``: one per GPU; on CPUs one (a second process would only split the same cores);
    - ``use_gpu``: whether there is a GPU;
    - ``cpus_per_worker``: the CPUs left after ``decode_cpus``, shared by the workers (at least 1);
    - ``batch_size``: at most ``images // num_workers``, so that every worker takes a full batch
      each epoch; on CPUs, with ``memory`` = ``(available bytes, bytes of a training process,
      bytes per image of a step)`` (:func:`pdso_ray.models.dino_pretrain.step_memory`), also at
      most what :data:`MEMORY_SHARE` of the available memory holds.

    What the user gave and does not fit stays, for the preflight to name in its ``error:`` line.
    Raises ``ValueError`` when not even a batch of one fits in memory."""
    pc = cfg.pretrain
    before = {key: getattr(pc, key.split(".", 1)[1]) for key in FITTED_KEYS}
    why = {}
    if "pretrain.num_workers" not in given:
        pc.num_workers = max(1, min(gpus, images)) if gpus else 1
        why["pretrain.num_workers"] = f"{gpus} GPU(s)" if gpus else "no GPU: one process uses the cores"
    if "pretrain.use_gpu" not in given:
        pc.use_gpu = gpus > 0
        why["pretrain.use_gpu"] = f"{gpus} GPU(s)"
    if "pretrain.cpus_per_worker" not in given:
        pc.cpus_per_worker = float(max(1, int((cpus - pc.decode_cpus) // pc.num_workers)))
        why["pretrain.cpus_per_worker"] = f"{cpus:g} CPUs, {pc.decode_cpus:g} for decoding"
    if "pretrain.batch_size" not in given:
        if pc.batch_size * pc.num_workers > images:
            pc.batch_size = max(1, images // pc.num_workers)
            why["pretrain.batch_size"] = f"{images} train images on {pc.num_workers} worker(s)"
        if memory is not None and not gpus:
            available, process, per_image = memory
            fits = int((MEMORY_SHARE * available / pc.num_workers - process) // max(per_image, 1)) + 1
            if fits < 1:
                raise ValueError(f"pretrain: one training process of models.dino.arch={cfg.models.dino.arch} "
                                 f"takes {process / 1e9:.1f} GB, more than {MEMORY_SHARE:.0%} of the "
                                 f"{available / 1e9:.1f} GB available: use a smaller backbone, fewer "
                                 "pretrain.num_local views or a smaller pretrain.input_size")
            if pc.batch_size > fits:
                pc.batch_size = fits
                why["pretrain.batch_size"] = (f"{per_image / 1e9:.2f} GB per image on top of "
                                              f"{process / 1e9:.1f} GB; {available / 1e9:.1f} GB available")
    return [f"{key}: {before[key]} -> {getattr(pc, key.split('.', 1)[1])} ({why[key]})"
            for key in FITTED_KEYS if key in why and getattr(pc, key.split(".", 1)[1]) != before[key]]


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One epoch's record as the terminal shows it, with the time left at that epoch's pace."""
    left = (epochs - record["epoch"]) * record["seconds"]
    eta = f", ~{left / 60:.0f} min left" if left >= 60 else f", ~{left:.0f} s left" if left else ""
    return (f"pretrain: epoch {record['epoch']}/{epochs} loss {record['loss']:.4f} teacher entropy "
            f"{record['teacher_entropy']:.3f} kl_div {record['kl_div']:.3f} prototypes "
            f"{record['prototypes_used']} border share {record['border_ring_share']:.2f} "
            f"({record['images']} images, {record['seconds']:.1f} s{eta}); teacher written")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function.

    ``config``: ``recipe`` (``dataclasses.asdict`` of the DinoPretrainConfig), ``pretrain`` (the
    PretrainConfig), ``probe`` (P×S×S×3 uint8 probe images), ``storage``, ``run`` (the
    :class:`~pdso_ray.run_layout.RunLayout`: where the teachers go), ``collapse_file`` and
    ``tracker`` (the training curves: rank 0 logs each epoch's record).
    Resumes from ``ray.train.get_checkpoint()``; reports once per epoch on every rank the epoch's
    record (``epoch, loss, teacher_entropy, mean_output_entropy, kl_div, prototypes_used,
    border_ring_share, images, seconds, start_epoch, collapsed``); rank 0 attaches the checkpoint
    (``state.pt``: trainer state, epoch, history, start_epoch), except for a collapsed epoch,
    whose record rank 0 writes to ``collapse_file`` before every rank stops. Before it reports
    an epoch that did not collapse, rank 0 writes the teacher (:func:`write_teacher`) and the
    history so far (``run.pretrain_history``), from which the driver logs the epoch.
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
        if rank == 0:
            write_teacher(config["storage"], config["run"], trainer.teacher_backbone_state_dict(), epoch,
                          recipe.epochs, pc.teacher_every)
            # the driver shows the epochs it finds here (PretrainStage.run)
            config["storage"].write_json(config["run"].pretrain_history, history)
        report_epoch(metrics, epoch, (lambda epoch=epoch: {"trainer": trainer.state_dict(), "epoch": epoch,
                                                            "history": history, "start_epoch": start_epoch})
                     if rank == 0 else None)
    if curves is not None:
        curves.close()


def write_teacher(storage: Storage, run, teacher: dict[str, Any], epoch: int, epochs: int, every: int) -> None:
    """Write ``teacher`` (the official DINO layout) after ``epoch`` of ``epochs``, each file
    atomically: to ``run.pretrain_teacher``, and to ``run.pretrain_epoch_teacher(epoch)`` when
    ``every`` (> 0) divides ``epoch`` or it is the last."""
    from pdso_ray.models.loading import save_weights

    save_weights(storage, run.pretrain_teacher, teacher)
    if every and (epoch % every == 0 or epoch == epochs):
        save_weights(storage, run.pretrain_epoch_teacher(epoch), teacher)


# PretrainConfig fields that say how the training runs, not what it learns: outside the key, so
# that `pdso-ray pretrain`'s sizing, a resumed run on another machine or more kept teachers reuse
# the pretraining.
EXECUTION_FIELDS = ("cpus_per_worker", "use_gpu", "decode_cpus", "max_failures", "keep_checkpoints",
                    "teacher_every", "probe_images", "collapse_after_epochs", "min_kl_div")


class PretrainStage(Stage):
    name = "pretrain"
    # What pretraining reads: the recipe (pretrain's fields but EXECUTION_FIELDS), the backbone,
    # the seed and the data keys that choose the images (the listing itself is the input
    # fingerprint). Not data.classes: another C reuses the teacher.
    config_sections = (*(f"pretrain.{f.name}" for f in dataclasses.fields(PretrainConfig)
                         if f.name not in EXECUTION_FIELDS),
                       "models.dino.arch", "models.dino.image_size", "data.root", "data.layout",
                       "data.train_split", "data.limit", "data.max_pixels", "data.max_file_bytes", "seed")
    restarts_on_new_inputs = True

    # The worker function; a class attribute so a test can wrap it (kill a run mid-way).
    train_loop = staticmethod(train_loop_per_worker)

    @classmethod
    def needs(cls, cfg: PipelineConfig) -> Needs:
        pc = cfg.pretrain
        per_epoch = pc.num_workers * pc.batch_size
        enough = MinImages(per_epoch, f"pretrain.batch_size={pc.batch_size} on each of pretrain.num_workers="
                           f"{pc.num_workers} worker(s) (one full batch each per epoch)",
                           "lower pretrain.batch_size (`pdso-ray pretrain` fits it to the images)")
        return Needs(images=("train",), min_images=enough, groups=(WorkerGroup(
            "pretraining (Ray Train)", "pretrain.num_workers", pc.num_workers, "pretrain.cpus_per_worker",
            pc.cpus_per_worker, gpus=1.0 if pc.use_gpu else 0.0, feed_cpus=pc.decode_cpus),))

    def extra_outputs(self, run) -> tuple[str, ...]:
        return (run.tensorboard_dir(self.name),)

    def input_fingerprint(self, ctx: RunContext) -> str:
        """The train listing's fingerprint: an image added, removed or replaced changes it."""
        return ctx.train_listing.fingerprint()

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Train (or resume) and write the teacher and the history. Counts: ``images`` (listed),
        ``images_per_epoch`` (trained on in the last epoch: the decodable ones, less each
        worker's last partial batch), ``epochs``, ``start_epoch``
        (> 1 after a resume), ``steps_per_epoch``, ``workers``, the last epoch's ``final_loss``,
        ``kl_div`` and ``border_ring_share``; ``diagnostics.pretrain`` holds the history."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        cfg, storage, pc = ctx.cfg, ctx.storage, ctx.cfg.pretrain
        images = ctx.train_listing.images
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
                               "storage": storage, "run": ctx.run, "collapse_file": collapse_file,
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
        history_url = ctx.run.pretrain_history
        shown = len(storage.read_json(history_url)) if storage.exists(history_url) else 0

        def show_new_epochs() -> None:
            nonlocal shown
            try:
                written = storage.read_json(history_url) if storage.exists(history_url) else []
            except (OSError, ValueError):  # progress only: the next poll reads it again
                return
            for record in written[shown:]:
                log.info("%s", epoch_line(record, recipe.epochs))
            shown = max(shown, len(written))

        try:
            result = fit(trainer, show_new_epochs)
        except Exception as e:
            if "running low on memory" not in str(e):
                raise
            # Ray's own message is a page of its memory accounting: say what to change instead.
            raise PipelineError(
                f"pretrain: Ray killed the training worker because the machine ran low on memory "
                f"(pretrain.batch_size={pc.batch_size} images of {size} px, {recipe.crops.num_local} local "
                f"views, models.dino.arch={recipe.arch}): lower pretrain.batch_size (`pdso-ray pretrain` "
                "measures a step and fits it to the memory)") from None
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
        # the last epoch's teacher, also when the workers had nothing left to train
        write_teacher(storage, ctx.run, teacher, int(state["epoch"]), recipe.epochs, pc.teacher_every)
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
