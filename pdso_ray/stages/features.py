"""Stage 1, ``features``: images → pooled DINO features (and their h-flip), streaming on Ray Data.

list (driver) → read bytes + decode + resize (CPU tasks) → DINO (autoscaling actor pool; GPU and
bf16 when present) → write Parquet shards (CPU tasks). Every listed image ends in exactly one
place: a row of ``features/*.parquet`` or a row of ``rejected/*.parquet`` with its reason. Shards
are named by a hash of their ids, so a retried task overwrites its own file; a re-run after a crash
skips the ids already written.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from pdso_ray.config import PipelineConfig
from pdso_ray.data.imagenet_s import list_split
from pdso_ray.stages.base import Batch, BatchStep, Resources, RunContext, Stage, map_step
from pdso_ray.stages.read_decode import ReadDecode
from pdso_ray.storage import Storage
from pdso_ray.tables import iter_row_groups, shard_name, vectors_to_arrow, write_table

log = logging.getLogger("pdso_ray")

REJECTED_DIR = "rejected"


class DinoFeatures(BatchStep):
    """Pooled DINO features of each decoded image and of its horizontal flip, plus the saliency
    peak. Rows with a reason pass through with zero features (the writer routes them)."""

    def __init__(self, cfg: PipelineConfig, storage: Storage):
        self.dino_cfg = cfg.models.dino
        self.allow_random_init = cfg.models.allow_random_init
        self.storage = storage

    def setup(self) -> None:
        import torch

        from pdso_ray.models.loading import build_dino_from_config

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_dino_from_config(self.dino_cfg, self.storage,
                                            allow_random_init=self.allow_random_init)
        self.model.to(self.device).eval()

    def __call__(self, batch: Batch) -> Batch:
        import torch

        from pdso_ray.method.features import pooled_feature, saliency_from_attention, saliency_peak
        from pdso_ray.models.dino import to_model_input

        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        n = len(ok)
        dim = self.model.embed_dim
        feats = np.zeros((n, dim), dtype=np.float32)
        feats_flip = np.zeros((n, dim), dtype=np.float32)
        peaks = np.zeros((n, 2), dtype=np.float32)
        if ok.any():
            x = to_model_input(batch["image"][ok], self.dino_cfg.image_size).to(self.device)
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
        out = {k: batch[k] for k in ("id", "path", "split", "height", "width", "reason")}
        out.update(feat=feats, feat_flip=feats_flip, saliency_peak=peaks)
        return out


class WriteShards(BatchStep):
    """Write one batch: its good rows to ``features/``, its rejected rows to ``rejected/``.
    Returns one row of counts per batch."""

    def __init__(self, storage: Storage, features_dir: str, rejected_dir: str):
        self.storage = storage
        self.features_dir = features_dir
        self.rejected_dir = rejected_dir

    def __call__(self, batch: Batch) -> Batch:
        ids = [str(i) for i in batch["id"]]
        name = shard_name(ids)
        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        if ok.any():
            table = pa.table({
                "id": pa.array(np.asarray(ids, dtype=object)[ok], pa.string()),
                "path": pa.array([str(p) for p in batch["path"][ok]], pa.string()),
                "split": pa.array([str(s) for s in batch["split"][ok]], pa.string()),
                "height": pa.array(batch["height"][ok], pa.int32()),
                "width": pa.array(batch["width"][ok], pa.int32()),
                "feat": vectors_to_arrow(batch["feat"][ok]),
                "feat_flip": vectors_to_arrow(batch["feat_flip"][ok]),
                "saliency_peak": vectors_to_arrow(batch["saliency_peak"][ok]),
            })
            write_table(self.storage, Storage.join(self.features_dir, name), table)
        if (~ok).any():
            write_rejected(self.storage, Storage.join(self.rejected_dir, name),
                           ids=list(np.asarray(ids, dtype=object)[~ok]),
                           paths=[str(p) for p in batch["path"][~ok]],
                           reasons=[str(r) for r in batch["reason"][~ok]])
        return {"n_ok": np.asarray([ok.sum()]), "n_rejected": np.asarray([(~ok).sum()])}


def write_rejected(storage: Storage, url: str, ids: list[str | None], paths: list[str],
                   reasons: list[str]) -> None:
    table = pa.table({"id": pa.array(ids, pa.string()), "path": pa.array(paths, pa.string()),
                      "reason": pa.array(reasons, pa.string())})
    write_table(storage, url, table)


def _done_ids(storage: Storage, *folders: str) -> set[str]:
    done: set[str] = set()
    for folder in folders:
        for table in iter_row_groups(storage, folder, columns=["id"]):
            done.update(i for i in table.column("id").to_pylist() if i is not None)
    return done


class FeaturesStage(Stage):
    name = "features"
    config_sections = ("data.root", "data.classes", "data.train_split", "data.limit",
                       "data.max_pixels", "models.dino")
    extra_outputs = (REJECTED_DIR,)
    feature_step = DinoFeatures  # the model step; tests swap in a fault-injecting subclass

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg, storage = ctx.cfg, ctx.storage
        features_dir = self.output_dir(ctx)
        rejected_dir = ctx.path(REJECTED_DIR)
        listing = list_split(storage, cfg.data.root, cfg.data.classes, cfg.data.train_split)
        images = listing.images[: cfg.data.limit] if cfg.data.limit else listing.images
        if listing.ignored:
            log.info("features: %d non-image files ignored (e.g. %s)", len(listing.ignored),
                     listing.ignored[0])
        if listing.rejected:
            # Files that cannot be given a safe id are rejected at listing time.
            write_rejected(storage, Storage.join(rejected_dir, "listing.parquet"),
                           ids=[None] * len(listing.rejected),
                           paths=[r.path for r in listing.rejected],
                           reasons=[r.reason for r in listing.rejected])

        done = _done_ids(storage, features_dir, rejected_dir)
        todo = [r for r in images if r.id not in done]
        log.info("features: %d images listed, %d already done, %d to process",
                 len(images), len(images) - len(todo), len(todo))
        if todo:
            self._process(ctx, todo, features_dir, rejected_dir)

        n_ok = _count_ids(storage, features_dir)
        n_rejected = _count_ids(storage, rejected_dir, include_null=True)
        total = len(images) + len(listing.rejected)
        return {"images_total": total, "images_ok": n_ok, "images_rejected": n_rejected,
                "files_ignored": len(listing.ignored)}

    def _process(self, ctx: RunContext, todo: list, features_dir: str, rejected_dir: str) -> None:
        import ray.data

        cfg, storage = ctx.cfg, ctx.storage
        fc = cfg.features
        rows = [{"id": r.id, "path": r.path, "split": r.split} for r in todo]
        blocks = max(1, min(len(rows) // fc.batch_size, 4096))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        decode = ReadDecode(storage, cfg.data.max_pixels, cfg.models.dino.image_size, square=True)
        ds = map_step(ds, decode,
                      Resources(batch_size=fc.batch_size, num_cpus=fc.decode_cpus, stateful=False),
                      ctx.cluster_has_gpu)
        ds = map_step(ds, self.feature_step(cfg, storage),
                      Resources(batch_size=fc.batch_size, num_cpus=fc.cpus_per_actor,
                                num_gpus=fc.gpus_per_actor, min_actors=fc.min_actors,
                                max_actors=fc.max_actors),
                      ctx.cluster_has_gpu)
        ds = map_step(ds, WriteShards(storage, features_dir, rejected_dir),
                      Resources(batch_size=fc.rows_per_file, num_cpus=0, stateful=False),
                      ctx.cluster_has_gpu)
        written = 0
        for row in ds.iter_rows():
            written += int(row["n_ok"]) + int(row["n_rejected"])
        if written != len(todo):
            raise RuntimeError(f"features: {written} rows written for {len(todo)} images")


def _count_ids(storage: Storage, folder: str, include_null: bool = False) -> int:
    n = 0
    for table in iter_row_groups(storage, folder, columns=["id"]):
        col = table.column("id")
        n += len(col) if include_null else len(col) - col.null_count
    return n
