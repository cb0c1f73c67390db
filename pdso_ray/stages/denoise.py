"""Stage 3, ``denoise``: DFF small-loss denoising of the k-means #1 labels (docs/method.md §3).

1. **f, g, h on the frozen features**: one Ray task (on a GPU when the cluster has one), so that
   the driver never holds the features. It reads ``features/`` (row group by row group) and
   ``cluster/`` itself, trains f, g and h, saves h (``denoise/classifier.pt``) and its class
   prototypes (``denoise/prototypes.npy``, C×D' float32, where k-means #2 starts, and
   ``denoise/prototype_counts.npy``, (C,) int64 h's training images behind each) and writes, file
   by file and aligned with the feature files, ``denoise/<name>.parquet``: id, ``emb`` (e(x),
   L2-normalised), ``subset1``, ``clean`` (S2) and ``relabel`` (g's label). Memory: the features
   once (N×D×2 float32) when they fit ``denoise.max_in_memory_gb``, else one shuffle block; plus
   O(N) labels, masks and losses. ``denoise/frozen.json`` marks it done (a re-run after a kill
   goes on with step 2).
2. **With ``denoise.finetune_blocks``: the backbone fine-tuning** (:func:`tune_loop_per_worker`,
   Ray Train, a checkpoint per epoch under ``denoise/tuning/``; a re-run resumes after the last
   epoch): h and the backbone's last blocks train on h's training images, decoded by Ray Data
   every epoch. Writes ``denoise/backbone.pth`` (official DINO layout; stage 5 loads it) and
   replaces ``classifier.pt``.
3. **Then the re-embedding** (:class:`ReembedFiles`, a Ray Data actor pool, one feature file per
   call): every image embedded again by the tuned backbone and h; each rewritten file is marked
   in its Parquet metadata (:data:`EMBEDDING_KEY`) and skipped by a re-run; the prototypes are
   recomputed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from pdso_ray.config import DenoiseConfig
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import (Batch, BatchStep, Needs, PipelineError, Resources, RunContext, Stage,
                                  WorkerGroup, checkpoint_state, ddp_wrap, dino_need, fit, map_step,
                                  ordered_ingest, report_epoch, resume_training, shuffled_batches,
                                  stage_tracker, train_storage)
from pdso_ray.stages.read_decode import ImageReader, ReadDecode
from pdso_ray.stages.diagnostics import image_diagnostics
from pdso_ray.storage import Storage
from pdso_ray.tables import (
    arrow_to_vectors,
    column_values,
    parquet_files,
    read_table,
    row_group_sizes,
    save_array,
    vectors_to_arrow,
    write_aligned_files,
    write_table,
)

log = logging.getLogger("pdso_ray")


def prototype_files(run: RunLayout) -> tuple[str, str]:
    """``denoise/prototypes.npy`` (C×D' float32) and ``denoise/prototype_counts.npy`` ((C,) int64)."""
    folder = run.stage_dir("denoise")
    return Storage.join(folder, "prototypes.npy"), Storage.join(folder, "prototype_counts.npy")


class ParquetPairs:
    """``feat`` and ``feat_flip`` of the feature files, one Parquet row group at a time: the chunks
    of a :class:`~pdso_ray.method.denoise.ChunkedFeatures` (chunk i = the i-th row group, files in
    order). Reads only footers until a chunk is asked for."""

    def __init__(self, storage: Storage, files: list[str]):
        self.storage = storage
        self.files = files
        sizes = row_group_sizes(storage, files)
        self.chunks = [(f, g) for f, groups in enumerate(sizes) for g in range(len(groups))]
        self.chunk_sizes = [n for groups in sizes for n in groups]
        self.num_rows = int(sum(self.chunk_sizes))
        first = next((i for i, n in enumerate(self.chunk_sizes) if n), None)
        self.dim = 0 if first is None else self.load(first)[0].shape[1]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``i`` as two rows×D float32 arrays."""
        import pyarrow.parquet as pq

        f, g = self.chunks[i]
        with self.storage.open(self.files[f], "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(g, columns=["feat", "feat_flip"])
        return arrow_to_vectors(table.column("feat")), arrow_to_vectors(table.column("feat_flip"))

    def feature_bytes(self) -> int:
        return self.num_rows * self.dim * 2 * 4

    def load_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row, N×D float32 each, filled row group by row group (no second copy)."""
        feats = np.empty((self.num_rows, self.dim), dtype=np.float32)
        flips = np.empty_like(feats)
        start = 0
        for i, n in enumerate(self.chunk_sizes):
            feats[start:start + n], flips[start:start + n] = self.load(i)
            start += n
        return feats, flips

    def load_file(self, f: int) -> np.ndarray:
        """``feat`` of file ``f``: rows×D float32."""
        return arrow_to_vectors(read_table(self.storage, self.files[f], ["feat"]).column("feat"))


def run_denoise(storage: Storage, feature_files: list[str], run: RunLayout, classes: int,
                settings: DenoiseConfig) -> dict[str, Any]:
    """The task body: everything is read and written here, on the worker.

    Features of at most ``settings.max_in_memory_gb`` (feat + feat_flip as float32) are loaded once;
    larger ones are streamed row group by row group on every pass (training epochs, scoring,
    embedding), so the worker holds one shuffle block (``ChunkedFeatures.shuffle_rows`` rows) at a
    time. Outputs are written file by file.
    """
    import torch

    from pdso_ray.method.denoise import ChunkedFeatures, denoise, embed_features
    from pdso_ray.models.loading import save_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = ParquetPairs(storage, feature_files)
    in_memory = pairs.feature_bytes() <= settings.max_in_memory_gb * 1024**3
    if in_memory:
        feats, flips = pairs.load_all()
        source = ChunkedFeatures.from_arrays(feats, flips)

        def file_feats(f: int, start: int, stop: int) -> np.ndarray:
            return feats[start:stop]
    else:
        source = ChunkedFeatures(pairs.chunk_sizes, pairs.load, pairs.dim)

        def file_feats(f: int, start: int, stop: int) -> np.ndarray:
            return pairs.load_file(f)
    labels = np.concatenate([read_table(storage, run.aligned_file("cluster", u), ["cluster"]).column("cluster")
                             .to_numpy().astype(np.int64) for u in feature_files])
    result = denoise(source, labels, classes, settings, device=device)
    save_weights(storage, run.denoise_classifier, result.classifier.state_dict())
    protos_file, counts_file = prototype_files(run)
    save_array(storage, protos_file, result.prototypes)
    save_array(storage, counts_file, result.prototype_counts)

    def columns(f: int, start: int, stop: int) -> dict[str, Any]:
        emb = embed_features(result.classifier, file_feats(f, start, stop), device=device)
        return {"emb": vectors_to_arrow(emb),
                "subset1": result.subset1[start:stop], "clean": result.clean_mask[start:stop],
                "relabel": result.labels[start:stop].astype(np.int32)}

    write_aligned_files(storage, feature_files, run.stage_dir("denoise"), columns)
    noisy = labels != result.labels
    return {**{k: (float(v) if isinstance(v, float) else int(v)) for k, v in result.stats.items()},
            "relabelled_fraction": float(noisy.mean()) if len(noisy) else 0.0,
            "features_in_memory": in_memory}


FROZEN_DONE = "frozen.json"  # the frozen-feature task's counts, once its outputs are written
EMBEDDING_KEY = b"pdso_ray.embedding"  # Parquet metadata of a denoise file: b"tuned" once re-embedded


def h_training_rows(storage: Storage, run: RunLayout, feature_files: list[str],
                    settings: DenoiseConfig) -> tuple[np.ndarray, np.ndarray]:
    """h's training set as the denoise files record it: ``(mask (N,) bool, labels (N,) int64)``
    in the row order of ``feature_files`` (:func:`pdso_ray.method.denoise.h_training_set`)."""
    from pdso_ray.method.denoise import h_training_set

    def column(stage: str, name: str) -> np.ndarray:
        return np.concatenate([read_table(storage, run.aligned_file(stage, u), [name]).column(name).to_numpy()
                               for u in feature_files])

    relabel = column("denoise", "relabel").astype(np.int64)
    clean_labels = column("cluster", "cluster").astype(np.int64) if settings.s2_labels == "kmeans" else relabel
    return h_training_set(settings.h_rows, column("denoise", "clean").astype(bool), clean_labels, relabel)


def tune_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker of the backbone fine-tuning (:class:`~pdso_ray.models.backbone_tuning.BackboneTuner`).

    ``config``: ``dino`` (the :class:`~pdso_ray.models.loading.DinoSource` of ``models.dino``),
    ``storage``, ``classifier`` (URL of h trained on the frozen features), ``settings`` (the
    DenoiseConfig), ``image_size``, ``total_steps``, ``tracker`` (the training curves: rank 0 logs
    each epoch's loss). Resumes from ``ray.train.get_checkpoint()``;
    reports once per epoch (``epoch``, ``loss``, ``images``, ``seconds``); rank 0 attaches the
    checkpoint (``state.pt``: tuner state, epoch, history).
    """
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pdso_ray.models.backbone_tuning import BackboneTuner
    from pdso_ray.models.loading import load_classifier

    settings: DenoiseConfig = config["settings"]
    storage: Storage = config["storage"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    tuner = BackboneTuner(config["dino"].build(storage), load_classifier(storage, config["classifier"]),
                          blocks=settings.finetune_blocks, image_size=config["image_size"],
                          backbone_lr=settings.finetune_lr, head_lr=settings.finetune_head_lr,
                          total_steps=config["total_steps"], device=device)
    if distributed:
        tuner.wrap(ddp_wrap(device))
    history, start_epoch = resume_training(tuner, "tuner")
    curves = config["tracker"].open({"blocks": settings.finetune_blocks, "lr": settings.finetune_lr}) \
        if rank == 0 and config.get("tracker") else None

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, settings.finetune_epochs + 1):
        started = time.perf_counter()
        losses, images = [], 0
        # DDP ranks must take the same number of steps: equal shards, the partial batch dropped
        for batch in shuffled_batches(shard, settings.finetune_batch_size, (settings.seed, epoch, rank),
                                      drop_last=distributed, dtypes={"image": torch.uint8, "label": torch.int64}):
            losses.append(tuner.step(batch["image"], batch["label"]))
            images += int(batch["image"].shape[0])
        record = {"epoch": epoch, "loss": round(float(np.mean(losses)) if losses else float("nan"), 5),
                  "images": images * world, "seconds": round(time.perf_counter() - started, 2)}
        history.append(record)
        if rank == 0:
            log.info("denoise: backbone fine-tuning epoch %d/%d loss %.4f (%d images, %.1f s)", epoch,
                     settings.finetune_epochs, record["loss"], record["images"], record["seconds"])
        if curves is not None:
            curves.log(epoch, {"tuning/loss": record["loss"],
                               "tuning/images_per_second": record["images"] / max(record["seconds"], 1e-9)})
            curves.flush()
        report_epoch(record, epoch, (lambda epoch=epoch: {"tuner": tuner.state_dict(), "epoch": epoch,
                                                          "history": history}) if rank == 0 else None)
    if curves is not None:
        curves.close()


class ReembedFiles(BatchStep):
    """In: ``file`` (URLs of feature files). For each, the tuned backbone and h embed the file's
    images again (square resize, pooled feature, e(x)), and the file's ``denoise/`` twin is
    rewritten with that ``emb`` and marked tuned (:data:`EMBEDDING_KEY`). An image that no longer
    decodes keeps its frozen-feature embedding (counted). Out: ``file``, ``rows``, ``kept_frozen``."""

    def __init__(self, cfg, storage: Storage, run: RunLayout):
        from pdso_ray.models.loading import DinoSource

        self.cfg, self.storage, self.run = cfg, storage, run
        self.dino = DinoSource.for_embedding(cfg, run)
        self.reader = ImageReader.from_config(storage, cfg.data)
        fc = cfg.features
        self.resources = Resources(batch_size=1, num_cpus=fc.cpus_per_actor, num_gpus=fc.gpus_per_actor,
                                   min_actors=fc.min_actors, max_actors=fc.max_actors)

    def setup(self) -> None:
        import torch

        from pdso_ray.models.loading import load_classifier

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = self.dino.build(self.storage)
        self.head = load_classifier(self.storage, self.run.denoise_classifier)

    def __call__(self, batch: Batch) -> Batch:
        rows, frozen = [], []
        for url in batch["file"]:
            n, k = self._reembed(str(url))
            rows.append(n)
            frozen.append(k)
        return {"file": batch["file"], "rows": np.asarray(rows), "kept_frozen": np.asarray(frozen)}

    def _reembed(self, feature_file: str) -> tuple[int, int]:
        from pdso_ray.data.decode import resize_square
        from pdso_ray.models.backbone_tuning import pooled_embedding

        size = self.cfg.models.dino.image_size
        paths = read_table(self.storage, feature_file, ["path"]).column("path").to_pylist()
        out_url = self.run.aligned_file("denoise", feature_file)
        table = read_table(self.storage, out_url)
        emb = arrow_to_vectors(table.column("emb")).copy()
        kept_frozen = 0
        step = self.cfg.features.batch_size
        for start in range(0, len(paths), step):
            images, rows = [], []
            batch = paths[start:start + step]
            for i, decoded in enumerate(self.reader.read_batch(batch, target_short_side=size), start):
                if decoded.ok:
                    images.append(resize_square(decoded.image, size))
                    rows.append(i)
                else:
                    kept_frozen += 1
            if images:
                emb[rows] = pooled_embedding(self.backbone, self.head, np.stack(images), size, self.device)
        table = table.set_column(table.schema.get_field_index("emb"), "emb", vectors_to_arrow(emb))
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), EMBEDDING_KEY: b"tuned"})
        write_table(self.storage, out_url, table)
        if kept_frozen:
            log.warning("denoise: %d images of %s no longer decode; they keep their frozen-feature "
                        "embedding", kept_frozen, feature_file)
        return len(paths), kept_frozen


def _is_reembedded(storage: Storage, url: str) -> bool:
    import pyarrow.parquet as pq

    with storage.open(url, "rb") as fh:
        metadata = pq.ParquetFile(fh).schema_arrow.metadata or {}
    return metadata.get(EMBEDDING_KEY) == b"tuned"


class DenoiseStage(Stage):
    name = "denoise"
    # models.dino: the backbone the fine-tuning starts from (its changes reach here through
    # features anyway)
    config_sections = ("denoise", "data.classes", "models.dino", "seed")
    depends_on = ("features", "cluster")
    # denoise.max_in_memory_gb: holding S919's features in memory (3.9 GB) beats streaming them:
    # streaming costs one zstd decode of the features per pass (~25 s per pass on one busy core,
    # half the time of a linear epoch), and a whole-data shuffle beats shuffling blocks of row groups.

    @classmethod
    def needs(cls, cfg) -> Needs:
        """One task (1 CPU, a GPU when the run uses GPUs); with ``denoise.finetune_blocks`` also the
        images, the backbone, the tuner's workers and the re-embedding actor pool."""
        task = WorkerGroup("the denoise task", None, 1, None, 1.0, gpus=1.0)
        d, fc = cfg.denoise, cfg.features
        if not d.finetune_blocks:
            return Needs(groups=(task,))
        if cfg.data.features:
            return Needs(conflicts=(
                f"denoise.finetune_blocks={d.finetune_blocks} fine-tunes the backbone on the images, but "
                f"data.features={cfg.data.features!r} gives precomputed features without them: set "
                "denoise.finetune_blocks=0 (denoising on the given features)",))
        tuner = WorkerGroup("the backbone fine-tuning (Ray Train)", "denoise.finetune_workers", d.finetune_workers,
                            "denoise.finetune_cpus_per_worker", d.finetune_cpus_per_worker, gpus=1.0,
                            feed_cpus=fc.decode_cpus)
        reembed = WorkerGroup("the re-embedding actor pool", "features.min_actors", fc.min_actors,
                              "features.cpus_per_actor", fc.cpus_per_actor, gpus=fc.gpus_per_actor)
        return Needs(images=("train",), models=(dino_need(cfg),), groups=(task, tuner, reembed))

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return (run.tensorboard_dir(self.name),)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """f, g, h on the frozen features (one task; skipped when an interrupted run finished
        it), then with ``denoise.finetune_blocks`` the backbone fine-tuning (Ray Train, resumes
        from its last epoch) and the re-embedding (Ray Data, file by file; files already
        re-embedded are skipped)."""
        import ray

        files = parquet_files(ctx.storage, ctx.run.features_dir)
        settings = dataclasses.replace(ctx.cfg.denoise, seed=ctx.cfg.seed_for("denoise"))
        done = Storage.join(ctx.run.stage_dir(self.name), FROZEN_DONE)
        if ctx.storage.exists(done):
            counts = ctx.storage.read_json(done)
        else:
            task = ray.remote(run_denoise).options(num_gpus=1 if ctx.cluster_has_gpu else 0,
                                                   num_cpus=1, max_retries=2)
            counts = ray.get(task.remote(ctx.storage, files, ctx.run, ctx.cfg.data.classes, settings))
            ctx.storage.write_json(done, counts)
        if settings.finetune_blocks:
            h_rows = h_training_rows(ctx.storage, ctx.run, files, settings)
            counts["tuning"] = self._tune_backbone(ctx, files, settings, h_rows)
            counts["tuning"].update(self._reembed(ctx, files, settings, h_rows))
        return {**counts, **self.diagnostics(ctx)}

    def _tune_backbone(self, ctx: RunContext, files: list[str], settings: DenoiseConfig,
                       h_rows: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        """Fine-tune the backbone with h on h's training images (``h_rows``: their mask and labels,
        :func:`h_training_rows`); write the tuned backbone (``denoise/backbone.pth``) and h
        (``denoise/classifier.pt``, replacing the frozen-feature h)."""
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from pdso_ray.models.loading import DinoSource, save_weights
        from pdso_ray.stages.streaming import from_rows

        cfg, storage, run = ctx.cfg, ctx.storage, ctx.run
        mask, labels = h_rows
        rows = []
        start = 0
        for url in files:
            table = read_table(storage, url, ["id", "path", "split"]).to_pydict()
            for i, (image_id, path, split) in enumerate(zip(table["id"], table["path"], table["split"]), start):
                if mask[i]:
                    rows.append({"id": image_id, "path": path, "split": split, "label": int(labels[i])})
            start += len(table["id"])
        per_step = settings.finetune_batch_size * settings.finetune_workers
        total_steps = settings.finetune_epochs * max(1, -(-len(rows) // per_step))
        size = cfg.models.dino.image_size
        reader = ImageReader.from_config(storage, cfg.data)
        ds = map_step(from_rows(rows, settings.finetune_batch_size),
                      ReadDecode(reader, size, Resources(batch_size=settings.finetune_batch_size,
                                                         num_cpus=cfg.features.decode_cpus, stateful=False),
                                 square=True), ctx.cluster_has_gpu)
        ds = ds.filter(lambda row: row["reason"] == "").select_columns(["image", "label"])
        storage_path, storage_fs = train_storage(storage, run.denoise_tuning_dir)
        trainer = TorchTrainer(
            tune_loop_per_worker,
            train_loop_config={"dino": DinoSource.from_config(cfg), "storage": storage,
                               "classifier": run.denoise_classifier, "settings": settings,
                               "image_size": size, "total_steps": total_steps,
                               "tracker": stage_tracker(ctx, self.name)},
            scaling_config=ScalingConfig(num_workers=settings.finetune_workers, use_gpu=ctx.cluster_has_gpu,
                                         resources_per_worker={"CPU": settings.finetune_cpus_per_worker}),
            run_config=RunConfig(storage_path=storage_path, storage_filesystem=storage_fs, name="train",
                                 failure_config=FailureConfig(max_failures=settings.finetune_max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
            datasets={"train": ds},
            dataset_config=ordered_ingest(),
        )
        log.info("denoise: fine-tuning the last %d blocks of %s with h on %d images, %d epochs",
                 settings.finetune_blocks, cfg.models.dino.arch, len(rows), settings.finetune_epochs)
        result = fit(trainer)
        if result.checkpoint is None:
            raise PipelineError(f"denoise: the backbone fine-tuning under {run.denoise_tuning_dir} "
                                "left no checkpoint")
        state = checkpoint_state(result.checkpoint)
        save_weights(storage, run.denoise_classifier, state["tuner"]["head"])
        save_weights(storage, run.denoise_backbone, state["tuner"]["backbone"])
        history = state["history"]
        return {"images": len(rows), "epochs": int(state["epoch"]), "history": history,
                "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"]}

    def _reembed(self, ctx: RunContext, files: list[str], settings: DenoiseConfig,
                 h_rows: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        """Embed every image again with the tuned backbone and h, then recompute the prototypes
        k-means #2 starts from (over h's training rows ``h_rows`` with ``denoise.prototypes=means``)."""
        from pdso_ray.method.denoise import head_prototypes
        from pdso_ray.models.loading import load_classifier
        from pdso_ray.stages.streaming import from_rows

        storage, run = ctx.storage, ctx.run
        todo = [u for u in files if not _is_reembedded(storage, run.aligned_file("denoise", u))]
        rows = kept_frozen = 0
        if todo:
            ds = map_step(from_rows([{"file": u} for u in todo], 1), ReembedFiles(ctx.cfg, storage, run),
                          ctx.cluster_has_gpu)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows += int(batch["rows"].sum())
                kept_frozen += int(batch["kept_frozen"].sum())
        classes = ctx.cfg.data.classes
        if settings.prototypes == "weights":
            mask, labels = h_rows
            prototypes = head_prototypes(load_classifier(storage, run.denoise_classifier))
            counts = np.bincount(labels[mask], minlength=classes).astype(np.int64)
        else:
            prototypes, counts = _class_means(storage, run, files, *h_rows, classes)
        protos_file, counts_file = prototype_files(run)
        save_array(storage, protos_file, prototypes)
        save_array(storage, counts_file, counts)
        return {"reembedded_files": len(todo), "reembedded_images": rows, "kept_frozen_embedding": kept_frozen}

    def diagnostics(self, ctx: RunContext) -> dict[str, Any]:
        """Purity of the k-means #1 labels on S1, of the labels h trains on (those S2 was
        selected under, ``denoise.s2_labels``: k-means #1's or g's relabelling) on S2, and of the
        relabelling DFF passes on, over every image, against the class folders."""
        out = ctx.run.stage_dir(self.name)

        def steps():
            kmeans = column_values(ctx.storage, ctx.run.stage_dir("cluster"), "cluster")
            trained = (kmeans if ctx.cfg.denoise.s2_labels == "kmeans"
                       else column_values(ctx.storage, out, "relabel"))
            return [("denoise_s1", kmeans, column_values(ctx.storage, out, "subset1")),
                    ("denoise_relabel", column_values(ctx.storage, out, "relabel"), None),
                    ("denoise_s2", trained, column_values(ctx.storage, out, "clean"))]

        return image_diagnostics(ctx, out, steps)


def _class_means(storage: Storage, run: RunLayout, files: list[str], mask: np.ndarray, labels: np.ndarray,
                 classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the mean re-embedded ``emb`` over the rows of ``mask``: (C×D' float32, a zero
    row for a class without rows; (C,) int64 rows per class), one denoise file at a time."""
    from pdso_ray.method.purify import cluster_means

    sums, counts, start = None, np.zeros(classes, dtype=np.int64), 0
    for url in files:
        emb = arrow_to_vectors(read_table(storage, run.aligned_file("denoise", url), ["emb"]).column("emb"))
        rows = slice(start, start + len(emb))
        picked, lab = mask[rows], labels[rows][mask[rows]]
        if sums is None:
            sums = np.zeros((classes, emb.shape[1]), dtype=np.float64)
        np.add.at(sums, lab, emb[picked].astype(np.float64))
        counts += np.bincount(lab, minlength=classes)
        start += len(emb)
    return cluster_means(sums, counts, np.zeros(sums.shape, dtype=np.float32)), counts
