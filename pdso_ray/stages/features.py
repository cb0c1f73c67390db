"""Stage 1, ``features``: images → pooled DINO features (and their h-flip), streaming on Ray Data.

list (driver) → read bytes + decode + resize (CPU tasks) → DINO (autoscaling actor pool; GPU and
bf16 when present) → write Parquet shards (CPU tasks). With GPU actors (``data.gpu_decode``) the CPU
tasks only read, and the actor decodes each batch's JPEGs on its GPU
(:class:`~pdso_ray.stages.read_decode.DeviceDecode`). Every listed image ends in exactly one
place: a row of ``features/*.parquet`` or a row of ``rejected/*.parquet`` with its reason. Shards
are named by a hash of their ids, so a retried task overwrites its own file; a re-run after a crash
skips the ids already written (:mod:`pdso_ray.stages.streaming`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from pdso_ray.config import PipelineConfig
from pdso_ray.data.listing import Rejected
from pdso_ray.stages.base import Batch, BatchStep, Needs, Resources, RunContext, WorkerGroup, dino_need
from pdso_ray.stages.read_decode import DeviceDecode, ImageReader, ReadDecode
from pdso_ray.stages.streaming import StreamingStage, Work, ids_in, reconcile, write_rejected
from pdso_ray.storage import Storage
from pdso_ray.tables import drop_ids, iter_row_groups, read_table, shard_name, vectors_to_arrow, write_table

log = logging.getLogger("pdso_ray")

LISTING_REJECTED = "listing.parquet"  # rejected/: the files refused when the split was listed


class DinoFeatures(BatchStep):
    """Pooled DINO features of each decoded image and of its horizontal flip, plus the saliency
    peak. Rows with a reason pass through with zero features (the writer routes them), and so do
    ``id``, ``path``, ``split``, ``cls`` (the image's class, "" when unknown), ``height``,
    ``width``."""

    def __init__(self, cfg: PipelineConfig, storage: Storage, device_decode: DeviceDecode | None = None):
        from pdso_ray.models.loading import DinoSource

        self.device_decode = device_decode  # set: the batch holds encoded bytes, decoded here
        self.dino = DinoSource.from_config(cfg)
        self.image_size = cfg.models.dino.image_size
        self.storage = storage
        fc = cfg.features
        self.resources = Resources(batch_size=fc.batch_size, num_cpus=fc.cpus_per_actor,
                                   num_gpus=fc.gpus_per_actor, min_actors=fc.min_actors,
                                   max_actors=fc.max_actors)

    def setup(self) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.dino.build(self.storage).to(self.device).eval()

    def __call__(self, batch: Batch) -> Batch:
        import torch

        from pdso_ray.method.features import pooled_feature, saliency_from_attention, saliency_peak
        from pdso_ray.models.dino import to_model_input

        if self.device_decode is not None:
            batch = self.device_decode(batch, self.device)
        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        n = len(ok)
        dim = self.model.embed_dim
        feats = np.zeros((n, dim), dtype=np.float32)
        feats_flip = np.zeros((n, dim), dtype=np.float32)
        peaks = np.zeros((n, 2), dtype=np.float32)
        if ok.any():
            # uint8 travels to the device and is resized and normalised there
            x = to_model_input(batch["image"][ok], self.image_size, device=self.device)
            x = torch.cat([x, torch.flip(x, dims=[3])])
            with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                tokens, attention = self.model(x)
            tokens = tokens.float()
            saliency = saliency_from_attention(attention.float())
            pooled = pooled_feature(tokens, saliency).cpu().numpy()
            m = int(ok.sum())
            feats[ok], feats_flip[ok] = pooled[:m], pooled[m:]
            peaks[ok] = np.asarray(saliency_peak(saliency[:m].cpu()), dtype=np.float32).reshape(m, 2)
        out = {k: batch[k] for k in ("id", "path", "split", "cls", "height", "width", "reason") if k in batch}
        out.update(feat=feats, feat_flip=feats_flip, saliency_peak=peaks)
        return out


class WriteShards(BatchStep):
    """Write one batch: its good rows to ``features/``, its rejected rows to ``rejected/``, both
    named by a hash of the batch's ids. Returns each row's ``id`` and ``reason``."""

    def __init__(self, storage: Storage, features_dir: str, rejected_dir: str, rows_per_file: int):
        self.storage = storage
        self.features_dir = features_dir
        self.rejected_dir = rejected_dir
        # I/O-bound: no CPU slot, so writers never wait behind the model actors.
        self.resources = Resources(batch_size=rows_per_file, num_cpus=0, stateful=False)

    def __call__(self, batch: Batch) -> Batch:
        ids = [str(i) for i in batch["id"]]
        name = shard_name(ids)
        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        if ok.any():
            table = pa.table({
                "id": pa.array(np.asarray(ids, dtype=object)[ok], pa.string()),
                "path": pa.array([str(p) for p in batch["path"][ok]], pa.string()),
                "split": pa.array([str(s) for s in batch["split"][ok]], pa.string()),
                "cls": pa.array([str(c) for c in batch["cls"][ok]] if "cls" in batch else [""] * int(ok.sum()),
                                pa.string()),
                "height": pa.array(batch["height"][ok], pa.int32()),
                "width": pa.array(batch["width"][ok], pa.int32()),
                "feat": vectors_to_arrow(batch["feat"][ok]),
                "feat_flip": vectors_to_arrow(batch["feat_flip"][ok]),
                "saliency_peak": vectors_to_arrow(batch["saliency_peak"][ok]),
            })
            write_table(self.storage, Storage.join(self.features_dir, name), table)
        if (~ok).any():
            write_rejected(self.storage, Storage.join(self.rejected_dir, name),
                           [Rejected(path=str(p), reason=str(r), image_id=i) for i, p, r in
                            zip(np.asarray(ids, dtype=object)[~ok], batch["path"][~ok], batch["reason"][~ok])])
        return {"id": batch["id"], "reason": batch["reason"]}


class FeaturesStage(StreamingStage):
    name = "features"
    config_sections = ("data.root", "data.layout", "data.classes", "data.train_split", "data.limit",
                       "data.max_pixels", "data.max_file_bytes", "models.dino", "seed")
    feature_step = DinoFeatures  # the model step; tests swap in a fault-injecting subclass

    @classmethod
    def upstream(cls, cfg: PipelineConfig) -> tuple[str, ...]:
        """``pretrain`` when the backbone is the teacher it writes
        (:func:`pdso_ray.pipeline.resolve_checkpoints`), so a new pretraining recomputes features."""
        from pdso_ray.run_layout import RunLayout

        return ("pretrain",) if cfg.models.dino.checkpoint == RunLayout.from_config(cfg).pretrain_teacher else ()

    @classmethod
    def needs(cls, cfg: PipelineConfig) -> Needs:
        if cfg.data.features:  # precomputed: nothing to extract
            return Needs()
        fc = cfg.features
        return Needs(images=("train",), models=(dino_need(cfg),),
                     groups=(WorkerGroup("the DINO actor pool", "features.min_actors", fc.min_actors,
                                         "features.cpus_per_actor", fc.cpus_per_actor, gpus=fc.gpus_per_actor),))

    def extra_outputs(self, run) -> tuple[str, ...]:
        return (run.rejected_dir, run.input_index("features"))

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.features.batch_size

    def input_fingerprint(self, ctx: RunContext) -> str:
        """The listing's (:meth:`~pdso_ray.data.listing.SplitListing.fingerprint`): an image
        added, removed or replaced under ``data.root`` changes it."""
        return ctx.train_listing.fingerprint()

    def work(self, ctx: RunContext) -> Work:
        listing = ctx.train_listing
        images = listing.images
        if listing.ignored:
            log.info("features: %d non-image files ignored (e.g. %s)", len(listing.ignored),
                     listing.ignored[0])
        self._drop_changed(ctx, {r.id: r.version for r in images})
        if listing.rejected:
            # Files that cannot be used are rejected at listing time, with their reasons.
            write_rejected(ctx.storage, Storage.join(ctx.run.rejected_dir, LISTING_REJECTED),
                           listing.rejected)
        else:
            ctx.storage.remove(Storage.join(ctx.run.rejected_dir, LISTING_REJECTED))
        return Work(ids=[r.id for r in images],
                    rows=[{"id": r.id, "path": r.path, "split": r.split, "cls": r.wnid} for r in images],
                    rejected=listing.rejected, info={"ignored": len(listing.ignored), "images": images})

    def _drop_changed(self, ctx: RunContext, current: dict[str, str]) -> None:
        """Remove the rows of images that are gone from ``data.root`` or were replaced since they
        were computed (their stamp in the input index differs), so that they are computed again
        and nothing stale is kept. Only the files holding such rows are rewritten."""
        storage, run = ctx.storage, ctx.run
        index_url = run.input_index("features")
        computed: dict[str, str] = {}
        if storage.exists(index_url):
            table = read_table(storage, index_url, ["id", "version"])
            computed = dict(zip(table.column("id").to_pylist(), table.column("version").to_pylist()))
        done = ids_in(storage, run.features_dir, run.rejected_dir)
        stale = {i for i in done if i not in current or computed.get(i, current[i]) != current[i]}
        if stale:
            dropped = drop_ids(storage, run.features_dir, stale) + drop_ids(storage, run.rejected_dir, stale)
            log.info("features: %d images gone or replaced under data.root since the last run: %d rows "
                     "dropped, the replaced ones are computed again", len(stale), dropped)

    def done_ids(self, ctx: RunContext) -> set[str]:
        return ids_in(ctx.storage, ctx.run.features_dir, ctx.run.rejected_dir)

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        cfg, fc = ctx.cfg, ctx.cfg.features
        reader = ImageReader.from_config(ctx.storage, cfg.data)
        size = cfg.models.dino.image_size
        # with GPU actors, JPEGs travel encoded and are decoded in a batch on the GPU
        on_gpu = ctx.cluster_has_gpu and fc.gpus_per_actor > 0 and cfg.data.gpu_decode
        read = ReadDecode(reader, size, Resources(batch_size=fc.batch_size, num_cpus=fc.decode_cpus, stateful=False),
                          square=True, decode=not on_gpu)
        model = self.feature_step(cfg, ctx.storage,
                                  DeviceDecode(cfg.data.max_pixels, size) if on_gpu else None)
        return [read, model, WriteShards(ctx.storage, ctx.run.features_dir, ctx.run.rejected_dir, fc.rows_per_file)]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        n_ok = _count_ids(ctx.storage, ctx.run.features_dir)
        n_rejected = _count_ids(ctx.storage, ctx.run.rejected_dir, include_null=True)
        total = len(work.ids) + len(work.rejected)
        reconcile("features", total, n_ok, n_rejected)
        images = work.info["images"]
        write_table(ctx.storage, ctx.run.input_index("features"), pa.table({
            "id": pa.array([r.id for r in images], pa.string()),
            "path": pa.array([r.path for r in images], pa.string()),
            "version": pa.array([r.version for r in images], pa.string())}))
        return {"images_total": total, "images_ok": n_ok, "images_rejected": n_rejected,
                "images_computed": len(results), "files_ignored": work.info["ignored"],
                "splits": {ctx.data.train_split(): {"images": total, "ok": n_ok, "rejected": n_rejected}}}


def _count_ids(storage: Storage, folder: str, include_null: bool = False) -> int:
    n = 0
    for table in iter_row_groups(storage, folder, columns=["id"]):
        col = table.column("id")
        n += len(col) if include_null else len(col) - col.null_count
    return n
