"""Stage 5, ``pseudo_labels``: one streaming pass that turns each train image into a raw and a
refined pixel label (DESIGN §3.5–3.6).

read + decode (CPU tasks) → actor pool holding DINO, the denoised embedding ``e(x)``, the final
centroids and SAM: patch features + saliency → raw label → prompts → SAM → refined label → PNGs
(``labels/raw/<id>.png``, ``labels/refined/<id>.png``) → per-image statistics as Parquet
(``labels/stats/``). Per-patch features are recomputed here, never stored. A re-run skips images
whose statistics row exists.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac

from pdso_ray.config import PipelineConfig
from pdso_ray.data.decode import decode_image
from pdso_ray.data.imagenet_s import check_id, encode_label
from pdso_ray.stages.base import Batch, BatchStep, Resources, RunContext, Stage, map_step
from pdso_ray.storage import Storage
from pdso_ray.tables import iter_row_groups, shard_name, write_table

log = logging.getLogger("pdso_ray")

LABELS_DIR = "labels"


def label_url(run_storage: Storage, output: str, kind: str, image_id: str) -> str:
    """Where the ``kind`` ("raw" or "refined") label of ``image_id`` lives in the run folder."""
    return run_storage.join(output, LABELS_DIR, kind, check_id(image_id) + ".png")


class PseudoLabeler(BatchStep):
    """Per image: decode, DINO patch tokens and saliency, ``e(x)`` per patch, raw label from the
    image's candidate centroids, refinement (SAM or other), both labels written as PNGs.

    In: ``id``, ``path``, ``topk`` (K ids), ``topk_dist`` (K distances). Out: one statistics row per
    image (``reason`` non-empty when the image could not be decoded — it was decodable in stage 1,
    so this only happens if the file changed since).
    """

    def __init__(self, cfg: PipelineConfig, storage: Storage):
        self.cfg = cfg
        self.storage = storage

    def setup(self) -> None:
        import torch

        from pdso_ray.method.refiners import NEEDS_SAM, RefineParams, get_refiner
        from pdso_ray.models.loading import build_dino_from_config
        from pdso_ray.stages.denoise import load_embedding

        cfg = self.cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dino = build_dino_from_config(cfg.models.dino, self.storage,
                                           allow_random_init=cfg.models.allow_random_init)
        self.dino.to(self.device).eval()
        self.embed = load_embedding(self.storage, self.storage.join(cfg.output, "denoise")).to(self.device)
        self.centroids = np.load(self.storage.open(self.storage.join(cfg.output, "purify", "centroids.npy")))
        rc = cfg.pseudo_labels.refine
        self.method = rc.method
        self.refine = get_refiner(rc.method)
        self.params = RefineParams(min_area=rc.min_area, gmm_confidence=rc.gmm_confidence)
        self.predictor = None
        if rc.method in NEEDS_SAM:
            from pdso_ray.models.loading import build_sam_predictor_from_config

            self.predictor = build_sam_predictor_from_config(
                cfg.models.sam, self.storage, allow_random_init=cfg.models.allow_random_init,
                device=self.device, points_per_side=rc.sam_select_points_per_side)
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
            tokens, attention = self.dino(x)
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
            raw_url = label_url(self.storage, self.cfg.output, "raw", image_id)
            refined_url = label_url(self.storage, self.cfg.output, "refined", image_id)
            decoded = decode_image(self.storage.read_bytes(path), max_pixels=self.cfg.data.max_pixels)
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
            if k == "classes":
                arr = np.empty(len(v), dtype=object)
                arr[:] = v
                out[k] = arr
            elif k in ("prompts", "masks_used", "pixels_changed", "main_class"):
                out[k] = np.asarray(v, dtype=np.int64)
            else:
                out[k] = np.asarray(v, dtype=object)
        return out


class WriteStats(BatchStep):
    """One Parquet file of per-image statistics per batch, named by its ids."""

    def __init__(self, storage: Storage, stats_dir: str):
        self.storage = storage
        self.stats_dir = stats_dir

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
        return {"n": np.asarray([len(ids)])}


class PseudoLabelsStage(Stage):
    name = "pseudo_labels"
    config_sections = ("pseudo_labels", "models", "data.max_pixels")
    depends_on = ("features", "purify")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        import ray.data

        cfg, storage = ctx.cfg, ctx.storage
        stats_dir = ctx.path(LABELS_DIR, "stats")
        done = set()
        for table in iter_row_groups(storage, stats_dir, columns=["id"]):
            done.update(table.column("id").to_pylist())
        todo = []
        for table in iter_row_groups(storage, ctx.path("purify"),
                                     columns=["id", "path", "topk", "topk_dist"]):
            for row in table.to_pylist():
                if row["id"] not in done:
                    todo.append(row)
        log.info("pseudo_labels: %d images done, %d to process", len(done), len(todo))
        pc = cfg.pseudo_labels
        if todo:
            blocks = max(1, min(len(todo) // pc.batch_size, 4096))
            ds = ray.data.from_items(todo, override_num_blocks=blocks)
            ds = map_step(ds, PseudoLabeler(cfg, storage),
                          Resources(batch_size=pc.batch_size, num_gpus=pc.gpus_per_actor,
                                    min_actors=pc.min_actors, max_actors=pc.max_actors),
                          ctx.cluster_has_gpu)
            ds = map_step(ds, WriteStats(storage, stats_dir),
                          Resources(batch_size=pc.batch_size, num_cpus=0, stateful=False),
                          ctx.cluster_has_gpu)
            written = sum(int(r["n"]) for r in ds.iter_rows())
            if written != len(todo):
                raise RuntimeError(f"pseudo_labels: {written} rows written for {len(todo)} images")
        totals = {"images": 0, "failed": 0, "prompts": 0, "masks_used": 0, "pixels_changed": 0}
        for table in iter_row_groups(storage, stats_dir,
                                     columns=["reason", "prompts", "masks_used", "pixels_changed"]):
            totals["images"] += table.num_rows
            totals["failed"] += sum(1 for r in table.column("reason").to_pylist() if r)
            for k in ("prompts", "masks_used", "pixels_changed"):
                totals[k] += int(pac.sum(table.column(k)).as_py() or 0)
        return totals
