"""The label-free quality signals in the report (``report/quality.json``, written by the report
stage: :mod:`pdso_ray.stages.quality`): a red box at the top of the page when they call the
result degenerate (:func:`warning_box`), and a section with the measurements
(:func:`quality_signals`).
"""

from __future__ import annotations

from typing import Any

from pdso_ray.measuring import is_not_computed
from pdso_ray.report.base import Report, esc, not_run, table
from pdso_ray.report.figures import label_grid, overlay
from pdso_ray.tables import iter_row_groups

MAX_LISTED = 5  # images named per signal (least foreground, least agreement)
BEST_WORST = 4  # images shown at each end


def warning_box(r: Report) -> str:
    """The red box of the page's top: one item per warning; empty when there is none."""
    signals = r.json(r.run.quality_file) or {}
    warnings = signals.get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
    return ('<div class="alarm"><strong>This result looks degenerate.</strong> The label-free '
            'quality signals (section "Quality signals") say:<ul>' + items + "</ul></div>")


def _percent(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "—"


def _labels_row(name: str, value: Any) -> list[Any]:
    if not isinstance(value, dict):
        return [name, value, "", "", ""]
    fewest = sorted(value["per_image"].items(), key=lambda kv: kv[1])[:MAX_LISTED]
    absent = value["classes_absent"]
    return [name, f"{value['images']} images", _percent(value["median_foreground"]),
            f"{value['empty_images']} ({_percent(value['empty_share'])})",
            f"{len(absent)} absent{': ' + ', '.join(map(str, absent[:20])) if absent else ''}; largest class "
            f"{_percent(value['largest_class_share'])} of the foreground; least foreground: "
            + ", ".join(f"{i} ({_percent(s)})" for i, s in fewest)]


def quality_signals(r: Report) -> str:
    signals = r.json(r.run.quality_file)
    if signals is None:
        return not_run("no report/quality.json")
    out = table(["labels (a sample)", "measured on", "median foreground", "all background", "classes"],
                [_labels_row(name, signals[key]) for name, key in
                 (("refined pseudo labels (train)", "pseudo_labels"), ("predictions", "predictions"))
                 if key in signals])
    # (name, key in quality.json, how a measurement reads)
    measured = (
        ("model vs its refined pseudo labels", "agreement", lambda v:
         f"pixel agreement {_percent(v['median'])}, foreground IoU {v['median_foreground_iou']:.2f} "
         f"(medians of {v['images']} images)"),
        ("k-means #1 clusters", "clusters", lambda v:
         f"{v['classes']} clusters, {v['empty']} empty; largest holds {_percent(v['largest_share'])} of "
         f"the images; distance to the nearest over the second centroid, median "
         f"{v.get('margin_ratio_median', float('nan')):.2f} (0: at a centroid, 1: between two)"),
        ("the same k-means from another seed", "stability", lambda v:
         f"NMI {v['nmi']:.2f}, matched agreement {_percent(v['agreement'])} ({v['images']} images)"),
        ("DINO saliency peaks on the border ring", "saliency", lambda v:
         f"{_percent(v['border_share'])} of {v['images']} images (44 % if it peaked anywhere)"),
        ("classes on the foreground both see (validation, matched)", "classes", lambda v:
         f"agree on {_percent(v['agreement'])} of {v['foreground_pixels']} pixels, chance "
         f"{_percent(v['chance'])} (κ {v['kappa']:.2f}; 0: chance, 1: all agree)"),
    )
    rows = [[name, signals[key] if is_not_computed(signals[key]) else read(signals[key])]
            for name, key, read in measured if key in signals]
    rows.append(["models", "the synthetic stand-ins (they know only the demo's shapes)"
                 if signals.get("standins") else "as configured"])
    rows.append(["ground truth", "yes" if signals.get("ground_truth") else "none: no mIoU"])
    out += table(["signal", "value"], rows)
    count = len(signals.get("warnings") or [])
    return out + (f'<p class="note">{count} warning{"s" if count != 1 else ""} (top of the page). '
                  "Thresholds: docs/method.md, \"Label-free quality signals\".</p>")


def best_and_worst(r: Report) -> str:
    """The images whose predictions agree best and worst with the refined pseudo labels the
    model learned (foreground IoU, the label-free signal of each image): image, prediction over
    it, prediction, pseudo label. For runs whose predicted images have pseudo labels (a folder
    run predicts its train images); validation runs show their predictions against ground truth."""
    signals = r.json(r.run.quality_file) or {}
    if signals.get("ground_truth"):
        return ("<p>This run has ground truth: its predictions are shown against it "
                "(\"Predictions (validation images)\") and scored per class.</p>")
    agree = signals.get("agreement")
    if not isinstance(agree, dict) or not agree.get("per_image_foreground_iou"):
        return not_run("no image has both a prediction and a pseudo label with foreground "
                       "(report/quality.json)")
    ranked = sorted(agree["per_image_foreground_iou"].items(), key=lambda kv: (-kv[1], kv[0]))
    chosen = ranked if len(ranked) <= 2 * BEST_WORST else ranked[:BEST_WORST] + ranked[-BEST_WORST:]
    paths: dict[str, str] = {}
    for part in iter_row_groups(r.storage, r.run.label_stats_dir, ["id", "path"]):
        paths.update(zip(part.column("id").to_pylist(), part.column("path").to_pylist()))
    rows = []
    for image_id, iou in chosen:
        image = r.image(paths[image_id], exif_transpose=False) if image_id in paths else None
        pred = r.label(r.run.prediction_png(image_id))
        both = overlay(image, pred) if image is not None and pred is not None else None
        rows.append((f"{image_id} (IoU {iou:.2f})", [image, both, pred, r.label(r.run.label_png("refined", image_id))]))
    fig = label_grid(rows, ["image", "prediction over the image", "prediction", "refined pseudo label"])
    return (r.figure(fig, "best_worst_predictions.png", "best and worst predictions by agreement")
            + f"<p>Ranked by the foreground IoU of each prediction with the refined pseudo label it "
              f"learned from (images where neither has foreground left out): the "
              f"{min(BEST_WORST, len(ranked))} best first, then the worst. Colours are "
              "cluster ids (one palette in every picture of this report); black is background.</p>")
