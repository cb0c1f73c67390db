
import numpy as np
import pytest
from scipy import ndimage

from pdso_ray.method.metrics import SegmentationEvaluator
from pdso_ray.method.refiners import (
    IGNORE,
    REFINERS,
    RefineContext,
    RefineParams,
    get_refiner,
    merge_class_masks,
    refine_gmm,
    refine_none,
    refine_sam_select,
    refine_spo,
)

H = W = 64
IMAGE = np.zeros((H, W, 3), np.uint8)


def _rect(y0, y1, x0, x1, shape=(H, W)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def _iou(a, b):
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


class FakeSam:
    """A deterministic "good SAM" for square images, recording every call.

    A box prompt selects the ground-truth object of highest IoU with the filled box. Multimask
    answers (box rectangle, object, dilated object) with predicted IoUs (0.6, 0.95, 0.8), so the
    right choice is candidate 1. Low-res logits are +8/-8 at image resolution (L = H); given a
    ``mask_input``, the answer is the mask those logits encode, so a second pass returns exactly
    what the first pass fed it. ``generate_automatic`` returns ``auto`` (mask, score) pairs.
    """

    def __init__(self, objects, auto=()):
        self.objects = [np.asarray(o, bool) for o in objects]
        self.auto = list(auto)
        self.calls = []
        self.set_image_calls = 0
        self.shape = None

    def set_image(self, image):
        self.set_image_calls += 1
        self.shape = image.shape[:2]

    def _target(self, box):
        x0, y0, x1, y1 = np.asarray(box).astype(int)
        rect = _rect(y0, y1 + 1, x0, x1 + 1, self.shape)
        ious = [_iou(rect, o) for o in self.objects]
        if not ious or max(ious) == 0:
            return np.zeros(self.shape, bool), rect
        return self.objects[int(np.argmax(ious))], rect

    def predict(self, boxes=None, points=None, point_labels=None, mask_input=None, multimask=True,
                return_masks=True):
        self.calls.append({
            "boxes": None if boxes is None else np.array(boxes),
            "points": None if points is None else np.array(points),
            "point_labels": None if point_labels is None else np.array(point_labels),
            "mask_input": None if mask_input is None else np.array(mask_input),
            "multimask": multimask,
            "return_masks": return_masks,
        })
        masks, ious = [], []
        for i in range(len(boxes)):
            target, rect = self._target(boxes[i])
            if mask_input is not None:
                target = mask_input[i, 0] > 0
            if multimask:
                masks.append([rect, target, ndimage.binary_dilation(target, iterations=2)])
                ious.append([0.6, 0.95, 0.8])
            else:
                masks.append([target])
                ious.append([0.9])
        masks = np.array(masks, bool)
        low_res = np.where(masks, 8.0, -8.0).astype(np.float32)
        return (masks if return_masks else None), np.array(ious, np.float32), low_res

    def generate_automatic(self, image):
        return list(self.auto)


def _two_object_scene():
    """Object A (main, class 1) overlapping object B (class 2); raw label with noise."""
    a, b = _rect(8, 32, 8, 32), _rect(20, 44, 20, 44)
    raw = np.zeros((H, W), np.int32)
    raw[a] = 1
    raw[b & ~a] = 2
    raw[14:17, 14:17] = 0  # a hole in A
    raw[60, 60:62] = 1  # 2-px speckle: below min_area
    raw[50:56, 2:8] = 5  # a class outside the context
    sal = np.zeros((H, W))
    sal[10, 10] = 1.0  # the peak lies in A
    return a, b, raw, sal


def test_spo_merge_order_main_then_secondary_then_background():
    a, b, raw, sal = _two_object_scene()
    params = RefineParams(min_area=10)
    out = refine_spo(IMAGE, raw, sal, RefineContext(1, (2,), params=params), FakeSam([a, b]))
    expected = np.zeros((H, W), np.int32)
    expected[a] = 1
    expected[b & ~a] = 2
    np.testing.assert_array_equal(out.label, expected)  # hole filled, speckle and class 5 -> 0
    assert out.label.dtype == np.int32
    assert out.stats["prompts"] == 2 and out.stats["masks_used"] == 2
    assert out.stats["pixels_changed"] == int(np.count_nonzero(expected != raw))

    # with class 2 as main, the overlap goes to class 2
    swapped = refine_spo(IMAGE, raw, sal, RefineContext(2, (1,), params=params), FakeSam([a, b]))
    assert np.all(swapped.label[a & b] == 2)
    assert np.all(swapped.label[a & ~b] == 1)


def test_spo_two_batched_passes_feed_best_low_res_logits():
    a, b, raw, _ = _two_object_scene()
    raw[2:6, 40:60] = 2  # a second component of class 2: three boxes in all
    small = _rect(2, 6, 40, 60)
    fake = FakeSam([a, b, small])
    no_peak = np.zeros((H, W))  # peak at (0, 0), background: no point prompt
    refine_spo(IMAGE, raw, no_peak, RefineContext(1, (2,), params=RefineParams(min_area=10)), fake)
    assert fake.set_image_calls == 1
    assert len(fake.calls) == 2  # one call per pass for all boxes of all classes
    first, second = fake.calls
    assert first["multimask"] and first["mask_input"] is None and not first["return_masks"]
    assert not second["multimask"] and second["return_masks"]
    assert first["points"] is None and second["points"] is None
    # boxes go class by class (main first), components in raster order
    np.testing.assert_array_equal(first["boxes"], [[8, 8, 31, 31], [40, 2, 59, 5], [20, 20, 43, 43]])
    np.testing.assert_array_equal(first["boxes"], second["boxes"])
    # pass 2 receives candidate 1 (highest predicted IoU) of pass 1, i.e. the objects' logits
    for i, obj in enumerate([a, small, b]):
        np.testing.assert_array_equal(second["mask_input"][i, 0] > 0, obj)


def test_spo_saliency_peak_rides_on_its_box_in_a_second_call():
    a, b, raw, sal = _two_object_scene()  # the peak (10, 10) lies in A
    fake = FakeSam([a, b])
    out = refine_spo(IMAGE, raw, sal, RefineContext(2, (1,), params=RefineParams(min_area=10)), fake)
    assert fake.set_image_calls == 1
    assert [c["multimask"] for c in fake.calls] == [True, True, False, False]
    plain, with_point = fake.calls[0], fake.calls[1]
    np.testing.assert_array_equal(plain["boxes"], [[20, 20, 43, 43]])  # class 2 (main) box only
    assert plain["points"] is None
    np.testing.assert_array_equal(with_point["boxes"], [[8, 8, 31, 31]])
    np.testing.assert_array_equal(with_point["points"], [[[10, 10]]])
    np.testing.assert_array_equal(with_point["point_labels"], [[1]])
    # results are scattered back in prompt order: pass 2 got each box's own best logits
    np.testing.assert_array_equal(fake.calls[2]["mask_input"][0, 0] > 0, b)
    np.testing.assert_array_equal(fake.calls[3]["mask_input"][0, 0] > 0, a)
    assert np.all(out.label[a & b] == 2) and np.all(out.label[a & ~b] == 1)


def test_spo_ignores_small_components_and_skips_sam_without_prompts():
    raw = np.zeros((H, W), np.int32)
    raw[5:8, 5:8] = 1  # 9 px < min_area
    fake = FakeSam([_rect(5, 8, 5, 8)])
    out = refine_spo(IMAGE, raw, np.zeros((H, W)), RefineContext(1, params=RefineParams(min_area=10)), fake)
    assert fake.calls == [] and fake.set_image_calls == 0
    assert not out.label.any() and out.stats["prompts"] == 0
    out = refine_spo(IMAGE, raw, np.zeros((H, W)), RefineContext(1, params=RefineParams(min_area=9)), fake)
    assert len(fake.calls[0]["boxes"]) == 1 and out.label.sum() == 9


def _two_component_scene():
    """Class 1 in two components, A (first in raster order) and B, the saliency peak in B; a
    2-px speckle of class 1 above both (first of all in raster order, below min_area 10)."""
    a, b = _rect(8, 20, 8, 20), _rect(40, 52, 40, 52)
    raw = np.zeros((H, W), np.int32)
    raw[a | b] = 1
    raw[0, 60:62] = 1
    sal = np.zeros((H, W))
    sal[45, 46] = 1.0
    return a, b, raw, sal


def test_spo_all_components_prompts_every_kept_component():
    a, b, raw, sal = _two_component_scene()
    fake = FakeSam([a, b])
    out = refine_spo(IMAGE, raw, sal, RefineContext(1, params=RefineParams(min_area=10)), fake)
    assert [c["multimask"] for c in fake.calls] == [True, True, False, False]
    np.testing.assert_array_equal(fake.calls[0]["boxes"], [[8, 8, 19, 19]])  # A, no point
    np.testing.assert_array_equal(fake.calls[1]["boxes"], [[40, 40, 51, 51]])  # B carries the peak
    np.testing.assert_array_equal(fake.calls[1]["points"], [[[46, 45]]])
    np.testing.assert_array_equal(out.label, np.where(a | b, 1, 0))
    assert out.stats["prompts"] == 2 and out.stats["masks_used"] == 2


def test_spo_first_component_prompts_one_box_per_class_with_the_peak_on_it():
    a, b, raw, sal = _two_component_scene()
    fake = FakeSam([a, b])
    params = RefineParams(min_area=10, spo_components="first")
    out = refine_spo(IMAGE, raw, sal, RefineContext(1, params=params), fake)
    # one prompt: A's box (the first kept component) with the peak, although the peak lies in B,
    # as the official predictor's element 0 (point broadcast to every box, box 0 returned)
    assert [c["multimask"] for c in fake.calls] == [True, False]
    for call in fake.calls:
        np.testing.assert_array_equal(call["boxes"], [[8, 8, 19, 19]])
        np.testing.assert_array_equal(call["points"], [[[46, 45]]])
    np.testing.assert_array_equal(out.label, np.where(a, 1, 0))  # B is lost
    assert out.stats["prompts"] == 1 and out.stats["masks_used"] == 1
    # "first" counts among kept components: with min_area 0 (the official code has no filter)
    # the speckle is the first component and the only one prompted
    fake = FakeSam([a, b])
    refine_spo(IMAGE, raw, sal, RefineContext(1, params=RefineParams(min_area=0, spo_components="first")), fake)
    np.testing.assert_array_equal(fake.calls[0]["boxes"], [[60, 0, 61, 0]])


def test_spo_is_idempotent_with_a_good_sam():
    a, b, raw, sal = _two_object_scene()
    ctx = RefineContext(1, (2,), params=RefineParams(min_area=10))
    once = refine_spo(IMAGE, raw, sal, ctx, FakeSam([a, b])).label
    twice = refine_spo(IMAGE, once, sal, ctx, FakeSam([a, b]))
    np.testing.assert_array_equal(twice.label, once)
    assert twice.stats["pixels_changed"] == 0


@pytest.mark.parametrize("select_fail", ["drop", "keep"])
def test_sam_select_assignment_rules(select_fail):
    raw = np.zeros((H, W), np.int32)
    r1 = _rect(10, 30, 10, 30)  # class 1, 400 px
    r2 = _rect(40, 46, 40, 46)  # class 2, 36 px
    raw[r1], raw[r2] = 1, 2
    m_obj = _rect(8, 30, 10, 32)  # 400 of its 484 px in r1 -> class 1
    m_cover = _rect(36, 64, 36, 64)  # 36 of 784 px in r2, but covers all of r2 -> class 2
    m_bg = _rect(0, 6, 0, 64)  # no overlap: unused
    m_low = _rect(12, 34, 12, 30)  # lower score; 324 of 396 px in r1: class 1, unclaimed pixels only
    auto = [(m_bg, 0.99), (m_low, 0.5), (m_obj, 0.9), (m_cover, 0.8)]
    ctx = RefineContext(1, (2,), params=RefineParams(select_fail=select_fail))
    out = refine_sam_select(IMAGE, raw, np.zeros((H, W)), ctx, FakeSam([], auto))
    # no raw foreground lies under the failing mask m_bg: both rules give the same label
    expected = raw.copy()
    expected[m_obj] = 1
    expected[m_cover & ~m_obj] = 2
    expected[m_low & ~m_obj & ~m_cover] = 1
    np.testing.assert_array_equal(out.label, expected)
    assert out.stats == {"prompts": 4, "masks_used": 3,
                         "pixels_changed": int(np.count_nonzero(expected != raw))}


def test_sam_select_mask_claimed_by_one_class_only():
    raw = np.zeros((H, W), np.int32)
    raw[0:32, :] = 1  # 2048 px
    raw[32:40, :] = 2  # 512 px
    mask = _rect(0, 48, 0, 64)  # qualifies for both (>0.5 of mask in 1; covers all of 2)
    out = refine_sam_select(IMAGE, raw, np.zeros((H, W)), RefineContext(2, (1,)), FakeSam([], [(mask, 0.9)]))
    assert np.all(out.label[mask] == 1)  # the larger overlap wins, one class only
    assert out.stats["masks_used"] == 1
    # thresholds are strict for the mask share (> 0.5) and inclusive for region cover (>= 0.85)
    half = _rect(0, 32, 0, 32) | _rect(48, 64, 0, 64)  # 1024 px: 1024 in class 1 = 0.5 exactly
    raw2 = np.zeros((H, W), np.int32)
    raw2[0:32, :] = 1
    out = refine_sam_select(IMAGE, raw2, np.zeros((H, W)), RefineContext(1), FakeSam([], [(half, 0.9)]))
    assert out.stats["masks_used"] == 0
    ctx = RefineContext(1, params=RefineParams(select_region_cover=0.5))
    out = refine_sam_select(IMAGE, raw2, np.zeros((H, W)), ctx, FakeSam([], [(half, 0.9)]))
    assert out.stats["masks_used"] == 1 and np.all(out.label[half] == 1)


def _false_activation_scene():
    """Class 1: a true object (with a SAM mask that qualifies), a false activation inside a
    large background mask (which fails the class test), and a patch no mask touches."""
    obj, fake_act, untouched = _rect(10, 30, 10, 30), _rect(44, 54, 44, 54), _rect(56, 62, 2, 7)
    raw = np.zeros((H, W), np.int32)
    raw[obj | fake_act | untouched] = 1  # region: 400 + 100 + 30 px
    m_obj = obj.copy()
    m_bg = _rect(36, 64, 36, 64)  # 784 px; 100 in the region: < 0.5 of the mask, < 0.85 of the region
    return raw, obj, fake_act, untouched, [(m_bg, 0.9), (m_obj, 0.95)]


def test_sam_select_drop_rule_removes_a_false_activation_and_keep_rule_keeps_it():
    raw, obj, fake_act, untouched, auto = _false_activation_scene()
    dropped = refine_sam_select(IMAGE, raw, np.zeros((H, W)), RefineContext(1), FakeSam([], auto))
    np.testing.assert_array_equal(dropped.label, np.where(obj | untouched, 1, 0))
    assert dropped.stats == {"prompts": 2, "masks_used": 1, "pixels_changed": 100}
    ctx = RefineContext(1, params=RefineParams(select_fail="keep"))
    kept = refine_sam_select(IMAGE, raw, np.zeros((H, W)), ctx, FakeSam([], auto))
    np.testing.assert_array_equal(kept.label, raw)
    assert kept.stats == {"prompts": 2, "masks_used": 1, "pixels_changed": 0}


def test_sam_select_scan_order_is_iou_then_area_then_generator_order():
    raw = np.zeros((H, W), np.int32)
    raw[10:30, 10:30] = 1
    raw[30:50, 30:50] = 2
    small = _rect(10, 34, 10, 34)  # class 1: 400 of its 576 px in region 1
    large = _rect(26, 54, 26, 54)  # class 2: 400 of its 784 px in region 2
    overlap = small & large
    for auto in ([(small, 0.9), (large, 0.9)], [(large, 0.9), (small, 0.9)]):
        out = refine_sam_select(IMAGE, raw, np.zeros((H, W)), RefineContext(1, (2,)), FakeSam([], auto))
        assert np.all(out.label[overlap] == 2)  # equal IoU: the larger mask is scanned first
    out = refine_sam_select(IMAGE, raw, np.zeros((H, W)), RefineContext(1, (2,)),
                            FakeSam([], [(small, 0.91), (large, 0.9)]))
    assert np.all(out.label[overlap] == 1)  # a higher predicted IoU comes first
    twin = _rect(10, 30, 10, 30)  # same score and area as the (shifted) mask below: list order
    shifted = _rect(11, 31, 10, 30)
    raw3 = np.zeros((H, W), np.int32)
    raw3[10:20, 10:30], raw3[20:31, 10:30] = 1, 2
    for auto, first in (([(twin, 0.9), (shifted, 0.9)], 1), ([(shifted, 0.9), (twin, 0.9)], 2)):
        out = refine_sam_select(IMAGE, raw3, np.zeros((H, W)), RefineContext(1, (2,)), FakeSam([], auto))
        assert np.all(out.label[twin & shifted] == first)


def _gmm_scene(seed=0):
    """8x8 patches of 8 px; left half class 1 features, right half class 2, noise in the raw label."""
    rng = np.random.default_rng(seed)
    e = np.eye(4)
    emb = np.where(np.arange(8)[None, :, None] < 4, e[0], e[1]) + 0.05 * rng.standard_normal((8, 8, 4))
    emb[5, 1] = (e[0] + e[1]) / np.sqrt(2)  # an ambiguous patch
    patch_raw = np.where(np.arange(8)[None, :] < 4, 1, 2).repeat(8, axis=0)
    patch_raw[2:4, 1:3] = 2  # wrong class in the left half
    patch_raw[0, :] = 0  # background row
    raw = patch_raw.repeat(8, axis=0).repeat(8, axis=1).astype(np.int32)
    return emb.astype(np.float32), raw


@pytest.mark.parametrize("em_steps", [0, 2])
def test_gmm_relabels_by_posterior_keeps_background_and_ignores_low_confidence(em_steps):
    emb, raw = _gmm_scene()
    ctx = RefineContext(1, (2,), patch_emb=emb, params=RefineParams(gmm_confidence=0.9, gmm_em_steps=em_steps))
    out = refine_gmm(IMAGE, raw, np.zeros((H, W)), ctx, None)
    assert set(np.unique(out.label)) <= {0, 1, 2, IGNORE}
    assert np.all(out.label[raw == 0] == 0)
    assert np.all(out.label[20:28, 12:20] == 1)  # the mislabelled block, patch (2..3, 1..2)
    assert out.label[5 * 8 + 4, 1 * 8 + 4] == IGNORE  # the ambiguous patch
    assert np.all(out.label[40:64, 40:64] == 2)
    assert out.stats["masks_used"] == 2


def test_gmm_needs_patch_embeddings_and_handles_no_class():
    _, raw = _gmm_scene()
    with pytest.raises(ValueError, match="patch_emb"):
        refine_gmm(IMAGE, raw, np.zeros((H, W)), RefineContext(1), None)
    empty = np.zeros((H, W), np.int32)
    out = refine_gmm(IMAGE, empty, np.zeros((H, W)), RefineContext(1, patch_emb=np.ones((8, 8, 4))), None)
    assert not out.label.any()


def test_none_registry_and_input_checks():
    raw = np.arange(H * W, dtype=np.int64).reshape(H, W) % 3
    out = refine_none(IMAGE, raw, np.zeros((H, W)), RefineContext(1), None)
    np.testing.assert_array_equal(out.label, raw)
    assert out.label.dtype == np.int32 and out.stats["pixels_changed"] == 0
    assert set(REFINERS) == {"spo", "sam_select", "gmm", "none"}
    assert get_refiner("spo") is refine_spo
    with pytest.raises(ValueError, match="unknown refine method 'crf'"):
        get_refiner("crf")
    with pytest.raises(ValueError, match="image must be"):
        refine_none(IMAGE[..., 0], raw, np.zeros((H, W)), RefineContext(1), None)
    with pytest.raises(ValueError, match="raw_label"):
        refine_none(IMAGE, raw[:10], np.zeros((H, W)), RefineContext(1), None)
    with pytest.raises(ValueError, match="distinct"):
        RefineContext(1, (1, 2))
    with pytest.raises(ValueError, match="gmm_confidence must lie in"):
        RefineParams(gmm_confidence=1.5)
    with pytest.raises(ValueError, match="spo_components must be one of .* got 'some'"):
        RefineParams(spo_components="some")
    with pytest.raises(ValueError, match="select_fail must be one of .* got 'ignore'"):
        RefineParams(select_fail="ignore")
    assert RefineParams().spo_components == "all" and RefineParams().select_fail == "drop"
    with pytest.raises(ValueError, match="needs a MaskPredictor"):
        refine_spo(IMAGE, raw, np.zeros((H, W)), RefineContext(1), None)


def test_merge_class_masks_priority():
    m1, m2 = _rect(0, 10, 0, 10), _rect(5, 15, 5, 15)
    label = merge_class_masks((20, 20), [(3, m1[:20, :20]), (8, m2[:20, :20])])
    assert label[7, 7] == 3 and label[12, 12] == 8 and label[18, 18] == 0


def _synthetic_images(n, seed):
    """Square scenes of 2-3 objects (ellipses and rectangles, classes 1..4) and a noisy raw label:
    each object's label is shifted, dilated and sprinkled with wrong-class speckle, as a coarse
    patch-level argmax would be."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    scenes = []
    for _ in range(n):
        gt = np.zeros((H, W), np.int32)
        objects, classes = [], []
        for k, cls in enumerate(rng.choice(np.arange(1, 5), size=rng.integers(2, 4), replace=False)):
            cy, cx = rng.integers(12, 52, size=2)
            ry, rx = rng.integers(6, 12, size=2)
            if k % 2:
                obj = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:
                obj = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            obj &= gt == 0  # objects do not overlap
            gt[obj] = cls
            objects.append(obj)
            classes.append(int(cls))
        raw = np.zeros((H, W), np.int32)
        for obj, cls in zip(objects, classes):
            noisy = ndimage.binary_dilation(np.roll(obj, (2, -3), axis=(0, 1)), iterations=3)
            raw[noisy & (raw == 0)] = cls
        speckle = (rng.random((H, W)) < 0.03) & (raw > 0)
        raw[speckle] = rng.integers(1, 5, size=int(speckle.sum()))
        sal = ndimage.gaussian_filter((gt > 0).astype(float), 2)
        sizes = [int(o.sum()) for o in objects]
        order = np.argsort(sizes)[::-1]
        auto = [(objects[i], 0.9 - 0.01 * j) for j, i in enumerate(order)] + [(gt == 0, 0.5)]
        scenes.append((gt, raw, sal, objects, [classes[i] for i in order], auto))
    return scenes


def _miou(pairs):
    ev = SegmentationEvaluator(num_classes=4, match={i: i for i in range(5)})
    for pred, gt in pairs:
        ev.update(pred, gt)
    return ev.finalize().miou


def test_refined_beats_raw_on_noisy_synthetic_labels(capsys):
    scenes = _synthetic_images(6, seed=3)
    params = RefineParams(min_area=20)
    results = {"raw": [], "spo": [], "sam_select": []}
    for gt, raw, sal, objects, classes, auto in scenes:
        ctx = RefineContext(classes[0], tuple(classes[1:]), params=params)
        results["raw"].append((raw, gt))
        for name in ("spo", "sam_select"):
            out = REFINERS[name](IMAGE, raw, sal, ctx, FakeSam(objects, auto))
            assert set(np.unique(out.label)) <= {0, *classes} | set(np.unique(raw).tolist())
            results[name].append((out.label, gt))
    miou = {k: _miou(v) for k, v in results.items()}
    with capsys.disabled():
        print(f"\nsynthetic mIoU vs GT: raw {miou['raw']:.1f}, spo {miou['spo']:.1f}, "
              f"sam_select {miou['sam_select']:.1f}")
    assert miou["spo"] > miou["raw"] + 10
    assert miou["sam_select"] > miou["raw"] + 3
