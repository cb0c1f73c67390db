"""The sections of the run report (:mod:`pdso_ray.report.page`), in page order: :data:`SECTIONS`.

Each section is a function of the :class:`~pdso_ray.report.base.Report` returning HTML; it reads
the artifacts it shows through the run folder's layout and says "not run" when they are missing.
Label colours and image grids come from :mod:`pdso_ray.report.figures`.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pdso_ray.report.base import Report, esc, not_run, readable_counts, sample, table
from pdso_ray.report.figures import label_grid, overlay
from pdso_ray.report.predictions import confusion_matrix, methods_side_by_side, previews, validation_grid
from pdso_ray.report.signals import best_and_worst, quality_signals
from pdso_ray.report.quality import (ablation, image_diagnostics, methods, per_class_iou, pseudo_label_choice,
                                     pseudo_label_gains, threshold_rule)
from pdso_ray.tables import column_values, iter_row_groups, parquet_files

log = logging.getLogger("pdso_ray")

MAX_GRID_ROWS = 8
MAX_REJECTED_ROWS = 200


def _overview(r: Report) -> str:
    summary = r.json(r.run.summary_file)
    val, test = r.json(r.run.eval_file("validation.json")), r.json(r.run.eval_file("test.json"))
    if summary is None and val is None:
        return not_run("no summary.json")
    rows = [["run folder", r.run.root], ["method", r.run.method]]
    for key in ("images_total", "images_ok", "images_rejected", "files_ignored"):
        if summary and key in summary:
            rows.append([key.replace("_", " "), summary[key]])
    for split, info in sorted((summary or {}).get("splits", {}).items()):
        rows.append([f"{split} images", ", ".join(f"{k} {v}" for k, v in info.items())])
    if val is not None:
        rows += [["validation mIoU (%), official rule (argmax over C+1)", val["mIoU"]],
                 ["validation Acc (%)", val.get("Acc")], ["validation images", val.get("num_images")]]
    if test is not None:
        rows += [["test mIoU (%)", test["mIoU"]], ["test images", test.get("num_images")]]
    tuned = r.json(r.run.eval_file("validation_threshold.json"))
    if tuned is not None:
        rows.append([f"validation mIoU (%), threshold rule (t = {tuned['threshold']:g}, tuned on "
                     "validation ground truth)", tuned["mIoU"]])
    out = table(["", "value"], rows)
    for stage, notes in ((summary or {}).get("notes") or {}).items():
        out += "".join(f'<p class="note">{esc(stage)}: {esc(n)}</p>' for n in notes)
    return out


def _stages(r: Report) -> str:
    whole = r.json(r.run.summary_file)
    if whole is None and r.stage_order is None:
        return not_run("no summary.json")
    summary = (whole or {}).get("stages", {})
    order = r.stage_order or (whole or {}).get("stage_order") or list(summary)
    rows, seconds = [], {}
    # The report stage is still running while this is written: its row would be stale.
    for name in [s for s in order if s != "report"]:
        manifest = r.storage.read_manifest(r.run.stage_dir(name)) or {}
        info = summary.get(name, {})
        status = info.get("status") or ("done" if manifest else "not run")
        secs = manifest.get("seconds", info.get("seconds"))
        counts = manifest.get("counts", info.get("counts")) or {}
        if isinstance(secs, (int, float)):
            seconds[name] = secs
        rows.append([name, status, secs, manifest.get("completed_at"), readable_counts(counts)])
    out = table(["stage", "status", "seconds", "completed", "counts"], rows)
    if seconds:
        fig = Figure(figsize=(8, 0.35 * len(seconds) + 0.8))
        ax = fig.subplots()
        names = list(seconds)[::-1]
        ax.barh(names, [seconds[n] for n in names], color="#4c78a8")
        ax.set_xlabel("seconds (last run of each stage)")
        out += r.figure(fig, "stage_seconds.png", "seconds per stage")
    return out


def _pretraining(r: Report) -> str:
    history = r.json(r.run.pretrain_history)
    if not history:
        return not_run("no pretrain/history.json (the run did not pretrain its backbone)")
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(12, 2.8))
    ax_loss, ax_entropy, ax_used, ax_border = fig.subplots(1, 4)
    ax_loss.plot(epochs, [h["loss"] for h in history], color="#4c78a8")
    ax_loss.set(xlabel="epoch", ylabel="DINO loss")
    for key, label, colour in (("teacher_entropy", "mean H(teacher)", "#4c78a8"),
                               ("mean_output_entropy", "H(mean teacher)", "#f58518"),
                               ("kl_div", "difference (collapse: -> 0)", "#54a24b")):
        ax_entropy.plot(epochs, [h[key] for h in history], color=colour, label=label)
    ax_entropy.set(xlabel="epoch", ylabel="nats")
    ax_entropy.legend(fontsize=7)
    ax_used.plot(epochs, [h["prototypes_used"] for h in history], color="#4c78a8")
    ax_used.set(xlabel="epoch", ylabel="prototypes used (argmax)")
    ax_border.plot(epochs, [h["border_ring_share"] for h in history], color="#e45756")
    ax_border.axhspan(0.2, 0.4, color="#54a24b", alpha=0.15)
    ax_border.set(xlabel="epoch", ylabel="probe images: border > centre", ylim=(0, 1))
    for ax in (ax_loss, ax_entropy, ax_used, ax_border):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    fig.tight_layout()
    out = r.figure(fig, "pretraining.png", "pretraining curves")
    last = history[-1]
    out += table(["last epoch", "loss", "kl_div (nats)", "prototypes used", "border share", "images",
                  "seconds"], [[last["epoch"], last["loss"], last["kl_div"], last["prototypes_used"],
                                last["border_ring_share"], last["images"], last["seconds"]]])
    return out + ("<p>Border share: the share of fixed probe images whose CLS attention is higher "
                  "on the border ring of patches than inside (green band: runs whose saliency finds "
                  "the objects; above 0.6 it sits on the background).</p>")


def _finetuning(r: Report) -> str:
    history = r.json(r.run.finetune_history)
    if not history:
        return not_run("no finetune/history.json")
    epochs, losses = [h["epoch"] for h in history], [h["loss"] for h in history]
    fig = Figure(figsize=(6, 2.8))
    ax = fig.subplots()
    ax.plot(epochs, losses, marker="o", color="#4c78a8")
    ax.set(xlabel="epoch", ylabel="mean training loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    fig.tight_layout()
    return (r.figure(fig, "finetune_loss.png", "fine-tuning loss per epoch")
            + f"<p>{len(history)} epochs: loss {losses[0]:.4f} after the first, {losses[-1]:.4f} after "
              "the last (finetune.loss on the method's train labels, ignored pixels left out).</p>")


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


GALLERY_CLUSTERS = 10  # the largest final clusters shown
GALLERY_NEAREST, GALLERY_RANDOM = 4, 2  # images per cluster: nearest its centroid, then a sample


def _cluster_gallery(r: Report) -> str:
    """What each final cluster holds: for the largest clusters, the images nearest its centroid
    and a few others drawn by a hash of their ids (what a cluster means, and whether it follows
    objects or only colour)."""
    members: dict[int, list[tuple[float, str, str]]] = {}
    for part in iter_row_groups(r.storage, r.run.stage_dir("purify"), ["id", "path", "cluster", "topk_dist"]):
        for image_id, path, cluster, dist in zip(*(part.column(c).to_pylist()
                                                   for c in ("id", "path", "cluster", "topk_dist"))):
            members.setdefault(int(cluster), []).append((float(dist[0]) if dist else 0.0, image_id, path))
    if not members:
        return not_run("no final assignment in purify/")
    largest = sorted(members, key=lambda c: (-len(members[c]), c))[:GALLERY_CLUSTERS]
    rows = []
    for cluster in largest:
        ranked = sorted(members[cluster])
        nearest = ranked[:GALLERY_NEAREST]
        rest = {image_id: path for _, image_id, path in ranked[GALLERY_NEAREST:]}
        chosen = [path for _, _, path in nearest] + [rest[i] for i in sample(list(rest), GALLERY_RANDOM)]
        panels = [r.image(path, exif_transpose=True) for path in chosen]
        blank = np.full((1, 1, 3), 255, np.uint8)  # a cluster smaller than a row
        rows.append((f"cluster {cluster + 1} ({len(ranked)} images)",
                     panels + [blank] * (GALLERY_NEAREST + GALLERY_RANDOM - len(panels))))
    titles = [f"nearest {i + 1}" for i in range(GALLERY_NEAREST)] + ["another"] * GALLERY_RANDOM
    shown = f"the {len(largest)} largest of {len(members)}" if len(members) > len(largest) else f"all {len(members)}"
    return (r.figure(label_grid(rows, titles), "cluster_gallery.png", "images of each cluster")
            + f"<p>Final clusters ({shown}; label id = cluster + 1): the images nearest each "
              "centroid, then others of the cluster.</p>")


def _train_grid(r: Report) -> str:
    stats = r.run.label_stats_dir
    if not parquet_files(r.storage, stats):
        return not_run("no labels/stats/")
    found = {}  # id -> (image URL, raw label URL, refined label URL: files or shard members)
    for part in iter_row_groups(r.storage, stats, ["id", "path", "label_raw", "label_refined"]):
        found.update((row["id"], (row["path"], row["label_raw"], row["label_refined"])) for row in part.to_pylist())
    rows = []
    for image_id in sample(list(found), MAX_GRID_ROWS):
        path, raw, refined = found[image_id]
        image, refined_label = r.image(path, exif_transpose=True), r.label(refined or None)
        both = overlay(image, refined_label) if image is not None and refined_label is not None else None
        rows.append((image_id, [image, r.label(raw or None), refined_label, both]))
    fig = label_grid(rows, ["image", "raw label", "refined label", "refined over the image"])
    return (r.figure(fig, "train_labels.png", "train images with raw and refined labels")
            + "<p>Label colours are cluster ids (train images have no ground truth); "
              "black is background, white ignore.</p>")


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


def _logs(r: Report) -> str:
    folder = r.run.logs_dir
    logs = r.storage.list_files(folder, suffixes=(".log",))
    note = ("<p>What Ray and the workers wrote during each <code>pdso-ray run</code> (its progress "
            "per operator, worker output, fine-tuning's per-epoch lines): one file per run, added "
            "when the run ends; <code>--verbose</code> shows it on the terminal instead.</p>")
    if not logs:
        return note + not_run("no logs/ yet")
    report_dir = r.run.report_dir
    items = "".join(f'<li><a href="{esc(posixpath.relpath(url, report_dir))}">{esc(posixpath.basename(url))}</a></li>'
                    for url in logs)
    return note + f"<ul>{items}</ul>"


def _configuration(r: Report) -> str:
    url = r.run.config_file
    if not r.storage.exists(url):
        return not_run("no config.yaml")
    # config.yaml is written with secrets already redacted (config.dump_yaml).
    text = esc(r.storage.read_text(url))
    return f"<details><summary>config.yaml</summary><pre>{text}</pre></details>"


SECTIONS: list[tuple[str, Callable[[Report], str]]] = [
    ("Overview", _overview),
    ("Quality signals (label-free)", quality_signals),
    ("Methods on this data", methods),
    ("Ablation: what each stage adds", ablation),
    ("Image-level diagnostics (train images)", image_diagnostics),
    ("Stages", _stages),
    ("Pretraining (stage pretrain)", _pretraining),
    ("Fine-tuning loss", _finetuning),
    ("Pseudo-label threshold and σ (chosen on validation)", pseudo_label_choice),
    ("Pseudo labels on validation: largest gains and losses from refinement", pseudo_label_gains),
    ("Cluster sizes", _cluster_sizes),
    ("Cluster gallery", _cluster_gallery),
    ("Per-class IoU (validation)", per_class_iou),
    ("Confusion matrix (validation)", confusion_matrix),
    ("Threshold rule (tuned on validation ground truth)", threshold_rule),
    ("Pseudo labels (train images)", _train_grid),
    ("Predictions (validation images)", validation_grid),
    ("Predictions without ground truth: best and worst", best_and_worst),
    ("PDSO and LightCluster on the same images", methods_side_by_side),
    ("Previews of the label PNGs", previews),
    ("Rejected images", _rejected), ("Logs", _logs), ("Configuration", _configuration),
]
