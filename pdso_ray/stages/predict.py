"""Stage 7, ``predict``: the fine-tuned model on the evaluation splits (docs/method.md §8).

list (driver) → read + decode (CPU tasks; JPEG DCT-downscaled towards the prediction size) →
actor pool holding ``finetune/model.pt`` (GPU and bf16 when present): resize so the short side is
``predict.short_side`` (each side a multiple of the model's stride), logits, bilinear upsampling
to the image's original size → PNGs:

- ``predictions/<split>/<rel>.png``: argmax over the C+1 channels, background included — the
  official decision rule (PASS and PDSO write and score this); label codec of
  :mod:`pdso_ray.data.imagenet_s`, ids 0..C;
- with ``predict.background: threshold`` also ``predictions/<split>_fgclass/`` (the best
  foreground class) and ``predictions/<split>_fg/`` (8-bit grey, ``round(255 · (1 −
  p(background)))``): PASS's foreground-threshold rule, whose threshold the evaluate stage tunes
  on validation ground truth and reports beside the official number.

Images are decoded without applying EXIF orientation, as the official ImageNet-S tools read them,
so every prediction has its ground truth's size. An image that cannot be read or decoded gets no
PNG and a row (id, path, reason) in ``predictions/rejected_{split}.parquet``; so does one the
listing refused. Beside each prediction, with ``previews`` (on by default with ``output_format:
files``), its colour preview ``predictions/<split>_colour/<rel>.png`` and its overlay on the image
``predictions/<split>_overlay/<rel>.jpg`` (:mod:`pdso_ray.stages.previews`). A re-run skips images
whose prediction exists (written last). With
``data.layout: folder`` the one split is ``all``: ``predictions/all/<relative path>.png``. With
``output_format: webdataset`` each batch's PNGs of a folder are one PNG shard instead, with an
index of per-image statistics (height, width, classes present; :mod:`pdso_ray.data.png_sets`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np

from pdso_ray.data.ids import id_from_png_rel, split_of
from pdso_ray.data.imagenet_s import encode_gray_png, encode_label
from pdso_ray.data.listing import Rejected
from pdso_ray.data.png_sets import PngOutputs, png_files
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import Batch, BatchStep, Needs, Resources, RunContext, pool_group
from pdso_ray.stages.previews import PreviewWriter, previews_wanted
from pdso_ray.stages.read_decode import DeviceDecode, ImageReader, ReadDecode
from pdso_ray.stages.streaming import StreamingStage, Work, reconcile, write_rejected
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")


class Predictor(BatchStep):
    """Load the segmentation model once per actor; predict and write the PNGs of each good row.

    Always ``predictions/<id>.png``: argmax over the C+1 outputs, background included (the
    official decision rule). With ``foreground_rule`` (``predict.background: threshold``) also the
    best foreground class (``<split>_fgclass/``) and the foreground probability (``<split>_fg/``,
    ``round(255·(1 − p_background))``), which PASS's threshold rule combines. With ``previews``
    also the prediction's colour preview (``<split>_colour/<rel>.png``) and its overlay
    (``<split>_overlay/<rel>.jpg``: the image as decoded for the model with the label blended in),
    :class:`~pdso_ray.stages.previews.PreviewWriter`, always files. Rows whose resized input
    sizes agree run as one batch. Out: ``id``, ``reason`` (rows with a reason were not written).

    ``model_url``: the model to load (:func:`pdso_ray.models.heads.load_segmenter`: a
    ``model.pt`` or an exported model folder); default the run's ``finetune/model.pt``.
    ``output_format``: ``files`` (one PNG per image) or ``webdataset`` (one PNG shard per output
    folder and batch, :class:`~pdso_ray.data.png_sets.PngOutputs`, its index holding each image's
    size and classes). ``device_decode``: set, the batch holds encoded bytes, decoded on the
    actor's device.
    """

    def __init__(self, storage: Storage, run: RunLayout, short_side: int, resources: Resources,
                 foreground_rule: bool = False, model_url: str | None = None, previews: bool = False,
                 output_format: str = "files", device_decode: DeviceDecode | None = None):
        self.device_decode = device_decode  # set: the batch holds encoded bytes, decoded here
        self.storage = storage
        self.run = run
        self.short_side = short_side
        self.resources = resources
        self.foreground_rule = foreground_rule
        self.model_url = model_url or run.finetune_model
        self.previews = PreviewWriter(storage, run) if previews else None
        self.output_format = output_format

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

        if self.device_decode is not None:
            batch = self.device_decode(batch, self.device)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, reason in enumerate(batch["reason"]):
            if not reason:
                h, w = batch["image"][i].shape[:2]
                groups[model_input_size(h, w, self.short_side, self.model.stride)].append(i)
        outputs = PngOutputs(self.storage, self.output_format)
        stats: dict[str, dict[str, Any]] = {}
        for size, rows in groups.items():
            x = to_model_input([batch["image"][i] for i in rows], size, device=self.device)
            with torch.inference_mode(), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(x)
            with torch.inference_mode():
                for j, i in enumerate(rows):
                    orig = (int(batch["height"][i]), int(batch["width"][i]))
                    pred = logits_to_prediction(logits[j].float(), orig)
                    image_id = str(batch["id"][i])
                    split = split_of(image_id)
                    if self.foreground_rule:
                        outputs.add(self.run.foreground_label_dir(split), image_id,
                                    encode_label(pred.foreground_label.cpu().numpy()))
                        outputs.add(self.run.foreground_dir(split), image_id,
                                    encode_gray_png(foreground_to_uint8(pred.foreground.cpu().numpy())))
                    label = pred.label.cpu().numpy()
                    if self.previews is not None:
                        self.previews.write("predictions", image_id, label, batch["image"][i])
                    # last: the official prediction marks the image done
                    outputs.add(self.run.predictions_dir(split), image_id, encode_label(label))
                    if outputs.as_shards:  # the shard's index holds per-image statistics
                        stats[image_id] = {"height": orig[0], "width": orig[1],
                                           "classes": sorted(int(c) for c in np.unique(label) if c)}
        outputs.flush(stats)
        return {"id": batch["id"], "reason": batch["reason"]}


class PredictStage(StreamingStage):
    name = "predict"
    config_sections = ("predict", "data.root", "data.layout", "data.classes", "data.eval_splits", "output_format",
                       "data.max_pixels", "data.max_file_bytes")
    depends_on = ("finetune",)

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(images=("eval",), groups=(pool_group("the prediction actor pool", "predict", cfg.predict),))

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return (run.predictions_root,)

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.predict.batch_size

    def write_previews(self, ctx: RunContext) -> bool:
        """Whether each prediction gets its colour preview and overlay (config ``previews``)."""
        return previews_wanted(ctx.cfg)

    def model_url(self, ctx: RunContext) -> str:
        """The model to predict with: the run's fine-tuned ``finetune/model.pt``."""
        return ctx.run.finetune_model

    def work(self, ctx: RunContext) -> Work:
        if not ctx.storage.exists(self.model_url(ctx)):
            raise FileNotFoundError(f"{self.name}: no fine-tuned model at {self.model_url(ctx)}; "
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
        """Ids of the images whose prediction exists (written after the foreground rule's PNGs)."""
        out = set()
        for info in ctx.data.eval_splits(ctx.storage):
            if info.present:
                labels = png_files(ctx.storage, ctx.run.predictions_dir(info.split))
                out |= {id_from_png_rel(info.split, rel) for rel in labels}
        return out

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        cfg, pc = ctx.cfg, ctx.cfg.predict
        reader = ImageReader.from_config(ctx.storage, cfg.data)
        on_gpu = ctx.cluster_has_gpu and pc.gpus_per_actor > 0 and cfg.data.gpu_decode
        return [ReadDecode(reader, pc.short_side,
                           Resources(batch_size=pc.batch_size, num_cpus=1.0, stateful=False),
                           exif_transpose=False, decode=not on_gpu),
                Predictor(ctx.storage, ctx.run, pc.short_side,
                          Resources(batch_size=pc.batch_size, num_cpus=1.0, num_gpus=pc.gpus_per_actor,
                                    min_actors=pc.min_actors, max_actors=pc.max_actors),
                          foreground_rule=pc.background == "threshold", model_url=self.model_url(ctx),
                          previews=self.write_previews(ctx), output_format=cfg.output_format,
                          device_decode=DeviceDecode(cfg.data.max_pixels, pc.short_side, exif_transpose=False)
                          if on_gpu else None)]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        paths = {r["id"]: r["path"] for r in work.rows}
        rejected: dict[str, list[Rejected]] = work.info["rejected"]
        for image_id, reason in results.items():
            if reason:
                rejected[split_of(image_id)].append(Rejected(paths[image_id], reason, image_id))
        written = self.done_ids(ctx)
        splits: dict[str, dict[str, int]] = {}
        for split, listed in work.info["listed"].items():
            write_rejected(ctx.storage, ctx.run.predict_rejected(split), rejected[split])
            n = sum(1 for i in written if split_of(i) == split)
            splits[split] = {"images": listed, "predicted": n, "rejected": len(rejected[split])}
            reconcile(f"{self.name}: {split}", listed, n, len(rejected[split]))
        return {"splits": splits, "notes": work.info["notes"]}
