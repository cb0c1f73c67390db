"""Stage 5, ``pseudo_labels``: pixel pseudo labels of every train image, raw and refined, with the
saliency threshold t and SPO's secondary-class distance σ chosen on validation
(docs/method.md §5–§6).

Three streaming passes (:mod:`pdso_ray.stages.streaming`), each resumable, over an actor pool
holding DINO, the denoised embedding e(x), the final centroids and SAM:

1. **validation scores** — for each validation image: its candidate classes (the nearest final
   centroids of its pooled embedding, as purify computed them for train images), the class of
   every pixel before any threshold (``labels/classmap/validation/``) and its 8-bit saliency
   (``labels/saliency/validation/``);
2. the driver sweeps t over ``pseudo_labels.threshold_grid`` with the official protocol (one
   Hungarian matching per t, best mIoU), reading only those PNGs; **validation refinement** —
   the raw labels at the chosen t (``labels/raw/validation/``) refined once per σ of the grid
   (``labels/sweep/sigma_<σ>/validation/``; by default the ``refine.sigma_quantiles`` of the train
   images' distances to their second-nearest centroid, docs/method.md §6); the driver keeps the
   best σ;
3. **train labels** — raw and refined labels of every train image at the chosen t and σ
   (``labels/raw/train/``, ``labels/refined/train/``: PNG files, or with ``output_format:
   webdataset`` one PNG shard per batch with its index, :mod:`pdso_ray.data.png_sets`) and
   per-image statistics (``labels/stats/``, whose ``label_raw``/``label_refined`` give each
   label's URL, a file or a shard member); with ``previews`` each label's colour preview and its
   overlay on the image (``labels/<kind>/train_colour/``, ``..._overlay/``,
   :mod:`pdso_ray.stages.previews`).

An explicit ``pseudo_labels.threshold`` or ``refine.sigma`` replaces its sweep; without validation
ground truth t falls back to the configured (or PASS-published) value and σ to the configured one
or the ``refine.sigma_fallback_quantile``, with a note. The choice and
its curves go to ``eval/pseudo_label_threshold.json``; the validation mIoU of the raw and refined
labels at the chosen values, and per-image scores, to ``eval/pseudo_labels.json`` and the summary's
``diagnostics.pseudo_labels``. Per-patch features are recomputed here, never stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac

from pdso_ray.config import PipelineConfig
from pdso_ray.data.ids import LABEL_SUFFIX, id_from_png_rel, png_rel, split_of
from pdso_ray.data.imagenet_s import VALIDATION, encode_gray_png, encode_label
from pdso_ray.data.png_sets import PngOutputs
from pdso_ray.measuring import best_effort
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import (Batch, BatchStep, ModelNeed, Needs, Resources, RunContext, Stage, dino_need,
                                  pool_group)
from pdso_ray.stages.previews import PreviewWriter, previews_wanted
from pdso_ray.stages.read_decode import ImageReader
from pdso_ray.stages.streaming import StreamingPass, Work, ids_in, object_column, reconcile, run_pass
from pdso_ray.storage import Storage
from pdso_ray.tables import arrow_to_vectors, iter_row_groups, parquet_files, shard_name, write_table

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("pdso_ray")

FALLBACK_SIGMA = 0.8  # the official --yz: a placeholder where σ decides nothing (no SPO, one candidate)
STAT_COLUMNS = ("prompts", "masks_used", "pixels_changed")


def saliency_to_uint8(saliency: np.ndarray) -> np.ndarray:
    """``H×W`` saliency in [0, 1] → uint8 ``round(255 s)``: the stored maps, and what the raw label's
    threshold compares, so the validation sweep and the train labels apply t identically."""
    return np.clip(np.rint(np.asarray(saliency, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


class PseudoLabeler(BatchStep):
    """One image at a time: decode, embedded patch tokens and saliency, the class map over the
    candidate centroids, then by ``mode``:

    - ``"scores"``: write the class map and the saliency map (validation);
    - ``"sweep"``: the raw label at ``threshold``, refined once per σ of ``sigmas`` (validation);
    - ``"train"``: the raw and the refined label at ``threshold`` and ``sigmas[0]``, and a
      statistics row.

    In: ``id``, ``path``, and for train images ``topk``/``topk_dist`` (their nearest final
    centroids from purify; validation images get them from their own pooled embedding). Out:
    ``id``, ``reason`` ("" when written; a decode failure otherwise — the image changed since it
    was listed), plus the statistics columns in train mode.
    """

    def __init__(self, cfg: PipelineConfig, storage: Storage, run: RunLayout, mode: str,
                 threshold: float | None = None, sigmas: tuple[float, ...] = ()):
        from pdso_ray.models.loading import DinoSource, SamSource

        if mode not in ("scores", "sweep", "train"):
            raise ValueError(f"mode must be scores, sweep or train, got {mode!r}")
        if mode != "scores" and (threshold is None or not sigmas):
            raise ValueError(f"mode {mode!r} needs a threshold and at least one sigma")
        self.cfg, self.storage, self.run = cfg, storage, run
        self.mode, self.threshold, self.sigmas = mode, threshold, tuple(sigmas)
        self.previews = PreviewWriter(storage, run) if mode == "train" and previews_wanted(cfg) else None
        self.reader = ImageReader.from_config(storage, cfg.data)
        self.dino = DinoSource.for_embedding(cfg, run)
        self.sam = SamSource.from_config(cfg) if mode != "scores" and _needs_sam(cfg) else None
        pc = cfg.pseudo_labels
        self.resources = Resources(batch_size=pc.batch_size, num_gpus=pc.gpus_per_actor,
                                   min_actors=pc.min_actors, max_actors=pc.max_actors)

    def setup(self) -> None:
        import torch

        from pdso_ray.evaluation import fg_cut
        from pdso_ray.method.refiners import RefineParams, get_refiner
        from pdso_ray.models.embedding import Embedder
        from pdso_ray.models.loading import load_embedding
        from pdso_ray.tables import load_array

        cfg = self.cfg
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.embedder = Embedder(self.dino.build(self.storage),
                                 load_embedding(self.storage, self.run.denoise_classifier), device)
        self.centroids = load_array(self.storage, self.run.centroids_file("purify")).astype(np.float32)
        rc = cfg.pseudo_labels.refine
        self.refine = get_refiner(rc.method)
        self.params = RefineParams(min_area=rc.min_area, spo_components=rc.spo_components,
                                   select_fail=rc.select_fail, gmm_confidence=rc.gmm_confidence)
        self.predictor = None
        if self.sam is not None:
            self.predictor = self.sam.predictor(self.storage, device=device,
                                                points_per_side=rc.sam_select_points_per_side)
        self.cut = None if self.threshold is None else fg_cut(self.threshold)

    def _candidates(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """An image's ``purify.topk`` nearest final centroids (ids, squared L2 distances) from its
        pooled embedding, as purify computed them for train images."""
        from pdso_ray.method.kmeans_math import search_numpy

        emb = self.embedder.image(image, self.cfg.models.dino.image_size)[None]
        dist, ids = search_numpy(emb, self.centroids, min(self.cfg.purify.topk, len(self.centroids)))
        return ids[0].astype(np.int64), dist[0].astype(np.float64)

    def _refine(self, image, raw, saliency, emb, topk, topk_dist, sigma):
        from pdso_ray.method.pseudo_labels import main_and_secondary_classes
        from pdso_ray.method.refiners import RefineContext

        main, secondary = main_and_secondary_classes(topk, topk_dist, sigma)
        # label ids are cluster id + 1; only classes the raw label holds get prompts
        in_raw = set(np.unique(raw).tolist())
        context = RefineContext(main_class=main + 1,
                                secondary_classes=[c + 1 for c in secondary if c + 1 in in_raw],
                                patch_emb=emb, params=self.params)
        return main, self.refine(image, raw, saliency, context, self.predictor)

    def __call__(self, batch: Batch) -> Batch:
        from pdso_ray.method.pseudo_labels import class_map

        pc = self.cfg.pseudo_labels
        rows: dict[str, list] = {k: [] for k in ("id", "reason", "path", "label_raw", "label_refined",
                                                 "main_class", "classes", *STAT_COLUMNS)}
        # the train labels as files or shards; the validation sweeps' labels stay files
        outputs = PngOutputs(self.storage, self.cfg.output_format if self.mode == "train" else "files")
        paths = [str(p) for p in batch["path"]]
        for i, (image_id, path, decoded) in enumerate(zip(batch["id"], paths, self.reader.read_batch(paths))):
            image_id = str(image_id)
            stats: dict[str, Any] = dict.fromkeys(STAT_COLUMNS, 0)
            main, present = -1, []
            if decoded.ok:
                image = decoded.image
                emb, saliency = self.embedder.patches(image, pc.image_size)
                if "topk" in batch:
                    topk = np.asarray(batch["topk"][i], dtype=np.int64)
                    topk_dist = np.asarray(batch["topk_dist"][i], dtype=np.float64)
                else:
                    topk, topk_dist = self._candidates(image)
                ids = np.arange(len(self.centroids)) if pc.candidates == "all" else topk
                classes = class_map(emb, self.centroids[ids], ids, image.shape[:2])
                saliency_u8 = saliency_to_uint8(saliency)
                if self.mode == "scores":
                    self.storage.write_bytes(self.run.label_png("saliency", image_id), encode_gray_png(saliency_u8))
                    self.storage.write_bytes(self.run.label_png("classmap", image_id), encode_label(classes))
                else:
                    raw = np.where(saliency_u8 < self.cut, 0, classes).astype(np.int32)
                    split = split_of(image_id)
                    for sigma in self.sigmas:
                        main, result = self._refine(image, raw, saliency, emb, topk, topk_dist, sigma)
                        refined = (self.run.sweep_dir(sigma, split) if self.mode == "sweep"
                                   else self.run.label_dir("refined", split))
                        outputs.add(refined, image_id, encode_label(result.label))
                    if self.previews is not None:  # before the statistics row marks the image done
                        self.previews.write("refined", image_id, result.label, image)
                        self.previews.write("raw", image_id, raw, image)
                    # last: the raw label marks the image done
                    outputs.add(self.run.label_dir("raw", split), image_id, encode_label(raw))
                    stats = result.stats
                    present = sorted(int(c) for c in np.unique(result.label) if 0 < c < 1000)
            rows["id"].append(image_id)
            rows["reason"].append("" if decoded.ok else decoded.reason)
            rows["path"].append(path)
            rows["main_class"].append(main + 1 if decoded.ok and self.mode == "train" else 0)
            rows["classes"].append(np.asarray(present, dtype=np.int32))
            for k in STAT_COLUMNS:
                rows[k].append(int(stats.get(k, 0)))
        # a shard's index carries the images' statistics too
        index_columns = {image_id: {"main_class": rows["main_class"][j], "classes": rows["classes"][j].tolist(),
                                    **{k: rows[k][j] for k in STAT_COLUMNS}} for j, image_id in enumerate(rows["id"])}
        written = outputs.flush(index_columns)
        for image_id in rows["id"]:
            for kind in ("raw", "refined"):  # "" where nothing was written (failed, or not a train pass)
                url = written.get((self.run.label_dir(kind, split_of(image_id)), image_id), "")
                rows[f"label_{kind}"].append(url if self.mode == "train" else "")
        out: Batch = {}
        for k, v in rows.items():
            out[k] = np.asarray(v, dtype=np.int64) if k in (*STAT_COLUMNS, "main_class") else object_column(v)
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
        table = pa.table({
            "id": pa.array(ids, pa.string()),
            "path": pa.array([str(p) for p in batch["path"]], pa.string()),
            "label_raw": pa.array([str(p) for p in batch["label_raw"]], pa.string()),
            "label_refined": pa.array([str(p) for p in batch["label_refined"]], pa.string()),
            "main_class": pa.array(batch["main_class"], pa.int32()),
            "classes": pa.array([list(map(int, c)) for c in batch["classes"]], pa.list_(pa.int32())),
            **{k: pa.array(batch[k], pa.int64()) for k in STAT_COLUMNS},
            "reason": pa.array([str(r) for r in batch["reason"]], pa.string()),
        })
        write_table(self.storage, Storage.join(self.stats_dir, shard_name(ids)), table)
        return {"id": batch["id"], "reason": batch["reason"]}


def _needs_sam(cfg: PipelineConfig) -> bool:
    from pdso_ray.method.refiners import NEEDS_SAM

    return cfg.pseudo_labels.refine.method in NEEDS_SAM


# ---- the three passes ------------------------------------------------------------------------------
class _ValidationPass(StreamingPass):
    """The validation images that the listing accepted (decode failures are counted, and scored as
    all background by the sweeps)."""

    def __init__(self, mode: str, threshold: float | None = None, sigmas: tuple[float, ...] = ()):
        self.mode, self.threshold, self.sigmas = mode, threshold, sigmas
        self.name = f"pseudo_labels (validation {'scores' if mode == 'scores' else 'refinement'})"

    def batch_size(self, ctx: RunContext) -> int:
        return ctx.cfg.pseudo_labels.batch_size

    def work(self, ctx: RunContext) -> Work:
        listing = ctx.data.list_split(ctx.storage, VALIDATION)
        return Work(ids=[r.id for r in listing.images],
                    rows=[{"id": r.id, "path": r.path} for r in listing.images])

    def _outputs(self, ctx: RunContext) -> list[str]:
        run = ctx.run
        if self.mode == "scores":
            return [run.label_dir("saliency", VALIDATION), run.label_dir("classmap", VALIDATION)]
        return [run.label_dir("raw", VALIDATION), *[run.sweep_dir(s, VALIDATION) for s in self.sigmas]]

    def done_ids(self, ctx: RunContext) -> set[str]:
        done = None
        for folder in self._outputs(ctx):
            have = set(ctx.storage.list_relative(folder, LABEL_SUFFIX))
            done = have if done is None else done & have
        return {id_from_png_rel(VALIDATION, rel) for rel in done or ()}

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        return [PseudoLabeler(ctx.cfg, ctx.storage, ctx.run, self.mode, self.threshold, self.sigmas)]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        failed = {png_rel(i) for i, reason in results.items() if reason}
        done = self.done_ids(ctx)
        reconcile(self.name, len(work.ids), len(done & set(work.ids)), len(failed))
        return {"images": len(work.ids), "failed": sorted(failed)}


class _TrainPass(StreamingPass):
    name = "pseudo_labels (train)"

    def __init__(self, threshold: float, sigma: float):
        self.threshold, self.sigma = threshold, sigma

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
        return [PseudoLabeler(ctx.cfg, ctx.storage, ctx.run, "train", self.threshold, (self.sigma,)),
                WriteStats(ctx.storage, ctx.run.label_stats_dir, self.batch_size(ctx))]

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        totals = {"images": 0, "failed": 0, **dict.fromkeys(STAT_COLUMNS, 0)}
        for table in iter_row_groups(ctx.storage, ctx.run.label_stats_dir, columns=["reason", *STAT_COLUMNS]):
            totals["images"] += table.num_rows
            totals["failed"] += sum(1 for r in table.column("reason").to_pylist() if r)
            for k in STAT_COLUMNS:
                totals[k] += int(pac.sum(table.column(k)).as_py() or 0)
        reconcile(self.name, len(work.ids), totals["images"] - totals["failed"], totals["failed"])
        return totals


# ---- the stage ---------------------------------------------------------------------------------------
class PseudoLabelsStage(Stage):
    name = "pseudo_labels"
    config_sections = ("pseudo_labels", "models", "purify.topk", "data.root", "data.layout", "output_format",
                       "data.max_pixels", "data.max_file_bytes", "seed")
    depends_on = ("features", "purify")

    @classmethod
    def needs(cls, cfg) -> Needs:
        from pdso_ray.method.refiners import NEEDS_SAM

        pc, sc = cfg.pseudo_labels, cfg.models.sam
        sam = (ModelNeed("sam", sc.arch, sc.checkpoint, sc.image_size),) if pc.refine.method in NEEDS_SAM else ()
        return Needs(images=("train", "eval"), models=(dino_need(cfg, pc.image_size), *sam),
                     groups=(pool_group("the DINO + SAM actor pool", "pseudo_labels", pc),))

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return (run.method_path("labels"), run.eval_file("pseudo_label_threshold.json"),
                run.eval_file("pseudo_labels.json"))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg, pc = ctx.cfg, ctx.cfg.pseudo_labels
        gt_dir = ctx.data.gt_dir(ctx.storage, VALIDATION)
        sigma_grid, sigma_fallback, sigma_shares = self._sigma_grid(ctx)
        notes: list[str] = []
        diagnostics: dict[str, Any] = {}
        if gt_dir is None:
            threshold, sigma = cfg.saliency_threshold(), sigma_fallback
            sigma_source = ("configured" if pc.refine.sigma is not None
                            else "fallback quantile" if _uses_sigma(cfg) else "unused: no SPO")
            notes.append(f"no validation ground truth: saliency threshold {threshold:g} "
                         f"({'configured' if pc.threshold is not None else 'PASS published value'}) "
                         f"and sigma {sigma:g} ({sigma_source}) were not chosen on validation")
            choice = {"threshold": threshold, "sigma": sigma, "source": "fallback", "curve": [],
                      "sigma_curve": []}
        else:
            failed = {"scores": run_pass(ctx, _ValidationPass("scores"))["failed"]}
            measured = self.measure(ctx, gt_dir, sigma_grid, failed)
            if isinstance(measured, str):
                threshold, sigma = cfg.saliency_threshold(), sigma_fallback
                notes.append(f"the validation sweep was {measured}: saliency threshold {threshold:g} and "
                             f"sigma {sigma:g} are the configured or fallback values")
                choice = {"threshold": threshold, "sigma": sigma, "source": "fallback", "curve": [],
                          "sigma_curve": [], "sweep": measured}
                diagnostics = measured
            else:
                threshold, sigma, choice, diagnostics = measured
        for point in choice["sigma_curve"]:
            point["secondary_share"] = sigma_shares.get(point["sigma"])
        choice["sigma_secondary_share"] = sigma_shares.get(sigma)
        ctx.storage.write_json(ctx.run.eval_file("pseudo_label_threshold.json"), choice)
        counts = run_pass(ctx, _TrainPass(threshold, sigma))
        out: dict[str, Any] = {**counts, "threshold": threshold, "sigma": sigma, "notes": notes}
        if diagnostics:
            out["diagnostics"] = {"pseudo_labels": diagnostics}
        return out

    def _sigma_grid(self, ctx: RunContext) -> tuple[list[float], float, dict[float, float]]:
        """``(the σ values to sweep, σ without validation, {σ: share of train images it gives a
        secondary class})``. A configured ``refine.sigma`` or ``sigma_grid`` is used as given; by
        default σ are quantiles of the train images' distances to their second-nearest final
        centroid (purify's ``topk_dist``), so the sweep spans "no image has a secondary class" to
        "most do" in any distance space. The shares are measured for every σ."""
        from pdso_ray.method.pseudo_labels import second_nearest_distances, sigmas_at_quantiles

        rc = ctx.cfg.pseudo_labels.refine
        if not _uses_sigma(ctx.cfg):
            return [rc.sigma if rc.sigma is not None else FALLBACK_SIGMA], FALLBACK_SIGMA, {}
        # One float per image: each row group's N×topk distances are reduced as they are read
        # (at S919, 1.28 M × 50 would be 256 MB in the driver; this is 10 MB).
        second_parts = []
        for table in iter_row_groups(ctx.storage, ctx.run.stage_dir("purify"), columns=["topk_dist"]):
            if table.num_rows == 0:
                continue
            dist = arrow_to_vectors(table.column("topk_dist"))
            if dist.shape[1] < 2:  # purify.topk = 1: one candidate per image, none can be secondary
                break
            second_parts.append(second_nearest_distances(dist))
        second = np.concatenate(second_parts) if second_parts else None

        def shares(sigmas: list[float]) -> dict[float, float]:
            return {} if second is None else {s: float(np.mean(second <= s)) for s in sigmas}

        if rc.sigma is not None:
            return [rc.sigma], rc.sigma, shares([rc.sigma])
        if second is None:  # one candidate per image (purify.topk = 1): nothing can be secondary
            return [FALLBACK_SIGMA], FALLBACK_SIGMA, {}
        fallback = sigmas_at_quantiles(second, [rc.sigma_fallback_quantile])[0][0]
        if rc.sigma_grid is not None:
            return list(rc.sigma_grid), fallback, shares([*rc.sigma_grid, fallback])
        grid = [sigma for sigma, _ in sigmas_at_quantiles(second, rc.sigma_quantiles)]
        return grid, fallback, shares([*grid, fallback])

    def measure(self, ctx: RunContext, gt_dir: str, sigma_grid: list[float], failed: dict[str, Any]):
        """The validation sweep, best-effort: ``(t, sigma, eval/pseudo_label_threshold.json's
        choice, diagnostics)`` with t chosen on the validation class maps and saliency (the
        ``scores`` pass, whose failed images are ``failed["scores"]``) and sigma on the refined
        labels of the ``sweep`` pass (run here, once t is known), unless configured; or ``"not
        computed: <reason>"`` when the ground truth cannot score them."""
        cfg, pc = ctx.cfg, ctx.cfg.pseudo_labels

        def chosen():
            threshold, curve, raw = self._choose_threshold(ctx, gt_dir, failed["scores"])
            if "sweep" not in failed:
                failed["sweep"] = run_pass(ctx, _ValidationPass("sweep", threshold, tuple(sigma_grid)))["failed"]
            sigma, sigma_curve, refined = self._choose_sigma(ctx, gt_dir, sigma_grid, failed["sweep"])
            choice = {"threshold": threshold, "sigma": sigma, "curve": curve, "sigma_curve": sigma_curve,
                      "source": {"threshold": "configured" if pc.threshold is not None else "validation sweep",
                                 "sigma": "configured" if pc.refine.sigma is not None
                                 else "validation sweep" if _uses_sigma(cfg) else "unused"}}
            diagnostics = best_effort("pseudo_labels: the raw and refined labels on validation",
                                      lambda: self._diagnostics(ctx, gt_dir, threshold, sigma, raw, refined,
                                                                failed["scores"]))
            log.info("pseudo_labels: t = %g (validation raw mIoU %.2f, saliency foreground IoU %.1f), "
                     "sigma = %g (refined mIoU %.2f)", threshold, raw.miou, raw.foreground_iou, sigma, refined.miou)
            return threshold, sigma, choice, diagnostics

        return best_effort("pseudo_labels: the validation sweep of t and sigma", chosen)

    @staticmethod
    def _files(ctx: RunContext, pred_dir: str, gt_dir: str, failed, fg_dir: str | None = None):
        from pdso_ray.evaluation import pair_files

        listing_rejected = {r.rel + LABEL_SUFFIX for r in ctx.data.list_split(ctx.storage, VALIDATION).rejected
                            if r.rel is not None}
        return pair_files(ctx.storage, pred_dir, gt_dir, fg_dir, rejected=listing_rejected | set(failed))

    def _choose_threshold(self, ctx: RunContext, gt_dir: str, failed):
        from pdso_ray.evaluation import best_index, evaluate_thresholds

        pc, run = ctx.cfg.pseudo_labels, ctx.run
        grid = [pc.threshold] if pc.threshold is not None else sorted(pc.threshold_grid)
        files = self._files(ctx, run.label_dir("classmap", VALIDATION), gt_dir, failed,
                            run.label_dir("saliency", VALIDATION))
        results = evaluate_thresholds(ctx.storage, files, ctx.cfg.data.classes, grid, size_bins=False)
        best = best_index(results)
        curve = [{"threshold": t, "mIoU": r.miou, "saliency_foreground_IoU": _finite(r.foreground_iou)}
                 for t, r in zip(grid, results)]
        return grid[best], curve, results[best]

    def _choose_sigma(self, ctx: RunContext, gt_dir: str, grid: list[float], failed):
        from pdso_ray.evaluation import evaluate_thresholds

        results = [evaluate_thresholds(ctx.storage, self._files(ctx, ctx.run.sweep_dir(s, VALIDATION),
                                                                gt_dir, failed),
                                       ctx.cfg.data.classes, size_bins=False)[0] for s in grid]
        best = int(np.argmax([r.miou for r in results]))
        return grid[best], [{"sigma": s, "mIoU": r.miou} for s, r in zip(grid, results)], results[best]

    def _diagnostics(self, ctx: RunContext, gt_dir: str, threshold: float, sigma: float, raw, refined,
                     failed) -> dict[str, Any]:
        """Validation mIoU of the raw and refined labels at the chosen values, and per-image
        accuracies (under each one's matching), kept in ``eval/pseudo_labels.json`` for the report."""
        from pdso_ray.evaluation import per_image_accuracy

        run = ctx.run
        raw_files = self._files(ctx, run.label_dir("raw", VALIDATION), gt_dir, failed)
        refined_files = self._files(ctx, run.sweep_dir(sigma, VALIDATION), gt_dir, failed)
        raw_acc = per_image_accuracy(ctx.storage, raw_files, raw.match)
        refined_acc = per_image_accuracy(ctx.storage, refined_files, refined.match)
        method = ctx.cfg.pseudo_labels.refine.method
        saliency = {"foreground_IoU": _finite(raw.foreground_iou), "threshold": threshold}
        report = {"raw": {"mIoU": raw.miou, "threshold": threshold, "match": _json_match(raw.match)},
                  "saliency": saliency,
                  "refined": {"mIoU": refined.miou, "method": method, "sigma": sigma,
                              "dir": run.sweep_dir(sigma, VALIDATION), "match": _json_match(refined.match)},
                  "images": {rel: {"raw": raw_acc[rel], "refined": refined_acc.get(rel)} for rel in raw_acc}}
        ctx.storage.write_json(run.eval_file("pseudo_labels.json"), report)
        return {"raw": {"mIoU": raw.miou, "threshold": threshold},
                "refined": {"mIoU": refined.miou, "method": method, "sigma": sigma},
                "saliency": saliency}


def _uses_sigma(cfg: PipelineConfig) -> bool:
    """Only SPO reads sigma (its secondary classes)."""
    return cfg.pseudo_labels.refine.method == "spo"


def _finite(x: float) -> float | None:
    """JSON has no NaN: a measurement with nothing to measure is null."""
    return None if np.isnan(x) else float(x)


def _json_match(match: dict[int, int]) -> dict[str, int]:
    return {str(p): int(g) for p, g in sorted(match.items())}
