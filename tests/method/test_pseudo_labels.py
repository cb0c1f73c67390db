import numpy as np
import pytest

from pdso_ray.method.pseudo_labels import (
    apply_saliency_threshold,
    class_map,
    main_and_secondary_classes,
    raw_pseudo_label,
    second_nearest_distances,
    sigmas_at_quantiles,
)


def _emb(rng, h, w, d):
    return rng.standard_normal((h, w, d)).astype(np.float32)


def test_raw_label_is_cosine_argmax_plus_one_at_patch_resolution():
    rng = np.random.default_rng(0)
    emb = _emb(rng, 6, 5, 8)
    cen = rng.standard_normal((4, 8)).astype(np.float32)
    ids = np.array([10, 3, 7, 0])
    label = raw_pseudo_label(emb * 5.0, np.ones((6, 5)), cen, ids, threshold=0.5, out_hw=(6, 5))
    en = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    cn = cen / np.linalg.norm(cen, axis=-1, keepdims=True)
    expected = ids[np.argmax(en @ cn.T, axis=-1)] + 1
    assert label.dtype == np.int32
    np.testing.assert_array_equal(label, expected)


def test_saliency_below_threshold_is_background():
    rng = np.random.default_rng(1)
    emb = _emb(rng, 4, 4, 3)
    cen = rng.standard_normal((2, 3))
    sal = np.linspace(0, 1, 16).reshape(4, 4)
    label = raw_pseudo_label(emb, sal, cen, np.array([0, 1]), threshold=0.4)
    assert np.all(label[sal < 0.4] == 0)
    assert np.all(label[sal >= 0.4] >= 1)


def test_upsampled_boundary_falls_between_patch_centres():
    # Left two patch columns point at centroid 0, right two at centroid 1: at 8x, the boundary
    # is the middle column of the image, and every pixel gets one of the two classes.
    emb = np.zeros((4, 4, 2), np.float32)
    emb[:, :2, 0] = 1.0
    emb[:, 2:, 1] = 1.0
    cen = np.eye(2, dtype=np.float32)
    label = raw_pseudo_label(emb, np.ones((32, 32)), cen, np.array([4, 9]), threshold=0.5)
    assert np.all(label[:, :16] == 5) and np.all(label[:, 16:] == 10)


def test_raw_label_rejects_bad_input():
    emb = np.zeros((2, 2, 3), np.float32)
    cen = np.ones((2, 3))
    with pytest.raises(ValueError, match="candidate_centroids"):
        raw_pseudo_label(emb, np.ones((4, 4)), np.ones((2, 4)), np.array([0, 1]), 0.5)
    with pytest.raises(ValueError, match="candidate_ids"):
        raw_pseudo_label(emb, np.ones((4, 4)), cen, np.array([0]), 0.5)
    with pytest.raises(ValueError, match="candidate_ids"):
        raw_pseudo_label(emb, np.ones((4, 4)), cen, np.array([0, -1]), 0.5)
    with pytest.raises(ValueError, match="out_hw"):
        raw_pseudo_label(emb, np.ones((4, 4)), cen, np.array([0, 1]), 0.5, out_hw=(8, 8))


def test_main_and_secondary_classes():
    ids = np.array([5, 2, 9, 4, 2])
    dist = np.array([0.7, 0.3, 0.8, 0.95, 0.5])
    main, secondary = main_and_secondary_classes(ids, dist, sigma=0.8)
    assert main == 2
    assert secondary == [5, 9]  # by distance; the repeat of 2 and 4 (> sigma) are left out
    assert main_and_secondary_classes(ids, dist, sigma=0.0) == (2, [])
    with pytest.raises(ValueError, match="equal-length"):
        main_and_secondary_classes(ids, dist[:2], 0.8)
    with pytest.raises(ValueError, match="integers"):
        main_and_secondary_classes(ids.astype(float), dist, 0.8)


def test_pruned_class_map_agrees_with_all_candidates_at_patch_centres():
    rng = np.random.default_rng(5)
    emb = _emb(rng, 7, 6, 16)
    cen = rng.standard_normal((40, 16)).astype(np.float32)
    ids = np.arange(40)
    full = class_map(emb, cen, ids, (7, 6), prune_to=None)
    pruned = class_map(emb, cen, ids, (7, 6), prune_to=2)
    np.testing.assert_array_equal(pruned, full)  # at patch resolution the argmax is exact
    big_full = class_map(emb, cen, ids, (56, 48), prune_to=None)
    big_pruned = class_map(emb, cen, ids, (56, 48), prune_to=2)
    assert (big_full == big_pruned).mean() > 0.99


def test_threshold_is_applied_to_the_class_map():
    classes = np.array([[3, 3], [2, 2]], np.int32)
    sal = np.array([[0.1, 0.5], [0.49, 0.9]])
    np.testing.assert_array_equal(apply_saliency_threshold(classes, sal, 0.5), [[0, 3], [0, 2]])


def test_sigma_quantiles_give_their_share_of_images_a_secondary_class():
    rng = np.random.default_rng(0)
    # 1000 images, 5 candidates each, in a space where the distances are large (no fixed sigma fits)
    topk_dist = rng.uniform(3.0, 9.0, size=(1000, 5))
    second = second_nearest_distances(topk_dist)
    assert np.array_equal(second, np.sort(topk_dist, axis=1)[:, 1])
    pairs = sigmas_at_quantiles(second, [0.9, 0.0, 0.5, 0.5])
    assert [s for s, _ in pairs] == sorted({s for s, _ in pairs}) and len(pairs) == 3  # sorted, no repeats
    for (sigma, share), q in zip(pairs, (0.0, 0.5, 0.9)):
        assert share == pytest.approx(q, abs=0.01)
        # the share is what main_and_secondary_classes really gives at that sigma
        with_secondary = np.mean([len(main_and_secondary_classes(np.arange(5), d, sigma)[1]) > 0
                                  for d in topk_dist])
        assert with_secondary == pytest.approx(share)
    with pytest.raises(ValueError, match="k >= 2"):
        second_nearest_distances(topk_dist[:, :1])
    with pytest.raises(ValueError, match="quantiles"):
        sigmas_at_quantiles(second, [1.5])
