"""Stage 8, ``evaluate``: predictions + ground truth → ``eval/*.json`` (the official protocol,
:mod:`pdso_ray.evaluation`).

Validation: a PASS-style background threshold sweep when the predict stage wrote foreground maps
(``predictions/validation_fg/``): for every threshold t of
:data:`~pdso_ray.evaluation.BACKGROUND_THRESHOLDS`, pixels whose foreground probability is below t
become background and the others keep their label; each t gets its own Hungarian matching and
mIoU. The best t (highest mIoU, the lowest t on ties) and its matching are kept. Without
foreground maps the labels are evaluated as they are (threshold null).

Test: if ground truth exists (``test-segmentation/``; the official test GT is withheld), the test
predictions are evaluated with the best t and the *validation* matching. Without GT the
predictions are only counted: ``pdso-ray export`` packs them for the benchmark server.

Writes ``eval/threshold_curve.json`` (``[{"threshold", "mIoU"}]``, with a sweep),
``eval/validation.json`` (the metrics of :meth:`SegmentationResult.to_json` plus ``threshold``),
``eval/match.json`` (``{"pred id": gt id}``, the official toolbox's format) and, with test GT,
``eval/test.json``. An image that was rejected (at listing or by the predict stage:
``predictions/rejected_{split}.parquet``) is scored as an all-background prediction and listed
under ``unpredicted``; any other missing prediction is an error. A split without ground truth, or
a run on a plain folder of images, is skipped with a note in the counts.
"""

from __future__ import annotations

import logging
from typing import Any

from pdso_ray.data.imagenet_s import TEST, VALIDATION
from pdso_ray.evaluation import BACKGROUND_THRESHOLDS, best_index, evaluate_thresholds, pair_files
from pdso_ray.run_layout import LABEL_SUFFIX, RunLayout, png_rel
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.stages.streaming import read_rejected

log = logging.getLogger("pdso_ray")


def rejected_rels(ctx: RunContext, split: str) -> set[str]:
    """Relative names (``<wnid>/<stem>.png``) of the ``split`` images that got no prediction."""
    url = ctx.run.predict_rejected(split)
    if not ctx.storage.exists(url):
        return set()
    return {png_rel(r.image_id) for r in read_rejected(ctx.storage, url) if r.image_id}


class EvaluateStage(Stage):
    """Threshold sweep and matching on validation, reused on test (see the module docstring)."""

    name = "evaluate"
    config_sections = ("data.root", "data.layout", "data.classes", "data.class_list")
    depends_on = ("predict",)

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return tuple(run.eval_file(n) for n in
                     ("validation.json", "test.json", "match.json", "threshold_curve.json"))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        storage, classes, run = ctx.storage, ctx.cfg.data.classes, ctx.run
        splits = {info.split: info for info in ctx.data.eval_splits(storage)}
        notes = [info.note for info in splits.values() if info.gt_dir is None and info.note]
        val = splits.get(VALIDATION)
        if val is None or val.gt_dir is None:
            for note in notes:
                log.info("evaluate: %s", note)
            return {"skipped": True, "notes": notes or ["no validation ground truth: nothing to evaluate"]}

        val_fg = run.foreground_dir(VALIDATION)
        sweep = bool(storage.list_relative(val_fg, LABEL_SUFFIX))
        files = pair_files(storage, run.predictions_dir(VALIDATION), val.gt_dir,
                           val_fg if sweep else None, rejected_rels(ctx, VALIDATION))
        unpredicted = [f.rel for f in files if f.pred is None]
        thresholds: list[float | None] = list(BACKGROUND_THRESHOLDS) if sweep else [None]
        log.info("evaluate: %d validation images, %s", len(files),
                 f"sweeping {len(thresholds)} background thresholds" if sweep
                 else "no foreground maps, no threshold sweep")
        results = evaluate_thresholds(storage, files, classes, thresholds)
        best = best_index(results)
        threshold, result = thresholds[best], results[best]
        if sweep:
            curve = [{"threshold": t, "mIoU": r.miou} for t, r in zip(thresholds, results)]
            storage.write_json(run.eval_file("threshold_curve.json"), curve)
        storage.write_json(run.eval_file("match.json"),
                           {str(p): g for p, g in sorted(result.match.items())})
        storage.write_json(run.eval_file("validation.json"),
                           {**result.to_json(), "split": VALIDATION, "threshold": threshold,
                            "unpredicted": unpredicted})
        counts: dict[str, Any] = {"validation_images": result.num_images, "mIoU": result.miou,
                                  "threshold": threshold, "validation_unpredicted": len(unpredicted),
                                  "notes": notes}
        log.info("evaluate: validation mIoU %.2f at background threshold %s", result.miou, threshold)

        test = splits.get(TEST)
        test_pred = run.predictions_dir(TEST)
        counts["test_images"] = len(storage.list_relative(test_pred, LABEL_SUFFIX))
        if counts["test_images"] and test is not None and test.gt_dir is not None:
            test_files = pair_files(storage, test_pred, test.gt_dir,
                                    run.foreground_dir(TEST) if sweep else None, rejected_rels(ctx, TEST))
            (test_result,) = evaluate_thresholds(storage, test_files, classes, [threshold],
                                                 match=result.match)
            storage.write_json(run.eval_file("test.json"),
                               {**test_result.to_json(), "split": TEST, "threshold": threshold,
                                "match_from": VALIDATION,
                                "unpredicted": [f.rel for f in test_files if f.pred is None]})
            counts["mIoU_test"] = test_result.miou
            log.info("evaluate: test mIoU %.2f (validation matching and threshold)", test_result.miou)
        elif counts["test_images"]:
            log.info("evaluate: %d test predictions, no test ground truth: kept for "
                     "`pdso-ray export`", counts["test_images"])
        return counts
