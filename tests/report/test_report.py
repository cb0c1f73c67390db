"""The run report on hand-made run folders: empty, partial, full, and with a corrupt artifact."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pdso_ray.config import DataConfig, PipelineConfig, dump_yaml
from pdso_ray.data.imagenet_s import IGNORE_ID, decode_label, encode_label, list_split
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.report import build_report
from pdso_ray.report.base import esc
from pdso_ray.method.overlay import class_colors, colorize
from pdso_ray.plan import STAGES
from pdso_ray.stages.base import RunContext
from pdso_ray.stages.evaluate import EvaluateStage
from pdso_ray.stages.previews import PreviewWriter
from pdso_ray.stages.report import ReportStage
from pdso_ray.storage import Storage
from pdso_ray.tables import vectors_to_arrow, write_table

C = 4
SECRET = "report-secret-PLANTED-41d7"
ALL_PARTS = ("config", "summary", "pretrain", "cluster", "purify", "labels", "pseudo", "predictions",
             "rejected", "finetune", "logs")
FULL_FIGURES = {"stage_seconds.png", "pretraining.png", "cluster_sizes.png", "iou_per_class.png", "image_diagnostics.png",
                "confusion_matrix.png",
                "finetune_loss.png", "cluster_gallery.png",
                "pseudo_label_curves.png", "pseudo_label_gains.png",
                "threshold_curve.png", "train_labels.png", "validation_predictions.png"}
SECTIONS = 23
DIAGNOSTICS = {"image": {step: {"purity": p, "nmi": p - 0.1, "accuracy": p - 0.05, "images": 12}
                         for step, p in (("cluster", 0.6), ("denoise_s1", 0.7), ("denoise_s2", 0.8),
                                         ("purify_kept", 0.85), ("purify_final", 0.75))},
               "ablation": [{"step": "raw pseudo labels (t = 0.4)", "mIoU": 40.0},
                            {"step": "refined pseudo labels (spo, sigma = 0.8)", "mIoU": 55.5},
                            {"step": "final model (dino, ce)", "mIoU": 61.25}]}
# Rejected rows planted in every run that has them; the second one's path must come out escaped.
PLANTED = [("train/n00000002/broken_7", "n00000002/broken_7.JPEG", "truncated or corrupt image"),
           (None, "n00000003/<script>alert(1)</script>.JPEG",
            "characters outside [A-Za-z0-9._-]")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    make_demo_dataset(root, classes=C, train_per_class=3, val_per_class=2, test_per_class=0,
                      image_size=(40, 56), seed=5)
    return root


def make_run_folder(data_root: str, run: str, parts=ALL_PARTS, storage: Storage | None = None,
                    seed: int = 0) -> RunContext:
    """A run folder with the artifacts each stage would leave, made by hand (no models)."""
    storage = storage or Storage()
    rng = np.random.default_rng(seed)
    cfg = PipelineConfig(output=run, data=DataConfig(root=data_root, classes=C))
    cfg.storage.s3.secret = SECRET
    ctx = RunContext(cfg=cfg, storage=storage)
    previews = PreviewWriter(storage, ctx.run)
    train = list_split(storage, data_root, C, "train").images
    ids = [rec.id for rec in train]
    clusters = rng.integers(0, C, len(ids))
    if "config" in parts:
        storage.write_text(ctx.run.path("config.yaml"), dump_yaml(cfg))
    if "summary" in parts:
        done = {"features": (6.2, {"images_total": len(ids) + 2, "images_ok": len(ids),
                                   "images_rejected": 2, "files_ignored": 1}),
                "cluster": (1.5, {"objective": 12.25}), "purify": (2.0, {"kept": len(ids) - 3})}
        stages = {}
        for name, (seconds, counts) in done.items():
            storage.write_manifest(ctx.run.path(name), {"key": "k", "stage": name,
                                                    "seconds": seconds, "counts": counts})
            stages[name] = {"status": "done", "seconds": seconds, "counts": counts}
        storage.write_json(ctx.run.path("summary.json"), {**done["features"][1], "stages": stages,
                                                          "stage_order": list(STAGES),
                                                          "diagnostics": DIAGNOSTICS})
    if "cluster" in parts:
        write_table(storage, ctx.run.path("cluster", "part-0.parquet"),
                    pa.table({"id": ids, "cluster": rng.integers(0, C, len(ids))}))
    if "purify" in parts:
        kept = np.ones(len(ids), dtype=bool)
        kept[:3] = False
        topk = np.stack([clusters, (clusters + 1) % C], 1)
        write_table(storage, ctx.run.path("purify", "part-0.parquet"), pa.table({
            "id": ids, "path": [rec.path for rec in train], "cluster": clusters, "kept": kept,
            "topk": vectors_to_arrow(topk.astype(np.float32)).cast(pa.list_(pa.int64())),
            "topk_dist": vectors_to_arrow(rng.random((len(ids), 2)))}))
    if "labels" in parts:
        rows = {"id": [], "path": [], "label_raw": [], "label_refined": []}
        for rec, cluster in zip(train, clusters):
            hsv = np.asarray(Image.open(io.BytesIO(storage.read_bytes(rec.path))).convert("HSV"))
            obj = hsv[..., 1] > 110  # the synthetic objects are the saturated pixels
            refined = np.where(obj, cluster + 1, 0)
            raw = refined.copy()
            raw[rng.random(raw.shape) < 0.08] = rng.integers(1, C + 1)
            for kind, label in (("raw", raw), ("refined", refined)):
                url = ctx.run.path("labels", kind, rec.id + ".png")
                storage.write_bytes(url, encode_label(label))
                rows[f"label_{kind}"].append(url)
                previews.write(kind, rec.id, label, np.asarray(Image.open(io.BytesIO(storage.read_bytes(rec.path)))))
            rows["id"].append(rec.id)
            rows["path"].append(rec.path)
        write_table(storage, ctx.run.path("labels", "stats", "part-0.parquet"), pa.table(rows))
    perm = {k: k % C + 1 for k in range(1, C + 1)}
    gt_dir = storage.join(data_root, f"ImageNetS{C}", "validation-segmentation")
    gts = {url[len(gt_dir) + 1:]: decode_label(storage.read_bytes(url))
           for url in storage.list_files(gt_dir, suffixes=(".png",))}
    if "pseudo" in parts:
        images = {}
        for rel, gt in gts.items():
            obj = (gt > 0) & (gt != IGNORE_ID)
            refined = np.where(obj, perm[int(gt[obj][0])], 0).astype(np.int32)
            raw = refined.copy()
            raw[rng.random(raw.shape) < 0.3] = 0
            storage.write_bytes(ctx.run.path("labels", "raw", "validation", rel), encode_label(raw))
            storage.write_bytes(ctx.run.path("labels", "sweep", "sigma_0.8", "validation", rel),
                                encode_label(refined))
            images[rel] = {"raw": float(rng.random()), "refined": float(rng.random())}
        match = {"0": 0, **{str(p): g for g, p in perm.items()}}
        storage.write_json(ctx.run.path("eval", "pseudo_label_threshold.json"), {
            "threshold": 0.4, "sigma": 0.8, "source": {"threshold": "validation sweep", "sigma": "validation sweep"},
            "curve": [{"threshold": t, "mIoU": 30 + 10 * t} for t in (0.2, 0.4, 0.6)],
            "sigma_curve": [{"sigma": v, "mIoU": 50 + v} for v in (0.5, 0.8)]})
        storage.write_json(ctx.run.path("eval", "pseudo_labels.json"), {
            "raw": {"mIoU": 40.0, "threshold": 0.4, "match": match},
            "refined": {"mIoU": 55.5, "method": "spo", "sigma": 0.8,
                        "dir": ctx.run.sweep_dir(0.8, "validation"), "match": match},
            "images": images})
    if "predictions" in parts:
        for rel, gt in gts.items():
            obj = (gt > 0) & (gt != IGNORE_ID)
            label = np.full(gt.shape, perm[int(gt[obj][0])], dtype=np.int32)
            label[rng.random(gt.shape) < 0.05] = 1
            fg = np.clip(np.where(obj, 190, 70) + rng.integers(-40, 40, gt.shape), 0, 255)
            official = np.where(fg < 128, 0, label)
            storage.write_bytes(ctx.run.path("predictions", "validation", rel), encode_label(official))
            previews.write("predictions", f"validation/{rel[:-4]}", official, None)
            storage.write_bytes(ctx.run.path("predictions", "validation_fgclass", rel), encode_label(label))
            buf = io.BytesIO()
            Image.fromarray(fg.astype(np.uint8), mode="L").save(buf, format="PNG")
            storage.write_bytes(ctx.run.path("predictions", "validation_fg", rel), buf.getvalue())
        EvaluateStage().run(ctx)
    if "pretrain" in parts:
        storage.write_json(ctx.run.pretrain_history, [
            {"epoch": e, "loss": 5.0 - e, "teacher_entropy": 4.0 - e, "mean_output_entropy": 5.0,
             "kl_div": 1.0 + e, "prototypes_used": 10 * e, "border_ring_share": 0.6 - 0.1 * e,
             "images": 64, "seconds": 2.5} for e in (1, 2, 3)])
    if "finetune" in parts:
        storage.write_json(ctx.run.finetune_history, [{"epoch": e, "loss": 1.0 / e} for e in (1, 2, 3)])
    if "logs" in parts:
        storage.write_text(ctx.run.log_file("20261205-120000"), "Ray's lines\n")
    if "rejected" in parts:
        write_table(storage, ctx.run.path("rejected", "part-0.parquet"), pa.table({
            "id": pa.array([p[0] for p in PLANTED], pa.string()),
            "path": [storage.join(data_root, "ImageNetS4", "train", p[1]) for p in PLANTED],
            "reason": [p[2] for p in PLANTED]}))
    return ctx


def read_report(storage: Storage, url: str) -> tuple[str, list[str]]:
    """The page and the image files it references (all must exist beside it)."""
    page = storage.read_text(url)
    srcs = re.findall(r'<img src="([^"]+)"', page)
    base = url.rsplit("/", 1)[0]
    for src in srcs:
        assert "/" not in src and storage.exists(storage.join(base, src)), src
    return page, srcs


def sections(page: str) -> dict[str, str]:
    return dict(re.findall(r"<section><h2>(.*?)</h2>(.*?)</section>", page, flags=re.S))


# ---- colours ----------------------------------------------------------------------------------


def test_class_colors_are_fixed_and_distinct():
    lut = class_colors()
    assert lut.shape == (IGNORE_ID + 1, 3) and lut.dtype == np.uint8
    assert lut[0].tolist() == [0, 0, 0] and lut[IGNORE_ID].tolist() == [255, 255, 255]
    classes = {tuple(c) for c in lut[1:IGNORE_ID]}
    assert len(classes) == IGNORE_ID - 1  # 999 distinct colours, none black or white
    assert (0, 0, 0) not in classes and (255, 255, 255) not in classes
    assert np.array_equal(lut, class_colors())
    label = np.array([[0, 3], [IGNORE_ID, 5000]])
    rgb = colorize(label)
    assert rgb[0, 1].tolist() == lut[3].tolist() and rgb[1, 1].tolist() == [128, 128, 128]


def test_image_names_with_control_characters_are_drawn_as_escapes():
    from pdso_ray.report.figures import label_grid, printable

    assert printable("n01/bad\x07name\tx") == "n01/bad\\x07name\\tx"
    assert printable("n01/été_0") == "n01/été_0"  # printable non-ASCII names stay as they are
    fig = label_grid([("bad\x07name", [np.zeros((4, 4, 3), np.uint8)])], ["image"])
    drawn = [t.get_text() for t in fig.axes[0].texts]
    assert "bad\\x07name" in drawn and not any("\x07" in t for t in drawn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a missing glyph for "\x07"
        fig.savefig(io.BytesIO(), format="png")


# ---- report -----------------------------------------------------------------------------------


def test_report_of_an_empty_run_says_not_run(tmp_path):
    storage = Storage()
    run = str(tmp_path / "run")
    url = build_report(storage, run)
    assert url == f"{run}/report/index.html"
    page, srcs = read_report(storage, url)
    assert srcs == []
    found = sections(page)
    assert len(found) == SECTIONS
    not_run = [t for t, body in found.items() if 'class="notrun"' in body]
    assert not_run == list(found)


def test_report_of_a_partial_run(dataset, tmp_path):
    ctx = make_run_folder(dataset, str(tmp_path / "run"),
                          parts=("config", "summary", "purify", "rejected"))
    page, srcs = read_report(ctx.storage, build_report(ctx.storage, ctx.run.root))

    assert set(srcs) == {"stage_seconds.png", "cluster_sizes.png", "image_diagnostics.png", "cluster_gallery.png"}
    found = sections(page)
    for title in ("Per-class IoU (validation)", "Threshold rule (tuned on validation ground truth)",
                  "Pseudo-label threshold and σ (chosen on validation)",
                  "Pseudo labels (train images)", "Predictions (validation images)"):
        assert 'class="notrun"' in found[title], title
    assert "<td>features</td><td>done</td><td>6.2</td>" in page
    assert "<td>evaluate</td><td>not run</td>" in page
    assert "Purification kept 9 of 12 images (75.0 %)" in found["Cluster sizes"]
    rejected = found["Rejected images"]
    assert "2 images rejected." in rejected
    assert "<td>train/n00000002/broken_7</td>" in rejected
    assert "<td>truncated or corrupt image</td><td>1</td>" in rejected
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.JPEG" in rejected and "<script>" not in page


def test_report_of_a_full_run(dataset, tmp_path):
    ctx = make_run_folder(dataset, str(tmp_path / "run"))
    counts = ReportStage().run(ctx)

    page, srcs = read_report(ctx.storage, counts["index"])
    assert set(srcs) == FULL_FIGURES and counts["figures"] == len(FULL_FIGURES)
    assert 'class="notrun"' not in page and 'class="error"' not in page
    for src in srcs:
        with Image.open(io.BytesIO(ctx.storage.read_bytes(ctx.run.path("report", src)))) as im:
            assert im.format == "PNG" and im.width >= 300 and im.height >= 100
    grid_png = ctx.storage.read_bytes(ctx.run.path("report", "train_labels.png"))
    with Image.open(io.BytesIO(grid_png)) as im:
        grid_h = im.height
    # 12 train images → 8 rows; the validation grid has all 8 validation images.
    assert grid_h > 8 * 150
    val = ctx.storage.read_json(ctx.run.path("eval", "validation.json"))
    found = sections(page)
    assert f"<td>{val['mIoU']:.4g}</td>" in found["Overview"]
    assert "ids mapped to ground-truth classes by the validation matching" in found[
        "Predictions (validation images)"]
    tuned = ctx.storage.read_json(ctx.run.path("eval", "validation_threshold.json"))
    assert f"t = {tuned['threshold']:g}, tuned on validation ground truth" in found["Overview"]
    ablation = found["Ablation: what each stage adds"]
    assert "<td>refined pseudo labels (spo, sigma = 0.8)</td><td>55.5</td>" in ablation
    assert "k-means #1 0.600 → S1 (small loss under f) 0.700" in ablation and "never reads" in ablation
    assert "<td>purified (kept) set</td><td>0.85</td>" in found["Image-level diagnostics (train images)"]
    assert ("<code>denoise.profile: anchored</code> (DFF on, h on all, backbone blocks tuned 0, k-means #2/#3 "
            "in the embedding space from prototypes, CSD rules on") in found["Image-level diagnostics (train images)"]
    gains = found["Pseudo labels on validation: largest gains and losses from refinement"]
    assert "raw 40.00, refined 55.50" in gains and "n00000001" in gains  # the legend names wnids
    assert "<td>train/n00000002/broken_7</td>" in found["Rejected images"]
    assert "<td>3</td><td>2</td><td>4</td><td>30</td><td>0.3</td>" in found["Pretraining (stage pretrain)"]
    assert "loss 1.0000 after the first, 0.3333 after the last" in found["Fine-tuning loss"]
    assert f"Final clusters (all {C};" in found["Cluster gallery"]
    assert '<a href="../logs/run-20261205-120000.log">' in found["Logs"]
    assert "images ok 12; images rejected 2; images total 14</td>" in found["Stages"]  # not a dict
    # the validation predictions: the best and the worst by each image's own mIoU
    scores = ctx.storage.read_json(ctx.run.validation_image_scores)
    assert len(scores) == 8 and all(0 <= v <= 100 for v in scores.values())
    ranked = sorted(scores, key=lambda rel: (-scores[rel], rel))
    grid = found["Predictions (validation images)"]
    assert f"Best: {esc(ranked[0][:-4])} ({scores[ranked[0]]:.1f})" in grid
    assert f"worst: {esc(ranked[-1][:-4])} ({scores[ranked[-1]]:.1f})" in grid
    # the confusion matrix: every scored pixel, GT classes as rows of the table
    confusion = np.load(ctx.run.confusion_file)
    assert confusion.shape == (C + 1, C + 1) and confusion.sum() == val["num_pixels"]
    assert "<th>ground truth</th><th>predicted as</th>" in found["Confusion matrix (validation)"]
    # the previews beside the label PNGs, linked from the page
    shown = found["Previews of the label PNGs"]
    for folder in ("labels/raw/train_colour", "labels/refined/train_overlay", "predictions/validation_colour"):
        assert f'<a href="../{folder}/">' in shown, folder
    assert "predictions/validation_overlay" not in shown  # the fixture wrote colour previews only
    assert "Only pdso predicted" in found["PDSO and LightCluster on the same images"]
    signals = ctx.storage.read_json(ctx.run.quality_file)  # measured by the stage, shown at the top
    assert signals["ground_truth"] is True and signals["predictions"]["images"] == 8
    assert signals["pseudo_labels"]["images"] == 12 and "8 images" in found["Quality signals (label-free)"]
    for url in ctx.storage.list_files(ctx.run.path("report")):
        assert SECRET.encode() not in ctx.storage.read_bytes(url), url


def test_report_on_memory_storage_reads_config_from_the_run(dataset):
    storage = Storage()
    ctx = make_run_folder(dataset, "memory://report-test/run", parts=("config", "predictions"),
                          storage=storage)
    page, srcs = read_report(storage, build_report(storage, ctx.run.root))  # no cfg passed
    assert {"iou_per_class.png", "threshold_curve.png", "validation_predictions.png"} <= set(srcs)
    assert "ids mapped to ground-truth classes" in page
    assert 'class="error"' not in page


def test_a_corrupt_artifact_only_breaks_its_sections(dataset, tmp_path):
    ctx = make_run_folder(dataset, str(tmp_path / "run"), parts=("summary", "purify"))
    ctx.storage.write_text(ctx.run.path("eval", "validation.json"), "{ not json")
    page, srcs = read_report(ctx.storage, build_report(ctx.storage, ctx.run.root))
    found = sections(page)
    assert "not computed: JSONDecodeError" in found["Per-class IoU (validation)"]
    assert "cluster_sizes.png" in srcs and 'class="error"' not in found["Cluster sizes"]


def test_warnings_head_the_page_in_a_red_box(dataset, tmp_path):
    ctx = make_run_folder(dataset, str(tmp_path / "run"), parts=("config", "summary"))
    ctx.storage.write_json(ctx.run.quality_file, {"standins": True, "ground_truth": False,
                                                  "warnings": ["one <b>cluster</b> holds 90 %", "second"]})
    page, _ = read_report(ctx.storage, build_report(ctx.storage, ctx.run.root))
    box = page.index('<div class="alarm">')
    assert box < page.index("<section>")
    assert "<li>one &lt;b&gt;cluster&lt;/b&gt; holds 90 %</li><li>second</li>" in page[box:]
    assert "synthetic stand-ins" in sections(page)["Quality signals (label-free)"]
    ctx.storage.write_json(ctx.run.quality_file, {"warnings": []})
    page, _ = read_report(ctx.storage, build_report(ctx.storage, ctx.run.root))
    assert 'class="alarm"' not in page


def test_both_methods_on_the_same_images_side_by_side(dataset, tmp_path):
    ctx = make_run_folder(dataset, str(tmp_path / "run"), parts=("config", "predictions"))
    lightcluster = ctx.run.for_method("lightcluster")
    rels = sorted(ctx.storage.list_relative(ctx.run.predictions_dir("validation"), ".png"))
    for rel in rels:  # another method, its own ids: GT class g predicted as C + 1 - g
        label = decode_label(ctx.storage.read_bytes(ctx.run.path("predictions", "validation", rel)))
        ctx.storage.write_bytes(ctx.storage.join(lightcluster.predictions_dir("validation"), rel),
                                encode_label(np.where(label > 0, C + 1 - label, 0)))
    ctx.storage.write_json(lightcluster.eval_file("match.json"), {"0": 0, **{str(C + 1 - g): g for g in range(1, C + 1)}})
    page, srcs = read_report(ctx.storage, build_report(ctx.storage, ctx.run.root))
    section = sections(page)["PDSO and LightCluster on the same images"]
    assert "methods_side_by_side.png" in srcs and 'class="notrun"' not in section
    assert f"{len(rels)} images of split validation predicted by both methods (6 shown)" in section
    assert "mapped to ground-truth classes by each method&#x27;s own validation matching" in section
    with Image.open(ctx.storage.open(ctx.run.report_file("methods_side_by_side.png"))) as im:
        assert im.height > 6 * 200  # a row per image shown
