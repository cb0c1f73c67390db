"""The held-out world (benchmarks/heldout_world.py): deterministic, in the ImageNet-S codec with an
ignore band on every object border, and a world where a colour histogram cannot find the classes."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from benchmarks.image_purity import image_scores, load_split
from benchmarks.heldout_world import (
    MARKER_NAME, SIBLINGS, arrangement_distance, class_recipes, load_photos, make_heldout_world, sample, wnid_for,
)
from pdso_ray.data.imagenet_s import BACKGROUND_ID, IGNORE_ID, decode_label


@pytest.fixture(scope="module")
def photos():
    return load_photos()


def test_classes_come_in_look_alike_groups_that_differ_in_one_thing():
    recipes = class_recipes(12, class_seed=4)
    assert recipes == class_recipes(12, class_seed=4) and recipes[:8] == class_recipes(8, class_seed=4)
    for group in range(3):
        base, texture, shape, arrangement = recipes[4 * group: 4 * group + 4]
        assert [r.sibling for r in (base, texture, shape, arrangement)] == list(SIBLINGS)
        assert texture.texture != base.texture and texture.silhouette_params == base.silhouette_params
        assert shape.silhouette != base.silhouette and shape.texture_params == base.texture_params
        assert arrangement.silhouette_params == base.silhouette_params and arrangement.texture == base.texture
        assert [p.kind for p in arrangement.parts] == [p.kind for p in base.parts]
        assert arrangement_distance(np.array([p.angle for p in base.parts]),
                                    np.array([p.angle for p in arrangement.parts])) >= 0.7
    looks = {json.dumps({**asdict(r), "group": 0, "sibling": ""}, sort_keys=True) for r in recipes}
    assert len(looks) == 12


def test_images_are_a_function_of_seed_split_class_and_index(photos):
    recipes = class_recipes(3, class_seed=0)
    image, label, quality = sample(recipes, photos, 5, "validation", 2, 7)
    again, again_label, again_quality = sample(recipes, photos, 5, "validation", 2, 7)
    assert np.array_equal(image, again) and np.array_equal(label, again_label) and quality == again_quality
    for other in [(6, "validation", 2, 7), (5, "test", 2, 7), (5, "validation", 3, 7), (5, "validation", 2, 8)]:
        assert not np.array_equal(sample(recipes, photos, *other)[0][:20, :20], image[:20, :20])


def test_labels_have_the_class_background_and_an_ignore_band_between_them(photos):
    recipes = class_recipes(4, class_seed=1)
    shapes = set()
    for k in range(1, 5):
        for i in range(4):
            image, label, _ = sample(recipes, photos, 0, "test", k, i)
            h, w = label.shape
            shapes.add((h, w))
            assert image.shape == (h, w, 3) and image.dtype == np.uint8
            assert 80 <= min(h, w) and max(h, w) <= 200 and h != w
            assert set(np.unique(label)) == {BACKGROUND_ID, k, IGNORE_ID}
            obj, bg = label == k, label == BACKGROUND_ID
            # no object pixel touches a background pixel, not even diagonally: the band is between
            padded = np.pad(obj, 1)
            near_obj = np.zeros_like(obj)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    near_obj |= padded[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]
            assert not (near_obj & bg).any()
            # the band is thin: a few px wide along the borders, not a blanket
            assert (label == IGNORE_ID).sum() < 1.5 * obj.sum() + 0.1 * label.size
            assert obj.sum() > 0
    assert len(shapes) > 8  # sizes and aspect ratios vary


def test_dataset_layout_and_codec(tmp_path):
    root = make_heldout_world(tmp_path, classes=2, train_per_class=2, val_per_class=1, test_per_class=1,
                              seed=3, progress=False)
    assert root == tmp_path / "ImageNetS2"
    assert (root / "classes.txt").read_text() == f"{wnid_for(1)}\n{wnid_for(2)}\n"
    marker = json.loads((root / MARKER_NAME).read_text())
    assert marker["seed"] == 3 and len(marker["recipes"]) == 2
    assert sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.JPEG")) == [
        f"train/{w}/{w}_{i}.JPEG" for w in (wnid_for(1), wnid_for(2)) for i in (0, 1)]
    for split in ("validation", "test"):
        for k in (1, 2):
            w = wnid_for(k)
            assert (root / split / w / f"{w}_0.JPEG").is_file()
            label = decode_label((root / f"{split}-segmentation" / w / f"{w}_0.png").read_bytes())
            assert set(np.unique(label)) == {BACKGROUND_ID, k, IGNORE_ID}
    before = (root / "train" / wnid_for(2) / f"{wnid_for(2)}_1.JPEG").read_bytes()
    assert make_heldout_world(tmp_path, classes=2, train_per_class=2, val_per_class=1, test_per_class=1,
                              seed=3, progress=False) == root  # same parameters: kept as is
    assert (root / "train" / wnid_for(2) / f"{wnid_for(2)}_1.JPEG").read_bytes() == before
    with pytest.raises(FileExistsError, match="other parameters"):
        make_heldout_world(tmp_path, classes=2, train_per_class=2, val_per_class=1, test_per_class=1, seed=4)
    images, labels = load_split(str(tmp_path), 2)
    assert len(images) == 4 and sorted(labels.tolist()) == [1, 1, 2, 2]


def test_colour_histograms_cluster_the_world_near_chance(photos):
    classes, per_class = 12, 16
    recipes = class_recipes(classes, class_seed=0)
    images, labels = [], []
    for k in range(1, classes + 1):
        for i in range(per_class):
            images.append(sample(recipes, photos, 0, "train", k, i)[0])
            labels.append(k)
    scores = image_scores(images, np.array(labels), classes, restarts=10)
    for name, s in scores.items():
        # at chance: no better than 95% of shuffled clusterings of the same sizes (about 0.2 here)
        assert s["purity"] <= s["chance95"] + 0.02, (name, s)


def test_the_colour_baseline_finds_classes_that_are_colours():
    """The measurement itself can fail: where each class has its own hue it clusters them."""
    rng = np.random.default_rng(0)
    classes, images, labels = 12, [], []
    for k in range(1, classes + 1):
        for _ in range(10):
            grey = rng.uniform(0.2, 0.9, (30, 40, 1))
            hue = np.array([np.cos(2 * np.pi * k / classes), np.cos(2 * np.pi * (k / classes - 1 / 3)),
                            np.cos(2 * np.pi * (k / classes + 1 / 3))]) * 0.4 + 0.5
            images.append((grey * hue * 255).astype(np.uint8))
            labels.append(k)
    scores = image_scores(images, np.array(labels), classes, restarts=5)
    assert scores["hue_histogram"]["purity"] > 0.6 and scores["hsv_histogram"]["purity"] > 0.6
