"""The ImageNet-S protocol on arrays: matching, IoU accumulation, ignore handling, bins."""

import itertools
import json
import math

import numpy as np
import pytest

from pdso_ray.method.metrics import (
    IGNORE_ID,
    SegmentationEvaluator,
    apply_match,
    check_match,
    foreground_iou,
    hungarian_match,
    iou_from_confusion,
    resize_nearest,
    size_bin,
)


def _evaluate(pairs, num_classes, **kwargs):
    ev = SegmentationEvaluator(num_classes, **kwargs)
    for i, (pred, gt) in enumerate(pairs):
        ev.update(np.asarray(pred), np.asarray(gt), name=f"img{i}")
    return ev.finalize()


def _random_gt(rng, num_classes, n_images, size=12):
    """Label maps that together contain every id 0..C, so a perfect prediction scores 100."""
    out = []
    for i in range(n_images):
        gt = np.zeros((size, size), dtype=np.int64)
        cls = 1 + (i % num_classes)
        gt[2:8, 3:9] = cls
        gt[0, :] = IGNORE_ID
        gt[9:, 9:] = rng.integers(1, num_classes + 1)
        out.append(gt)
    return out


def test_perfect_prediction_scores_100():
    gts = _random_gt(np.random.default_rng(0), num_classes=4, n_images=8)
    res = _evaluate([(np.where(g == IGNORE_ID, 0, g), g) for g in gts], 4)
    assert res.miou == pytest.approx(100.0)
    assert res.iou == pytest.approx([100.0] * 5)
    assert res.match == {i: i for i in range(5)}
    assert res.pixel_accuracy == pytest.approx(100.0)
    assert res.image_accuracy == pytest.approx(100.0)


def test_permuted_labels_score_100_after_matching():
    rng = np.random.default_rng(1)
    c = 6
    perm = np.concatenate([[0], rng.permutation(c) + 1])  # gt id -> predicted id
    gts = _random_gt(rng, c, n_images=12)
    pairs = [(perm[np.where(g == IGNORE_ID, 0, g)], g) for g in gts]
    res = _evaluate(pairs, c)
    assert res.miou == pytest.approx(100.0)
    assert res.match == {int(perm[g]): g for g in range(c + 1)}


def test_hand_worked_partial_case():
    # C = 2. Image A (the ignored pixel's prediction, 1, must vanish):
    #   gt [[0,1,1],[0,1,1000]]  pred [[0,2,2],[2,2,1]]
    #   valid: gt 0 1 1 0 1 / pred 0 2 2 2 2; present: pred {2}, gt {1}.
    # Image B: gt [[2,2],[0,0]]  pred [[1,1],[1,0]]; present: pred {1}, gt {2}.
    # Co-occurrence [p-1, g-1] = [[0,1],[1,0]] -> match 1->2, 2->1 (0->0).
    # Matched A: pred 0 1 1 1 1 vs gt 0 1 1 0 1; matched B: pred 2 2 2 0 vs gt 2 2 0 0.
    #   class 0: TP 1+1=2, P 1+1=2, T 2+2=4 -> 2/(4+2-2) = 50%
    #   class 1: TP 3, P 4, T 3 -> 3/4 = 75%
    #   class 2: TP 2, P 3, T 2 -> 2/3 = 66.667%
    #   mIoU = (50 + 75 + 66.667)/3 = 63.889%; pixel accuracy 7/9 = 77.778%
    # Acc: A's top matched id 1 is in its GT, B's 2 too -> 100%.
    # Size bins: A (5 valid px): class 1 has 3 -> 300 > 50*5 -> L. B (4 px): class 2 has 2 ->
    #   200 <= 50*4 -> ML. L = mean(IoU0 = 1/2, IoU1 = 3/4) = 62.5%;
    #   ML = mean(IoU0 = 1/(2+1-1) = 1/2, IoU2 = 2/3) = 58.333%; S and MS unused -> NaN.
    a_gt = [[0, 1, 1], [0, 1, IGNORE_ID]]
    a_pred = [[0, 2, 2], [2, 2, 1]]
    b_gt = [[2, 2], [0, 0]]
    b_pred = [[1, 1], [1, 0]]
    res = _evaluate([(a_pred, a_gt), (b_pred, b_gt)], 2)
    assert res.match == {0: 0, 1: 2, 2: 1}
    assert res.iou == pytest.approx([50.0, 75.0, 200.0 / 3])
    assert res.miou == pytest.approx((50.0 + 75.0 + 200.0 / 3) / 3)
    assert res.pixel_accuracy == pytest.approx(700.0 / 9)
    assert res.image_accuracy == pytest.approx(100.0)
    assert res.num_pixels == 9 and res.num_images == 2
    assert res.size_miou["L"] == pytest.approx(62.5)
    assert res.size_miou["ML"] == pytest.approx((50.0 + 200.0 / 3) / 2)
    assert math.isnan(res.size_miou["S"]) and math.isnan(res.size_miou["MS"])


def test_ignore_pixels_are_dropped_from_prediction_before_matching():
    # Predicted id 2 appears only under ignored pixels: were it counted as present, it would
    # co-occur with GT 1 twice and 1 -> 1, 2 -> 2 would lose to 2 -> 1.
    gt1 = np.array([[1, 1, IGNORE_ID, IGNORE_ID]])
    pred1 = np.array([[1, 1, 2, 2]])
    gt2 = np.array([[1, 1, IGNORE_ID, IGNORE_ID]])
    pred2 = np.array([[1, 1, 2, IGNORE_ID]])  # even the ignore id is fine there
    gt3 = np.array([[2, 2, 0, 0]])
    pred3 = np.array([[2, 2, 0, 0]])
    res = _evaluate([(pred1, gt1), (pred2, gt2), (pred3, gt3)], 2)
    assert res.match == {0: 0, 1: 1, 2: 2}
    assert res.num_pixels == 8
    assert res.iou == pytest.approx([100.0, 100.0, 100.0])


def test_counts_accumulate_in_int64_past_float32_precision():
    # Class 1: 2**24 correct pixels plus one missed one. In float32, 2**24 + 1 == 2**24 and the
    # IoU would come out as exactly 100.
    big = np.ones((2048, 2048), dtype=np.uint8)  # 2**22 pixels
    ev = SegmentationEvaluator(1)
    for _ in range(4):
        ev.update(big, big)
    ev.update(np.zeros((1, 1), np.uint8), np.ones((1, 1), np.uint8))
    assert ev.confusion.dtype == np.int64
    assert ev.confusion[1, 1] == 2**24 and ev.confusion[0, 1] == 1
    res = ev.finalize()
    expected = 100.0 * 2**24 / (2**24 + 1)
    assert res.iou[1] == pytest.approx(expected, abs=1e-9)
    assert res.iou[1] < 100.0
    assert res.num_pixels == 2**24 + 1


def test_image_accuracy_breaks_ties_on_matched_ids():
    # Images 1, 2 make the match swap 1 <-> 2. Image 3 predicts ids 1 and 2 on 2 pixels each;
    # matched, they become 2 and 1, so the tie goes to matched id 1 (argmax takes the first),
    # which its GT {0, 2} lacks: a miss. Acc = 2/3. (Breaking the tie on unmatched ids would
    # pick 1 -> 2 and count a hit.)
    # Co-occurrence [[0, 2], [1, 1]]: identity totals 1, swap 3.
    pairs = [
        ([[2, 2], [0, 0]], [[1, 1], [0, 0]]),
        ([[1, 1], [0, 0]], [[2, 2], [0, 0]]),
        ([[1, 1], [2, 2]], [[2, 0], [0, 0]]),
    ]
    res = _evaluate(pairs, 2)
    assert res.match == {0: 0, 1: 2, 2: 1}
    assert res.image_accuracy == pytest.approx(200.0 / 3)
    fixed = _evaluate(pairs, 2, match={0: 0, 1: 2, 2: 1})
    assert fixed.image_accuracy == pytest.approx(200.0 / 3)
    assert fixed.iou == pytest.approx(res.iou)


def test_no_predicted_foreground_is_an_image_accuracy_miss():
    res = _evaluate([([[0, 0]], [[1, 0]]), ([[1, 0]], [[1, 0]])], 1)
    assert res.image_accuracy == pytest.approx(50.0)


def test_fixed_match_is_applied_not_recomputed():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[2, 2, 1, 1]])
    identity = _evaluate([(pred, gt)], 2, match={"0": 0, "1": 1, "2": 2})
    assert identity.match == {0: 0, 1: 1, 2: 2}
    assert identity.iou == pytest.approx([0.0, 0.0, 0.0])
    swapped = _evaluate([(pred, gt)], 2, match={0: 0, 1: 2, 2: 1})
    assert swapped.miou == pytest.approx(200.0 / 3)  # background absent everywhere: 0


def test_fixed_match_missing_an_id_is_an_error():
    ev = SegmentationEvaluator(2, match={0: 0, 1: 1})
    with pytest.raises(ValueError, match="does not cover"):
        ev.update(np.array([[2, 1]]), np.array([[1, 1]]), name="x.png")


def test_size_mismatch_is_an_error_naming_the_image():
    ev = SegmentationEvaluator(3)
    with pytest.raises(ValueError, match=r"n01/a\.png.*\(4, 4\).*\(4, 5\)"):
        ev.update(np.zeros((4, 4), int), np.zeros((4, 5), int), name="n01/a.png")


def test_resize_nearest_on_request_is_recorded():
    pred = np.array([[1, 2], [0, 1]])
    gt = np.kron(pred, np.ones((2, 3), dtype=int))  # each pixel a 2x3 block
    ev = SegmentationEvaluator(2, resize="nearest")
    ev.update(pred, gt, name="n01/a.png")
    ev.update(gt, gt, name="n01/b.png")
    res = ev.finalize()
    assert res.resized == ["n01/a.png"]
    assert res.miou == pytest.approx(100.0)


def test_resize_nearest_keeps_ids_and_centres():
    label = np.array([[1, 2, 3], [4, 5, 6]])
    assert resize_nearest(label, (4, 6)).tolist() == [
        [1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6]]
    assert resize_nearest(label, (1, 3)).tolist() == [[4, 5, 6]]


@pytest.mark.parametrize("pred,gt,what", [
    ([[0, 3]], [[0, 1]], r"prediction \(img0\) has ids outside 0..2: \[3\]"),
    ([[0, IGNORE_ID]], [[0, 1]], r"prediction \(img0\) has ids outside 0..2: \[1000\]"),
    ([[0, -1]], [[0, 1]], r"outside 0..2: \[-1\]"),
    ([[0, 1]], [[0, 7]], r"GT \(img0\) has ids outside 0..2: \[7\]"),
    ([[0.0, 1.0]], [[0, 1]], "integer array"),
    ([0, 1], [0, 1], "2-D"),
])
def test_bad_ids_and_arrays_are_errors(pred, gt, what):
    with pytest.raises(ValueError, match=what):
        _evaluate([(pred, gt)], 2)


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationEvaluator(0)
    with pytest.raises(ValueError, match="resize"):
        SegmentationEvaluator(3, resize="bilinear")
    with pytest.raises(ValueError, match="outside 0..3"):
        SegmentationEvaluator(3, match={1: 4})
    with pytest.raises(ValueError, match="no images"):
        SegmentationEvaluator(3).finalize()


def test_hungarian_match_reaches_the_brute_force_optimum():
    rng = np.random.default_rng(2)
    for _ in range(20):
        cooc = rng.integers(0, 5, size=(5, 5))
        match = hungarian_match(cooc)
        assert match[0] == 0 and sorted(match.values()) == list(range(6))
        total = sum(cooc[p - 1, g - 1] for p, g in match.items() if p)
        best = max(sum(cooc[i, j] for i, j in enumerate(perm))
                   for perm in itertools.permutations(range(5)))
        assert total == best


def test_apply_match_and_iou_from_confusion():
    conf = np.array([[5, 1, 0], [0, 0, 4], [2, 3, 0]])  # rows predicted, columns GT
    matched = apply_match(conf, {0: 0, 1: 2, 2: 1})
    assert matched.tolist() == [[5, 1, 0], [2, 3, 0], [0, 0, 4]]
    # class 0: TP 5, P 6, T 7 -> 5/8; class 1: 3/(4+5-3); class 2: 4/4; absent class -> 0
    assert iou_from_confusion(matched) == pytest.approx([62.5, 50.0, 100.0])
    assert iou_from_confusion(np.zeros((2, 2), int)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"\[2\] have pixels"):
        apply_match(conf, {0: 0, 1: 1})


def test_size_bin_edges_are_exact():
    # 100 px: 5 -> S, 6 -> MS, 25 -> MS, 26 -> ML, 50 -> ML, 51 -> L; 1 of 21 px is 4.76% -> S.
    assert size_bin(np.array([5, 6, 25, 26, 50, 51]), 100).tolist() == [0, 1, 1, 2, 2, 3]
    assert size_bin(np.array([1]), 21).tolist() == [0]


def test_check_match_accepts_json_keys():
    assert check_match({"0": 0, "2": "1"}, 2) == {0: 0, 2: 1}
    with pytest.raises(ValueError, match="not an integer"):
        check_match({"a": 1}, 2)


def test_result_json_is_strict_json():
    res = _evaluate([([[1, 0]], [[1, 0]])], 1)
    out = res.to_json()
    assert out["mIoU"] == pytest.approx(100.0) and out["match"] == {"0": 0, "1": 1}
    # class 1 covers 1 of 2 pixels: 50% -> ML; the other bins are unused (NaN -> null)
    assert out["size_mIoU"] == {"S": None, "MS": None, "ML": pytest.approx(100.0), "L": None}
    json.dumps(out, allow_nan=False)


def test_foreground_iou_ignores_classes_and_the_matching():
    # 2 classes; pred finds the object's pixels but calls them the wrong class, and adds 2 pixels
    gt = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
    pred = np.array([[0, 2, 2, 2], [0, 1, 1, 1]])
    ev = SegmentationEvaluator(2)
    ev.update(pred, gt)
    res = ev.finalize()
    assert res.foreground_iou == pytest.approx(100 * 4 / 6)  # 4 shared fg pixels, 6 fg in either
    assert res.to_json()["FgIoU"] == pytest.approx(100 * 4 / 6)
    assert foreground_iou(np.zeros((3, 3), np.int64)) != foreground_iou(np.zeros((3, 3), np.int64))  # NaN


def test_per_image_miou_and_the_matched_confusion_matrix():
    """Two images, predicted ids 2 and 1 standing for GT classes 1 and 2 (the matching swaps them):
    the first image is perfect, the second half wrong."""
    gt_a = np.array([[0, 0, 1, 1]])
    gt_b = np.array([[0, 2, 2, 2]])
    ev = SegmentationEvaluator(2, per_image=True)
    ev.update(np.array([[0, 0, 2, 2]]), gt_a, name="a")
    ev.update(np.array([[0, 1, 0, 2]]), gt_b, name="b")
    result = ev.finalize()
    assert result.match[2] == 1 and result.match[1] == 2
    # b: background IoU 1/2, class 2 IoU 1/3 (one pixel right of three GT, one more predicted as 1)
    assert result.image_miou["a"] == pytest.approx(100.0)
    assert result.image_miou["b"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 0) / 3)  # ids 0, 1 (wrong), 2
    assert result.confusion.tolist() == [[3, 0, 1], [0, 2, 1], [0, 0, 1]]  # matched predicted × GT
    assert result.confusion.sum() == result.num_pixels == 8
