"""Stage ``lightcluster`` (``method: lightcluster``): LightCluster's training-free labels and
predictions (docs/method.md, "LightCluster"; the per-image and per-level rules live in
:mod:`pdso_ray.method.lightcluster`).

It reads ``features`` (ids and paths of the train images) and ``cluster`` (k-means #1 of the
pooled features, shared with PDSO: an image's *category*, and the centroids that place an
evaluation image in one). Three streaming passes (:mod:`pdso_ray.stages.streaming`) with driver
steps between them, each resumable:

1. **sample** (train images; DINO actor pool): the last block's attention features and
   ``patches_per_image`` random patches of each image with their saliency →
   ``levels/samples/*.parquet`` (``id, category, saliency, feat``). No other per-patch feature is
   ever stored.
2. driver: the **dataset level**, a distributed k-means (``dataset_k``) over the sample; the
   **category level**, per category a k-means (``category_k``) over its images' sampled patches
   (Ray Data ``groupby``). At both, the clusters of above-average saliency are foreground →
   ``levels/*.npy``.
3. **segment** (train, validation and, unless ``lightcluster.finetune``, test images; DINO actor
   pool): per image the three level masks, the consistent mask (≥ ``min_votes`` of the ``voters``), upsampled
   and refined on the image, and the labelling vector (the CLS token of the masked region, or of
   the image) → ``levels/masks/<id>.png`` (one bit per mask, :data:`MASK_BITS`) and
   ``levels/vectors/{train,eval}/*.parquet``.
4. driver: the **labelling** k-means (K = C) over the train vectors; an evaluation image takes the
   nearest centroid; an image without foreground gets no class (all background).
5. **label** (CPU tasks): labels in PDSO's formats — ``labels/{raw,refined}/`` and
   ``labels/stats/`` of the train images (what ``finetune`` reads), the validation labels of
   every mask for the ablation (``labels/levels/<mask>/``) and, unless ``lightcluster.finetune``,
   the predictions ``predictions/<split>/`` that ``evaluate`` scores; with ``previews``, the colour
   preview and overlay of each train label and prediction (:mod:`pdso_ray.stages.previews`).

Every image is accounted for: a train image that no longer decodes is listed in
``levels/rejected_{sample,segment}/``, an evaluation image in ``predictions/rejected_<split>.parquet``
(scored as all background, as PDSO's predict stage does).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from pdso_ray.config import PipelineConfig
from pdso_ray.data.imagenet_s import IGNORE_ID, VALIDATION, decode_gray_png, decode_label, encode_gray_png, encode_label
from pdso_ray.data.decode import shrink_to
from pdso_ray.data.ids import LABEL_SUFFIX, png_rel, split_of
from pdso_ray.data.listing import Rejected
from pdso_ray.data.members import read_one
from pdso_ray.data.png_sets import PngSource, png_files
from pdso_ray.measuring import best_effort, not_computed
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import Batch, BatchStep, Needs, Resources, RunContext, Stage, dino_need, pool_group
from pdso_ray.stages.diagnostics import classes_of, image_scores
from pdso_ray.stages.previews import PreviewWriter, previews_wanted
from pdso_ray.stages.read_decode import ImageReader
from pdso_ray.stages.streaming import (StreamingPass, Work, ids_in, object_column, read_rejected, reconcile,
                                       run_pass, write_rejected)
from pdso_ray.storage import Storage
from pdso_ray.tables import (arrow_to_vectors, column_values, count_rows, iter_row_groups, load_array, parquet_files,
                             read_table, save_array, shard_name, vectors_to_arrow, write_table)

log = logging.getLogger("pdso_ray")

# The masks of one image, one bit each in levels/masks/<id>.png (bit i is MASK_BITS[i]), in the
# ablation's order.
MASK_BITS = ("dataset", "category", "image", "consistent", "refined")
MASK_NAMES = {"dataset": "dataset level alone", "category": "category level alone", "image": "image level alone",
              "consistent": "consistent mask, upsampled (no refinement)", "refined": "consistent mask, refined"}
# The dataset-level k-means trains on at most this many sampled patches per cluster (all are
# assigned): two clusters need few points, and the sample of a large dataset is millions of rows.
DATASET_POINTS_PER_CLUSTER = 16_384
# Images per task of the label pass (and per labels/stats file): PNG work, spread over the CPUs.
LABEL_TASK_IMAGES = 256


def params_from_config(cfg: PipelineConfig):
    """The :class:`~pdso_ray.method.lightcluster.LightClusterParams` of ``cfg.lightcluster``."""
    from pdso_ray.method.lightcluster import LightClusterParams

    lc = cfg.lightcluster
    return LightClusterParams(dataset_k=lc.dataset_k, category_k=lc.category_k, image_k=lc.image_k,
                              voters=tuple(lc.voters), min_votes=votes_needed(cfg), niter=lc.niter, patches_per_image=lc.patches_per_image,
                              refine_iterations=lc.refine_iterations, seed=cfg.seed_for("lightcluster"))


def votes_needed(cfg: PipelineConfig) -> int:
    """``lightcluster.min_votes``, or a majority of the ``voters`` when it is unset."""
    lc = cfg.lightcluster
    return lc.min_votes if lc.min_votes is not None else len(lc.voters) // 2 + 1


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """The patch sampler of one image: the same patches for an image whatever batch it is in."""
    return np.random.default_rng([seed, int(hashlib.sha1(image_id.encode()).hexdigest()[:12], 16)])


def mask_bits(masks: dict[str, np.ndarray]) -> np.ndarray:
    """H×W uint8 with bit i set where ``masks[MASK_BITS[i]]`` (H×W bool) is True."""
    out = np.zeros(next(iter(masks.values())).shape, dtype=np.uint8)
    for i, name in enumerate(MASK_BITS):
        out |= np.asarray(masks[name], dtype=np.uint8) << i
    return out


def mask_from_bits(bits: np.ndarray, name: str) -> np.ndarray:
    """H×W bool: the ``name`` mask of :func:`mask_bits`' output."""
    return (np.asarray(bits) >> MASK_BITS.index(name)) & 1 == 1


def resize_nearest(values: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """H×W uint8 ``values`` at ``hw`` (nearest neighbour: bits stay bits)."""
    from PIL import Image

    if values.shape[:2] == tuple(hw):
        return values
    return np.asarray(Image.fromarray(values).resize((hw[1], hw[0]), Image.NEAREST))


class AttentionStep(BatchStep):
    """The DINO actor of the ``sample`` and ``segment`` passes (module docstring). In: ``id``,
    ``path``, ``split``, ``category`` (-1: place the image by its pooled feature). Out: ``id``,
    ``reason``; in ``segment`` mode also ``has_object``, ``vector``, ``train``."""

    def __init__(self, cfg: PipelineConfig, storage: Storage, run: RunLayout, mode: str):
        from pdso_ray.models.loading import DinoSource

        if mode not in ("sample", "segment"):
            raise ValueError(f"mode must be sample or segment, got {mode!r}")
        self.cfg, self.storage, self.run, self.mode = cfg, storage, run, mode
        self.reader = ImageReader.from_config(storage, cfg.data)
        self.dino = DinoSource.from_config(cfg)
        self.params = params_from_config(cfg)
        lc = cfg.lightcluster
        self.resources = Resources(batch_size=lc.batch_size, num_gpus=lc.gpus_per_actor,
                                   min_actors=lc.min_actors, max_actors=lc.max_actors)

    def setup(self) -> None:
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.dino.build(self.storage).to(self.device).eval()
        if self.mode == "segment":
            self.state = load_state(self.storage, self.run)
            self.category_centroids = load_array(self.storage, self.run.centroids_file("cluster")).astype(np.float32)

    def _forward(self, images: list[np.ndarray], patch_mask=None):
        import torch

        from pdso_ray.models.dino import to_model_input

        x = to_model_input(images, self.cfg.models.dino.image_size, device=self.device)
        kind = self.cfg.lightcluster.feature if patch_mask is None else None
        with torch.inference_mode(), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.model.attention_features(x, kind=kind, patch_mask=patch_mask)

    def __call__(self, batch: Batch) -> Batch:
        from pdso_ray.method.features import saliency_from_attention

        ids = [str(i) for i in batch["id"]]
        reasons, good, images = [], [], []
        paths = [str(p) for p in batch["path"]]
        for i, (path, data) in enumerate(zip(paths, self.reader.fetch(paths))):
            # evaluation images as stored (their predictions must match the ground truth's size)
            decoded = self.reader.decode(path, data, target_short_side=self.cfg.lightcluster.refine_short_side,
                                         exif_transpose=not self._is_eval_only(batch, i))
            reasons.append("" if decoded.ok else decoded.reason)
            if decoded.ok:
                good.append(i)
                images.append(decoded)
        out: Batch = {"id": batch["id"], "reason": np.asarray(reasons, dtype=object)}
        features = saliency = None
        if good:
            result = self._forward([d.image for d in images])
            features = result.features.float().cpu().numpy()
            saliency = saliency_from_attention(result.cls_attention.float()).cpu().numpy()
        if self.mode == "sample":
            return {**out, **self._sample(batch, ids, good, features, saliency)}
        return {**out, **self._segment(batch, ids, good, images, result if good else None, features, saliency)}

    @staticmethod
    def _is_eval_only(batch: Batch, i: int) -> bool:
        return "train" in batch and not bool(batch["train"][i])

    def _sample(self, batch, ids, good, features, saliency) -> Batch:
        """Each good image's ``patches_per_image`` sampled rows (m×D) and their saliency (m)."""
        from pdso_ray.method.lightcluster import sample_patches

        n, d = len(ids), self.model.embed_dim
        rows = [np.zeros((0, d), np.float32)] * n
        sal = [np.zeros(0, np.float32)] * n
        for j, i in enumerate(good):
            rows[i], sal[i] = sample_patches(features[j], saliency[j], self.params.patches_per_image,
                                             image_rng(self.params.seed, ids[i]))
        return {"category": np.asarray(batch["category"]), "sample": object_column(rows),
                "sample_saliency": object_column(sal)}

    def _segment(self, batch, ids, good, images, result, features, saliency) -> Batch:
        import torch

        from pdso_ray.method.features import pooled_feature
        from pdso_ray.method.lightcluster import label_vectors, nearest_centroid, segment_image
        from pdso_ray.method.mask_refine import upsample_mask

        n = len(ids)
        has_object = np.zeros(n, dtype=bool)
        vectors = [np.zeros(0, dtype=np.float32)] * n
        if good:
            categories = np.asarray(batch["category"], dtype=np.int64)[good]
            unplaced = categories < 0
            if unplaced.any():
                tokens = result.patch_tokens.float()
                pooled = pooled_feature(tokens, torch.as_tensor(saliency, device=tokens.device)).cpu().numpy()
                categories[unplaced] = nearest_centroid(pooled[unplaced], self.category_centroids)
            patch_masks = []
            for j, i in enumerate(good):
                small = shrink_to(images[j].image, self.cfg.lightcluster.refine_short_side, "short")
                masks = segment_image(features[j], saliency[j], small, self.state, int(categories[j]),
                                      self.params, self.device)
                patch_masks.append(masks.patch_mask)
                hw = small.shape[:2]
                level_masks = {name: (upsample_mask(masks.levels[k], hw, self.device) > 0.5).cpu().numpy()
                               for k, name in enumerate(MASK_BITS[:3])}
                bits = mask_bits({**level_masks, "consistent": masks.upsampled, "refined": masks.mask})
                self.storage.write_bytes(self.run.lightcluster_mask_png(ids[i]),
                                         encode_gray_png(resize_nearest(bits, images[j].orig_size)))
                has_object[i] = masks.mask.any()
            image_cls = result.cls_token.float().cpu().numpy()
            object_cls = None
            if self.cfg.lightcluster.labelling == "object_cls":
                pm = torch.as_tensor(np.stack(patch_masks), device=self.device)
                object_cls = self._forward([d.image for d in images], patch_mask=pm).cls_token.float().cpu().numpy()
            chosen = label_vectors(image_cls, object_cls, has_object[good])
            for j, i in enumerate(good):
                vectors[i] = chosen[j]
        return {"has_object": has_object, "vector": object_column(vectors), "train": np.asarray(batch["train"])}


class WriteVectors(BatchStep):
    """The segment pass's last step: the labelling vectors of a batch, train images to
    ``vectors/train/``, evaluation-only images to ``vectors/eval/``, failures to
    ``rejected_segment/``, each file named by the batch's ids."""

    def __init__(self, storage: Storage, run: RunLayout, batch_size: int):
        self.storage, self.run = storage, run
        self.resources = Resources(batch_size=batch_size, num_cpus=0, stateful=False)

    def __call__(self, batch: Batch) -> Batch:
        ids = np.asarray([str(i) for i in batch["id"]], dtype=object)
        name = shard_name(list(ids))
        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        train = np.asarray(batch["train"], dtype=bool)
        for folder, rows in (("train", ok & train), ("eval", ok & ~train)):
            if rows.any():
                table = pa.table({"id": pa.array(ids[rows], pa.string()),
                                  "has_object": pa.array(batch["has_object"][rows], pa.bool_()),
                                  "vector": vectors_to_arrow(np.stack(list(batch["vector"][rows])))})
                write_table(self.storage, self.run.lightcluster_path("vectors", folder, name), table)
        if (~ok).any():
            write_rejected(self.storage, self.run.lightcluster_path("rejected_segment", name),
                           [Rejected(path="", reason=str(r), image_id=i) for i, r in zip(ids[~ok], batch["reason"][~ok])])
        return {"id": batch["id"], "reason": batch["reason"]}


class WriteLabels(BatchStep):
    """The label pass (CPU tasks): one image's mask bits and class → its label PNGs (module
    docstring, step 5); then ``labels/stats/`` rows of its train images and a ``labelled/`` row
    per image (the pass's record of what is done). In: ``id``, ``path``, ``class`` (-1 = none),
    ``train``, ``eval``.

    ``previews``: ``(reader, short side)`` to write each train label's and prediction's colour
    preview and overlay (:mod:`pdso_ray.stages.previews`), the image decoded again at that short
    side, oriented as the segment pass saw it; None writes none."""

    def __init__(self, storage: Storage, run: RunLayout, write_predictions: bool, batch_size: int,
                 previews: tuple[ImageReader, int] | None = None):
        self.storage, self.run, self.write_predictions = storage, run, write_predictions
        self.resources = Resources(batch_size=batch_size, num_cpus=1.0, stateful=False)
        self.previews = previews
        self.preview_writer = PreviewWriter(storage, run)

    def __call__(self, batch: Batch) -> Batch:
        from pdso_ray.method.lightcluster import label_from_mask

        ids = [str(i) for i in batch["id"]]
        stats: dict[str, list] = {"id": [], "path": [], "label_raw": [], "label_refined": [], "main_class": []}
        for image_id, path, cls, train, evaluated in zip(ids, batch["path"], batch["class"], batch["train"],
                                                          batch["eval"]):
            bits = decode_gray_png(self.storage.read_bytes(self.run.lightcluster_mask_png(image_id)), "mask")
            class_id = int(cls) if cls >= 0 else None
            label = {name: label_from_mask(mask_from_bits(bits, name), class_id) for name in MASK_BITS}
            if split_of(image_id) == VALIDATION:
                for name in MASK_BITS:
                    self.storage.write_bytes(self.run.level_png(name, image_id), encode_label(label[name]))
            written = ((("raw", "consistent"), ("refined", "refined")) if train else ()) + \
                ((("predictions", "refined"),) if evaluated and self.write_predictions else ())
            if self.previews is not None and written:
                reader, short_side = self.previews
                decoded = reader.read(str(path), target_short_side=short_side, exif_transpose=bool(train))
                for kind, name in written:
                    self.preview_writer.write(kind, image_id, label[name], decoded.image if decoded.ok else None)
            if train:
                for kind, name in (("raw", "consistent"), ("refined", "refined")):
                    self.storage.write_bytes(self.run.label_png(kind, image_id), encode_label(label[name]))
                stats["id"].append(image_id)
                stats["path"].append(str(path))
                stats["label_raw"].append(self.run.label_png("raw", image_id))
                stats["label_refined"].append(self.run.label_png("refined", image_id))
                stats["main_class"].append(0 if class_id is None else class_id + 1)
            if evaluated and self.write_predictions:
                self.storage.write_bytes(self.run.prediction_png(image_id), encode_label(label["refined"]))
        name = shard_name(ids)
        if stats["id"]:
            write_table(self.storage, Storage.join(self.run.label_stats_dir, name),
                        pa.table({**{k: pa.array(v, pa.string()) for k, v in stats.items() if k != "main_class"},
                                  "main_class": pa.array(stats["main_class"], pa.int32())}))
        write_table(self.storage, self.run.lightcluster_path("labelled", name), pa.table({"id": pa.array(ids, pa.string())}))
        return {"id": batch["id"], "reason": np.full(len(ids), "", dtype=object)}


# ---- the fitted state ------------------------------------------------------------------------------
def save_state(storage: Storage, run: RunLayout, state) -> None:
    for name, array in (("dataset_centroids", state.dataset.centroids), ("dataset_foreground", state.dataset.foreground),
                        ("category_centroids", state.categories.centroids),
                        ("category_foreground", state.categories.foreground)):
        save_array(storage, run.lightcluster_path(name + ".npy"), np.asarray(array))


def load_state(storage: Storage, run: RunLayout):
    """The :class:`~pdso_ray.method.lightcluster.LightClusterState` that :func:`save_state` wrote."""
    from pdso_ray.method.lightcluster import CategoryModels, LevelModel, LightClusterState

    def arr(name):
        return load_array(storage, run.lightcluster_path(name + ".npy"))

    return LightClusterState(LevelModel(arr("dataset_centroids").astype(np.float32), arr("dataset_foreground")),
                             CategoryModels(arr("category_centroids").astype(np.float32), arr("category_foreground")),
                             load_array(storage, run.centroids_file("cluster")).astype(np.float32))


def fit_category(group: Batch, k: int, niter: int, seed: int, dim: int) -> Batch:
    """``map_groups`` function: one category's sampled patches → its level model, flattened
    (``fitted`` False when the category has fewer than ``k`` sampled patches)."""
    from pdso_ray.method.lightcluster import fit_level

    rows = np.stack(list(group["feat"])).astype(np.float32)
    category = int(group["category"][0])
    if rows.shape[0] < k:
        return {"category": np.array([category]), "fitted": np.array([False]),
                "centroids": object_column([np.zeros(k * dim, np.float32)]),
                "foreground": object_column([np.zeros(k, bool)])}
    model = fit_level(rows, np.asarray(group["saliency"], dtype=np.float32), k, niter, seed)
    return {"category": np.array([category]), "fitted": np.array([True]),
            "centroids": object_column([model.centroids.reshape(-1)]),
            "foreground": object_column([model.foreground])}


# ---- the passes ------------------------------------------------------------------------------------
def _train_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """``{id, path, split, category}`` of every train image with features, from ``features/`` and the
    ``cluster/`` file aligned with each feature file."""
    rows = []
    for url in parquet_files(ctx.storage, ctx.run.features_dir):
        table = read_table(ctx.storage, url, ["id", "path", "split"])
        clusters = read_table(ctx.storage, ctx.run.aligned_file("cluster", url), ["id", "cluster"])
        if not table.column("id").equals(clusters.column("id")):
            raise RuntimeError(f"lightcluster: {ctx.run.aligned_file('cluster', url)} is not aligned with "
                               f"{url}; re-run the cluster stage")
        rows += [{"id": i, "path": p, "split": s, "category": int(c)} for i, p, s, c in
                 zip(*(table.column(k).to_pylist() for k in ("id", "path", "split")),
                     clusters.column("cluster").to_pylist())]
    return rows


def segment_rows(train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per image to segment, with its roles: ``train`` (labelled, in the labelling k-means)
    and ``eval`` (predicted). An image in both lists (a folder of images is its own evaluation
    split) appears once, in both roles, with its train category."""
    rows = {r["id"]: {**r, "train": True, "eval": False} for r in train_rows}
    for r in eval_rows:
        rows.setdefault(r["id"], {**r, "train": False})["eval"] = True
    return list(rows.values())


class _SamplePass(StreamingPass):
    name = "lightcluster (sample)"

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.lightcluster.batch_size

    def work(self, ctx: RunContext) -> Work:
        rows = _train_rows(ctx)
        return Work(ids=[r["id"] for r in rows], rows=rows)

    def done_ids(self, ctx: RunContext) -> set[str]:
        return ids_in(ctx.storage, ctx.run.lightcluster_path("samples"), ctx.run.lightcluster_path("rejected_sample"))

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        return [AttentionStep(ctx.cfg, ctx.storage, ctx.run, "sample"),
                WriteSample(ctx.storage, ctx.run, ctx.cfg.features.rows_per_file)]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        sampled = ids_in(ctx.storage, ctx.run.lightcluster_path("samples"))
        failed = ids_in(ctx.storage, ctx.run.lightcluster_path("rejected_sample"))
        reconcile(self.name, len(work.ids), len(sampled & set(work.ids)), len(failed & set(work.ids)))
        return {"images": len(work.ids), "failed": len(failed)}


class WriteSample(BatchStep):
    """The sample pass's last step: one ``samples/`` file per batch of images (``id, category,
    saliency, feat``, one row per sampled patch) and their failures to ``rejected_sample/``, both
    named by the batch's ids."""

    def __init__(self, storage: Storage, run: RunLayout, images_per_file: int):
        self.storage, self.run = storage, run
        self.resources = Resources(batch_size=images_per_file, num_cpus=0, stateful=False)

    def __call__(self, batch: Batch) -> Batch:
        ids = [str(i) for i in batch["id"]]
        name = shard_name(ids)
        ok = [i for i, r in enumerate(batch["reason"]) if not r]
        counts = [len(batch["sample_saliency"][i]) for i in ok]
        if sum(counts):
            table = pa.table({
                "id": pa.array(np.repeat(np.asarray(ids, dtype=object)[ok], counts), pa.string()),
                "category": pa.array(np.repeat(np.asarray(batch["category"])[ok], counts), pa.int32()),
                "saliency": pa.array(np.concatenate([batch["sample_saliency"][i] for i in ok]), pa.float32()),
                "feat": vectors_to_arrow(np.concatenate([batch["sample"][i] for i in ok]))})
            write_table(self.storage, self.run.lightcluster_path("samples", name), table)
        bad = [(ids[i], str(r)) for i, r in enumerate(batch["reason"]) if r]
        if bad:
            write_rejected(self.storage, self.run.lightcluster_path("rejected_sample", name),
                           [Rejected(path="", reason=r, image_id=i) for i, r in bad])
        return {"id": batch["id"], "reason": batch["reason"]}


class _SegmentPass(StreamingPass):
    name = "lightcluster (segment)"

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.lightcluster.batch_size

    def work(self, ctx: RunContext) -> Work:
        return Work(ids=[r["id"] for r in self.rows], rows=self.rows)

    def done_ids(self, ctx: RunContext) -> set[str]:
        p = ctx.run.lightcluster_path
        return ids_in(ctx.storage, p("vectors", "train"), p("vectors", "eval"), p("rejected_segment"))

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        return [AttentionStep(ctx.cfg, ctx.storage, ctx.run, "segment"),
                WriteVectors(ctx.storage, ctx.run, ctx.cfg.features.rows_per_file)]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        failed = ids_in(ctx.storage, ctx.run.lightcluster_path("rejected_segment"))
        reconcile(self.name, len(work.ids), len(self.done_ids(ctx) - failed), len(failed))
        return {"images": len(work.ids), "failed": len(failed)}


class _LabelPass(StreamingPass):
    name = "lightcluster (label)"

    def __init__(self, rows: list[dict[str, Any]], write_predictions: bool):
        self.rows, self.write_predictions = rows, write_predictions

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.lightcluster.batch_size

    def work(self, ctx: RunContext) -> Work:
        return Work(ids=[r["id"] for r in self.rows], rows=self.rows)

    def done_ids(self, ctx: RunContext) -> set[str]:
        return ids_in(ctx.storage, ctx.run.lightcluster_path("labelled"))

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        cfg = ctx.cfg
        previews = ((ImageReader.from_config(ctx.storage, cfg.data), cfg.lightcluster.refine_short_side)
                    if previews_wanted(cfg) else None)
        return [WriteLabels(ctx.storage, ctx.run, self.write_predictions, LABEL_TASK_IMAGES, previews)]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        reconcile(self.name, len(work.ids), len(self.done_ids(ctx) & set(work.ids)), 0)
        return {"images": len(work.ids)}


# ---- the stage ---------------------------------------------------------------------------------------
class LightClusterStage(Stage):
    """LightCluster end to end (module docstring)."""

    name = "lightcluster"
    config_sections = ("lightcluster", "models.dino", "data.root", "data.layout", "data.classes",
                       "data.eval_splits", "data.max_pixels", "data.max_file_bytes", "seed")
    depends_on = ("features", "cluster")

    @classmethod
    def needs(cls, cfg) -> Needs:
        return Needs(images=("train", "eval"), models=(dino_need(cfg),),
                     groups=(pool_group("the DINO actor pool", "lightcluster", cfg.lightcluster),))

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return (run.method_path("labels"), run.predictions_root, run.eval_file("lightcluster.json"))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg, storage, run = ctx.cfg, ctx.storage, ctx.run
        sample = run_pass(ctx, _SamplePass())
        state = self._fit_levels(ctx)
        train_rows = _train_rows(ctx)
        eval_rows, listing = self._eval_rows(ctx)
        rows = segment_rows(train_rows, eval_rows)
        segment = run_pass(ctx, _SegmentPass(rows))
        classes = self._label_classes(ctx)
        label_rows = [{"id": r["id"], "path": r["path"], "class": classes[r["id"]], "train": r["train"],
                       "eval": r["eval"]} for r in rows if r["id"] in classes]
        write_predictions = not cfg.lightcluster.finetune
        run_pass(ctx, _LabelPass(label_rows, write_predictions))
        counts: dict[str, Any] = {
            "images": len(rows), "train_images": len(train_rows), "sampled_patches": count_rows(storage, run.lightcluster_path("samples")),
            "dataset_foreground_clusters": int(state.dataset.foreground.sum()),
            "with_foreground": int(sum(1 for c in classes.values() if c >= 0)),
            "failed": sample["failed"] + segment["failed"],
        }
        if write_predictions:
            counts["splits"] = self._account_predictions(ctx, listing)
        counts.update(self._diagnostics(ctx, train_rows, classes))
        return counts

    # -- driver steps --
    def _fit_levels(self, ctx: RunContext):
        """The dataset and category levels from the patch sample (module docstring, step 2)."""
        import ray.data

        from pdso_ray.kmeans import kmeans
        from pdso_ray.method.lightcluster import CategoryModels, LevelModel, LightClusterState, foreground_clusters

        cfg, storage, run, lc = ctx.cfg, ctx.storage, ctx.run, ctx.cfg.lightcluster
        files = parquet_files(storage, run.lightcluster_path("samples"))
        if not files:
            raise RuntimeError(f"lightcluster: no patch sample in {run.lightcluster_path('samples')}")
        seed = cfg.seed_for("lightcluster")
        result = kmeans(files, lc.dataset_k, niter=lc.niter, nredo=lc.nredo, seed=seed, column="feat",
                        storage=storage, num_shards=cfg.cluster.num_shards, use_gpu=ctx.cluster_has_gpu,
                        max_points_per_centroid=DATASET_POINTS_PER_CLUSTER)
        saliency = column_values(storage, run.lightcluster_path("samples"), "saliency")
        dataset = LevelModel(result.centroids.astype(np.float32),
                             foreground_clusters(result.assignments, saliency, lc.dataset_k))
        dim = result.centroids.shape[1]
        fs, _ = storage.arrow_fs(files[0])
        ds = ray.data.read_parquet([storage.arrow_fs(u)[1] for u in files], filesystem=fs,
                                   columns=["category", "saliency", "feat"])
        # one partition per sample file at most: the default (200) costs seconds on small runs
        fitted = ds.groupby("category", num_partitions=max(1, min(cfg.data.classes, len(files)))).map_groups(
            fit_category, fn_kwargs={"k": lc.category_k, "niter": lc.niter, "seed": seed, "dim": dim},
            batch_format="numpy").take_all()
        num_categories = cfg.data.classes
        models = [dataset] * num_categories  # a category without enough sampled patches uses the dataset level
        for row in fitted:
            if row["fitted"]:
                models[int(row["category"])] = LevelModel(
                    np.asarray(row["centroids"], np.float32).reshape(lc.category_k, dim), np.asarray(row["foreground"], bool))
        if lc.category_k != lc.dataset_k:
            missing = [c for c in range(num_categories) if models[c] is dataset]
            if missing:
                raise RuntimeError(f"lightcluster: categories {missing[:5]} have fewer than category_k="
                                   f"{lc.category_k} sampled patches and dataset_k differs; raise patches_per_image")
        state = LightClusterState(dataset, CategoryModels.stack(models),
                                  load_array(storage, run.centroids_file("cluster")).astype(np.float32))
        save_state(storage, run, state)
        log.info("lightcluster: dataset level %d clusters (%d foreground), %d category models fitted",
                 lc.dataset_k, int(dataset.foreground.sum()), len(fitted))
        return state

    def _eval_rows(self, ctx: RunContext):
        """Rows of the evaluation images (validation always, test unless fine-tuning follows) and
        their listings, per split."""
        rows, listing = [], {}
        for info in ctx.data.eval_splits(ctx.storage):
            if not info.present or (ctx.cfg.lightcluster.finetune and info.split != VALIDATION
                                    and info.split != ctx.data.train_split()):
                continue
            found = ctx.data.list_split(ctx.storage, info.split)
            listing[info.split] = found
            rows += [{"id": r.id, "path": r.path, "split": r.split, "category": -1} for r in found.images]
        return rows, listing

    def _label_classes(self, ctx: RunContext) -> dict[str, int]:
        """``{id: class}`` of every segmented image (module docstring, step 4): -1 without foreground."""
        from pdso_ray.kmeans import kmeans
        from pdso_ray.method.lightcluster import nearest_centroid

        cfg, storage, lc = ctx.cfg, ctx.storage, ctx.cfg.lightcluster
        train_dir = ctx.run.lightcluster_path("vectors", "train")
        files = parquet_files(storage, train_dir)
        result = kmeans(files, cfg.data.classes, niter=lc.niter, nredo=lc.nredo, seed=cfg.seed_for("lightcluster"),
                        column="vector", storage=storage, num_shards=cfg.cluster.num_shards,
                        use_gpu=ctx.cluster_has_gpu)
        classes: dict[str, int] = {}
        start = 0
        for table in iter_row_groups(storage, files, columns=["id", "has_object"]):
            n = table.num_rows
            for image_id, obj, c in zip(table.column("id").to_pylist(), table.column("has_object").to_pylist(),
                                        result.assignments[start:start + n]):
                classes[image_id] = int(c) if obj else -1
            start += n
        for table in iter_row_groups(storage, ctx.run.lightcluster_path("vectors", "eval"),
                                     columns=["id", "has_object", "vector"]):
            vectors = arrow_to_vectors(table.column("vector")).astype(np.float32)
            nearest = nearest_centroid(vectors, result.centroids.astype(np.float32))
            for image_id, obj, c in zip(table.column("id").to_pylist(), table.column("has_object").to_pylist(), nearest):
                classes[image_id] = int(c) if obj else -1
        save_array(storage, ctx.run.lightcluster_path("label_centroids.npy"), result.centroids)
        return classes

    def _account_predictions(self, ctx: RunContext, listing) -> dict[str, dict[str, int]]:
        """Per evaluation split: listed = predicted + rejected (listing and decode failures, written
        to ``predictions/rejected_<split>.parquet`` as the predict stage does)."""
        failed = {r.image_id: r.reason for r in read_rejected(ctx.storage, ctx.run.lightcluster_path("rejected_segment"))}
        splits = {}
        for split, found in listing.items():
            rejected = list(found.rejected) + [Rejected(r.path, failed[r.id], r.id) for r in found.images if r.id in failed]
            write_rejected(ctx.storage, ctx.run.predict_rejected(split), rejected)
            predicted = len(ctx.storage.list_relative(ctx.run.predictions_dir(split), LABEL_SUFFIX))
            reconcile(f"lightcluster: {split}", found.total, predicted, len(rejected))
            splits[split] = {"images": found.total, "predicted": predicted, "rejected": len(rejected)}
        return splits

    def _diagnostics(self, ctx: RunContext, train_rows, classes: dict[str, int]) -> dict[str, Any]:
        """Validation mIoU and foreground IoU of every mask (``eval/lightcluster.json``, the
        ablation's rows) and the image-level purity of the labelling against the class folders;
        each best-effort (``"not computed: <reason>"`` when it cannot be measured)."""
        out: dict[str, Any] = {}
        if ctx.data.folder_is_class and train_rows:
            out["classes"] = best_effort("lightcluster: image-level diagnostics",
                                         lambda: _class_scores(ctx, train_rows, classes))
        gt_dir = ctx.data.gt_dir(ctx.storage, VALIDATION)
        if gt_dir is not None:
            out["levels"] = best_effort("lightcluster: the masks on validation", lambda: self._levels(ctx, gt_dir))
        return {"diagnostics": {"lightcluster": out}} if out else {}

    @staticmethod
    def _levels(ctx: RunContext, gt_dir: str) -> list[dict[str, Any]]:
        """Validation mIoU and foreground IoU of every mask, also written to ``eval/lightcluster.json``."""
        from pdso_ray.evaluation import evaluate_thresholds, pair_files

        storage, run = ctx.storage, ctx.run
        failed = {png_rel(r.image_id) for r in read_rejected(storage, run.lightcluster_path("rejected_segment"))
                  if r.image_id and split_of(r.image_id) == VALIDATION}
        failed |= {r.rel + LABEL_SUFFIX for r in ctx.data.list_split(storage, VALIDATION).rejected
                   if r.rel is not None}
        levels = []
        fg = foreground_iou(storage, run, gt_dir)
        for name in MASK_BITS:
            files = pair_files(storage, run.level_dir(name, VALIDATION), gt_dir, rejected=failed)
            (result,) = evaluate_thresholds(storage, files, ctx.cfg.data.classes, size_bins=False, progress=False)
            levels.append({"mask": name, "step": MASK_NAMES[name], "mIoU": result.miou, "fg_iou": fg[name]})
            log.info("lightcluster: validation %s: mIoU %.2f, foreground IoU %.3f", name, result.miou, fg[name])
        storage.write_json(run.eval_file("lightcluster.json"),
                           {"levels": levels, "voters": list(ctx.cfg.lightcluster.voters),
                            "min_votes": votes_needed(ctx.cfg)})
        return [{"mask": lv["mask"], "mIoU": lv["mIoU"], "fg_iou": lv["fg_iou"]} for lv in levels]


def _class_scores(ctx: RunContext, train_rows, classes: dict[str, int]) -> dict[str, Any] | str:
    """The labelling's image-level scores against the images' classes
    (:func:`~pdso_ray.stages.diagnostics.classes_of`), or ``"not computed: ..."`` when they have
    none."""
    ids = [r["id"] for r in train_rows if r["id"] in classes]
    truth = classes_of(ctx, pa.array(ids, pa.string()))
    if truth is None:
        return not_computed(f"no class truth: the images carry no class (e.g. {ids[0]!r})")
    return image_scores(truth, np.asarray([classes[i] for i in ids]))


def foreground_iou(storage: Storage, run: RunLayout, gt_dir: PngSource) -> dict[str, float]:
    """Foreground IoU over the validation set of every mask of :data:`MASK_BITS` against the ground
    truth's foreground (any class; ignored pixels left out): Σ|M ∩ G| / Σ|M ∪ G|. ``gt_dir``: a
    PNG source (:mod:`pdso_ray.data.png_sets`)."""
    inter = np.zeros(len(MASK_BITS), dtype=np.int64)
    union = np.zeros(len(MASK_BITS), dtype=np.int64)
    masks_dir = run.lightcluster_path("masks", VALIDATION)
    gt_pngs = png_files(storage, gt_dir)
    for rel in storage.list_relative(masks_dir, LABEL_SUFFIX):
        if rel not in gt_pngs:
            continue
        gt = decode_label(read_one(storage, gt_pngs[rel]))
        bits = decode_gray_png(storage.read_bytes(Storage.join(masks_dir, rel)), "mask")
        if bits.shape != gt.shape:
            continue  # a prediction of another size is an evaluation error, reported by evaluate
        valid = gt != IGNORE_ID
        truth = (gt > 0) & valid
        for i, name in enumerate(MASK_BITS):
            m = mask_from_bits(bits, name) & valid
            inter[i] += int((m & truth).sum())
            union[i] += int((m | truth).sum())
    return {name: float(inter[i] / union[i]) if union[i] else 0.0 for i, name in enumerate(MASK_BITS)}

