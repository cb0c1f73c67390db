"""Random class styles (``style_seed``) of the hue world: classes other than its default ones."""

import json

import numpy as np

from pdso_ray.data.synthetic import MARKER_NAME, make_demo_dataset
from pdso_ray.data.synthetic.hue import TEXTURES, class_style, render_sample


def test_default_styles_are_the_fixed_demo_styles():
    assert [class_style(k, 5) for k in range(1, 6)] == [class_style(k, 5, None) for k in range(1, 6)]
    s = class_style(3, 5)
    assert (s.hue, s.texture, s.shape, s.period) == (0.4, "dots", "triangle", 0.35)


def test_style_seed_draws_deterministic_styles_that_differ_from_the_demo():
    a = [class_style(k, 64, style_seed=11) for k in range(1, 65)]
    assert a == [class_style(k, 64, style_seed=11) for k in range(1, 65)]
    assert a != [class_style(k, 64, style_seed=12) for k in range(1, 65)]
    # a style depends on (style_seed, k) only, not on the number of classes
    assert class_style(7, 8, style_seed=11) == a[6]
    hues = np.array([s.hue for s in a])
    assert hues.min() < 0.1 and hues.max() > 0.9 and len(set(np.round(hues, 6))) == 64
    assert {s.texture for s in a} == set(TEXTURES)
    assert all(0.3 <= s.period <= 0.55 for s in a)
    assert a[:5] != [class_style(k, 5) for k in range(1, 6)]


def test_render_sample_uses_the_drawn_style():
    demo_img, label = render_sample(np.random.default_rng(0), 1, 5, (48, 48))
    styled_img, styled_label = render_sample(np.random.default_rng(0), 1, 5, (48, 48), style_seed=3)
    assert not np.array_equal(demo_img, styled_img)
    assert set(np.unique(styled_label)) <= {0, 1, 1000}


def test_dataset_records_world_and_style_seed(tmp_path):
    small = dict(classes=2, train_per_class=1, val_per_class=0, test_per_class=0, image_size=(24, 24), world="hue")
    plain = make_demo_dataset(str(tmp_path / "plain"), **small)
    styled = make_demo_dataset(str(tmp_path / "styled"), style_seed=5, **small)
    plain_marker = json.loads((tmp_path / "plain" / "ImageNetS2" / MARKER_NAME).read_text())
    styled_marker = json.loads((tmp_path / "styled" / "ImageNetS2" / MARKER_NAME).read_text())
    assert plain_marker["style_seed"] is None and styled_marker["style_seed"] == 5
    assert plain_marker["world"] == styled_marker["world"] == "hue"
    image = "train/n00000001/n00000001_0.JPEG"
    assert (tmp_path / "plain" / "ImageNetS2" / image).read_bytes() != (tmp_path / "styled" / "ImageNetS2" / image).read_bytes()
    assert plain.endswith("ImageNetS2") and styled.endswith("ImageNetS2")
