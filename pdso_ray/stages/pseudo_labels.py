"""Stage 5, ``pseudo_labels``: one streaming pass that turns each train image into a raw and a
refined pixel label (docs/method.md §5–§6).

read + decode (CPU tasks) → actor pool holding DINO, the denoised embedding ``e(x)``, the final
centroids and SAM: patch features + saliency → raw label → prompts → SAM → refined label → PNGs
(``labels/raw/<id>.png``, ``labels/refined/<id>.png``) → per-image statistics as Parquet
(``labels/stats/``). Per-patch features are recomputed here, never stored. A re-run skips images
whose statistics row exists.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac

from pdso_ray.config import PipelineConfig
from pdso_ray.data.imagenet_s import encode_label
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import Batch, BatchStep, Resources, RunContext
from pdso_ray.stages.read_decode import ImageReader
from pdso_ray.stages.streaming import StreamingStage, Work, ids_in, object_column, reconcile
from pdso_ray.storage import Storage
from pdso_ray.tables import iter_row_groups, parquet_files, shard_name, write_table

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("pdso_ray")


class PseudoLabeler(BatchStep):
    """Per image: decode, DINO patch tokens and saliency, ``e(x)`` per patch, raw label from the
    image's candidate centroids, refinement (SAM or other), both labels written as PNGs.

    In: ``id``, ``path``, ``topk`` (K ids), ``topk_dist`` (K distances). Out: one statistics row per
    image (``reason`` non-empty when the image could not be decoded — it was decodable in stage 1,
    so this only happens if the file changed since).
    """

    def __init__(self, cfg: PipelineConfig, storage: Storage, run: RunLayout):
        from pdso_ray.models.loading import DinoSource, SamSource

        self.cfg = cfg
        self.storage = storage
        self.run = run
        self.reader = ImageReader.from_config(storage, cfg.data)
        self.dino = DinoSource.from_config(cfg)
        self.sam = SamSource.from_config(cfg) if _needs_sam(cfg) else None
        pc = cfg.pseudo_labels
        self.resources = Resources(batch_size=pc.batch_size, num_gpus=pc.gpus_per_actor,
                                   min_actors=pc.min_actors, max_actors=pc.max_actors)

    def setup(self) -> None:
        import torch

        from pdso_ray.method.refiners import RefineParams, get_refiner
        from pdso_ray.models.loading import load_embedding
        from pdso_ray.tables import load_array

        cfg = self.cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.dino.build(self.storage).to(self.device).eval()
        self.embed = load_embedding(self.storage, self.run.denoise_classifier).to(self.device)
        self.centroids = load_array(self.storage, self.run.centroids_file("purify"))
        rc = cfg.pseudo_labels.refine
        self.refine = get_refiner(rc.method)
        self.params = RefineParams(min_area=rc.min_area, gmm_confidence=rc.gmm_confidence)
        self.predictor = None
        if self.sam is not None:
            self.predictor = self.sam.predictor(self.storage, device=self.device,
                                                points_per_side=rc.sam_select_points_per_side)
        self.threshold = cfg.saliency_threshold()

    def _patch_features(self, image: np.ndarray):
        """Embedded patch features (h×w×D') and saliency upsampled to the image (H×W in [0, 1])."""
        import torch
        import torch.nn.functional as F

        from pdso_ray.method.features import saliency_from_attention
        from pdso_ray.models.dino import to_model_input

        size = self.cfg.pseudo_labels.image_size
        x = to_model_input(image[None], size).to(self.device)
        with torch.inference_mode(), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            tokens, attention = self.model(x)
            emb = self.embed(tokens.float())
        saliency = saliency_from_attention(attention.float())
        saliency = F.interpolate(saliency[:, None], size=image.shape[:2], mode="bilinear",
                                 align_corners=False)[0, 0]
        return emb[0].float().cpu().numpy(), saliency.clamp(0, 1).cpu().numpy()

    def __call__(self, batch: Batch) -> Batch:
        from pdso_ray.method.pseudo_labels import main_and_secondary_classes, raw_pseudo_label
        from pdso_ray.method.refiners import RefineContext

        rows: dict[str, list] = {k: [] for k in (
            "id", "path", "label_raw", "label_refined", "main_class", "classes", "prompts",
            "masks_used", "pixels_changed", "reason")}
        for image_id, path, topk, topk_dist in zip(batch["id"], batch["path"], batch["topk"],
                                                   batch["topk_dist"]):
            image_id, path = str(image_id), str(path)
            topk = np.asarray(topk, dtype=np.int64)
            topk_dist = np.asarray(topk_dist, dtype=np.float64)
            raw_url = self.run.label_png("raw", image_id)
            refined_url = self.run.label_png("refined", image_id)
            decoded = self.reader.read(path)
            stats: dict[str, Any] = {"prompts": 0, "masks_used": 0, "pixels_changed": 0}
            main = -1
            present: list[int] = []
            if decoded.ok:
                image = decoded.image
                emb, saliency = self._patch_features(image)
                raw = raw_pseudo_label(emb, saliency, self.centroids[topk], topk, self.threshold)
                main, secondary = main_and_secondary_classes(topk, topk_dist,
                                                             self.cfg.pseudo_labels.refine.sigma)
                # label ids are cluster id + 1; only classes the raw label holds get prompts
                in_raw = set(np.unique(raw).tolist())
                context = RefineContext(
                    main_class=main + 1,
                    secondary_classes=[c + 1 for c in secondary if c + 1 in in_raw],
                    patch_emb=emb, params=self.params)
                result = self.refine(image, raw, saliency, context, self.predictor)
                self.storage.write_bytes(raw_url, encode_label(raw))
                self.storage.write_bytes(refined_url, encode_label(result.label))
                stats = result.stats
                present = sorted(int(c) for c in np.unique(result.label) if 0 < c < 1000)
            rows["id"].append(image_id)
            rows["path"].append(path)
            rows["label_raw"].append(raw_url if decoded.ok else "")
            rows["label_refined"].append(refined_url if decoded.ok else "")
            rows["main_class"].append(main + 1 if decoded.ok else 0)
            rows["classes"].append(np.asarray(present, dtype=np.int32))
            rows["prompts"].append(int(stats.get("prompts", 0)))
            rows["masks_used"].append(int(stats.get("masks_used", 0)))
            rows["pixels_changed"].append(int(stats.get("pixels_changed", 0)))
            rows["reason"].append("" if decoded.ok else decoded.reason)
        out: Batch = {}
        for k, v in rows.items():
            if k in ("prompts", "masks_used", "pixels_changed", "main_class"):
                out[k] = np.asarray(v, dtype=np.int64)
            else:
                out[k] = object_column(v)
        return out


class WriteStats(BatchStep):
    """One Parquet file of per-image statistics per batch, named by its ids; returns each row's
    ``id`` and ``reason``."""

    def __init__(self, storage: Storage, stats_dir: str, batch_size: int):
        self.storage = storage
        self.stats_dir = stats_dir
        self.resources = Resources(batch_size=batch_size, num_cpus=0, stateful=False)

    def __call__(self, batch: Batch) -> Batch:
        ids = [str(i) for i in batch["id"]]
        name = shard_name(ids)
        table = pa.table({
            "id": pa.array(ids, pa.string()),
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "label_raw": pa.array([str(p) for p in batch["label_raw"]], pa.string()),
            "label_refined": pa.array([str(p) for p in batch["label_refined"]], pa.string()),
            "main_class": pa.array(batch["main_class"], pa.int32()),
            "classes": pa.array([list(map(int, c)) for c in batch["classes"]], pa.list_(pa.int32())),
            "prompts": pa.array(batch["prompts"], pa.int64()),
            "masks_used": pa.array(batch["masks_used"], pa.int64()),
            "pixels_changed": pa.array(batch["pixels_changed"], pa.int64()),
            "reason": pa.array([str(r) for r in batch["reason"]], pa.string()),
        })
        write_table(self.storage, Storage.join(self.stats_dir, name), table)
        return {"id": batch["id"], "reason": batch["reason"]}


def _needs_sam(cfg: PipelineConfig) -> bool:
    from pdso_ray.method.refiners import NEEDS_SAM

    return cfg.pseudo_labels.refine.method in NEEDS_SAM


class PseudoLabelsStage(StreamingStage):
    name = "pseudo_labels"
    config_sections = ("pseudo_labels", "models", "data.max_pixels", "data.max_file_bytes", "seed")
    depends_on = ("features", "purify")

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return (run.path("labels"),)

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.pseudo_labels.batch_size

    def work(self, ctx: RunContext) -> Work:
        # Only the ids come to the driver: the top-k lists stream from Parquet to the actors.
        return Work(ids=sorted(ids_in(ctx.storage, ctx.run.stage_dir("purify"))))

    def done_ids(self, ctx: RunContext) -> set[str]:
        return ids_in(ctx.storage, ctx.run.label_stats_dir)

    def dataset(self, ctx: RunContext, work: Work, todo: set[str]) -> "ray.data.Dataset":
        import ray.data

        files = parquet_files(ctx.storage, ctx.run.stage_dir("purify"))
        fs, _ = ctx.storage.arrow_fs(files[0])
        ds = ray.data.read_parquet([ctx.storage.arrow_fs(u)[1] for u in files], filesystem=fs,
                                   columns=["id", "path", "topk", "topk_dist"])
        if len(todo) < len(work.ids):
            done = set(work.ids) - todo  # a resumed run: usually the smaller set
            ds = ds.filter(lambda row: row["id"] not in done)
        return ds

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        return [PseudoLabeler(ctx.cfg, ctx.storage, ctx.run),
                WriteStats(ctx.storage, ctx.run.label_stats_dir, self.batch_size(ctx))]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        totals = {"images": 0, "failed": 0, "prompts": 0, "masks_used": 0, "pixels_changed": 0}
        for table in iter_row_groups(ctx.storage, ctx.run.label_stats_dir,
                                     columns=["reason", "prompts", "masks_used", "pixels_changed"]):
            totals["images"] += table.num_rows
            totals["failed"] += sum(1 for r in table.column("reason").to_pylist() if r)
            for k in ("prompts", "masks_used", "pixels_changed"):
                totals[k] += int(pac.sum(table.column(k)).as_py() or 0)
        reconcile("pseudo_labels", len(work.ids), totals["images"] - totals["failed"], totals["failed"])
        return totals
