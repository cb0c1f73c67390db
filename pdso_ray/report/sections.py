"""The sections of the run report (:mod:`pdso_ray.report.page`), in page order: :data:`SECTIONS`.

Each section is a function of the :class:`~pdso_ray.report.page.Report` returning HTML; it reads
the artifacts it shows through the run folder's layout and says "not run" when they are missing.
Label colours and image grids come from :mod:`pdso_ray.report.figures`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pdso_ray.data.imagenet_s import IGNORE_ID, VALIDATION
from pdso_ray.evaluation import apply_background_threshold, decode_fg
from pdso_ray.method.metrics import SIZE_BIN_NAMES
from pdso_ray.report.figures import class_colors, label_grid
from pdso_ray.report.page import Report, esc, fmt, not_run, sample, table
from pdso_ray.run_layout import LABEL_SUFFIX, png_rel
from pdso_ray.stages import STAGES
from pdso_ray.tables import column_values, iter_row_groups, parquet_files

log = logging.getLogger("pdso_ray")

MAX_GRID_ROWS = 8
MAX_REJECTED_ROWS = 200
MAX_BARS_BY_ID = 61  # per-class IoU drawn per id up to here (ImageNet-S50 + background)


def _overview(r: Report) -> str:
    summary = r.json(r.run.summary_file)
    val, test = r.json(r.run.eval_file("validation.json")), r.json(r.run.eval_file("test.json"))
    if summary is None and val is None:
        return not_run("no summary.json")
    rows = [["run folder", r.run.root]]
    for key in ("images_total", "images_ok", "images_rejected", "files_ignored"):
        if summary and key in summary:
            rows.append([key.replace("_", " "), summary[key]])
    if val is not None:
        rows += [["validation mIoU (%)", val["mIoU"]], ["validation Acc (%)", val.get("Acc")],
                 ["background threshold", val.get("threshold")],
                 ["validation images", val.get("num_images")]]
    if test is not None:
        rows += [["test mIoU (%)", test["mIoU"]], ["test images", test.get("num_images")]]
    return table(["", "value"], rows)


def _stages(r: Report) -> str:
    summary = (r.json(r.run.summary_file) or {}).get("stages", {})
    rows, seconds = [], {}
    # The report stage is still running while this is written: its row would be stale.
    for name in [s for s in STAGES if s != "report"]:
        manifest = r.storage.read_manifest(r.run.stage_dir(name)) or {}
        info = summary.get(name, {})
        status = info.get("status") or ("done" if manifest else "not run")
        secs = manifest.get("seconds", info.get("seconds"))
        counts = manifest.get("counts", info.get("counts")) or {}
        if isinstance(secs, (int, float)):
            seconds[name] = secs
        rows.append([name, status, secs, manifest.get("completed_at"),
                     ", ".join(f"{k}={fmt(v)}" for k, v in counts.items())])
    out = table(["stage", "status", "seconds", "completed", "counts"], rows)
    if seconds:
        fig = Figure(figsize=(8, 0.35 * len(seconds) + 0.8))
        ax = fig.subplots()
        names = list(seconds)[::-1]
        ax.barh(names, [seconds[n] for n in names], color="#4c78a8")
        ax.set_xlabel("seconds (last run of each stage)")
        out += r.figure(fig, "stage_seconds.png", "seconds per stage")
    return out


def _cluster_sizes(r: Report) -> str:
    c = r.cfg.data.classes if r.cfg else None
    series = {}
    for label, folder in (("k-means #1 (cluster/)", "cluster"), ("final (purify/)", "purify")):
        ids = column_values(r.storage, r.run.stage_dir(folder), "cluster")
        if ids is not None and ids.size:
            series[label] = np.bincount(ids.astype(np.int64),
                                        minlength=max(c or 0, int(ids.max()) + 1))
    if not series:
        return not_run("no cluster assignments in cluster/ or purify/")
    fig = Figure(figsize=(10, 3.4))
    ax_rank, ax_hist = fig.subplots(1, 2)
    top = max(int(sizes.max()) for sizes in series.values())
    median = max(1.0, max(float(np.median(sizes)) for sizes in series.values()))
    # A few huge clusters (what purification is for) squash a linear axis: go logarithmic.
    skewed = top > 20 * median
    if skewed:
        bins = np.geomspace(1, top + 1, 40)
    else:  # sizes are integers: unit-wide bins centred on them while that stays readable
        bins = np.arange(top + 2) - 0.5 if top <= 40 else 40
    rows = []
    for (label, sizes), colour in zip(series.items(), ("#f58518", "#4c78a8")):
        ranked = np.sort(sizes)[::-1]
        ax_rank.step(np.arange(1, ranked.size + 1), ranked, where="mid", color=colour,
                     label=label)
        ax_hist.hist(sizes, bins=bins, color=colour, alpha=0.6, label=label)
        rows.append([label, sizes.size, int(sizes.sum()), int((sizes == 0).sum()),
                     int(sizes.min()), float(np.median(sizes)), int(sizes.max())])
    ax_rank.set(xlabel="cluster rank (largest first)", ylabel="images")
    ax_hist.set(xlabel="cluster size (images)", ylabel="clusters")
    if skewed:
        ax_rank.set_yscale("symlog", linthresh=1)
        ax_hist.set_xscale("log")
    else:
        ax_rank.set_ylim(bottom=0)
    for axis in (ax_rank.xaxis, ax_hist.yaxis) + (() if skewed else (ax_rank.yaxis, ax_hist.xaxis)):
        axis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax_rank.legend(fontsize=8)
    out = r.figure(fig, "cluster_sizes.png", "cluster sizes")
    out += table(["assignment", "clusters", "images", "empty", "min", "median", "max"], rows)
    kept = column_values(r.storage, r.run.stage_dir("purify"), "kept")
    if kept is not None and kept.size:
        out += (f"<p>Purification kept {int(kept.sum())} of {kept.size} images "
                f"({100.0 * kept.mean():.1f} %) for the final k-means.</p>")
    return out


def _per_class_iou(r: Report) -> str:
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
    lowest = ", ".join(f"class {i}: {fmt(float(iou[i]))}" for i in worst)
    out += f"<p>Lowest IoU: {lowest}</p>"
    return out


def _threshold(r: Report) -> str:
    curve = r.json(r.run.eval_file("threshold_curve.json"))
    val = r.json(r.run.eval_file("validation.json"))
    if curve is None:
        if val is not None:
            return "<p>No sweep: the predictions came without foreground maps.</p>"
        return not_run("no eval/threshold_curve.json")
    ts = [p["threshold"] for p in curve]
    miou = [p["mIoU"] for p in curve]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.plot(ts, miou, "o-", color="#4c78a8", markersize=4)
    chosen = val.get("threshold") if val else None
    if chosen is not None:
        ax.axvline(chosen, color="#e45756", linestyle="--", label=f"chosen t = {chosen:g}")
        ax.legend(fontsize=8)
    ax.set(xlabel="background threshold t (foreground probability)", ylabel="validation mIoU (%)")
    return (r.figure(fig, "threshold_curve.png", "mIoU against background threshold")
            + f"<p>Pixels whose foreground probability is below t become background; "
              f"the best t on validation ({fmt(chosen)}) is applied to test.</p>")


def _train_grid(r: Report) -> str:
    stats = r.run.label_stats_dir
    if not parquet_files(r.storage, stats):
        return not_run("no labels/stats/")
    paths = {}
    for part in iter_row_groups(r.storage, stats, ["id", "path"]):
        paths.update(zip(part.column("id").to_pylist(), part.column("path").to_pylist()))
    rows = []
    for image_id in sample(list(paths), MAX_GRID_ROWS):
        image = r.image(paths[image_id], exif_transpose=True)
        rows.append((image_id, [image, r.label(r.run.label_png("raw", image_id)),
                                r.label(r.run.label_png("refined", image_id))]))
    fig = label_grid(rows, ["image", "raw label", "refined label"])
    return (r.figure(fig, "train_labels.png", "train images with raw and refined labels")
            + "<p>Label colours are cluster ids (train images have no ground truth); "
              "black is background, white ignore.</p>")


def _validation_grid(r: Report) -> str:
    pred_dir = r.run.predictions_dir(VALIDATION)
    rels = list(r.storage.list_relative(pred_dir, LABEL_SUFFIX))
    if not rels:
        return not_run("no predictions/validation/")
    val = r.json(r.run.eval_file("validation.json")) or {}
    threshold = val.get("threshold")
    match = r.json(r.run.eval_file("match.json"))
    lut = None
    if match is not None:
        lut = np.arange(IGNORE_ID + 1)
        for p, g in match.items():
            lut[int(p)] = int(g)
    images, gt_dir = {}, None
    if r.data is not None:
        gt_dir = r.data.gt_dir(r.storage, VALIDATION)
        try:
            listing = r.data.list_split(r.storage, VALIDATION)
            images = {png_rel(rec.id): rec.path for rec in listing.images}
        except FileNotFoundError:
            log.warning("report: validation images not found under %s", r.data.split_url(VALIDATION))
    rows = []
    for rel in sample(rels, MAX_GRID_ROWS):
        pred = r.label(r.storage.join(pred_dir, rel))
        fg_url = r.storage.join(r.run.foreground_dir(VALIDATION), rel)
        if pred is not None and threshold is not None and r.storage.exists(fg_url):
            pred = apply_background_threshold(pred, decode_fg(r.storage.read_bytes(fg_url)),
                                              threshold)
        if pred is not None and lut is not None:
            pred = lut[np.clip(pred, 0, IGNORE_ID)]
        gt = None if gt_dir is None else r.label(r.storage.join(gt_dir, rel))
        image = r.image(images[rel], exif_transpose=False) if rel in images else None
        rows.append((rel[:-4], [image, pred, gt]))
    how = (f"background threshold {threshold:g}, " if threshold is not None else "") + (
        "ids mapped to GT classes by the validation matching" if lut is not None
        else "raw predicted ids (no matching yet)")
    fig = label_grid(rows, ["image", "prediction", "ground truth"])
    return (r.figure(fig, "validation_predictions.png", "validation predictions and GT")
            + f"<p>Prediction: {esc(how)}. Black is background, white ignore.</p>")


def _rejected(r: Report) -> str:
    folder = r.run.rejected_dir
    if not parquet_files(r.storage, folder):
        if r.storage.read_manifest(r.run.stage_dir("features")) is not None:
            return "<p>No image was rejected.</p>"
        return not_run("the features stage has not completed")
    reasons: Counter[str] = Counter()
    rows = []
    for part in iter_row_groups(r.storage, folder, ["id", "path", "reason"]):
        for image_id, path, reason in zip(*(part.column(c).to_pylist()
                                            for c in ("id", "path", "reason"))):
            reasons[reason] += 1
            if len(rows) < MAX_REJECTED_ROWS:
                rows.append([image_id, path, reason])
    total = sum(reasons.values())
    out = f"<p>{total} image{'s' if total != 1 else ''} rejected.</p>"
    out += table(["reason", "images"], [[k, v] for k, v in reasons.most_common()])
    out += table(["id", "path", "reason"], rows)
    if total > len(rows):
        out += f"<p>... and {total - len(rows)} more (all in <code>rejected/*.parquet</code>).</p>"
    return out


def _configuration(r: Report) -> str:
    url = r.run.config_file
    if not r.storage.exists(url):
        return not_run("no config.yaml")
    # config.yaml is written with secrets already redacted (config.dump_yaml).
    text = esc(r.storage.read_text(url))
    return f"<details><summary>config.yaml</summary><pre>{text}</pre></details>"


SECTIONS: list[tuple[str, Callable[[Report], str]]] = [
    ("Overview", _overview), ("Stages", _stages), ("Cluster sizes", _cluster_sizes),
    ("Per-class IoU (validation)", _per_class_iou), ("Background threshold", _threshold),
    ("Pseudo labels (train images)", _train_grid),
    ("Predictions (validation images)", _validation_grid),
    ("Rejected images", _rejected), ("Configuration", _configuration),
]
