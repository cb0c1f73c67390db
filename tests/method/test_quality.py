"""Label-free quality signals on small arrays with known answers (pdso_ray.method.quality)."""

from __future__ import annotations

import numpy as np
import pytest

from pdso_ray.method import quality
from pdso_ray.method.quality import IGNORE_ID


def test_foreground_share_counts_labelled_pixels_only():
    label = np.zeros((4, 5), dtype=np.int32)
    label[0, :2] = 3
    label[3, :] = IGNORE_ID
    assert quality.foreground_share(label) == pytest.approx(2 / 15)
    assert np.isnan(quality.foreground_share(np.full((2, 2), IGNORE_ID)))


def test_label_set_finds_empty_images_absent_and_dominant_classes():
    labels = quality.LabelSet(classes=3)
    full = np.ones((10, 10), dtype=np.int32)
    labels.add("a", full)  # all class 1
    labels.add("b", np.zeros((10, 10), dtype=np.int32))  # all background
    half = np.zeros((10, 10), dtype=np.int32)
    half[:5] = 2
    labels.add("c", half)
    s = labels.summary()
    assert s["images"] == 3 and s["empty_images"] == 1 and s["empty_share"] == pytest.approx(1 / 3)
    assert s["median_foreground"] == pytest.approx(0.5)
    assert s["per_image"] == {"a": 1.0, "b": 0.0, "c": 0.5}
    assert s["classes_absent"] == [3]
    assert [c["images"] for c in s["per_class"]] == [1, 1, 0]
    assert s["largest_class_share"] == pytest.approx(100 / 150)


def test_agreement_resizes_the_prediction_and_ignores_ignored_pixels():
    reference = np.zeros((4, 4), dtype=np.int32)
    reference[:2] = 2
    reference[3, 3] = IGNORE_ID
    prediction = np.kron(reference.clip(max=2), np.ones((2, 2), dtype=np.int32))  # 8x8, same picture
    prediction[-2:, -2:] = 1  # under the ignored pixel: does not count
    assert quality.agreement(prediction, reference) == (1.0, 1.0)
    empty = np.zeros((8, 8), dtype=np.int32)
    same, iou = quality.agreement(empty, reference)
    assert same == pytest.approx(7 / 15) and iou == 0.0
    same, iou = quality.agreement(empty, np.zeros((4, 4), dtype=np.int32))
    assert same == 1.0 and np.isnan(iou)


def test_margin_ratio_is_zero_at_a_centroid_and_one_between_two():
    centroids = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]], dtype=np.float32)
    x = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.5]], dtype=np.float32)
    nearest, ratio = quality.margin_ratios(x, centroids)
    assert nearest[0] == 0 and nearest[2] == 1
    assert ratio[0] == pytest.approx(0.0) and ratio[1] == pytest.approx(1.0)
    assert ratio[2] == pytest.approx(0.5 / np.hypot(2.0, 0.5), rel=1e-5)
    assert quality.margin_ratios(x, centroids[:1])[1].tolist() == [0.0, 0.0, 0.0]


def test_cluster_signals_sizes_empty_and_largest():
    out = quality.cluster_signals(np.array([0, 0, 0, 2]), 4, np.array([0.2, 0.4, 0.9]), np.array([0, 0, 2]))
    assert out["sizes"] == [3, 0, 1, 0] and out["empty"] == 2
    assert out["largest"] == 0 and out["largest_share"] == 0.75
    assert out["margin_ratio_median"] == pytest.approx(0.4)
    assert out["per_cluster_margin"] == [pytest.approx(0.3), None, pytest.approx(0.9), None]
    with pytest.raises(ValueError, match="0..3"):
        quality.cluster_signals(np.array([4]), 4)


def test_seed_stability_separated_groups_are_stable_noise_is_not():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8, dtype=np.float32) * 20
    truth = np.repeat(np.arange(4), 50)
    x = centres[truth] + rng.normal(size=(200, 8)).astype(np.float32)
    relabelled = (truth + 1) % 4  # any ids: the matching decides
    stable = quality.seed_stability(x, relabelled, 4, seed=7)
    assert stable["nmi"] == pytest.approx(1.0) and stable["agreement"] == pytest.approx(1.0)
    noise = rng.normal(size=(200, 8)).astype(np.float32)
    shaky = quality.seed_stability(noise, truth, 4, seed=7)  # labels unrelated to the rows
    assert shaky["nmi"] < 0.2


def test_border_share():
    peaks = np.array([[0.5, 0.5], [0.05, 0.5], [0.5, 0.95], [0.3, 0.7]])
    assert quality.border_share(peaks) == 0.5
    assert np.isnan(quality.border_share(np.zeros((0, 2))))


def _labels(**changes) -> dict:
    per_class = [{"class": c, "images": 5, "foreground_share": 0.25} for c in range(1, 5)]
    return {"images": 20, "median_foreground": 0.3, "empty_images": 1, "empty_share": 0.05,
            "per_class": per_class, "classes_absent": [], "largest_class_share": 0.25, **changes}


def _healthy() -> dict:
    return {"standins": False, "ground_truth": False, "pseudo_labels": _labels(), "predictions": _labels(),
            "agreement": {"images": 20, "median": 0.9, "median_foreground_iou": 0.7},
            "clusters": {"classes": 4, "empty": 0, "largest_share": 0.3},
            "stability": {"nmi": 0.9, "agreement": 0.95}, "saliency": {"images": 20, "border_share": 0.3},
            "classes": quality.class_agreement(np.diag([900, 50, 60, 70, 80]))}


def test_class_agreement_is_one_on_the_diagonal_and_near_zero_for_independent_classes():
    perfect = quality.class_agreement(np.diag([900, 50, 60, 70, 80]))
    assert perfect["foreground_pixels"] == 260 and perfect["agreement"] == 1.0 and perfect["kappa"] == 1.0
    # the true class of a foreground pixel independent of the predicted one: the product of the marginals
    rows, cols = np.array([10, 20, 30, 40]), np.array([40, 30, 20, 10])
    confusion = np.zeros((5, 5), dtype=np.int64)
    confusion[0, 0] = 1000
    confusion[1:, 1:] = np.outer(rows, cols)
    confusion[1:, 0] = 7  # background in the truth, foreground predicted: not in the shared foreground
    independent = quality.class_agreement(confusion)
    assert independent["foreground_pixels"] == 100 * 100
    assert independent["agreement"] == pytest.approx(independent["chance"]) == pytest.approx(0.2)
    assert independent["kappa"] == pytest.approx(0.0, abs=1e-12)
    # half the shared pixels right, half spread evenly: chance 1/4, agreement 5/8, κ 1/2
    half = np.zeros((5, 5))
    half[1:, 1:] = np.eye(4) * 10 + 10 / 4
    assert quality.class_agreement(half)["kappa"] == pytest.approx(0.5)
    assert quality.class_agreement(np.diag([5, 0, 0]))["foreground_pixels"] == 0


def test_a_healthy_run_has_no_warning_and_unmeasured_signals_are_skipped():
    assert quality.quality_warnings(_healthy()) == []
    assert quality.quality_warnings({"predictions": "not computed: x", "clusters": "not computed: y"}) == []


def test_a_degenerate_run_gets_a_warning_per_sign_each_with_a_fix():
    signals = _healthy()
    signals.update(standins=True,
                   predictions=_labels(median_foreground=0.0, empty_images=19, empty_share=0.95,
                                       largest_class_share=0.97, classes_absent=[3]),
                   pseudo_labels=_labels(median_foreground=0.02, empty_images=5, empty_share=0.25),
                   agreement={"images": 20, "median": 0.97, "median_foreground_iou": 0.05},
                   clusters={"classes": 4, "empty": 1, "largest_share": 0.8},
                   stability={"nmi": 0.2, "agreement": 0.4}, saliency={"images": 20, "border_share": 0.8},
                   classes={"foreground_pixels": 3000, "agreement": 0.27, "chance": 0.17, "kappa": 0.12})
    warnings = quality.quality_warnings(signals)
    assert len(warnings) == 11
    assert all("fix:" in w for w in warnings)
    assert "stand-in" in warnings[0] and "synthetic shapes" in warnings[0]
    assert "predicts background on 19 of 20 images" in warnings[1] and "2.0 %" in warnings[1]
    # with ground truth the stand-ins' warning is left to the mIoU
    assert "agree on 27 % of the pixels, against 17 % by chance (κ 0.12)" in warnings[-1]
    signals["ground_truth"] = True
    assert len(quality.quality_warnings(signals)) == 10
