"""The report's quality sections: what each stage adds, measured (docs/method.md, "Measuring
quality").

- both methods side by side when both ran on the run folder;
- the ablation: validation mIoU of each labelling step (PDSO: raw pseudo labels, refined ones;
  LightCluster: each level's mask, consistent, refined) and the final model, per method, with the
  image-level purity row beside it;
- image-level diagnostics of every clustering step against the class folders (which the method
  never reads), as a table and one plot across the steps;
- the saliency threshold t and SPO's σ chosen on validation, with their curves;
- the validation images whose pseudo labels refinement helped and hurt most;
- per-class IoU and the threshold rule (when predicted); the validation predictions are in
  :mod:`~pdso_ray.report.predictions`.

Label colours in every picture are ground-truth classes (predicted ids mapped through the matching
that scored them), with a legend of class folders (and names, when the dataset has a
``class_names.txt`` of ``wnid name`` lines, as ImageNet's ``LOC_synset_mapping.txt``).
"""

from __future__ import annotations

import logging
import math
import posixpath
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pdso_ray.data.ids import png_rel
from pdso_ray.data.imagenet_s import IGNORE_ID, VALIDATION
from pdso_ray.measuring import is_not_computed
from pdso_ray.method.metrics import SIZE_BIN_NAMES
from pdso_ray.plan import METHODS, SHARED_STAGES
from pdso_ray.report.base import Report, esc, fmt, not_run, table
from pdso_ray.report.figures import class_colors, label_grid
from pdso_ray.run_layout import IMAGE_DIAGNOSTIC_STEPS as IMAGE_STEPS

log = logging.getLogger("pdso_ray")

GAIN_LOSS_ROWS = 6
MAX_BARS_BY_ID = 61  # per-class IoU drawn per id up to here (ImageNet-S50 + background)
STEP_NAMES = {"cluster": "k-means #1", "denoise_s1": "S1 (small loss under f)",
              "denoise_relabel": "relabelling (what DFF passes on)", "denoise_s2": "S2 (small loss under g)",
              "purify_kmeans2": "k-means #2", "purify_kept": "purified (kept) set",
              "purify_final": "final assignment"}
_DIAGNOSTIC_NOTE = ("These diagnostics score the method against the ImageNet-S class folders "
                    "(wnids) of the train images, which the method itself never reads.")


def _summary(r: Report) -> dict[str, Any]:
    return r.json(r.run.summary_file) or {}


def match_lut(match: dict[str, int] | None) -> np.ndarray | None:
    """Predicted id → GT id lookup (ids without an entry keep their value)."""
    if match is None:
        return None
    lut = np.arange(IGNORE_ID + 1)
    for p, g in match.items():
        lut[int(p)] = int(g)
    return lut


def mapped_label(label: np.ndarray | None, lut: np.ndarray | None) -> np.ndarray | None:
    if label is None or lut is None:
        return label
    return lut[np.clip(label, 0, IGNORE_ID)]


def class_names(r: Report) -> dict[int, str]:
    """GT id → ``"wnid (name)"`` (or the wnid alone), from the validation ground-truth folders
    (ids follow the sorted folder names, the ImageNet-S convention) and the dataset's optional
    ``class_names.txt``."""
    if r.data is None or not hasattr(r.data, "dataset_url"):
        return {}
    gt_dir = r.data.gt_dir(r.storage, VALIDATION)
    if gt_dir is None:
        return {}
    wnids = sorted({rel.split("/", 1)[0] for rel in r.pngs(gt_dir)})
    names: dict[str, str] = {}
    names_url = r.storage.join(r.data.dataset_url, "class_names.txt")
    if r.storage.exists(names_url):
        for line in r.storage.read_text(names_url).splitlines():
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                names[wnid] = name.strip()
    return {i: f"{w} ({names[w]})" if names.get(w) else w for i, w in enumerate(wnids, start=1)}


def legend(ids, names: dict[int, str]) -> str:
    """An HTML legend: a swatch of each id's colour and its class."""
    colours = class_colors()
    items = []
    for i in sorted({int(i) for i in ids if 0 <= int(i) <= IGNORE_ID}):
        what = "background" if i == 0 else "ignore" if i == IGNORE_ID else names.get(i, f"class {i}")
        r_, g, b = colours[i]
        items.append(f'<span style="white-space:nowrap"><span style="display:inline-block;width:1em;'
                     f'height:1em;background:rgb({r_},{g},{b});border:1px solid #999"></span> '
                     f'{i}: {esc(what)}</span>')
    return '<p class="note">' + " &nbsp; ".join(items) + "</p>" if items else ""


# ---- the methods side by side, the ablation and the image-level diagnostics -----------------------
def _method_summaries(r: Report) -> list[tuple[str, dict[str, Any]]]:
    """``(method, summary.json)`` of every method that ran in this run folder, this report's first."""
    others = [m for m in METHODS if m != r.run.method]
    found = []
    for method in (r.run.method, *others):
        summary = r.json(r.run.for_method(method).summary_file)
        if summary:
            found.append((method, summary))
    return found


def methods(r: Report) -> str:
    """Both methods' numbers when both ran on this run folder's data (they share its features and
    k-means #1)."""
    found = _method_summaries(r)
    if not found:
        return not_run("no summary.json")
    if len(found) < 2:
        other = [m for m in METHODS if m != r.run.method]
        return (f"<p>Only {esc(r.run.method)} ran on this run folder. Run the same config with "
                f"<code>--set method={esc(other[0])}</code> to compare on the same data and features.</p>")
    rows = []
    for method, summary in found:
        stages = summary.get("stages", {})
        seconds = sum(info.get("seconds", 0) for name, info in stages.items()
                      if info.get("status") == "done" and name not in SHARED_STAGES)
        page = "index.html" if method == r.run.method else \
            posixpath.relpath(r.run.for_method(method).report_file("index.html"), r.run.report_dir)
        rows.append([f'<a href="{esc(page)}">{esc(method)}</a>', summary.get("mIoU"), summary.get("mIoU_test"),
                     seconds])
    head = ["method", "validation mIoU (%)", "test mIoU (%)", "seconds of its own stages (last run)"]
    body = "".join("<tr>" + "".join(f"<td>{c if i == 0 else esc(fmt(c))}</td>" for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return (f"<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>{body}</table>"
            '<p class="note">Same images, same DINO features and the same k-means #1 (the shared stages '
            "at the top of the run folder); mIoU with the official rule (argmax over C+1, Hungarian "
            "matching on validation).</p>")


def ablation(r: Report) -> str:
    found = _method_summaries(r)
    if not found:
        return not_run("no diagnostics in summary.json (the evaluate stage scores the ablation)")
    out = ""
    for method, summary in found:
        diag = summary.get("diagnostics", {})
        steps = diag.get("ablation")
        image = diag.get("image", {})
        if len(found) > 1:
            out += f"<h3>{esc(method)}</h3>"
        if not steps and not image:
            out += not_run("no diagnostics in summary.json (the evaluate stage scores the ablation)")
            continue
        if is_not_computed(steps):
            out += f"<p>Ablation: {esc(steps)}</p>"
        elif steps:
            out += table(["step", "validation mIoU (%)"], [[s["step"], s["mIoU"]] for s in steps])
        scored = {k: v for k, v in image.items() if isinstance(v, dict)}
        if scored and method == "pdso":
            row = " → ".join(f"{STEP_NAMES[k]} {scored[k]['purity']:.3f}" for k in IMAGE_STEPS if k in scored)
            out += f"<p><b>Image-level purity</b> (train images): {esc(row)}</p>"
            out += f'<p class="note">{esc(_DIAGNOSTIC_NOTE)}</p>'
        lightcluster = diag.get("lightcluster", {})
        levels = lightcluster.get("levels")
        if is_not_computed(levels):
            out += f"<p>LightCluster masks on validation: {esc(levels)}</p>"
        elif levels:
            out += table(["LightCluster mask", "validation mIoU (%)", "foreground IoU"],
                         [[v["mask"], v["mIoU"], v["fg_iou"]] for v in levels])
        classes = lightcluster.get("classes")
        if is_not_computed(classes):
            out += f"<p>LightCluster labelling against the class folders: {esc(classes)}</p>"
        elif classes:
            out += (f"<p><b>LightCluster labelling</b> (train images, against the class folders): purity "
                    f"{classes['purity']:.3f}, NMI {classes['nmi']:.3f}</p>")
    return out


def image_diagnostics(r: Report) -> str:
    image = _summary(r).get("diagnostics", {}).get("image", {})
    if not image:
        if r.cfg is not None and not r.data.folder_is_class:
            return "<p>Not computed: this run's images have no class folders to score against.</p>"
        return not_run("no diagnostics.image in summary.json")
    missing = {k: v for k, v in image.items() if not isinstance(v, dict)}
    steps = [k for k in IMAGE_STEPS if isinstance(image.get(k), dict)]
    rows = [[STEP_NAMES[k], image[k]["purity"], image[k]["nmi"], image[k]["accuracy"], image[k]["images"]]
            for k in steps]
    rows += [[STEP_NAMES.get(k, k), str(v), "", "", ""] for k, v in missing.items()]
    if not steps:
        return (f'<p class="note">{esc(_DIAGNOSTIC_NOTE)}</p>'
                + table(["step", "purity", "NMI", "Hungarian accuracy", "images"], rows))
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    x = np.arange(len(steps))
    for metric, colour in (("purity", "#4c78a8"), ("nmi", "#f58518"), ("accuracy", "#54a24b")):
        ax.plot(x, [image[k][metric] for k in steps], "o-", color=colour, label=metric)
    ax.set_xticks(x, [STEP_NAMES[k] for k in steps], rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.02), ylabel="score")
    ax.legend(fontsize=8)
    return (f'<p class="note">{esc(_DIAGNOSTIC_NOTE)}</p>' + _rules(r)
            + table(["step", "purity", "NMI", "Hungarian accuracy", "images"], rows)
            + r.figure(fig, "image_diagnostics.png", "image-level purity, NMI and accuracy per step"))


def _rules(r: Report) -> str:
    """One line naming the denoising profile and the rules that decide these steps."""
    if r.cfg is None:
        return ""
    d, p = r.cfg.denoise, r.cfg.purify
    rules = (f"DFF {'on' if d.dff else 'off'}, h on {d.h_rows}, backbone blocks tuned {d.finetune_blocks}, "
             f"k-means #2/#3 in the {d.space} space from {p.init}, CSD rules {'on' if p.filter else 'off'}")
    return f"<p>Rules: <code>denoise.profile: {esc(d.profile)}</code> ({esc(rules)}; docs/method.md §3).</p>"


# ---- pseudo labels on validation -------------------------------------------------------------------
def pseudo_label_choice(r: Report) -> str:
    choice = r.json(r.run.eval_file("pseudo_label_threshold.json"))
    if choice is None:
        return not_run("no eval/pseudo_label_threshold.json")
    if choice["source"] == "fallback":
        why = f"The validation sweep was {choice['sweep']}" if choice.get("sweep") else "No validation ground truth"
        return (f"<p>{esc(why)}: t = {choice['threshold']:g} and σ = "
                f"{choice['sigma']:g} are the configured or published values, not chosen on validation.</p>")
    out, fig = "", Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 2)
    for ax, key, name, unit in ((axes[0], "curve", "threshold", "saliency threshold t"),
                                (axes[1], "sigma_curve", "sigma", "SPO secondary-class distance σ")):
        points = choice.get(key) or []
        if points:
            ax.plot([p[name] for p in points], [p["mIoU"] for p in points], "o-", color="#4c78a8", markersize=4,
                    label="mIoU")
            fg = [(p[name], p["saliency_foreground_IoU"]) for p in points
                  if p.get("saliency_foreground_IoU") is not None]
            if fg:  # the saliency's own foreground IoU at each t: how well it finds objects at all
                ax.plot(*zip(*fg), "s:", color="#54a24b", markersize=3, label="saliency foreground IoU")
            ax.axvline(choice[name], color="#e45756", linestyle="--", label=f"chosen {choice[name]:g}")
            ax.legend(fontsize=8)
        ax.set(xlabel=unit, ylabel="validation (%)")
    out += r.figure(fig, "pseudo_label_curves.png", "validation mIoU of pseudo labels against t and sigma")
    source = choice["source"]
    chosen_fg = next((p.get("saliency_foreground_IoU") for p in choice.get("curve") or []
                      if p["threshold"] == choice["threshold"]), None)
    share = choice.get("sigma_secondary_share")
    out += (f"<p>Raw pseudo labels: t = {choice['threshold']:g} ({esc(source['threshold'])})"
            + (f", where the saliency's foreground IoU is {chosen_fg:.1f}%" if chosen_fg is not None else "")
            + f"; refined: σ = {choice['sigma']:g} ({esc(source['sigma'])})"
            + (f", which gives {100 * share:.0f}% of the train images a secondary class" if share is not None else "")
            + ". Each point is the official protocol on the validation pseudo labels (its own Hungarian "
            "matching).</p>")
    return out


def pseudo_label_gains(r: Report) -> str:
    report = r.json(r.run.eval_file("pseudo_labels.json"))
    if report is None:
        return not_run("no eval/pseudo_labels.json (validation pseudo labels need validation ground truth)")
    scored = {rel: s for rel, s in report["images"].items()
              if s.get("refined") is not None and not math.isnan(s["raw"]) and not math.isnan(s["refined"])}
    if not scored:
        return "<p>No validation image could be scored.</p>"
    by_gain = sorted(scored, key=lambda rel: scored[rel]["refined"] - scored[rel]["raw"])
    n = min(GAIN_LOSS_ROWS, len(by_gain) // 2 or 1)
    picks = [("largest gain", rel) for rel in by_gain[::-1][:n]] + [("largest loss", rel) for rel in by_gain[:n]]
    gt = r.pngs(r.data.gt_dir(r.storage, VALIDATION) if r.data is not None else None)
    images = _validation_images(r)
    raw_lut, refined_lut = match_lut(report["raw"]["match"]), match_lut(report["refined"]["match"])
    raw_labels, refined_labels = r.pngs(r.run.label_dir("raw", VALIDATION)), r.pngs(report["refined"]["dir"])
    rows, shown = [], set()
    for kind, rel in picks:
        raw = mapped_label(r.label(raw_labels.get(rel)), raw_lut)
        refined = mapped_label(r.label(refined_labels.get(rel)), refined_lut)
        gt_label = r.label(gt.get(rel))
        image = r.image(images[rel], exif_transpose=False) if rel in images else None
        for lab in (raw, refined, gt_label):
            if lab is not None:
                shown.update(np.unique(lab).tolist())
        s = scored[rel]
        rows.append((f"{kind}: {rel[:-4]}  {s['raw']:.2f}→{s['refined']:.2f}", [image, raw, refined, gt_label]))
    fig = label_grid(rows, ["image", "raw", f"refined ({report['refined']['method']})", "ground truth"])
    return (f"<p>Validation mIoU: raw {report['raw']['mIoU']:.2f}, refined {report['refined']['mIoU']:.2f}. "
            f"The {n} images refinement helped most and the {n} it hurt most (per-image pixel accuracy, "
            "each label mapped to ground-truth classes by its own matching).</p>"
            + r.figure(fig, "pseudo_label_gains.png", "pseudo labels that refinement helped and hurt most")
            + legend(shown, class_names(r)))


def _validation_images(r: Report) -> dict[str, str]:
    """``{<wnid>/<stem>.png: image URL}`` of the validation images, {} when not reachable."""
    if r.data is None:
        return {}
    listed = r.split_images(VALIDATION)
    if listed is None:
        log.warning("report: validation images not reachable")
        return {}
    return {png_rel(image_id): path for image_id, path in listed.items()}


# ---- the final model -------------------------------------------------------------------------------
def per_class_iou(r: Report) -> str:
    val = r.json(r.run.eval_file("validation.json"))
    if val is None:
        return not_run("no eval/validation.json")
    iou = np.array([np.nan if v is None else v for v in val["IoU"]], dtype=float)
    test = r.json(r.run.eval_file("test.json"))
    fig = Figure(figsize=(10, 3.4))
    ax = fig.subplots()
    if iou.size <= MAX_BARS_BY_ID:
        ids = np.arange(iou.size)
        ax.bar(ids, iou, color=class_colors()[ids] / 255.0, edgecolor="#444444", linewidth=0.5)
        if test is not None:
            ax.plot(ids, [np.nan if v is None else v for v in test["IoU"]], "k.", label="test")
        ax.set_xticks(ids)
        ax.set_xlabel("class id (0 = background; colours as in the pictures below)")
    else:
        # Hundreds of one-pixel bars by id read as noise; sorted, they show the distribution.
        ranked = np.sort(np.nan_to_num(iou, nan=0.0))[::-1]
        ax.fill_between(np.arange(1, ranked.size + 1), ranked, step="mid", color="#4c78a8")
        ax.set_xlabel(f"classes sorted by IoU ({iou.size} incl. background)")
    ax.axhline(val["mIoU"], color="#888888", linestyle="--", label=f"mIoU {val['mIoU']:.2f}")
    ax.set(ylabel="IoU (%)", ylim=(0, 100))
    ax.legend(fontsize=8, loc="upper right")
    out = r.figure(fig, "iou_per_class.png", "per-class IoU")
    size_miou = val.get("size_mIoU") or {}
    bins = [b for b in SIZE_BIN_NAMES if b in size_miou]  # JSON sorted them by name
    out += table(["mIoU", "Acc", "PixelAcc", *[f"mIoU {b}" for b in bins], "images"],
                 [[val["mIoU"], val.get("Acc"), val.get("PixelAcc"),
                   *[size_miou[b] for b in bins], val.get("num_images")]])
    worst = np.argsort(np.nan_to_num(iou, nan=-1.0))[:5]
    names = class_names(r)
    lowest = ", ".join(f"{names.get(int(i), f'class {i}') if i else 'background'}: {fmt(float(iou[i]))}"
                       for i in worst)
    return out + f"<p>Lowest IoU: {esc(lowest)}</p>"


def threshold_rule(r: Report) -> str:
    curve = r.json(r.run.eval_file("threshold_curve.json"))
    tuned = r.json(r.run.eval_file("validation_threshold.json"))
    if r.json(r.run.eval_file("validation.json")) is None:
        return not_run("no eval/validation.json")
    if curve is None or tuned is None:
        return ("<p>Not used (<code>predict.background: argmax</code>): the official rule, argmax "
                "over the C+1 outputs, is the only decision.</p>")
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.plot([p["threshold"] for p in curve], [p["mIoU"] for p in curve], "o-", color="#4c78a8", markersize=4)
    ax.axvline(tuned["threshold"], color="#e45756", linestyle="--", label=f"best t = {tuned['threshold']:g}")
    ax.legend(fontsize=8)
    ax.set(xlabel="background threshold t (foreground probability)", ylabel="validation mIoU (%)")
    official = r.json(r.run.eval_file("validation.json")) or {}
    return (r.figure(fig, "threshold_curve.png", "mIoU of the threshold rule against t")
            + f"<p>PASS's foreground-threshold rule: {tuned['mIoU']:.2f} at t = {tuned['threshold']:g}, "
              f"<b>tuned on validation ground truth</b> — beside, not instead of, the official "
              f"{fmt(official.get('mIoU'))}.</p>")
