import numpy as np
import pytest

from pdso_ray.method.prompts import (
    boxes_for_class,
    build_prompts,
    connected_components,
    point_in_class,
    saliency_peak_point,
)


def test_connected_components_are_eight_connected():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal stroke: one component
    mask[4:6, 4:6] = True  # a separate square
    comps = connected_components(mask)
    assert len(comps) == 2
    assert comps[0].sum() == 3 and comps[0][2, 2]
    assert comps[1].sum() == 4 and comps[1][5, 5]
    assert np.array_equal(comps[0] | comps[1], mask)
    assert connected_components(np.zeros((3, 3), bool)) == []


def test_boxes_are_xyxy_inclusive_and_small_components_are_ignored():
    label = np.zeros((20, 30), np.int32)
    label[2:6, 3:10] = 1  # rows 2..5, cols 3..9 -> 28 px
    label[10:13, 20:22] = 1  # 6 px
    label[15:19, 0:5] = 2
    boxes = boxes_for_class(label, 1, min_area=6)
    np.testing.assert_array_equal(boxes, [[3, 2, 9, 5], [20, 10, 21, 12]])
    assert boxes.dtype == np.float32
    # min_area is inclusive: a 6-px component is kept at 6 and dropped at 7
    np.testing.assert_array_equal(boxes_for_class(label, 1, min_area=7), [[3, 2, 9, 5]])
    assert boxes_for_class(label, 5, min_area=0).shape == (0, 4)
    with pytest.raises(ValueError, match="min_area"):
        boxes_for_class(label, 1, min_area=-1)
    with pytest.raises(ValueError, match="integer"):
        boxes_for_class(label.astype(float), 1, min_area=1)


def test_saliency_peak_point_is_x_y_and_first_on_ties():
    sal = np.zeros((5, 8))
    sal[3, 6] = 1.0
    assert saliency_peak_point(sal) == (6, 3)
    sal[1, 7] = 1.0  # tie: row 1 comes first in raster order
    assert saliency_peak_point(sal) == (7, 1)
    with pytest.raises(ValueError, match="NaN"):
        saliency_peak_point(np.full((2, 2), np.nan))


def test_point_in_class():
    label = np.zeros((4, 5), np.int64)
    label[1, 3] = 2
    assert point_in_class(label, 2, (3, 1))
    assert not point_in_class(label, 2, (1, 3))
    with pytest.raises(ValueError, match="outside"):
        point_in_class(label, 2, (5, 0))


def test_build_prompts_order_point_and_min_area():
    label = np.zeros((32, 32), np.int32)
    label[2:10, 2:10] = 3  # secondary, 64 px
    label[20:30, 20:30] = 7  # main, comp A
    label[2:8, 20:30] = 7  # main, comp B (contains the saliency peak)
    label[15, 15] = 4  # a 1-px class: below min_area, no prompts
    sal = np.zeros((32, 32))
    sal[4, 25] = 1.0
    prompts = build_prompts(label, sal, classes=[7, 3, 4, 9], min_area=4)
    assert [p.class_id for p in prompts] == [7, 3]
    main = prompts[0]
    np.testing.assert_array_equal(main.boxes, [[20, 2, 29, 7], [20, 20, 29, 29]])
    assert main.point == (25, 4) and main.point_box == 0
    assert prompts[1].point is None and prompts[1].point_box is None
    # the peak inside an ignored component is dropped, not attached elsewhere
    sal2 = np.zeros((32, 32))
    sal2[15, 15] = 1.0
    assert all(p.point is None for p in build_prompts(label, sal2, [7, 3, 4], min_area=4))
    with pytest.raises(ValueError, match="distinct"):
        build_prompts(label, sal, [7, 7], min_area=1)
    with pytest.raises(ValueError, match="saliency shape"):
        build_prompts(label, sal[:10], [7], min_area=1)
