"""The project's one palette: label maps in colour and blended over their images."""

import numpy as np
import pytest

from pdso_ray.method.metrics import IGNORE_ID
from pdso_ray.method.overlay import OUT_OF_RANGE_COLOR, class_colors, colorize, overlay, palette_indices


def test_colorize_paints_each_id_its_palette_colour():
    label = np.array([[0, 1, 2], [IGNORE_ID, 999, IGNORE_ID + 7]], dtype=np.int32)
    rgb = colorize(label)
    lut = class_colors()
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[1, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == lut[1].tolist() and rgb[0, 2].tolist() == lut[2].tolist()
    assert rgb[1, 1].tolist() == lut[999].tolist() and rgb[1, 2].tolist() == list(OUT_OF_RANGE_COLOR)
    assert rgb[0, 1].tolist() != rgb[0, 2].tolist()  # neighbouring ids far apart
    assert np.array_equal(colorize(label.astype(np.uint16)), rgb)  # any integer dtype


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 3), np.int32), np.zeros((2, 2), np.float32),
                                 np.array([[0, -1]])])
def test_colorize_refuses_what_is_not_a_label_map(bad):
    with pytest.raises(ValueError):
        colorize(bad)


def test_overlay_blends_classes_and_leaves_background_and_ignore():
    image = np.full((4, 6, 3), 100, np.uint8)
    label = np.zeros((2, 3), np.int32)  # half the image's size: resized by nearest neighbour
    label[0, 0], label[1, 2] = 3, IGNORE_ID
    out = overlay(image, label, alpha=0.5)
    colour = class_colors()[3].astype(np.float64)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[:2, :2], np.broadcast_to(np.rint(0.5 * 100 + 0.5 * colour), (2, 2, 3)))
    assert (out[2:, 4:] == 100).all() and (out[:, 2:4] == 100).all()  # ignore, background
    assert np.array_equal(overlay(image, label, alpha=0.0), image)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, label, alpha=1.5)


def test_palette_indices_look_like_colorize_and_give_up_past_256_ids():
    label = np.array([[0, 7, 7], [IGNORE_ID, 999, 0]], dtype=np.int32)
    indices, palette = palette_indices(label)
    assert indices.dtype == np.uint8 and indices.tolist() == [[0, 1, 1], [3, 2, 0]]  # ids 0, 7, 999, 1000
    assert np.array_equal(palette[indices], colorize(label))
    many = np.arange(300, dtype=np.int32).reshape(15, 20)
    assert palette_indices(many) is None
    assert palette_indices(np.array([[0, IGNORE_ID + 1]])) is None  # grey ids: colorize's job
