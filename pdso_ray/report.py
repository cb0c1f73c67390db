"""The run report: ``report/index.html`` with PNG plots and label grids beside it.

:func:`build_report` reads what the run folder holds — ``summary.json`` and stage manifests,
``cluster/`` and ``purify/`` assignments, ``eval/*.json``, ``labels/``, ``predictions/``,
``rejected/``, ``config.yaml`` — and writes a static page that opens from any file browser or
bucket. Each section stands alone: a missing artifact makes its section say "not run", and an
unreadable one says why, without stopping the others.

Label colours and the image grids come from :mod:`pdso_ray.report_figures`. Figures are drawn
with matplotlib's object API (``Figure`` on the Agg canvas), which sets no global backend.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pdso_ray.config import STAGES, PipelineConfig
from pdso_ray.data.decode import decode_image
from pdso_ray.data.imagenet_s import IGNORE_ID, VALIDATION, dataset_dir, decode_label, list_split
from pdso_ray.evaluation import relative_pngs
from pdso_ray.export import load_run_config
from pdso_ray.method.metrics import SIZE_BIN_NAMES
from pdso_ray.stages.evaluate import (
    EVAL_DIR,
    FG_SUFFIX,
    PREDICTIONS_DIR,
    apply_background_threshold,
    decode_fg,
)
from pdso_ray.report_figures import PANEL_SIDE, class_colors, label_grid
from pdso_ray.storage import Storage
from pdso_ray.tables import iter_row_groups, parquet_files

log = logging.getLogger("pdso_ray")

REPORT_DIR = "report"
MAX_GRID_ROWS = 8
MAX_REJECTED_ROWS = 200
MAX_BARS_BY_ID = 61  # per-class IoU drawn per id up to here (ImageNet-S50 + background)
def build_report(storage: Storage, run_url: str, cfg: PipelineConfig | None = None) -> str:
    """Write ``report/index.html`` and its PNGs under ``run_url``; return the page's URL.

    ``cfg`` locates the dataset (images and GT for the validation grid); by default it is read
    from the run's ``config.yaml``.
    """
    if cfg is None:
        cfg = load_run_config(storage, run_url)
    report = _Report(storage, run_url, cfg)
    sections: list[tuple[str, Callable[[_Report], str]]] = [
        ("Overview", _overview), ("Stages", _stages), ("Cluster sizes", _cluster_sizes),
        ("Per-class IoU (validation)", _per_class_iou), ("Background threshold", _threshold),
        ("Pseudo labels (train images)", _train_grid),
        ("Predictions (validation images)", _validation_grid),
        ("Rejected images", _rejected), ("Configuration", _configuration),
    ]
    body = []
    for title, build in sections:
        try:
            content = build(report)
        except Exception as e:  # one unreadable artifact must not hide the rest of the report
            log.warning("report: section %r failed", title, exc_info=True)
            why = f"{type(e).__name__}: {e}"
            content = f'<p class="error">could not be built: {_esc(why)}</p>'
        body.append(f"<section><h2>{_esc(title)}</h2>\n{content}\n</section>")
    url = storage.join(report.out, "index.html")
    storage.write_text(url, _PAGE.format(run=_esc(run_url), body="\n".join(body)))
    return url


# ---- plumbing --------------------------------------------------------------------------------


class _Report:
    def __init__(self, storage: Storage, run: str, cfg: PipelineConfig | None):
        self.storage, self.run, self.cfg = storage, run, cfg
        self.out = storage.join(run, REPORT_DIR)

    def path(self, *parts: str) -> str:
        return self.storage.join(self.run, *parts)

    def json(self, *parts: str) -> Any:
        url = self.path(*parts)
        return self.storage.read_json(url) if self.storage.exists(url) else None

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        """Save ``fig`` as ``report/<name>`` and return the ``<img>`` tag that shows it."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        self.storage.write_bytes(self.storage.join(self.out, name), buf.getvalue())
        return f'<img src="{_esc(name)}" alt="{_esc(alt)}">'


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _not_run(why: str) -> str:
    return f'<p class="notrun">not run ({_esc(why)})</p>'


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} values]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(_fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _column(storage: Storage, folder: str, column: str) -> np.ndarray | None:
    """One column of a Parquet folder as a numpy array; None when the folder holds no Parquet
    or its files lack the column."""
    import pyarrow.parquet as pq

    files = parquet_files(storage, folder)
    if not files:
        return None
    with storage.open(files[0], "rb") as f:
        if column not in pq.read_schema(f).names:
            return None
    parts = [t.column(column).to_numpy() for t in iter_row_groups(storage, files, [column])]
    return np.concatenate(parts) if parts else None


def _sample(keys: list[str], n: int) -> list[str]:
    """Up to ``n`` keys, spread over the list by a hash of each key: deterministic, and not all
    from the first class folder as the first ``n`` in sorted order would be."""
    return sorted(sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())[:n])


# ---- sections --------------------------------------------------------------------------------


def _overview(r: _Report) -> str:
    summary = r.json("summary.json")
    val, test = r.json(EVAL_DIR, "validation.json"), r.json(EVAL_DIR, "test.json")
    if summary is None and val is None:
        return _not_run("no summary.json")
    rows = [["run folder", r.run]]
    for key in ("images_total", "images_ok", "images_rejected", "files_ignored"):
        if summary and key in summary:
            rows.append([key.replace("_", " "), summary[key]])
    if val is not None:
        rows += [["validation mIoU (%)", val["mIoU"]], ["validation Acc (%)", val.get("Acc")],
                 ["background threshold", val.get("threshold")],
                 ["validation images", val.get("num_images")]]
    if test is not None:
        rows += [["test mIoU (%)", test["mIoU"]], ["test images", test.get("num_images")]]
    return _table(["", "value"], rows)


def _stages(r: _Report) -> str:
    summary = (r.json("summary.json") or {}).get("stages", {})
    rows, seconds = [], {}
    # The report stage is still running while this is written: its row would be stale.
    for name in [s for s in STAGES if s != REPORT_DIR]:
        manifest = r.storage.read_manifest(r.path(name)) or {}
        info = summary.get(name, {})
        status = info.get("status") or ("done" if manifest else "not run")
        secs = manifest.get("seconds", info.get("seconds"))
        counts = manifest.get("counts", info.get("counts")) or {}
        if isinstance(secs, (int, float)):
            seconds[name] = secs
        rows.append([name, status, secs, manifest.get("completed_at"),
                     ", ".join(f"{k}={_fmt(v)}" for k, v in counts.items())])
    out = _table(["stage", "status", "seconds", "completed", "counts"], rows)
    if seconds:
        fig = Figure(figsize=(8, 0.35 * len(seconds) + 0.8))
        ax = fig.subplots()
        names = list(seconds)[::-1]
        ax.barh(names, [seconds[n] for n in names], color="#4c78a8")
        ax.set_xlabel("seconds (last run of each stage)")
        out += r.figure(fig, "stage_seconds.png", "seconds per stage")
    return out


def _cluster_sizes(r: _Report) -> str:
    c = r.cfg.data.classes if r.cfg else None
    series = {}
    for label, folder in (("k-means #1 (cluster/)", "cluster"), ("final (purify/)", "purify")):
        ids = _column(r.storage, r.path(folder), "cluster")
        if ids is not None and ids.size:
            series[label] = np.bincount(ids.astype(np.int64),
                                        minlength=max(c or 0, int(ids.max()) + 1))
    if not series:
        return _not_run("no cluster assignments in cluster/ or purify/")
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
    out += _table(["assignment", "clusters", "images", "empty", "min", "median", "max"], rows)
    kept = _column(r.storage, r.path("purify"), "kept")
    if kept is not None and kept.size:
        out += (f"<p>Purification kept {int(kept.sum())} of {kept.size} images "
                f"({100.0 * kept.mean():.1f} %) for the final k-means.</p>")
    return out


def _per_class_iou(r: _Report) -> str:
    val = r.json(EVAL_DIR, "validation.json")
    if val is None:
        return _not_run("no eval/validation.json")
    iou = np.array([np.nan if v is None else v for v in val["IoU"]], dtype=float)
    test = r.json(EVAL_DIR, "test.json")
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
    out += _table(["mIoU", "Acc", "PixelAcc", *[f"mIoU {b}" for b in bins], "images"],
                  [[val["mIoU"], val.get("Acc"), val.get("PixelAcc"),
                    *[size_miou[b] for b in bins], val.get("num_images")]])
    worst = np.argsort(np.nan_to_num(iou, nan=-1.0))[:5]
    lowest = ", ".join(f"class {i}: {_fmt(float(iou[i]))}" for i in worst)
    out += f"<p>Lowest IoU: {lowest}</p>"
    return out


def _threshold(r: _Report) -> str:
    curve = r.json(EVAL_DIR, "threshold_curve.json")
    val = r.json(EVAL_DIR, "validation.json")
    if curve is None:
        if val is not None:
            return "<p>No sweep: the predictions came without foreground maps.</p>"
        return _not_run("no eval/threshold_curve.json")
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
              f"the best t on validation ({_fmt(chosen)}) is applied to test.</p>")


def _train_grid(r: _Report) -> str:
    stats = r.path("labels", "stats")
    if not parquet_files(r.storage, stats):
        return _not_run("no labels/stats/")
    paths = {}
    for table in iter_row_groups(r.storage, stats, ["id", "path"]):
        paths.update(zip(table.column("id").to_pylist(), table.column("path").to_pylist()))
    rows = []
    for image_id in _sample(list(paths), MAX_GRID_ROWS):
        image = _load_image(r, paths[image_id], exif_transpose=True)
        rows.append((image_id, [image,
                                _load_label(r, r.path("labels", "raw", image_id + ".png")),
                                _load_label(r, r.path("labels", "refined", image_id + ".png"))]))
    fig = label_grid(rows, ["image", "raw label", "refined label"])
    return (r.figure(fig, "train_labels.png", "train images with raw and refined labels")
            + "<p>Label colours are cluster ids (train images have no ground truth); "
              "black is background, white ignore.</p>")


def _validation_grid(r: _Report) -> str:
    pred_dir = r.path(PREDICTIONS_DIR, VALIDATION)
    rels = list(relative_pngs(pred_dir, r.storage))
    if not rels:
        return _not_run("no predictions/validation/")
    val = r.json(EVAL_DIR, "validation.json") or {}
    threshold = val.get("threshold")
    match = r.json(EVAL_DIR, "match.json")
    lut = None
    if match is not None:
        lut = np.arange(IGNORE_ID + 1)
        for p, g in match.items():
            lut[int(p)] = int(g)
    images, dataset = {}, None
    if r.cfg is not None:
        dataset = dataset_dir(r.cfg.data.root, r.cfg.data.classes)
        try:
            listing = list_split(r.storage, r.cfg.data.root, r.cfg.data.classes, VALIDATION)
            images = {rec.id[len(VALIDATION) + 1:] + ".png": rec.path for rec in listing.images}
        except FileNotFoundError:
            log.warning("report: validation images not found under %s", dataset)
    rows = []
    for rel in _sample(rels, MAX_GRID_ROWS):
        pred = _load_label(r, r.storage.join(pred_dir, rel))
        fg_url = r.path(PREDICTIONS_DIR, VALIDATION + FG_SUFFIX, rel)
        if pred is not None and threshold is not None and r.storage.exists(fg_url):
            pred = apply_background_threshold(pred, decode_fg(r.storage.read_bytes(fg_url)),
                                              threshold)
        if pred is not None and lut is not None:
            pred = lut[np.clip(pred, 0, IGNORE_ID)]
        gt = None if dataset is None else _load_label(
            r, r.storage.join(dataset, "validation-segmentation", rel))
        image = _load_image(r, images[rel], exif_transpose=False) if rel in images else None
        rows.append((rel[:-4], [image, pred, gt]))
    how = (f"background threshold {threshold:g}, " if threshold is not None else "") + (
        "ids mapped to GT classes by the validation matching" if lut is not None
        else "raw predicted ids (no matching yet)")
    fig = label_grid(rows, ["image", "prediction", "ground truth"])
    return (r.figure(fig, "validation_predictions.png", "validation predictions and GT")
            + f"<p>Prediction: {_esc(how)}. Black is background, white ignore.</p>")


def _rejected(r: _Report) -> str:
    folder = r.path("rejected")
    if not parquet_files(r.storage, folder):
        if r.storage.read_manifest(r.path("features")) is not None:
            return "<p>No image was rejected.</p>"
        return _not_run("the features stage has not completed")
    reasons: Counter[str] = Counter()
    rows = []
    for table in iter_row_groups(r.storage, folder, ["id", "path", "reason"]):
        for image_id, path, reason in zip(*(table.column(c).to_pylist()
                                            for c in ("id", "path", "reason"))):
            reasons[reason] += 1
            if len(rows) < MAX_REJECTED_ROWS:
                rows.append([image_id, path, reason])
    total = sum(reasons.values())
    out = f"<p>{total} image{'s' if total != 1 else ''} rejected.</p>"
    out += _table(["reason", "images"], [[k, v] for k, v in reasons.most_common()])
    out += _table(["id", "path", "reason"], rows)
    if total > len(rows):
        out += f"<p>... and {total - len(rows)} more (all in <code>rejected/*.parquet</code>).</p>"
    return out


def _configuration(r: _Report) -> str:
    url = r.path("config.yaml")
    if not r.storage.exists(url):
        return _not_run("no config.yaml")
    # config.yaml is written with secrets already redacted (config.dump_yaml).
    text = _esc(r.storage.read_text(url))
    return f"<details><summary>config.yaml</summary><pre>{text}</pre></details>"


# ---- pictures --------------------------------------------------------------------------------


def _load_image(r: _Report, url: str, exif_transpose: bool) -> np.ndarray | None:
    """HxWx3 uint8, decoded at reduced size where the format allows; None if unreadable."""
    try:
        data = r.storage.read_bytes(url)
    except FileNotFoundError:
        return None
    max_pixels = r.cfg.data.max_pixels if r.cfg else 89_478_485
    result = decode_image(data, max_pixels=max_pixels, target_short_side=PANEL_SIDE,
                          exif_transpose=exif_transpose)
    return result.image if result.ok else None


def _load_label(r: _Report, url: str) -> np.ndarray | None:
    if not r.storage.exists(url):
        return None
    return decode_label(r.storage.read_bytes(url))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pdso-ray report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }}
h2 {{ font-size: 1.15em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }}
table {{ border-collapse: collapse; margin: .6em 0; font-size: .85em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }} td {{ word-break: break-all; }}
img {{ max-width: 100%; display: block; margin: .6em 0; }}
.notrun {{ color: #888; font-style: italic; }} .error {{ color: #b00020; }}
pre {{ background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }}
</style></head>
<body><h1>pdso-ray run report</h1><p><code>{run}</code></p>
{body}
</body></html>
"""
