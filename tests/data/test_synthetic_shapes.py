"""The hard synthetic world (``world="shapes"``): colour is never the class, classes come in
look-alike groups, the pools the stand-ins train and are measured on are disjoint, and the
ground truth is exact."""

import faiss
import numpy as np
import pytest

from pdso_ray.data.imagenet_s import IGNORE_ID
from pdso_ray.data.synthetic import hue, shapes
from pdso_ray.data.synthetic.photos import PHOTO_POOLS, background
from pdso_ray.method.cluster_metrics import purity
from pdso_ray.method.colour_stats import COLOUR_STATISTICS


def _attributes(c: shapes.ShapeClass) -> dict[str, tuple]:
    return {"body": (c.body,), "texture": (c.texture, c.period, c.angle), "arrangement": (c.arrangement,)}


def test_classes_come_in_look_alike_groups():
    for seed in (0, 1, 7):
        classes = shapes.class_set(24, seed, "eval")
        assert len({c.combination for c in classes}) == 24
        for g in range(8):
            base, *siblings = classes[3 * g:3 * g + 3]
            changed = []
            for sibling in siblings:
                diff = [k for k, v in _attributes(sibling).items() if v != _attributes(base)[k]]
                assert len(diff) == 1, (base, sibling)
                assert sibling.part == base.part
                changed.append(diff[0])
            assert changed[0] != changed[1]  # the two siblings look alike in different ways


def test_class_sets_are_deterministic_nested_and_pool_disjoint():
    assert shapes.class_set(12, 3, "eval") == shapes.class_set(12, 3, "eval")
    assert shapes.class_set(24, 3, "eval")[:12] == shapes.class_set(12, 3, "eval")
    assert shapes.class_set(12, 3, "eval") != shapes.class_set(12, 4, "eval")
    evaluation = {c.combination for seed in range(5) for c in shapes.class_set(60, seed, "eval")}
    pretraining = {c.combination for c in shapes.class_set(256, 4242, "pretrain")}
    assert evaluation and pretraining and not evaluation & pretraining
    assert set(PHOTO_POOLS["eval"]).isdisjoint(PHOTO_POOLS["pretrain"])
    with pytest.raises(ValueError, match="pool"):
        shapes.class_set(3, 0, "train")


def _render_set(classes: int, per_class: int, seed: int, render):
    images, labels, masks = [], [], []
    for k in range(1, classes + 1):
        for i in range(per_class):
            rng = np.random.default_rng([seed, k, i])
            size = (int(rng.integers(72, 121)), int(rng.integers(72, 121)))
            image, label = render(rng, k, size)
            images.append(image)
            labels.append(k)
            masks.append(label)
    return images, np.array(labels), masks


def _kmeans_purity(features: np.ndarray, truth: np.ndarray, k: int) -> float:
    x = np.ascontiguousarray(features, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=20, nredo=10, seed=0, min_points_per_centroid=1)
    km.train(x)
    return purity(km.index.search(x, 1)[1][:, 0], truth)


def test_colour_statistics_cluster_the_shapes_world_near_chance_and_the_hue_world_well():
    classes, per_class = 12, 12
    class_list = shapes.class_set(classes, 11, "eval")
    hard = _render_set(classes, per_class, 0,
                       lambda rng, k, size: shapes.render(rng, class_list[k - 1], k, size))
    easy = _render_set(classes, per_class, 0, lambda rng, k, size: hue.render_sample(rng, k, classes, size))
    on_easy = []
    for name, statistic in COLOUR_STATISTICS.items():
        on_hard = _kmeans_purity(statistic(hard[0]), hard[1], classes)
        # chance is about 0.17 here (12 clusters of 144 images)
        assert on_hard <= 0.25, (name, on_hard)
        on_easy.append(_kmeans_purity(statistic(easy[0]), easy[1], classes))
    assert max(on_easy) >= 0.6, on_easy  # the same statistics do see the hue world's classes


def test_instances_vary_in_size_position_aspect_and_occlusion():
    class_list = shapes.class_set(6, 2, "eval")
    images, truth, labels = _render_set(6, 25, 1, lambda rng, k, size: shapes.render(
        rng, class_list[k - 1], k, size, ignore_border=0))
    shapes_seen = {image.shape[:2] for image in images}
    assert len(shapes_seen) > 100 and any(h > w for h, w in shapes_seen) and any(w > h for h, w in shapes_seen)
    extents, cut = [], 0
    for label, k in zip(labels, truth):
        ys, xs = np.nonzero(label == k)
        assert ys.size > 0 and set(np.unique(label)) <= {0, k}
        extents.append(max(np.ptp(ys), np.ptp(xs)) / min(label.shape))
        cut += bool(ys.min() == 0 or xs.min() == 0 or ys.max() == label.shape[0] - 1 or xs.max() == label.shape[1] - 1)
    extents = np.array(extents)
    assert np.quantile(extents, 0.1) < 0.35 and np.quantile(extents, 0.9) > 0.6
    assert 0.05 < cut / len(labels) < 0.5  # some objects run off the image, most do not
    # every instance draws its own colours: the mean object colour varies widely within a class
    k = 1
    colours = np.array([img[lab == k].mean(0) for img, lab, t in zip(images, labels, truth) if t == k])
    assert colours.std(axis=0).mean() > 25  # measured ~37; the hue world: ~5


def test_ground_truth_has_the_ignore_band_on_the_visible_border():
    cls = shapes.class_set(3, 0, "eval")[0]
    _, bare = shapes.render(np.random.default_rng(5), cls, 2, (96, 128), ignore_border=0)
    image, banded = shapes.render(np.random.default_rng(5), cls, 2, (96, 128), ignore_border=1)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    band = banded == IGNORE_ID
    assert set(np.unique(banded)) == {0, 2, IGNORE_ID}
    assert (bare[band] == 2).any() and (bare[band] == 0).any()
    assert (banded[~band] == bare[~band]).all()


def test_backgrounds_are_photo_crops_of_the_requested_pool():
    rng = np.random.default_rng(0)
    crops = [background(rng, 60, 90, pool) for pool in ("eval", "pretrain") for _ in range(10)]
    assert all(c.shape == (60, 90, 3) and 0 <= c.min() and c.max() <= 255 for c in crops)
    assert all(c.std() > 2 for c in crops)  # textured, not flat
    with pytest.raises(ValueError, match="pool"):
        background(rng, 8, 8, "nope")
