"""Stage 8, ``evaluate``: predictions + ground truth → ``eval/*.json`` with the official protocol
(:mod:`pdso_ray.evaluation`), and the run's ablation.

**The official number.** ``predictions/validation/`` hold argmax over the C+1 outputs, background
included (PASS's and PDSO's rule): the Hungarian matching on validation and its mIoU give
``eval/validation.json`` and ``eval/match.json`` (``{"pred id": gt id}``, the official toolbox's
format) and the summary's ``mIoU``, with what the report shows of it: each image's own mIoU under
that matching (``eval/validation_images.json``) and the matched pixel confusion matrix
(``eval/confusion.npy``); ``pdso-ray evaluate --pred OUTPUT/predictions/validation``
reproduces it exactly. Test predictions with ground truth (``test-segmentation/``; the official
test GT is withheld) are scored with the *validation* matching: ``eval/test.json``, ``mIoU_test``.
Without test GT the predictions are only counted: ``pdso-ray export`` packs them for the server.

**The threshold rule** (``predict.background: threshold``): PASS's alternative decision — the best
foreground class, and background where the foreground probability is below t — with t swept over
:data:`~pdso_ray.evaluation.BACKGROUND_THRESHOLDS` on validation ground truth (one matching per t,
best mIoU, lowest t on ties): ``eval/threshold_curve.json``, ``eval/validation_threshold.json``,
``eval/test_threshold.json`` and ``mIoU_threshold`` — tuned on validation GT, so reported beside
the official number, never as it.

**The ablation** (``diagnostics.ablation``): validation mIoU of each labelling step and of the final
predictions (:func:`ablation`; PDSO's raw and refined pseudo labels, LightCluster's masks).

An image that was rejected (at listing or by the predict stage) is scored as an all-background
prediction and listed under ``unpredicted``. A split without ground truth, or a run on a plain
folder of images, is skipped with a note. Every score is a measurement: one that cannot be
computed (a prediction missing, a ground truth of another size) is a note ``... not computed:
<reason>`` and one warning line; the run goes on to its report.
"""

from __future__ import annotations

import logging
from typing import Any

from pdso_ray.data.ids import LABEL_SUFFIX, png_rel
from pdso_ray.data.imagenet_s import TEST, VALIDATION
from pdso_ray.data.png_sets import png_files
from pdso_ray.evaluation import BACKGROUND_THRESHOLDS, best_index, evaluate_thresholds, pair_files
from pdso_ray.measuring import best_effort
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.stages.streaming import read_rejected
from pdso_ray.tables import save_array

log = logging.getLogger("pdso_ray")


def rejected_rels(ctx: RunContext, split: str) -> set[str]:
    """Relative names (``<wnid>/<stem>.png``) of the ``split`` images that got no prediction: from
    their ids, or for names the listing could not make an id of, from their paths below the split
    folder (the ground truth of such an image has that name too)."""
    url = ctx.run.predict_rejected(split)
    if not ctx.storage.exists(url):
        return set()
    _, base = ctx.storage.fs(ctx.data.split_url(split))
    base = base.rstrip("/") + "/"
    out = set()
    for r in read_rejected(ctx.storage, url):
        if r.image_id:
            out.add(png_rel(r.image_id))
            continue
        _, path = ctx.storage.fs(r.path)
        if path.startswith(base) and "." in path[len(base):]:
            rel = path[len(base):]
            out.add(rel[: rel.rfind(".")] + LABEL_SUFFIX)
    return out


class EvaluateStage(Stage):
    """The official score on validation and test, the threshold rule beside it when predicted,
    the ablation (see the module docstring)."""

    name = "evaluate"
    config_sections = ("data.root", "data.layout", "data.classes", "data.class_list")
    depends_on = ("predict",)

    @classmethod
    def upstream(cls, cfg) -> tuple[str, ...]:
        """LightCluster without fine-tuning predicts in its own stage."""
        if cfg.method == "lightcluster" and not cfg.lightcluster.finetune:
            return ("lightcluster",)
        return cls.depends_on

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return tuple(run.eval_file(n) for n in
                     ("validation.json", "test.json", "match.json", "threshold_curve.json",
                      "validation_threshold.json", "test_threshold.json")) + (run.validation_image_scores,
                                                                              run.confusion_file)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        storage, run = ctx.storage, ctx.run
        splits = {info.split: info for info in ctx.data.eval_splits(storage)}
        notes = [info.note for info in splits.values() if info.note]
        val = splits.get(VALIDATION)
        if val is None or val.gt_dir is None:
            for note in notes:
                log.info("evaluate: %s", note)
            return {"skipped": True, "notes": notes or ["no validation ground truth: nothing to evaluate"]}
        test = splits.get(TEST)
        test_gt = test.gt_dir if test is not None else None
        counts: dict[str, Any] = {"notes": notes}
        official = best_effort("evaluate: the validation mIoU", lambda: self._validation(ctx, val.gt_dir))
        if isinstance(official, str):
            notes.append(f"validation mIoU {official}")
            return {**counts, "diagnostics": {"ablation": official}}
        scores, match = official
        counts.update(scores)
        counts["test_images"] = len(png_files(storage, run.predictions_dir(TEST)))
        if counts["test_images"] and test_gt is not None:
            test_miou = best_effort("evaluate: the test mIoU", lambda: self._test(ctx, test_gt, match))
            if isinstance(test_miou, str):
                notes.append(f"test mIoU {test_miou}")
            else:
                counts["mIoU_test"] = test_miou
        elif counts["test_images"]:
            log.info("evaluate: %d test predictions, no test ground truth: kept for `pdso-ray export`",
                     counts["test_images"])
        if png_files(storage, run.foreground_dir(VALIDATION)):
            rule = best_effort("evaluate: the threshold rule",
                               lambda: self._threshold_rule(ctx, val.gt_dir, test_gt))
            if isinstance(rule, str):
                notes.append(f"threshold rule {rule}")
            else:
                counts.update(rule)
        counts["diagnostics"] = {"ablation": best_effort("evaluate: the ablation",
                                                         lambda: ablation(ctx, counts["mIoU"]))}
        return counts

    @staticmethod
    def _validation(ctx: RunContext, gt_dir: str) -> tuple[dict[str, Any], dict[int, int]]:
        """The official validation score (``eval/validation.json``, ``eval/match.json``): its counts
        and the matching the test split is scored with."""
        storage, run = ctx.storage, ctx.run
        files = pair_files(storage, run.predictions_dir(VALIDATION), gt_dir,
                           rejected=rejected_rels(ctx, VALIDATION))
        (result,) = evaluate_thresholds(storage, files, ctx.cfg.data.classes, per_image=True)
        storage.write_json(run.eval_file("match.json"), {str(p): g for p, g in sorted(result.match.items())})
        # what the report shows: the best and worst images, and where the classes go
        storage.write_json(run.validation_image_scores,
                           {rel: round(v, 3) for rel, v in sorted(result.image_miou.items())})
        save_array(storage, run.confusion_file, result.confusion)
        unpredicted = [f.rel for f in files if f.pred is None]
        storage.write_json(run.eval_file("validation.json"),
                           {**result.to_json(), "split": VALIDATION, "rule": "argmax", "unpredicted": unpredicted})
        log.info("evaluate: validation mIoU %.2f (argmax over C+1, the official rule)", result.miou)
        return ({"validation_images": result.num_images, "mIoU": result.miou,
                 "validation_unpredicted": len(unpredicted)}, result.match)

    @staticmethod
    def _test(ctx: RunContext, gt_dir: str, match: dict[int, int]) -> float:
        """The test mIoU with the validation matching (``eval/test.json``)."""
        storage, run = ctx.storage, ctx.run
        files = pair_files(storage, run.predictions_dir(TEST), gt_dir, rejected=rejected_rels(ctx, TEST))
        (result,) = evaluate_thresholds(storage, files, ctx.cfg.data.classes, match=match)
        storage.write_json(run.eval_file("test.json"),
                           {**result.to_json(), "split": TEST, "rule": "argmax", "match_from": VALIDATION,
                            "unpredicted": [f.rel for f in files if f.pred is None]})
        log.info("evaluate: test mIoU %.2f (validation matching)", result.miou)
        return result.miou

    def _threshold_rule(self, ctx: RunContext, val_gt: str, test_gt: str | None) -> dict[str, Any]:
        """PASS's foreground-threshold rule, t tuned on validation GT (module docstring)."""
        storage, classes, run = ctx.storage, ctx.cfg.data.classes, ctx.run
        files = pair_files(storage, run.foreground_label_dir(VALIDATION), val_gt,
                           run.foreground_dir(VALIDATION), rejected_rels(ctx, VALIDATION))
        thresholds = list(BACKGROUND_THRESHOLDS)
        results = evaluate_thresholds(storage, files, classes, thresholds, size_bins=False)
        best = best_index(results)
        threshold, result = thresholds[best], results[best]
        storage.write_json(run.eval_file("threshold_curve.json"),
                           [{"threshold": t, "mIoU": r.miou} for t, r in zip(thresholds, results)])
        tuned = "background threshold tuned on validation ground truth"
        storage.write_json(run.eval_file("validation_threshold.json"),
                           {**result.to_json(), "split": VALIDATION, "rule": "threshold",
                            "threshold": threshold, "note": tuned})
        out: dict[str, Any] = {"mIoU_threshold": result.miou, "threshold": threshold}
        log.info("evaluate: validation mIoU %.2f with the threshold rule (t = %g, %s)",
                 result.miou, threshold, tuned)
        test_fgclass = run.foreground_label_dir(TEST)
        if test_gt is not None and png_files(storage, test_fgclass):
            test_files = pair_files(storage, test_fgclass, test_gt, run.foreground_dir(TEST),
                                    rejected_rels(ctx, TEST))
            (test_result,) = evaluate_thresholds(storage, test_files, classes, [threshold], match=result.match)
            storage.write_json(run.eval_file("test_threshold.json"),
                               {**test_result.to_json(), "split": TEST, "rule": "threshold",
                                "threshold": threshold, "match_from": VALIDATION, "note": tuned})
            out["mIoU_test_threshold"] = test_result.miou
        return out


def ablation(ctx: RunContext, final_miou: float) -> list[dict[str, Any]]:
    """``[{"step", "mIoU"}]``: validation mIoU of each labelling step the method scored, then of its
    final predictions. PDSO: the raw and refined pseudo labels (``eval/pseudo_labels.json``), then
    the final model. LightCluster: each level's mask, the consistent mask before and after
    refinement (``eval/lightcluster.json``), then the fine-tuned model when one was trained (the
    refined masks are the predictions otherwise)."""
    storage, run, cfg = ctx.storage, ctx.run, ctx.cfg
    steps = []
    if cfg.method == "lightcluster":
        url = run.eval_file("lightcluster.json")
        if storage.exists(url):
            steps += [{"step": level["step"], "mIoU": level["mIoU"]} for level in storage.read_json(url)["levels"]]
        if not cfg.lightcluster.finetune:
            steps.append({"step": "final: the refined masks (no training)", "mIoU": final_miou})
            return steps
    else:
        url = run.eval_file("pseudo_labels.json")
        pseudo = storage.read_json(url) if storage.exists(url) else None
        if pseudo is not None:
            steps.append({"step": f"raw pseudo labels (t = {pseudo['raw']['threshold']:g})", "mIoU": pseudo["raw"]["mIoU"]})
            refined = pseudo["refined"]
            how = f"{refined['method']}" + (f", sigma = {refined['sigma']:g}" if refined["method"] == "spo" else "")
            steps.append({"step": f"refined pseudo labels ({how})", "mIoU": refined["mIoU"]})
    steps.append({"step": f"final model ({cfg.finetune.backbone}, {cfg.finetune.loss})", "mIoU": final_miou})
    return steps
