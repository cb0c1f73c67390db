"""The evaluate stage and ``pdso-ray export`` on hand-made run folders: synthetic GT,
predictions and foreground maps written through Storage, no Ray."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pdso_ray.config import DataConfig, PipelineConfig, dump_yaml
from pdso_ray.data.imagenet_s import IGNORE_ID, decode_label, encode_label
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.cli import main as cli_main
from pdso_ray.export import export_submission
from pdso_ray.method.metrics import SegmentationEvaluator
from pdso_ray.stages.base import RunContext
from pdso_ray.evaluation import (
    BACKGROUND_THRESHOLDS,
    EvalFile,
    apply_background_threshold,
    evaluate_thresholds,
    fg_cut,
    pair_files,
)
from pdso_ray.stages.evaluate import EvaluateStage
from pdso_ray.storage import Storage
from pdso_ray.tables import write_table

C = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """ImageNetS3 with 2 validation and 2 test images per class, GT for both."""
    root = str(tmp_path_factory.mktemp("data"))
    make_demo_dataset(root, classes=C, train_per_class=0, val_per_class=2, test_per_class=2,
                      image_size=(24, 40), seed=3)
    return root


def make_ctx(data_root: str, run: str, storage: Storage | None = None) -> RunContext:
    cfg = PipelineConfig(output=run, data=DataConfig(root=data_root, classes=C))
    return RunContext(cfg=cfg, storage=storage or Storage())


def png_l(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_predictions(ctx: RunContext, split: str, make) -> int:
    """For every GT PNG of ``split``: ``make(gt) -> (best foreground class, fg or None)``, written
    as the predict stage would: the official argmax (background where p_background > 1/2, i.e.
    fg < 128) and, with fg, the threshold rule's two maps. Returns the number of images."""
    storage = ctx.storage
    gt_dir = storage.join(ctx.cfg.data.root, f"ImageNetS{C}", f"{split}-segmentation")
    urls = storage.list_files(gt_dir, suffixes=(".png",))
    for url in urls:
        rel = url[len(gt_dir) + 1:]
        label, fg = make(decode_label(storage.read_bytes(url)))
        official = label if fg is None else np.where(fg < 128, 0, label)
        storage.write_bytes(ctx.run.path("predictions", split, rel), encode_label(official))
        if fg is not None:
            storage.write_bytes(ctx.run.path("predictions", f"{split}_fgclass", rel), encode_label(label))
            storage.write_bytes(ctx.run.path("predictions", f"{split}_fg", rel), png_l(fg))
    return len(urls)


def object_mask(gt: np.ndarray) -> np.ndarray:
    return (gt > 0) & (gt != IGNORE_ID)


def image_class(gt: np.ndarray) -> int:
    return int(gt[object_mask(gt)][0])


def perfect(gt: np.ndarray):
    label = np.where(gt == IGNORE_ID, 0, gt)
    fg = np.where(object_mask(gt), 255, 0)
    return label, fg


def swept(perm: dict[int, int]):
    """Label = the permuted image class on *every* pixel; fg 200 on the object, and on the
    background alternately 60 and 140. Thresholds 0.55..0.75 make it exactly right (with the
    inverse matching); lower ones leave background pixels labelled, higher ones erase objects."""

    def make(gt: np.ndarray):
        label = np.full(gt.shape, perm[image_class(gt)], dtype=np.int32)
        checker = (np.indices(gt.shape).sum(axis=0) % 2).astype(bool)
        fg = np.where(object_mask(gt), 200, np.where(checker, 60, 140))
        return label, fg

    return make


# ---- pure helpers -----------------------------------------------------------------------------


def test_fg_cut_is_exact_on_the_uint8_grid():
    assert fg_cut(0.0) == 0
    assert fg_cut(0.2) == 51  # 0.2 * 255 = 51.000000000000004 in floats
    assert fg_cut(0.55) == 141
    assert fg_cut(1.0) == 255
    for t in BACKGROUND_THRESHOLDS:
        x = np.arange(256)
        assert np.array_equal(x < fg_cut(t), 100 * x < round(100 * t) * 255)
    with pytest.raises(ValueError, match="1.5"):
        fg_cut(1.5)


def test_apply_background_threshold():
    label = np.array([[3, 3, 0, 2]], dtype=np.int32)
    fg = np.array([[0, 51, 255, 50]], dtype=np.uint8)
    assert apply_background_threshold(label, fg, 0.2).tolist() == [[0, 3, 0, 0]]
    assert apply_background_threshold(label, fg, 0.0).tolist() == label.tolist()
    assert apply_background_threshold(label, fg, None) is label
    with pytest.raises(ValueError, match="shape"):
        apply_background_threshold(label, fg[:, :2], 0.5)


def test_single_pass_sweep_equals_separate_evaluations(dataset, tmp_path):
    """The one-pass sweep (ignored pixels dropped once, 1×n rows, threads) gives exactly the
    results of evaluating each thresholded full-size prediction on its own."""
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    saved = {}

    def noisy(gt):
        label = rng.integers(0, C + 1, gt.shape).astype(np.int32)
        label[object_mask(gt) & (rng.random(gt.shape) < 0.7)] = image_class(gt) % C + 1
        fg = rng.integers(0, 256, gt.shape)
        saved[len(saved)] = (label, fg.astype(np.uint8), gt)
        return label, fg

    write_predictions(ctx, "validation", noisy)
    s = ctx.storage
    files = pair_files(s, ctx.run.path("predictions", "validation_fgclass"),
                       s.join(dataset, f"ImageNetS{C}", "validation-segmentation"),
                       ctx.run.path("predictions", "validation_fg"))
    assert len(files) == 2 * C
    thresholds = [None, 0.0, 0.3, 0.65]
    results = evaluate_thresholds(s, files, C, thresholds, progress=False)
    for t, got in zip(thresholds, results):
        ev = SegmentationEvaluator(C)
        for label, fg, gt in saved.values():
            ev.update(apply_background_threshold(label, fg, t), gt)
        want = ev.finalize()
        assert got.to_json() == want.to_json(), t
    assert results[0].to_json() == results[1].to_json()  # t = 0 changes nothing
    assert results[2].miou != results[3].miou


# ---- the stage --------------------------------------------------------------------------------


def test_perfect_predictions_score_100(dataset):
    storage = Storage()
    ctx = make_ctx(dataset, "memory://eval-perfect/run", storage)
    n_val = write_predictions(ctx, "validation", perfect)
    write_predictions(ctx, "test", perfect)

    counts = EvaluateStage().run(ctx)

    assert counts["validation_images"] == n_val == 2 * C
    assert counts["mIoU"] == pytest.approx(100.0, abs=1e-6)
    assert counts["mIoU_test"] == pytest.approx(100.0, abs=1e-6)
    assert counts["threshold"] == 0.0  # every t scores 100: the lowest wins the tie
    assert counts["mIoU_threshold"] == pytest.approx(100.0, abs=1e-6)
    val = storage.read_json(ctx.run.path("eval", "validation.json"))
    assert val["IoU"] == pytest.approx([100.0] * (C + 1), abs=1e-6)
    assert val["rule"] == "argmax" and val["num_images"] == 2 * C
    assert storage.read_json(ctx.run.path("eval", "validation_threshold.json"))["threshold"] == 0.0
    match = storage.read_json(ctx.run.path("eval", "match.json"))
    assert match == {str(i): i for i in range(C + 1)}
    curve = storage.read_json(ctx.run.path("eval", "threshold_curve.json"))
    assert [p["threshold"] for p in curve] == list(BACKGROUND_THRESHOLDS)
    # At t >= 0.05 the background pixels (fg 0) were already 0; at every t the object keeps.
    assert all(p["mIoU"] == pytest.approx(100.0, abs=1e-6) for p in curve)


def test_sweep_picks_the_known_best_threshold(dataset, tmp_path):
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    identity = {k: k for k in range(1, C + 1)}
    write_predictions(ctx, "validation", swept(identity))

    counts = EvaluateStage().run(ctx)

    assert counts["threshold"] == 0.55
    assert counts["mIoU_threshold"] == pytest.approx(100.0, abs=1e-6)
    # The official argmax labels the background pixels whose fg is 140 (p_bg < 1/2): below 100.
    assert counts["mIoU"] < 95.0
    curve = {p["threshold"]: p["mIoU"] for p in
             ctx.storage.read_json(ctx.run.path("eval", "threshold_curve.json"))}
    perfect_ts = [t for t, m in curve.items() if m == pytest.approx(100.0, abs=1e-6)]
    assert perfect_ts == [0.55, 0.6, 0.65, 0.7, 0.75]
    # Half the background still labelled at 0.25..0.5 beats all of it at 0..0.2.
    assert curve[0.0] == curve[0.2] < curve[0.25] == curve[0.5] < 100.0
    # From 0.8 every pixel is background: only the background class scores.
    assert curve[0.8] < curve[0.25]
    tuned = ctx.storage.read_json(ctx.run.path("eval", "validation_threshold.json"))
    assert tuned["threshold"] == 0.55 and "tuned on validation ground truth" in tuned["note"]
    assert "mIoU_test" not in counts and counts["test_images"] == 0
    assert not ctx.storage.exists(ctx.run.path("eval", "test.json"))


def test_test_split_reuses_validation_matching_and_threshold(dataset, tmp_path):
    perm = {1: 3, 2: 1, 3: 2}  # GT class k is predicted as cluster id perm[k]
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    write_predictions(ctx, "validation", swept(perm))
    write_predictions(ctx, "test", swept(perm))

    counts = EvaluateStage().run(ctx)

    inverse = {str(p): g for g, p in perm.items()}
    assert ctx.storage.read_json(ctx.run.path("eval", "match.json")) == {"0": 0, **inverse}
    assert counts["mIoU_threshold"] == pytest.approx(100.0, abs=1e-6)
    # Test is only perfect with the validation threshold (0.55) and the validation matching.
    assert counts["mIoU_test_threshold"] == pytest.approx(100.0, abs=1e-6)
    tuned = ctx.storage.read_json(ctx.run.path("eval", "test_threshold.json"))
    assert tuned["threshold"] == 0.55 and tuned["match"] == {"0": 0, **inverse}
    test = ctx.storage.read_json(ctx.run.path("eval", "test.json"))
    assert test["rule"] == "argmax" and test["match"] == {"0": 0, **inverse}
    assert counts["test_images"] == 2 * C


def test_test_split_is_not_rematched(dataset, tmp_path):
    """Test predictions with another permutation would score 100 under their own Hungarian
    matching; under the reused validation matching they cannot."""
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    write_predictions(ctx, "validation", swept({1: 1, 2: 2, 3: 3}))
    write_predictions(ctx, "test", swept({1: 2, 2: 3, 3: 1}))

    counts = EvaluateStage().run(ctx)

    assert counts["mIoU_threshold"] == pytest.approx(100.0, abs=1e-6)
    test = ctx.storage.read_json(ctx.run.path("eval", "test_threshold.json"))
    assert test["IoU"][1:] == [0.0] * C  # every object pixel lands in a wrong class
    assert counts["mIoU_test_threshold"] == pytest.approx(test["IoU"][0] / (C + 1))
    assert ctx.storage.read_json(ctx.run.path("eval", "test.json"))["IoU"][1:] == [0.0] * C


def test_without_test_ground_truth_predictions_are_only_counted(tmp_path):
    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=C, train_per_class=0, val_per_class=1, test_per_class=0,
                      image_size=(16, 20), seed=1)
    ctx = make_ctx(root, str(tmp_path / "run"))
    write_predictions(ctx, "validation", perfect)
    for i in range(4):  # test images exist (the official test GT is withheld)
        ctx.storage.write_bytes(ctx.run.path("predictions", "test", "n00000001", f"x_{i}.png"),
                                encode_label(np.zeros((5, 5), dtype=np.int32)))

    counts = EvaluateStage().run(ctx)

    assert counts["test_images"] == 4
    assert "mIoU_test" not in counts
    assert not ctx.storage.exists(ctx.run.path("eval", "test.json"))


def test_without_foreground_maps_there_is_no_sweep(dataset, tmp_path):
    ctx = make_ctx(dataset, str(tmp_path / "run"))

    def labels_only(gt):
        label, _ = perfect(gt)
        label[0, 0] = 0 if label[0, 0] else 1  # one wrong pixel: below 100
        return label, None

    write_predictions(ctx, "validation", labels_only)
    counts = EvaluateStage().run(ctx)

    assert "threshold" not in counts and "mIoU_threshold" not in counts
    assert 90.0 < counts["mIoU"] < 100.0
    assert not ctx.storage.exists(ctx.run.path("eval", "threshold_curve.json"))
    assert [s["step"] for s in counts["diagnostics"]["ablation"]] == ["final model (dino, ce)"]


def test_a_missing_prediction_or_foreground_map_is_named_not_scored(dataset, tmp_path):
    """A measurement never ends a run: what cannot be scored is a note naming the file."""
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    write_predictions(ctx, "validation", perfect)
    victim = "n00000002/n00000002_1.png"
    ctx.storage.remove(ctx.run.path("predictions", "validation_fg", victim))
    counts = EvaluateStage().run(ctx)
    assert "mIoU" in counts and "mIoU_threshold" not in counts  # the official score does not need the map
    assert any(n.startswith("threshold rule not computed: ValueError") and victim in n for n in counts["notes"])
    ctx.storage.remove(ctx.run.path("predictions", "validation", victim))
    counts = EvaluateStage().run(ctx)
    assert "mIoU" not in counts
    assert any(n.startswith("validation mIoU not computed: ValueError") and victim in n for n in counts["notes"])


def test_images_rejected_by_predict_count_as_background(dataset, tmp_path):
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    write_predictions(ctx, "validation", perfect)
    victim = "n00000002/n00000002_1"
    for kind in ("validation", "validation_fg", "validation_fgclass"):
        ctx.storage.remove(ctx.run.path("predictions", kind, victim + ".png"))
    write_table(ctx.storage, ctx.run.path("predictions", "rejected_validation.parquet"),
                pa.table({"id": [f"validation/{victim}"], "path": ["x.JPEG"],
                          "reason": ["truncated or corrupt image"]}))

    counts = EvaluateStage().run(ctx)

    val = ctx.storage.read_json(ctx.run.path("eval", "validation.json"))
    assert val["unpredicted"] == [victim + ".png"] and counts["validation_unpredicted"] == 1
    assert val["num_images"] == 2 * C  # scored, not dropped
    gt = decode_label(ctx.storage.read_bytes(ctx.storage.join(
        dataset, f"ImageNetS{C}", "validation-segmentation", victim + ".png")))
    ev = SegmentationEvaluator(C)  # the same images, the victim predicted all background
    gt_dir = ctx.storage.join(dataset, f"ImageNetS{C}", "validation-segmentation")
    for url in ctx.storage.list_files(gt_dir, suffixes=(".png",)):
        other = decode_label(ctx.storage.read_bytes(url))
        ev.update(np.zeros_like(other) if victim in url else perfect(other)[0], other)
    assert counts["mIoU"] == pytest.approx(ev.finalize().miou)
    assert counts["mIoU"] < 100.0 and gt.max() > 0


def test_foreground_map_must_be_single_channel(dataset, tmp_path):
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    write_predictions(ctx, "validation", perfect)
    victim = "n00000001/n00000001_0.png"
    label_png = ctx.storage.read_bytes(ctx.run.path("predictions", "validation", victim))
    ctx.storage.write_bytes(ctx.run.path("predictions", "validation_fg", victim), label_png)  # RGB
    counts = EvaluateStage().run(ctx)
    assert any(n.startswith("threshold rule not computed:") and "mode L" in n for n in counts["notes"])


def test_thresholds_without_foreground_maps_are_refused():
    f = EvalFile("a/b.png", "p", None, "g")
    with pytest.raises(ValueError, match="foreground"):
        evaluate_thresholds(Storage(), [f], C, [0.5], progress=False)


# ---- export -----------------------------------------------------------------------------------


def evaluated_run(dataset: str, run: str) -> RunContext:
    """A run with validation and test predictions (permuted ids, background needing t = 0.55),
    evaluated, and its config.yaml."""
    ctx = make_ctx(dataset, run)
    perm = {1: 3, 2: 1, 3: 2}
    write_predictions(ctx, "validation", swept(perm))
    write_predictions(ctx, "test", swept(perm))
    ctx.storage.write_text(ctx.run.path("config.yaml"), dump_yaml(ctx.cfg))
    EvaluateStage().run(ctx)
    return ctx


def test_export_zip_has_the_benchmark_layout(dataset, tmp_path):
    ctx = evaluated_run(dataset, str(tmp_path / "run"))
    out = str(tmp_path / "sub" / "test.zip")

    result = export_submission(ctx.storage, ctx.run.root, out, method="my method", link="x.org")

    assert result.images == 2 * C and result.checked_against_dataset
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        pngs = sorted(n for n in names if n.endswith(".png"))
        assert pngs == [f"n0000000{k}/n0000000{k}_{i}.png" for k in (1, 2, 3) for i in (0, 1)]
        assert sorted(set(names) - set(pngs)) == ["match.json", "method.txt"]
        assert json.loads(zf.read("match.json")) == ctx.storage.read_json(
            ctx.run.path("eval", "match.json")) == {"0": 0, "3": 1, "1": 2, "2": 3}
        method = zf.read("method.txt").decode()
        assert method.splitlines()[0] == "Method name: my method"
        assert "Paper/Project link: x.org" in method and f"ImageNet-S{C}" in method
        for name in pngs:  # unmatched ids, the official predictions as the evaluation scored them
            assert zf.read(name) == ctx.storage.read_bytes(ctx.run.path("predictions", "test", name))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["test.zip"]  # no temp left


def test_export_refuses_incomplete_or_unevaluated_runs(dataset, tmp_path):
    ctx = make_ctx(dataset, str(tmp_path / "run"))
    write_predictions(ctx, "test", perfect)
    with pytest.raises(ValueError, match="evaluate"):
        export_submission(ctx.storage, ctx.run.root, str(tmp_path / "a.zip"))

    ctx = evaluated_run(dataset, str(tmp_path / "run2"))
    victim = "n00000003/n00000003_1.png"
    ctx.storage.remove(ctx.run.path("predictions", "test", victim))
    with pytest.raises(ValueError, match=f"1 of {2 * C} images have no prediction.*{victim}"):
        export_submission(ctx.storage, ctx.run.root, str(tmp_path / "c.zip"))
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".tmp-*"))


def test_export_command_line(dataset, tmp_path, capsys):
    ctx = evaluated_run(dataset, str(tmp_path / "run"))
    out = str(tmp_path / "test.zip")
    assert cli_main(["export", ctx.run.root, out, "--method", "m"]) == 0
    assert f"{2 * C} predictions" in capsys.readouterr().out
    assert zipfile.is_zipfile(out)
    empty = str(tmp_path / "empty-run")
    assert cli_main(["export", empty, str(tmp_path / "x.zip")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "evaluate stage" in err


def test_export_to_object_storage(dataset, tmp_path, s3_bucket):
    options, bucket = s3_bucket
    ctx = evaluated_run(dataset, str(tmp_path / "run"))
    storage = Storage(options)
    out = f"{bucket}/submissions/test.zip"

    export_submission(storage, ctx.run.root, out)

    assert storage.list_files(f"{bucket}/submissions") == [out]
    with zipfile.ZipFile(io.BytesIO(storage.read_bytes(out))) as zf:
        assert len([n for n in zf.namelist() if n.endswith(".png")]) == 2 * C
        assert zf.testzip() is None
