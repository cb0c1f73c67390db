"""The report's sections on the final predictions, as a person sees them:

- the validation predictions against ground truth, the best and the worst images by their own
  mIoU (``eval/validation_images.json``; a deterministic sample before the evaluate stage ran);
- the confusion matrix of validation pixels (``eval/confusion.npy``), GT class × matched class;
- PDSO and LightCluster on the same images, when both ran in the run folder (``make demo``);
- where the colour previews and overlays of the label PNGs are (``previews``).

Colours are the one palette of the project (:mod:`pdso_ray.method.overlay`), the previews' too.
"""

from __future__ import annotations

import posixpath

import numpy as np
from matplotlib.figure import Figure

from pdso_ray.data.ids import id_from_png_rel, split_of
from pdso_ray.data.imagenet_s import TEST, VALIDATION
from pdso_ray.data.sources import ALL
from pdso_ray.plan import METHODS
from pdso_ray.report.base import Report, esc, fmt, not_run, sample, table
from pdso_ray.report.figures import label_grid, overlay
from pdso_ray.report.quality import class_names, legend, mapped_label, match_lut
from pdso_ray.run_layout import PREVIEW_KINDS
from pdso_ray.tables import iter_row_groups, load_array

BEST_WORST = 4  # validation images shown at each end
SIDE_BY_SIDE_ROWS = 6
MAX_MATRIX_CLASSES = 61  # a drawn matrix up to here (ImageNet-S50 + background); a table beyond
TOP_CONFUSIONS = 10


def image_paths(r: Report, ids: set[str]) -> dict[str, str]:
    """``{image id: image URL}`` of ``ids``: from the features table (train images: a folder run's
    ``all``), then from a listing of the splits of the ids not found there."""
    found: dict[str, str] = {}
    if any(split_of(i) not in (VALIDATION, TEST) for i in ids):  # the features hold no evaluation split
        for part in iter_row_groups(r.storage, r.run.features_dir, ["id", "path"]):
            for image_id, path in zip(part.column("id").to_pylist(), part.column("path").to_pylist()):
                if image_id in ids:
                    found[image_id] = path
    for split in sorted({split_of(i) for i in ids - set(found)}):
        listed = r.split_images(split) or {}
        found.update((i, listed[i]) for i in ids if i in listed)
    return found


def _with_overlay(image: np.ndarray | None, label: np.ndarray | None) -> np.ndarray | None:
    return overlay(image, label) if image is not None and label is not None else None


def validation_grid(r: Report) -> str:
    predictions = r.pngs(r.run.predictions_dir(VALIDATION))
    if not predictions:
        return not_run("no predictions/validation/")
    lut = match_lut(r.json(r.run.eval_file("match.json")))
    scores = r.json(r.run.validation_image_scores) or {}
    scores = {rel: v for rel, v in scores.items() if rel in predictions}
    if scores:
        ranked = sorted(scores, key=lambda rel: (-scores[rel], rel))
        chosen = ranked if len(ranked) <= 2 * BEST_WORST else ranked[:BEST_WORST] + ranked[-BEST_WORST:]
    else:
        chosen = sample(sorted(predictions), 2 * BEST_WORST)
    gt_pngs = r.pngs(r.data.gt_dir(r.storage, VALIDATION) if r.data is not None else None)
    paths = image_paths(r, {id_from_png_rel(VALIDATION, rel) for rel in chosen})
    rows, shown = [], set()
    for rel in chosen:
        pred = mapped_label(r.label(predictions[rel]), lut)
        gt = r.label(gt_pngs.get(rel))
        for lab in (pred, gt):
            if lab is not None:
                shown.update(np.unique(lab).tolist())
        path = paths.get(id_from_png_rel(VALIDATION, rel))
        image = r.image(path, exif_transpose=False) if path else None
        name = rel[:-4] + (f" (mIoU {scores[rel]:.1f})" if rel in scores else "")
        rows.append((name, [image, _with_overlay(image, pred), pred, gt]))
    how = ("ids mapped to ground-truth classes by the validation matching" if lut is not None
           else "raw predicted ids (no matching yet)")
    order = (f"the {min(BEST_WORST, len(scores))} best by their own mIoU first, then the worst"
             if scores else "a sample (no per-image scores yet: the evaluate stage writes them)")
    fig = label_grid(rows, ["image", "prediction over the image", "prediction (argmax over C+1)", "ground truth"])
    named = ""
    if scores:
        ends = (("Best", chosen[:BEST_WORST]), ("worst", chosen[BEST_WORST:][::-1])) if len(chosen) > BEST_WORST \
            else (("Ranked", chosen),)
        named = "; ".join(f"{what}: " + ", ".join(f"{rel[:-4]} ({scores[rel]:.1f})" for rel in rels)
                          for what, rels in ends)
        named = f'<p class="note">{esc(named)} (mIoU % of each image alone, eval/validation_images.json).</p>'
    return (r.figure(fig, "validation_predictions.png", "validation predictions and GT")
            + f"<p>Prediction: {esc(how)}; {esc(order)}. Black is background, white ignore.</p>"
            + named + legend(shown, class_names(r)))


def confusion_matrix(r: Report) -> str:
    """Where each ground-truth class's pixels went: rows GT classes, columns matched predicted
    classes, each row divided by its pixels."""
    url = r.run.confusion_file
    if not r.storage.exists(url):
        return not_run("no eval/confusion.npy (needs validation ground truth)")
    counts = load_array(r.storage, url).astype(np.float64).T  # stored predicted × GT
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    names = class_names(r)
    k = share.shape[0]

    def name(i: int) -> str:
        return "background" if i == 0 else names.get(i, f"class {i}")

    if k <= MAX_MATRIX_CLASSES:
        side = min(9.0, 2.0 + 0.28 * k)
        fig = Figure(figsize=(side + 1.2, side))
        ax = fig.subplots()
        shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ticks = np.arange(k)
        labels = [str(i) for i in ticks]
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        if k <= 12:  # the shares themselves, while they fit in a cell
            for i in range(k):
                for j in range(k):
                    if share[i, j] >= 0.005:
                        ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if share[i, j] > 0.6 else "#222222")
        ax.set(xlabel="predicted class (matched to GT ids; 0 background)", ylabel="ground-truth class")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the GT class's pixels")
        fig.tight_layout()
        out = r.figure(fig, "confusion_matrix.png", "confusion matrix of validation pixels")
    else:
        out = f"<p>{k} classes: too many to draw; the largest confusions follow.</p>"
    off = share.copy()
    np.fill_diagonal(off, 0)
    worst = np.argsort(off, axis=None)[::-1][:TOP_CONFUSIONS]
    rows = [[name(int(g)), name(int(p)), f"{100 * off[g, p]:.1f} %"]
            for g, p in zip(*np.unravel_index(worst, off.shape)) if off[g, p] >= 0.0005]  # shows as 0.1 %
    if rows:
        out += table(["ground truth", "predicted as", "share of its pixels"], rows)
    return out + ('<p class="note">Rows: the validation pixels of each ground-truth class (ignore left '
                  "out); columns: the class they were predicted as, after the Hungarian matching. "
                  "The diagonal is what was right.</p>")


def _prediction_sources(r: Report) -> list[str]:
    """The splits whose predictions the report looks for, in order."""
    if r.data is not None:
        try:
            return [info.split for info in r.data.eval_splits(r.storage) if info.present]
        except (FileNotFoundError, ValueError):
            pass
    return [VALIDATION, ALL]


def methods_side_by_side(r: Report) -> str:
    """The same images predicted by both methods, each over the image (and ground truth when
    there is some), when both ran in this run folder."""
    layouts = [r.run.for_method(m) for m in METHODS]
    for split in _prediction_sources(r):
        found = [r.pngs(layout.predictions_dir(split)) for layout in layouts]
        common = sorted(set.intersection(*(set(f) for f in found)))
        if common:
            break
    else:
        ran = [m for m, layout in zip(METHODS, layouts) if r.storage.exists(layout.predictions_root)]
        if len(ran) != 1:
            return not_run("no predictions of both methods on the same images in this run folder")
        other = next(m for m in METHODS if m not in ran)
        return (f"<p>Only {esc(ran[0])} predicted in this run folder. Run the same config with "
                f"<code>--set method={esc(other)}</code> (as <code>make demo</code> does) to see both "
                "on the same images.</p>")
    gt_pngs = r.pngs(r.data.gt_dir(r.storage, split) if r.data is not None else None)
    luts = [match_lut(r.json(layout.eval_file("match.json"))) for layout in layouts]
    mapped = gt_pngs and all(lut is not None for lut in luts)
    chosen = sample(common, SIDE_BY_SIDE_ROWS)
    paths = image_paths(r, {id_from_png_rel(split, rel) for rel in chosen})
    rows, shown = [], set()
    for rel in chosen:
        path = paths.get(id_from_png_rel(split, rel))
        image = r.image(path, exif_transpose=False) if path else None  # as predicted
        labels = [r.label(f[rel]) for f in found]
        if mapped:
            labels = [mapped_label(label, lut) for label, lut in zip(labels, luts)]
        gt = [r.label(gt_pngs.get(rel))] if gt_pngs else []
        rows.append((rel[:-4], [image, *[p for label in labels for p in (_with_overlay(image, label), label)], *gt]))
        for label in (*labels, *gt):
            if label is not None:
                shown.update(np.unique(label).tolist())
    titles = ["image", *[f"{m} {what}" for m in METHODS for what in ("over the image", "prediction")]]
    titles += ["ground truth"] if gt_pngs else []
    colours = ("ids mapped to ground-truth classes by each method's own validation matching, so "
               "the same colour is the same class" if mapped else
               "each method's own ids: the two methods number their classes independently, so the "
               "same colour need not mean the same class")
    return (r.figure(label_grid(rows, titles), "methods_side_by_side.png", "both methods on the same images")
            + f"<p>{len(common)} images of split {esc(split)} predicted by both methods ({len(chosen)} shown). "
              f"Colours: {esc(colours)}.</p>" + (legend(shown, class_names(r)) if mapped else ""))


def previews(r: Report) -> str:
    """Where the colour previews and overlays of the label PNGs are, relative to this page."""
    # the train pseudo labels (a folder run's split is "all") and the predictions of every split
    labelled = [(kind, split) for kind in PREVIEW_KINDS if kind != "predictions" for split in ("train", ALL)]
    labelled += [("predictions", split) for split in _prediction_sources(r)]
    rows = []
    for kind, split in labelled:
        for what, folder in (("colour", r.run.colour_dir(kind, split)), ("overlay", r.run.overlay_dir(kind, split))):
            if r.storage.exists(folder):
                link = posixpath.relpath(folder, r.run.report_dir)
                rows.append(f"<tr><td>{esc(kind)}</td><td>{esc(split)}</td><td>{esc(what)}</td>"
                            f'<td><a href="{esc(link)}/">{esc(link)}/</a></td></tr>')
    mode = r.cfg.previews if r.cfg is not None else None
    note = ('<p class="note">Label PNGs hold ids (id = R + 256·G), which look black in an image viewer; '
            "beside each folder of them, <code>&lt;split&gt;_colour/</code> holds the same labels in "
            "this report's colours and <code>&lt;split&gt;_overlay/</code> the images with them blended "
            f"in (config <code>previews</code>: {esc(fmt(mode))}; docs/architecture.md, \"Previews\").</p>")
    if not rows:
        why = ("previews: none" if mode == "none" else
               "output_format: webdataset writes none unless previews: files" if mode == "auto" and
               r.cfg is not None and r.cfg.output_format == "webdataset" else "no labels with previews yet")
        return note + not_run(why)
    return (note + "<table><tr><th>labels</th><th>split</th><th>preview</th><th>folder</th></tr>"
            + "".join(rows) + "</table>")

