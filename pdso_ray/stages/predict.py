"""Stage 7, ``predict``: the fine-tuned model on the evaluation splits (DESIGN §3.8).

list (driver) → read + decode (CPU tasks; JPEG DCT-downscaled towards the prediction size) →
actor pool holding ``finetune/model.pt`` (GPU and bf16 when present): resize so the short side is
``predict.short_side`` (each side a multiple of the model's stride), logits, bilinear upsampling
to the image's original size, argmax over the C+1 channels → PNGs:

- ``predictions/{split}/<wnid>/<stem>.png``: label codec of :mod:`pdso_ray.data.imagenet_s`,
  ids 0..C (0 background);
- ``predictions/{split}_fg/<wnid>/<stem>.png``: 8-bit grey, ``round(255 · (1 − p(background)))``,
  for the evaluate stage's background-threshold sweep.

Images are decoded without applying EXIF orientation, as the official ImageNet-S tools read them,
so every prediction has its ground truth's size. An image that cannot be read or decoded gets no
PNG and a row (id, path, reason) in ``predictions/rejected_{split}.parquet``. A re-run skips
images whose two PNGs both exist (the foreground map is written last).
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from pdso_ray.data.imagenet_s import check_id, encode_label, list_split
from pdso_ray.stages.base import Batch, BatchStep, Resources, RunContext, Stage, map_step
from pdso_ray.stages.read_decode import ReadDecode
from pdso_ray.storage import Storage
from pdso_ray.tables import write_table

log = logging.getLogger("pdso_ray")

PREDICTIONS_DIR = "predictions"


def prediction_urls(storage: Storage, output: str, image_id: str) -> tuple[str, str]:
    """``(label PNG URL, foreground PNG URL)`` of ``image_id`` (``split/wnid/stem``) in the run."""
    split, rest = check_id(image_id).split("/", 1)
    return (storage.join(output, PREDICTIONS_DIR, image_id + ".png"),
            storage.join(output, PREDICTIONS_DIR, f"{split}_fg", rest + ".png"))


def encode_gray_png(values: np.ndarray) -> bytes:
    """PNG bytes of an ``H×W`` uint8 array (mode L)."""
    from PIL import Image

    if values.ndim != 2 or values.dtype != np.uint8:
        raise ValueError(f"expected an H×W uint8 array, got shape {values.shape} dtype {values.dtype}")
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, format="PNG")
    return buf.getvalue()


class Predictor(BatchStep):
    """Load the fine-tuned model once per actor; predict and write both PNGs of each good row.

    Rows whose resized input sizes agree run as one batch. Out: ``id``, ``path``, ``split``,
    ``reason`` (rows with a reason were not written).
    """

    def __init__(self, storage: Storage, model_url: str, output: str, short_side: int):
        self.storage = storage
        self.model_url = model_url
        self.output = output
        self.short_side = short_side

    def setup(self) -> None:
        import torch

        from pdso_ray.models.heads import load_segmenter

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = load_segmenter(self.model_url, self.storage)
        self.model.to(self.device)

    def __call__(self, batch: Batch) -> Batch:
        import torch

        from pdso_ray.models.dino import to_model_input
        from pdso_ray.models.heads import foreground_to_uint8, logits_to_prediction, model_input_size

        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, reason in enumerate(batch["reason"]):
            if not reason:
                h, w = batch["image"][i].shape[:2]
                groups[model_input_size(h, w, self.short_side, self.model.stride)].append(i)
        for size, rows in groups.items():
            x = to_model_input([batch["image"][i] for i in rows], size, device=self.device)
            with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(x)
            with torch.inference_mode():
                for j, i in enumerate(rows):
                    orig = (int(batch["height"][i]), int(batch["width"][i]))
                    label, foreground = logits_to_prediction(logits[j].float(), orig)
                    label_url, fg_url = prediction_urls(self.storage, self.output, str(batch["id"][i]))
                    fg = foreground_to_uint8(foreground.cpu().numpy())
                    self.storage.write_bytes(label_url, encode_label(label.cpu().numpy()))
                    self.storage.write_bytes(fg_url, encode_gray_png(fg))  # last: marks the image done
        return {k: batch[k] for k in ("id", "path", "split", "reason")}


def write_rejected(storage: Storage, url: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` of ``{id, path, reason}`` (id None when the listing refused the name) as Parquet."""
    table = pa.table({"id": pa.array([r["id"] for r in rows], pa.string()),
                      "path": pa.array([r["path"] for r in rows], pa.string()),
                      "reason": pa.array([r["reason"] for r in rows], pa.string())})
    write_table(storage, url, table)


class PredictStage(Stage):
    name = "predict"
    config_sections = ("predict", "data.root", "data.classes", "data.eval_splits", "data.max_pixels")
    depends_on = ("finetune",)
    extra_outputs = (PREDICTIONS_DIR,)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg, storage = ctx.cfg, ctx.storage
        model_url = ctx.path("finetune", "model.pt")
        if not storage.exists(model_url):
            raise FileNotFoundError(f"predict: no fine-tuned model at {model_url}; run the finetune stage")
        todo: list[dict[str, str]] = []
        rejected: dict[str, list[dict[str, Any]]] = {}
        listed: dict[str, int] = {}
        for split in cfg.data.eval_splits:
            listing = list_split(storage, cfg.data.root, cfg.data.classes, split)
            listed[split] = len(listing.images) + len(listing.rejected)
            rejected[split] = [{"id": None, "path": r.path, "reason": r.reason} for r in listing.rejected]
            label_done = set(storage.list_files(ctx.path(PREDICTIONS_DIR, split), suffixes=(".png",)))
            fg_done = set(storage.list_files(ctx.path(PREDICTIONS_DIR, f"{split}_fg"), suffixes=(".png",)))
            for record in listing.images:
                label_url, fg_url = prediction_urls(storage, cfg.output, record.id)
                if label_url not in label_done or fg_url not in fg_done:
                    todo.append({"id": record.id, "path": record.path, "split": split})
        log.info("predict: %d images to predict in %s", len(todo), ", ".join(cfg.data.eval_splits))
        if todo:
            for row in self._predict(ctx, todo, model_url):
                if row["reason"]:
                    rejected[row["split"]].append({k: row[k] for k in ("id", "path", "reason")})

        counts: dict[str, Any] = {}
        for split in cfg.data.eval_splits:
            write_rejected(storage, ctx.path(PREDICTIONS_DIR, f"rejected_{split}.parquet"), rejected[split])
            written = len(storage.list_files(ctx.path(PREDICTIONS_DIR, f"{split}_fg"), suffixes=(".png",)))
            counts[f"{split}_images"] = listed[split]
            counts[f"{split}_predicted"] = written
            counts[f"{split}_rejected"] = len(rejected[split])
            if written + len(rejected[split]) != listed[split]:
                raise RuntimeError(f"predict: {split}: {written} predicted + {len(rejected[split])} "
                                   f"rejected != {listed[split]} listed")
        return counts

    def _predict(self, ctx: RunContext, todo: list[dict[str, str]], model_url: str) -> list[dict[str, Any]]:
        import ray.data

        cfg, storage = ctx.cfg, ctx.storage
        pc = cfg.predict
        blocks = max(1, min(len(todo) // pc.batch_size, 4096))
        ds = ray.data.from_items(todo, override_num_blocks=blocks)
        ds = map_step(ds, ReadDecode(storage, cfg.data.max_pixels, pc.short_side,
                                         exif_transpose=False),
                      Resources(batch_size=pc.batch_size, num_cpus=1.0, stateful=False),
                      ctx.cluster_has_gpu)
        ds = map_step(ds, Predictor(storage, model_url, cfg.output, pc.short_side),
                      Resources(batch_size=pc.batch_size, num_cpus=1.0, num_gpus=pc.gpus_per_actor,
                                min_actors=pc.min_actors, max_actors=pc.max_actors),
                      ctx.cluster_has_gpu)
        rows = [{k: str(r[k]) for k in ("id", "path", "split", "reason")} for r in ds.iter_rows()]
        ids = [r["id"] for r in rows]
        if sorted(ids) != sorted(r["id"] for r in todo):
            raise RuntimeError(f"predict: {len(ids)} rows came back ({len(set(ids))} distinct) "
                               f"for {len(todo)} images")
        return rows
