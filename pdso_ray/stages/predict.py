"""Stage 7, ``predict``: the fine-tuned model on the evaluation splits (docs/method.md §8).

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

from pdso_ray.data.imagenet_s import encode_label
from pdso_ray.data.listing import Rejected
from pdso_ray.run_layout import LABEL_SUFFIX, RunLayout, id_from_png_rel, split_of
from pdso_ray.stages.base import Batch, BatchStep, Resources, RunContext
from pdso_ray.stages.read_decode import ImageReader, ReadDecode
from pdso_ray.stages.streaming import StreamingStage, Work, reconcile, write_rejected
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")


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

    Rows whose resized input sizes agree run as one batch. Out: ``id``, ``reason`` (rows with a
    reason were not written).
    """

    def __init__(self, storage: Storage, run: RunLayout, short_side: int, resources: Resources):
        self.storage = storage
        self.run = run
        self.short_side = short_side
        self.resources = resources

    def setup(self) -> None:
        import torch

        from pdso_ray.models.heads import load_segmenter

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = load_segmenter(self.run.finetune_model, self.storage)
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
                    image_id = str(batch["id"][i])
                    fg = foreground_to_uint8(foreground.cpu().numpy())
                    self.storage.write_bytes(self.run.prediction_png(image_id), encode_label(label.cpu().numpy()))
                    # last: marks the image done
                    self.storage.write_bytes(self.run.foreground_png(image_id), encode_gray_png(fg))
        return {"id": batch["id"], "reason": batch["reason"]}


class PredictStage(StreamingStage):
    name = "predict"
    config_sections = ("predict", "data.root", "data.layout", "data.classes", "data.eval_splits",
                       "data.max_pixels", "data.max_file_bytes")
    depends_on = ("finetune",)

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return (run.predictions_root,)

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.predict.batch_size

    def work(self, ctx: RunContext) -> Work:
        if not ctx.storage.exists(ctx.run.finetune_model):
            raise FileNotFoundError(f"predict: no fine-tuned model at {ctx.run.finetune_model}; "
                                    "run the finetune stage")
        work = Work(ids=[], info={"listed": {}, "rejected": {}, "notes": []})
        for info in ctx.data.eval_splits(ctx.storage):
            if not info.present:
                work.info["notes"].append(info.note)
                log.info("predict: %s", info.note)
                continue
            listing = ctx.data.list_split(ctx.storage, info.split)
            work.info["listed"][info.split] = listing.total
            work.info["rejected"][info.split] = list(listing.rejected)
            work.ids += [r.id for r in listing.images]
            work.rows += [{"id": r.id, "path": r.path, "split": r.split} for r in listing.images]
        return work

    def done_ids(self, ctx: RunContext) -> set[str]:
        """Ids of the images whose two PNGs both exist (the foreground map is written last)."""
        out = set()
        for info in ctx.data.eval_splits(ctx.storage):
            if info.present:
                labels = ctx.storage.list_relative(ctx.run.predictions_dir(info.split), LABEL_SUFFIX)
                fgs = ctx.storage.list_relative(ctx.run.foreground_dir(info.split), LABEL_SUFFIX)
                out |= {id_from_png_rel(info.split, rel) for rel in labels.keys() & fgs.keys()}
        return out

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        cfg, pc = ctx.cfg, ctx.cfg.predict
        reader = ImageReader.from_config(ctx.storage, cfg.data)
        return [ReadDecode(reader, pc.short_side,
                           Resources(batch_size=pc.batch_size, num_cpus=1.0, stateful=False),
                           exif_transpose=False),
                Predictor(ctx.storage, ctx.run, pc.short_side,
                          Resources(batch_size=pc.batch_size, num_cpus=1.0, num_gpus=pc.gpus_per_actor,
                                    min_actors=pc.min_actors, max_actors=pc.max_actors))]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        paths = {r["id"]: r["path"] for r in work.rows}
        rejected: dict[str, list[Rejected]] = work.info["rejected"]
        for image_id, reason in results.items():
            if reason:
                rejected[split_of(image_id)].append(Rejected(paths[image_id], reason, image_id))
        written = self.done_ids(ctx)
        counts: dict[str, Any] = {"notes": work.info["notes"]}
        for split, listed in work.info["listed"].items():
            write_rejected(ctx.storage, ctx.run.predict_rejected(split), rejected[split])
            n = sum(1 for i in written if split_of(i) == split)
            counts[f"{split}_images"] = listed
            counts[f"{split}_predicted"] = n
            counts[f"{split}_rejected"] = len(rejected[split])
            reconcile(f"predict: {split}", listed, n, len(rejected[split]))
        return counts
