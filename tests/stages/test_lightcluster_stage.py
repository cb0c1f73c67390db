"""``method: lightcluster`` through the pipeline: its stages, its outputs in PDSO's formats below
``lightcluster/``, exact accounting, resume, and the report setting both methods side by side."""

import os

import numpy as np
import pytest
from PIL import Image

from pdso_ray.config import ConfigError, load_config
from pdso_ray.data.ids import png_rel
from pdso_ray.data.imagenet_s import decode_label, list_split
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.method.overlay import class_colors
from pdso_ray.pipeline import run_pipeline
from pdso_ray.report import build_report
from pdso_ray.run_layout import RunLayout
from pdso_ray.plan import method_stages
from pdso_ray.stages.lightcluster import MASK_BITS, image_rng, mask_bits, mask_from_bits, segment_rows
from pdso_ray.storage import Storage
from pdso_ray.tables import read_folder

CLASSES = 3
PER_CLASS = 4
FAST = ["features.batch_size=8", "lightcluster.batch_size=8", "lightcluster.nredo=2", "cluster.nredo=2",
        "lightcluster.refine_iterations=3"]


def _cfg(root, output, *extra):
    return load_config("jobs/configs/demo.yaml", [f"data.root={root}", f"output={output}",
                                                  f"data.classes={CLASSES}", "method=lightcluster", *FAST, *extra])


def test_each_method_runs_its_own_stages():
    assert method_stages("pdso") == ["features", "cluster", "denoise", "purify", "pseudo_labels", "finetune",
                                     "predict", "evaluate", "report"]
    assert method_stages("lightcluster") == ["features", "cluster", "lightcluster", "evaluate", "report"]
    assert method_stages("lightcluster", lightcluster_finetune=True) == [
        "features", "cluster", "lightcluster", "finetune", "predict", "evaluate", "report"]


def test_a_stage_of_the_other_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'denoise' is a stage of method pdso"):
        _cfg(str(tmp_path), str(tmp_path / "run"), "stages=features,denoise")


def test_mask_bits_round_trip_and_the_sampler_is_per_image():
    rng = np.random.default_rng(0)
    masks = {name: rng.random((5, 7)) > 0.5 for name in MASK_BITS}
    bits = mask_bits(masks)
    for name in MASK_BITS:
        np.testing.assert_array_equal(mask_from_bits(bits, name), masks[name])
    a = image_rng(3, "train/n1/x").integers(0, 1000, 5)
    assert np.array_equal(a, image_rng(3, "train/n1/x").integers(0, 1000, 5))
    assert not np.array_equal(a, image_rng(3, "train/n1/y").integers(0, 1000, 5))


def test_an_image_both_trained_on_and_predicted_is_segmented_once_in_both_roles():
    train = [{"id": "all/a", "path": "p/a", "split": "all", "category": 2},
             {"id": "train/b", "path": "p/b", "split": "train", "category": 0}]
    evaluation = [{"id": "all/a", "path": "p/a", "split": "all", "category": -1},
                  {"id": "validation/c", "path": "p/c", "split": "validation", "category": -1}]
    rows = {r["id"]: r for r in segment_rows(train, evaluation)}
    assert len(rows) == 3
    assert (rows["all/a"]["train"], rows["all/a"]["eval"], rows["all/a"]["category"]) == (True, True, 2)
    assert (rows["train/b"]["train"], rows["train/b"]["eval"]) == (True, False)
    assert (rows["validation/c"]["train"], rows["validation/c"]["eval"], rows["validation/c"]["category"]) == \
        (False, True, -1)


def test_lightcluster_end_to_end_resumes_and_keeps_pdso_untouched(ray_local, tmp_path):
    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=2, test_per_class=1, seed=4)
    output = str(tmp_path / "run")
    summary = run_pipeline(_cfg(root, output))
    storage, run = Storage(), RunLayout(output, method="lightcluster")
    assert summary["method"] == "lightcluster"
    assert [s for s in summary["stage_order"]] == method_stages("lightcluster")
    assert summary["images_total"] == CLASSES * PER_CLASS
    assert {summary["stages"][s]["status"] for s in method_stages("lightcluster")} == {"done"}
    # nothing of PDSO's was written; the shared stages sit at the top
    assert not os.path.exists(os.path.join(output, "predictions"))
    assert os.path.exists(os.path.join(output, "features")) and os.path.exists(os.path.join(output, "cluster"))
    # train labels (PDSO's formats, the image's size) and the stats finetune reads
    stats = read_folder(storage, run.label_stats_dir)
    assert stats.num_rows == CLASSES * PER_CLASS
    for row in stats.to_pylist():
        raw = decode_label(storage.read_bytes(row["label_raw"]))
        refined = decode_label(storage.read_bytes(row["label_refined"]))
        assert raw.shape == refined.shape
        assert set(np.unique(refined)) <= set(range(CLASSES + 1))
        assert set(np.unique(refined)) - {0} <= {row["main_class"]}  # one class per image
        # beside each, its colour preview and its overlay on the image
        colour = np.asarray(Image.open(run.colour_png("refined", row["id"])).convert("RGB"))
        assert np.array_equal(colour, class_colors()[refined])
        assert Image.open(run.overlay_jpg("raw", row["id"])).format == "JPEG"
    # one prediction per evaluation image, of its ground truth's size
    for split, n in (("validation", 2 * CLASSES), ("test", CLASSES)):
        listing = list_split(storage, root, CLASSES, split)
        assert summary["splits"][split] == {"images": n, "predicted": n, "rejected": 0}
        for record in listing.images:
            pred = decode_label(storage.read_bytes(run.prediction_png(record.id)))
            gt_url = os.path.join(root, f"ImageNetS{CLASSES}", f"{split}-segmentation", png_rel(record.id))
            assert pred.shape == decode_label(storage.read_bytes(gt_url)).shape
            assert np.array_equal(np.asarray(Image.open(run.colour_png("predictions", record.id)).convert("RGB")), class_colors()[pred])
            assert os.path.exists(run.overlay_jpg("predictions", record.id))
    # the ablation: every mask, then the final predictions (= the refined masks, no training)
    ablation = summary["diagnostics"]["ablation"]
    assert [s["step"] for s in ablation][:5] == ["dataset level alone", "category level alone", "image level alone",
                                                "consistent mask, upsampled (no refinement)", "consistent mask, refined"]
    assert ablation[-1]["mIoU"] == pytest.approx(summary["mIoU"]) == pytest.approx(ablation[4]["mIoU"])
    levels = summary["diagnostics"]["lightcluster"]["levels"]
    assert [lv["mask"] for lv in levels] == list(MASK_BITS) and all(0 <= lv["fg_iou"] <= 1 for lv in levels)
    assert 0 < summary["diagnostics"]["lightcluster"]["classes"]["purity"] <= 1

    # an interrupted stage resumes: lose a prediction, a label record and the manifest
    some = list_split(storage, root, CLASSES, "validation").images[0].id
    before = storage.read_bytes(run.prediction_png(some))
    os.remove(run.prediction_png(some))
    labelled = sorted(os.listdir(run.lightcluster_path("labelled")))
    os.remove(os.path.join(run.lightcluster_path("labelled"), labelled[0]))
    os.remove(os.path.join(run.stage_dir("lightcluster"), "_SUCCESS.json"))
    again = run_pipeline(_cfg(root, output))
    assert again["stages"]["lightcluster"]["status"] == "done"
    assert again["stages"]["features"]["status"] == "skipped"
    assert storage.read_bytes(run.prediction_png(some)) == before
    assert again["mIoU"] == pytest.approx(summary["mIoU"])


def test_the_report_sets_both_methods_side_by_side(tmp_path):
    storage, output = Storage(), str(tmp_path / "run")
    for method, miou in (("pdso", 41.5), ("lightcluster", 33.25)):
        run = RunLayout(output, method=method)
        storage.write_json(run.summary_file, {"method": method, "mIoU": miou, "stages": {
            "features": {"status": "done", "seconds": 100.0}, "evaluate": {"status": "done", "seconds": 7.0}},
            "diagnostics": {"ablation": [{"step": f"{method} step", "mIoU": miou - 1}]}})
    page = open(build_report(storage, output, method="lightcluster"), encoding="utf-8").read()
    methods = page[page.index("Methods on this data"):page.index("Ablation")]
    assert "33.25" in methods and "41.5" in methods and methods.index("lightcluster") < methods.index("pdso")
    assert "../../report/index.html" in methods  # the PDSO report, from lightcluster/report/
    ablation = page[page.index("Ablation"):]
    assert "lightcluster step" in ablation and "pdso step" in ablation
    assert os.path.exists(os.path.join(output, "lightcluster", "report", "index.html"))
