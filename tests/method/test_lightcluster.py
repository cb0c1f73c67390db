"""LightCluster: known answers for each clustering level, consistency, refinement, labels, end to end."""

import subprocess
import sys

import numpy as np
import pytest

from pdso_ray.method.lightcluster import (
    LevelModel,
    LightClusterParams,
    consistent_mask,
    fit_category_models,
    fit_level,
    foreground_clusters,
    image_level_mask,
    kmeans_in_process,
    label_from_mask,
    label_vectors,
    level_mask,
    lightcluster_in_memory,
    normalize_features,
    sample_patches,
)
from pdso_ray.method.mask_refine import refine_mask, upsample_mask

D = 16


def _unit(rng, n=1, d=D):
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _population(center, n, rng, noise=0.05):
    return center + noise * rng.normal(size=(n, center.shape[-1]))


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


# ---- dataset level: which side is foreground -----------------------------------------------------
def test_foreground_clusters_known_answer():
    # cluster means 0.85, 0.15, 0.5, empty; overall mean 0.5: only cluster 0 is above it
    fg = foreground_clusters(np.array([0, 0, 1, 1, 2]), np.array([0.9, 0.8, 0.1, 0.2, 0.5]), k=4)
    assert fg.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="0..1"):
        foreground_clusters(np.array([0, 2]), np.array([0.1, 0.2]), k=2)


@pytest.mark.parametrize("salient", ["a", "b"])
def test_two_populations_split_with_the_salient_side_foreground(salient):
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 2)
    rows = normalize_features(np.concatenate([_population(a, 300, rng), _population(b, 500, rng)]))
    is_a = np.arange(800) < 300
    sal = np.where(is_a == (salient == "a"), 0.8, 0.2) + 0.05 * rng.normal(size=800)
    model = fit_level(rows, sal, k=2, niter=20, seed=0)
    assert model.foreground.sum() == 1
    # an image holding both populations: the salient one is its foreground, patch for patch
    planted = np.zeros((6, 6), dtype=bool)
    planted[1:4, 2:5] = True
    feats = np.where(planted[..., None], 3.0 * a, b) + 0.02 * rng.normal(size=(6, 6, D))  # scale: normalised away
    mask = level_mask(feats, model)
    np.testing.assert_array_equal(mask, planted if salient == "a" else ~planted)


def test_sample_patches_is_a_seeded_subset():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(4, 5, D))
    sal = rng.uniform(size=(4, 5))
    rows, s = sample_patches(feats, sal, 6, np.random.default_rng(7))
    rows2, _ = sample_patches(feats, sal, 6, np.random.default_rng(7))
    flat = normalize_features(feats).reshape(20, D)
    idx = [int(np.flatnonzero(np.all(np.isclose(flat, r), axis=1))[0]) for r in rows]
    assert len(set(idx)) == 6 and np.array_equal(rows, rows2)
    np.testing.assert_allclose(s, sal.reshape(-1)[idx])
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-6)
    assert sample_patches(feats, sal, 100, np.random.default_rng(0))[0].shape == (20, D)


# ---- category level ------------------------------------------------------------------------------
def test_category_clustering_recovers_planted_classes():
    rng = np.random.default_rng(2)
    centers = _unit(rng, 3)
    truth = np.repeat(np.arange(3), [20, 35, 15])
    cls = normalize_features(centers[truth] + 0.1 * rng.normal(size=(70, D)))
    _, ids = kmeans_in_process(cls, 3, niter=20, seed=0)
    contingency = np.zeros((3, 3), dtype=int)
    np.add.at(contingency, (ids, truth), 1)
    assert sorted((contingency > 0).sum(axis=0).tolist()) == [1, 1, 1]  # each class in one cluster
    assert sorted((contingency > 0).sum(axis=1).tolist()) == [1, 1, 1]  # each cluster one class


def _two_category_patches(rng, n=400):
    """Category 0 lives near angle 0°, category 1 near 180° (first two coordinates); within each,
    foreground and background sit at ±12°. Two dataset-level clusters split the categories, not
    foreground from background; two clusters within a category split foreground from background."""
    cats = np.repeat([0, 1], n // 2)
    fg = np.tile(np.arange(n // 2) % 2 == 0, 2)
    angle = np.where(cats == 0, 0.0, np.pi) + np.where(fg, 1.0, -1.0) * np.deg2rad(12)
    rows = np.zeros((n, D))
    rows[:, 0], rows[:, 1] = np.cos(angle), np.sin(angle)
    rows[:, 2:] = 0.01 * rng.normal(size=(n, D - 2))
    sal = np.where(fg, 0.75, 0.25) + 0.05 * rng.normal(size=n)
    return normalize_features(rows), sal, cats, fg


def test_category_level_splits_what_the_dataset_level_cannot():
    rows, sal, cats, fg = _two_category_patches(np.random.default_rng(3))
    dataset = fit_level(rows, sal, k=2, niter=20, seed=0)
    dataset_fg = dataset.foreground[kmeans_in_process(rows, 2, 20, 0)[1]]
    assert 0.3 < (dataset_fg == fg).mean() < 0.7  # the two clusters are the two categories
    models = fit_category_models(rows, sal, cats, num_categories=2, k=2, niter=20, seed=0, fallback=dataset)
    assert models.centroids.shape == (2, 2, D) and models.foreground.sum(axis=1).tolist() == [1, 1]
    for c in (0, 1):
        members = cats == c
        mask = level_mask(rows[members][:, None, :], models.level(c))[:, 0]
        np.testing.assert_array_equal(mask, fg[members])


def test_fit_category_models_falls_back_for_a_category_without_enough_rows():
    rows, sal, cats, _ = _two_category_patches(np.random.default_rng(4))
    cats = cats.copy()
    cats[0] = 2  # category 2 has a single row: too few for k = 2
    fallback = LevelModel(np.eye(2, D, dtype=np.float32), np.array([True, False]))
    models = fit_category_models(rows, sal, cats, num_categories=3, k=2, niter=20, seed=0, fallback=fallback)
    np.testing.assert_array_equal(models.centroids[2], fallback.centroids)
    np.testing.assert_array_equal(models.foreground[2], fallback.foreground)
    assert not np.array_equal(models.centroids[0], fallback.centroids)
    with pytest.raises(ValueError, match="categories must be"):
        fit_category_models(rows, sal, cats, num_categories=2, k=2, niter=20, seed=0, fallback=fallback)


# ---- image level and consistency -----------------------------------------------------------------
def test_image_level_mask_and_consistency_on_a_constructed_case():
    rng = np.random.default_rng(5)
    a, b = _unit(rng, 2)
    planted = np.zeros((5, 6), dtype=bool)
    planted[1:4, 1:4] = True
    feats = np.where(planted[..., None], a, b) + 0.03 * rng.normal(size=(5, 6, D))
    sal = np.where(planted, 0.9, 0.1)
    image_mask = image_level_mask(feats, sal, k=2, niter=20, seed=0)
    np.testing.assert_array_equal(image_mask, planted)
    # the other two levels err in different places: one adds row 4, one misses patch (2, 2)
    dataset_mask = planted.copy()
    dataset_mask[4] = True
    category_mask = planted.copy()
    category_mask[2, 2] = False
    masks = (dataset_mask, category_mask, image_mask)
    majority, votes = consistent_mask(masks, min_votes=2)
    np.testing.assert_array_equal(majority, planted)
    assert votes[2, 2] == 2 and votes[4, 0] == 1 and votes[1, 1] == 3 and votes[0, 0] == 0
    np.testing.assert_array_equal(consistent_mask(masks, 3)[0], category_mask)
    np.testing.assert_array_equal(consistent_mask(masks, 1)[0], dataset_mask)
    with pytest.raises(ValueError, match="min_votes"):
        consistent_mask(masks, 4)


# ---- upsampling and refinement -------------------------------------------------------------------
def _square_image(rng, top, left, size, hw=64):
    planted = np.zeros((hw, hw), dtype=bool)
    planted[top:top + size, left:left + size] = True
    image = np.where(planted[..., None], [200, 60, 40], [40, 110, 190]) + rng.normal(0, 4, (hw, hw, 3))
    return planted, np.clip(image, 0, 255).astype(np.uint8)


def _patch_mask(planted, p=8):
    """Patch-level mask: a patch is foreground when its centre pixel is."""
    return planted[p // 2::p, p // 2::p]


REFINE = dict(iterations=10, dilations=(1, 2, 4, 8), temperature=0.1)


def test_upsampling_and_refinement_keep_a_grid_aligned_mask():
    planted, image = _square_image(np.random.default_rng(6), 16, 24, 24)
    soft = upsample_mask(_patch_mask(planted), (64, 64))
    refined = refine_mask(image, soft, **REFINE).numpy() > 0.5
    # bilinear upsampling rounds the square's corners off; refinement restores them
    assert 0.9 < _iou(soft.numpy() > 0.5, planted) < 0.97
    assert _iou(refined, planted) > 0.995


def test_refinement_snaps_a_coarse_mask_to_the_object_edges():
    planted, image = _square_image(np.random.default_rng(7), 13, 19, 27)  # edges off the 8-px grid
    soft = upsample_mask(_patch_mask(planted), (64, 64))
    coarse = soft.numpy() > 0.5
    refined = refine_mask(image, soft, **REFINE).numpy() > 0.5
    assert _iou(coarse, planted) < 0.85
    assert _iou(refined, planted) > 0.995
    # colour edges stop the averaging: many more steps leave the mask in place (with
    # temperature 1 it leaks across the edge and collapses within 50 steps)
    settled = refine_mask(image, soft, 200, REFINE["dilations"], REFINE["temperature"]).numpy() > 0.5
    assert _iou(settled, planted) > 0.995
    assert np.array_equal(refine_mask(image, soft, 0, (1,), 0.1).numpy(), soft.numpy())
    with pytest.raises(ValueError, match="H×W×3"):
        refine_mask(image[:32], soft, **REFINE)


# ---- labels --------------------------------------------------------------------------------------
def test_label_from_mask_and_label_vectors():
    mask = np.array([[True, False], [False, True]])
    assert label_from_mask(mask, 4).tolist() == [[5, 0], [0, 5]]
    assert label_from_mask(mask, 4).dtype == np.int32
    assert label_from_mask(mask, None).tolist() == [[0, 0], [0, 0]]
    image_cls = np.array([[3.0, 0.0], [0.0, 2.0]])
    object_cls = np.array([[0.0, 5.0], [4.0, 0.0]])
    vectors = label_vectors(image_cls, object_cls, has_object=np.array([True, False]))
    np.testing.assert_allclose(vectors, [[0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(label_vectors(image_cls, None, np.array([True, True])), [[1.0, 0.0], [0.0, 1.0]])


# ---- end to end ----------------------------------------------------------------------------------
def _synthetic_dataset(rng, per_class=6, classes=2, hw=8, patch=8):
    """Each image: one square object of its class on a shared background. Features: class
    direction in the object, background direction elsewhere; saliency high on the object; CLS
    token near the class direction; pixels coloured by class, grey-blue background."""
    class_dirs, bg_dir = _unit(rng, classes), _unit(rng)[0]
    colours = np.array([[210, 50, 50], [60, 200, 70]])
    n = per_class * classes
    truth = np.repeat(np.arange(classes), per_class)
    planted = np.zeros((n, hw, hw), dtype=bool)
    for i in range(n):
        top, left = rng.integers(0, 4, size=2)
        size = rng.integers(3, 5)
        planted[i, top:top + size, left:left + size] = True
    feats = np.where(planted[..., None], class_dirs[truth][:, None, None], bg_dir)
    feats = feats + 0.05 * rng.normal(size=feats.shape)
    sal = np.clip(np.where(planted, 0.8, 0.15) + 0.05 * rng.normal(size=planted.shape), 0, 1)
    cls = class_dirs[truth] + 0.1 * rng.normal(size=(n, D))
    pixels = planted.repeat(patch, axis=1).repeat(patch, axis=2)
    images = np.where(pixels[..., None], colours[truth][:, None, None], [90, 100, 130])
    images = images + rng.normal(0, 3, images.shape)
    return feats, sal, cls, np.clip(images, 0, 255).astype(np.uint8), truth, pixels


@pytest.mark.parametrize("by_object", [False, True])
def test_end_to_end_recovers_planted_objects_and_classes(by_object):
    rng = np.random.default_rng(8)
    feats, sal, cls, images, truth, pixels = _synthetic_dataset(rng)
    # stand-in for the masked-forward CLS token: the mean feature of the masked patches
    object_cls = (lambda masks: np.stack([f[m].mean(axis=0) for f, m in zip(feats, masks)])) if by_object else None
    params = LightClusterParams(refine_dilations=(1, 2, 4), patches_per_image=8)
    out = lightcluster_in_memory(feats, sal, cls, images, num_classes=2, params=params, object_cls=object_cls)
    assert out.labels.shape == (12, 64, 64) and out.labels.dtype == np.int32
    for i in range(12):
        assert _iou(out.masks[i], pixels[i]) > 0.95
    # one predicted class per true class, distinct: labels equal the truth up to renaming
    assert (out.classes >= 0).all()
    mapping = {int(t): {int(c) for c in out.classes[truth == t]} for t in (0, 1)}
    assert all(len(v) == 1 for v in mapping.values()) and mapping[0] != mapping[1]
    assert set(np.unique(out.labels).tolist()) == {0, 1, 2}
    assert out.state.categories.centroids.shape == (2, 2, D)


def test_params_are_validated():
    with pytest.raises(ValueError, match="image_k must be >= 2"):
        LightClusterParams(image_k=1)
    with pytest.raises(ValueError, match="min_votes"):
        LightClusterParams(min_votes=4)
    with pytest.raises(ValueError, match="refine_dilations"):
        LightClusterParams(refine_dilations=())


def test_modules_import_no_ray_or_fsspec():
    code = ("import sys, pdso_ray.method.lightcluster, pdso_ray.method.mask_refine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fsspec', 's3fs', 'timm')"
            " or m == 'pdso_ray.storage'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_runs_on_the_dino_backbone_outputs():
    """Plumbing: the backbone's keys, saliency and CLS tokens (random weights: the masks mean
    nothing) go through every step, labelling by the CLS token of each masked region."""
    import torch

    from pdso_ray.method.features import saliency_from_attention
    from pdso_ray.models.dino import build_dino, to_model_input

    torch.manual_seed(0)
    model = build_dino("vit_tiny_test", img_size=32)
    images = np.random.default_rng(9).integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    x = to_model_input(images, 32)
    with torch.no_grad():
        out = model.attention_features(x, kind="key")

    def object_cls(masks):
        with torch.no_grad():
            return model.attention_features(x, patch_mask=torch.from_numpy(masks)).cls_token.numpy()

    params = LightClusterParams(refine_dilations=(1, 2), patches_per_image=8)
    result = lightcluster_in_memory(out.features.numpy(), saliency_from_attention(out.cls_attention).numpy(),
                                    out.cls_token.numpy(), images, num_classes=2, params=params, object_cls=object_cls)
    assert result.labels.shape == (6, 32, 32) and result.patch_masks.shape == (6, 4, 4)
    assert set(np.unique(result.labels).tolist()) <= {0, 1, 2}
    assert result.state.dataset.centroids.shape == (2, 48)
    for labels, mask, cls in zip(result.labels, result.masks, result.classes):
        np.testing.assert_array_equal(labels, label_from_mask(mask, int(cls) if cls >= 0 else None))


def test_only_the_voters_vote():
    from pdso_ray.method.lightcluster import (CategoryModels, LevelModel, LightClusterParams, LightClusterState,
                                              segment_image)

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=D), rng.normal(size=D)
    planted = np.zeros((6, 6), dtype=bool)
    planted[1:5, 1:5] = True
    feats = np.where(planted[..., None], a, b) + 0.03 * rng.normal(size=(6, 6, D))
    sal = np.where(planted, 0.9, 0.1)
    # the dataset and category levels call nothing foreground; the image level finds the object
    blind = LevelModel(np.stack([a, b]).astype(np.float32) / np.linalg.norm([a, b], axis=1, keepdims=True),
                       np.zeros(2, bool))
    state = LightClusterState(blind, CategoryModels.stack([blind]), np.zeros((1, D), np.float32))
    image = np.zeros((48, 48, 3), np.uint8)
    majority = segment_image(feats, sal, image, state, 0, LightClusterParams(refine_iterations=0))
    alone = segment_image(feats, sal, image, state, 0,
                          LightClusterParams(voters=("image",), min_votes=1, refine_iterations=0))
    assert not majority.patch_mask.any() and majority.levels[2].any()
    np.testing.assert_array_equal(alone.patch_mask, planted)
    np.testing.assert_array_equal(alone.levels, majority.levels)  # every level is still kept for the ablation

    with pytest.raises(ValueError, match="voters"):
        LightClusterParams(voters=("image", "image"))
    with pytest.raises(ValueError, match="voters"):
        LightClusterParams(voters=("pixel",))
    with pytest.raises(ValueError, match="number of voters"):
        LightClusterParams(voters=("image",), min_votes=2)
