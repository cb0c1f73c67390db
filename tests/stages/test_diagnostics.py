"""Every stage's measurements on inputs that break their assumptions: ids without a class folder
(precomputed features named ``img00000001``), artifacts missing a column or of the wrong length,
ground truth of another size, a report over broken files. Each is recorded as ``"not computed:
<reason>"`` with at most one warning line, and nothing raises: a measurement never ends a run.
Called without Ray, on small run folders written here."""

import logging

import numpy as np
import pyarrow as pa
import pytest

from pdso_ray.config import load_config
from pdso_ray.data.imagenet_s import encode_gray_png, encode_label
from pdso_ray.measuring import is_not_computed
from pdso_ray.report import build_report
from pdso_ray.stages.base import RunContext
from pdso_ray.stages.cluster import ClusterStage
from pdso_ray.stages.denoise import DenoiseStage
from pdso_ray.stages.evaluate import EvaluateStage
from pdso_ray.stages.lightcluster import LightClusterStage
from pdso_ray.stages.pseudo_labels import PseudoLabelsStage
from pdso_ray.stages.purify import PurifyStage
from pdso_ray.storage import Storage
from pdso_ray.tables import write_table

CLASSES = 2


def _ctx(tmp_path, *extra) -> RunContext:
    cfg = load_config(overrides=[f"data.classes={CLASSES}", f"data.root={tmp_path / 'data'}",
                                 f"output={tmp_path / 'run'}", *extra])
    return RunContext(cfg=cfg, storage=Storage())


def _write(ctx, stage, ids, **columns):
    table = {"id": pa.array(ids, pa.string()), **{k: pa.array(v) for k, v in columns.items()}}
    write_table(ctx.storage, ctx.storage.join(ctx.run.stage_dir(stage), "part-0.parquet"), pa.table(table))


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


GOOD_IDS = ["train/n01/a", "train/n01/b", "train/n02/c", "train/n02/d"]
PLAIN_IDS = ["img00000001", "img00000002", "img00000003", "img00000004"]


def _clustering_run(ctx, ids, rows=4):
    _write(ctx, "cluster", ids, cluster=np.array([0, 0, 1, 1][:rows], np.int32))
    _write(ctx, "denoise", ids, subset1=[True, False, True, True][:rows], clean=[True, True, False, True][:rows],
           relabel=np.array([0, 0, 1, 1][:rows], np.int32))
    _write(ctx, "purify", ids, cluster=np.array([0, 0, 1, 1][:rows], np.int32), kept=[True, True, True, False][:rows],
           cluster2=np.array([0, 0, 1, 1][:rows], np.int32))


STAGES = {"cluster": (ClusterStage, ["cluster"]),
          "denoise": (DenoiseStage, ["denoise_s1", "denoise_relabel", "denoise_s2"]),
          "purify": (PurifyStage, ["purify_kmeans2", "purify_kept", "purify_final"])}


@pytest.mark.parametrize("stage", STAGES)
def test_image_diagnostics_score_class_folders(tmp_path, stage):
    ctx = _ctx(tmp_path)
    _clustering_run(ctx, GOOD_IDS)
    cls, steps = STAGES[stage]
    image = cls().diagnostics(ctx)["diagnostics"]["image"]
    assert set(image) == set(steps) and all(isinstance(image[s], dict) for s in steps)
    scored = {"cluster": 4, "denoise": 3, "purify": 4}[stage]  # denoise_s2: the clean rows only
    assert image[steps[-1]]["purity"] == 1.0 and image[steps[-1]]["images"] == scored


@pytest.mark.parametrize("stage", STAGES)
def test_ids_without_a_class_folder_mean_no_class_truth(tmp_path, caplog, stage):
    ctx = _ctx(tmp_path, f"data.features={tmp_path / 'precomputed'}")
    _clustering_run(ctx, PLAIN_IDS)
    cls, steps = STAGES[stage]
    image = cls().diagnostics(ctx)["diagnostics"]["image"]
    assert set(image) == set(steps)
    for step in steps:
        assert image[step] == "not computed: no class truth: the image ids have no class folder (e.g. 'img00000001')"
    assert _warnings(caplog) == []  # expected of a user's own ids: not a warning


@pytest.mark.parametrize("stage", STAGES)
def test_broken_artifacts_are_not_computed_with_one_warning(tmp_path, caplog, stage):
    ctx = _ctx(tmp_path)
    _write(ctx, "cluster", GOOD_IDS[:3], cluster=np.array([0, 0, 1], np.int32))  # one row short of denoise's
    _write(ctx, "denoise", GOOD_IDS, subset1=[True] * 4, clean=[True] * 4)  # no "relabel" column
    _write(ctx, "purify", GOOD_IDS, cluster=np.zeros(4, np.int32))  # no "kept", no "cluster2" column
    if stage == "cluster":
        _write(ctx, "cluster", GOOD_IDS, other=np.zeros(4, np.int32))  # no "cluster" column
    cls, steps = STAGES[stage]
    with caplog.at_level(logging.WARNING, logger="pdso_ray"):
        image = cls().diagnostics(ctx)["diagnostics"]["image"]
    assert image and all(is_not_computed(v) for v in image.values()), image
    assert 1 <= len(_warnings(caplog)) <= len(steps)
    assert all("not computed" in r.getMessage() and "\n" not in r.getMessage() for r in _warnings(caplog))


def test_lightcluster_diagnostics_on_odd_ids_and_missing_masks(tmp_path, caplog):
    ctx = _ctx(tmp_path, "method=lightcluster")
    gt = tmp_path / "data" / f"ImageNetS{CLASSES}" / "validation-segmentation" / "n01"
    gt.mkdir(parents=True)
    (gt / "a.png").write_bytes(encode_label(np.ones((8, 8), np.int64)))
    (tmp_path / "data" / f"ImageNetS{CLASSES}" / "validation" / "n01").mkdir(parents=True)
    rows = [{"id": i} for i in PLAIN_IDS]
    with caplog.at_level(logging.WARNING, logger="pdso_ray"):
        out = LightClusterStage()._diagnostics(ctx, rows, {i: n % 2 for n, i in enumerate(PLAIN_IDS)})
    lc = out["diagnostics"]["lightcluster"]
    assert lc["classes"].startswith("not computed: no class truth")
    assert is_not_computed(lc["levels"]) and "no prediction" in lc["levels"]  # no masks were written
    assert len(_warnings(caplog)) == 1


def _validation(tmp_path, pred_side, gt_side):
    """One validation image: its ground truth (``gt_side`` px), the run's prediction, class map and
    saliency (``pred_side`` px)."""
    root = tmp_path / "data" / f"ImageNetS{CLASSES}"
    (root / "validation" / "n01").mkdir(parents=True)
    (root / "validation" / "n01" / "a.JPEG").write_bytes(b"not read here")
    (root / "validation-segmentation" / "n01").mkdir(parents=True)
    (root / "validation-segmentation" / "n01" / "a.png").write_bytes(encode_label(np.ones((gt_side, gt_side), np.int64)))
    ctx = _ctx(tmp_path)
    label = encode_label(np.ones((pred_side, pred_side), np.int64))
    for folder in (ctx.run.predictions_dir("validation"), ctx.run.label_dir("classmap", "validation"),
                   ctx.run.label_dir("raw", "validation"), ctx.run.sweep_dir(0.5, "validation")):
        ctx.storage.write_bytes(ctx.storage.join(folder, "n01", "a.png"), label)
    saliency = encode_gray_png(np.full((pred_side, pred_side), 200, np.uint8))
    ctx.storage.write_bytes(ctx.storage.join(ctx.run.label_dir("saliency", "validation"), "n01", "a.png"), saliency)
    return ctx, str(root / "validation-segmentation")


def test_pseudo_label_sweep_and_evaluation_on_ground_truth_of_another_size(tmp_path, caplog):
    ctx, gt_dir = _validation(tmp_path, pred_side=4, gt_side=8)
    with caplog.at_level(logging.WARNING, logger="pdso_ray"):
        swept = PseudoLabelsStage().measure(ctx, gt_dir, [0.5], {"scores": set(), "sweep": set()})
        counts = EvaluateStage().run(ctx)
    assert is_not_computed(swept) and "shape" in swept
    assert "mIoU" not in counts and is_not_computed(counts["diagnostics"]["ablation"])
    assert any(n.startswith("validation mIoU not computed: ValueError") for n in counts["notes"])
    assert len(_warnings(caplog)) == 2


def test_the_same_measurements_score_matching_ground_truth(tmp_path):
    ctx, gt_dir = _validation(tmp_path, pred_side=8, gt_side=8)
    threshold, sigma, choice, diagnostics = PseudoLabelsStage().measure(ctx, gt_dir, [0.5],
                                                                        {"scores": set(), "sweep": set()})
    counts = EvaluateStage().run(ctx)
    assert sigma == 0.5 and len(choice["curve"]) == len(ctx.cfg.pseudo_labels.threshold_grid)
    # saliency 200/255 everywhere on an all-object image: foreground at every t up to 200/255, none above
    fg = {p["threshold"]: p["saliency_foreground_IoU"] for p in choice["curve"]}
    assert fg[0.02] == fg[0.75] == 100.0 and fg[0.8] == 0.0
    assert diagnostics["saliency"] == {"foreground_IoU": 100.0, "threshold": threshold}
    assert diagnostics["refined"]["mIoU"] == diagnostics["raw"]["mIoU"] == counts["mIoU"] > 0
    assert [s["mIoU"] for s in counts["diagnostics"]["ablation"]] == [counts["mIoU"]] * 3


def test_the_report_over_broken_artifacts(tmp_path, caplog):
    ctx = _ctx(tmp_path)
    run = ctx.run
    ctx.storage.write_json(run.summary_file, {
        "method": "pdso", "stages": {"cluster": {"status": "done", "seconds": 1.0, "counts": {}}},
        "diagnostics": {"image": {"cluster": "not computed: no class truth: ...", "denoise_s1": {"purity": 0.5, "nmi": 0.1, "accuracy": 0.5, "images": 4}},
                        "ablation": "not computed: ValueError: shapes differ",
                        "lightcluster": {"levels": "not computed: KeyError: 'x'"}}})
    ctx.storage.write_json(run.eval_file("validation.json"), {"IoU": "not a list", "mIoU": "x"})
    ctx.storage.write_json(run.pretrain_history, [{"epoch": 1}])
    with caplog.at_level(logging.WARNING, logger="pdso_ray"):
        url = build_report(ctx.storage, ctx.cfg.output, cfg=ctx.cfg)
    page = ctx.storage.read_text(url)
    assert "not computed: no class truth" in page and "not computed: ValueError: shapes differ" in page
    failed = [r.getMessage() for r in _warnings(caplog)]
    assert failed and all(m.startswith("report: section") and "not computed" in m for m in failed)
    assert page.count('class="error">not computed: ') == len(failed)
    assert "Per-class IoU" in page and "Pretraining" in page  # their sections are there, saying why


def test_sigma_grid_comes_from_quantiles_of_the_second_nearest_distance(tmp_path):
    ctx = _ctx(tmp_path)
    second = np.linspace(10.0, 20.0, 101)  # large distances: no fixed sigma of the paper fits them
    _write(ctx, "purify", [f"train/n01/{i}" for i in range(101)],
           topk_dist=[[1.0, float(d), 30.0] for d in second])
    grid, fallback, shares = PseudoLabelsStage()._sigma_grid(ctx)
    assert grid == [10.0, 12.5, 15.0, 17.5, 19.0]  # quantiles 0, .25, .5, .75, .9
    assert fallback == 19.0 and shares[19.0] == pytest.approx(91 / 101)
    assert shares[15.0] == pytest.approx(51 / 101)
    ctx = _ctx(tmp_path, "pseudo_labels.refine.sigma_grid=[0.5,12]")  # a configured grid is used as given
    grid, _, shares = PseudoLabelsStage()._sigma_grid(ctx)
    assert grid == [0.5, 12.0] and shares[0.5] == 0.0 and shares[12.0] == pytest.approx(21 / 101)
