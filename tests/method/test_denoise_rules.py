"""The rules DFF and CSD gained for issue #12, on small arrays with known answers: best-of-n
k-means, S2 against the k-means labels, cosine heads and centring, class prototypes and the
starts of k-means #2/#3."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from pdso_ray.config import DenoiseConfig, PurifyConfig
from pdso_ray.method import kmeans_math as km
from pdso_ray.method.denoise import (
    ChunkedFeatures,
    Classifier,
    class_prototypes,
    denoise,
    embed_features,
    feature_mean,
    head_prototypes,
    score,
    select_clean,
    train_classifier,
)
from pdso_ray.method.purify import fill_missing_prototypes, purification_mask, purify


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- k-means restarts ---------------------------------------------------------------------------
def _four_blobs():
    """4 tight blobs of 50 at the corners of a square of side 10: a random start that puts two
    centroids in one blob stays in that local minimum."""
    rng = np.random.default_rng(0)
    corners = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    truth = np.repeat(np.arange(4), 50)
    x = (corners[truth] + 0.3 * rng.standard_normal((200, 2))).astype(np.float32)
    optimum = sum(((x[truth == c] - x[truth == c].mean(0)) ** 2).sum() for c in range(4))
    return x, optimum


def test_nredo_keeps_the_restart_with_the_best_objective():
    from pdso_ray.kmeans import kmeans

    x, optimum = _four_blobs()
    step = lambda c: km.lloyd_partial(x, c)  # noqa: E731
    finals = []
    for redo in range(10):  # each restart of kmeans(seed=3, nredo=10), run alone
        start = x[km.init_indices(len(x), 4, seed=3, redo=redo)]
        _, history = km.lloyd(step, start, 20, seed=3, redo=redo)
        finals.append(history[-1])
    assert max(finals) > 1.5 * optimum  # some starts end in a local minimum...
    assert min(finals) == pytest.approx(optimum, rel=1e-4)  # ...and some find the blobs
    best = kmeans(x, 4, niter=20, nredo=10, seed=3, num_shards=0, progress=False, kernel="numpy")
    assert best.history[-1] == pytest.approx(min(finals), rel=1e-6)
    assert best.objective == pytest.approx(optimum, rel=1e-4)
    assert sorted(best.counts.tolist()) == [50, 50, 50, 50]


def test_paper_defaults_of_the_new_keys():
    from pdso_ray.config import ClusterConfig

    assert ClusterConfig().nredo == 30 and PurifyConfig().nredo == 30
    d = DenoiseConfig()
    assert (d.s2_labels, d.head, d.logit_scale, d.centre) == ("kmeans", "cosine", 16.0, True)
    assert PurifyConfig().init == "prototypes"
    # measured choices (docs/method.md §3-4): h on every image with g's labels, k-means #2 from h's
    # class directions, no Lloyd iterations from them, the rules on each #2 cluster's mean; a
    # floor of 500 optimiser steps per head (small data)
    assert (d.h_rows, d.prototypes, d.min_steps) == ("all", "weights", 500)
    # f and g start at the k-means clusters; g's changes pass on where f agrees (small data)
    assert (d.head_init, d.relabel) == ("kmeans", "agreed")
    assert (PurifyConfig().prototype_niter2, PurifyConfig().prototype_niter3) == (0, 0)
    assert PurifyConfig().kept_distance == "mean"


# ---- S2 -----------------------------------------------------------------------------------------
def _hand_classifier():
    """A linear g with logits 10·x̂ on 2-D inputs: class 0 along e0, class 1 along e1."""
    g = Classifier(2, 2)
    with torch.no_grad():
        g.out.weight.copy_(10 * torch.eye(2))
        g.out.bias.zero_()
    return g


# rows 0, 1: k-means 0 and clearly 0; row 2: k-means 0 but clearly 1 (g disagrees);
# rows 3, 4: k-means 1 and clearly 1; row 5: k-means 1, borderline
S2_X = np.array([[1, 0.1], [1, 0.3], [0.1, 1], [0.2, 1], [0.05, 1], [0.7, 1]], dtype=np.float32)
S2_KMEANS = np.array([0, 0, 0, 1, 1, 1])


def test_s2_against_kmeans_labels_keeps_only_images_g_confirms():
    src = ChunkedFeatures.from_arrays(S2_X, S2_X)
    clean, clean_labels, relabels = select_clean(_hand_classifier(), src, S2_KMEANS, 2, 2 / 3, "kmeans")
    assert relabels.tolist() == [0, 0, 1, 1, 1, 1]
    # per k-means cluster the ceil(2/3 · 3) = 2 lowest losses against the k-means label:
    # cluster 0 drops row 2 (g says 1: high loss), cluster 1 drops the borderline row 5
    assert np.flatnonzero(clean).tolist() == [0, 1, 3, 4]
    assert clean_labels.tolist() == S2_KMEANS.tolist()


def test_s2_against_gs_labels_keeps_what_g_is_sure_of():
    src = ChunkedFeatures.from_arrays(S2_X, S2_X)
    clean, clean_labels, _ = select_clean(_hand_classifier(), src, S2_KMEANS, 2, 2 / 3, "relabel")
    # g's class 0 = rows 0, 1 (keeps ceil(4/3) = 2); class 1 = rows 2..5 keeps ceil(8/3) = 3, its
    # most confident: 4 (margin 9.5), 2 (9.0), 3 (7.9); row 2 enters S2 against its k-means label
    assert np.flatnonzero(clean).tolist() == [0, 1, 2, 3, 4]
    assert clean_labels.tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="against must be one of"):
        select_clean(_hand_classifier(), src, S2_KMEANS, 2, 0.5, "truth")


def test_denoise_trains_h_on_the_labels_s2_was_selected_under():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 60)
    base = dict(epochs_f=1, epochs_g=1, epochs_h=1, hidden_dim=4, batch_size=16, seed=0)
    src = ChunkedFeatures.from_arrays(x, x)
    on_s2 = dict(h_rows="s2", prototypes="means")
    by_kmeans = denoise(src, labels, 3, DenoiseConfig(**base, **on_s2, s2_labels="kmeans"))
    assert by_kmeans.clean_labels.tolist() == labels.tolist()
    by_g = denoise(src, labels, 3, DenoiseConfig(**base, **on_s2, s2_labels="relabel"))
    assert by_g.clean_labels.tolist() == by_g.labels.tolist()
    for result in (by_kmeans, by_g):  # prototypes: the S2 means of h's embedding
        counts = np.bincount(result.clean_labels[result.clean_mask], minlength=3)
        assert result.prototype_counts.tolist() == counts.tolist()
    with pytest.raises(ValueError, match="denoise.s2_labels"):
        denoise(src, labels, 3, DenoiseConfig(**base, s2_labels="g"))
    on_all = denoise(src, labels, 3, DenoiseConfig(**base, h_rows="all", prototypes="means"))
    # h on every image with g's relabelling: the prototypes are g's class means over all rows
    assert on_all.prototype_counts.tolist() == np.bincount(on_all.labels, minlength=3).tolist()
    emb = embed_features(on_all.classifier, x)
    for c in np.flatnonzero(on_all.prototype_counts):
        np.testing.assert_allclose(on_all.prototypes[c], emb[on_all.labels == c].mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="denoise.h_rows"):
        denoise(src, labels, 3, DenoiseConfig(**base, h_rows="s1"))
    with pytest.raises(ValueError, match="needs denoise.head=cosine"):
        denoise(src, labels, 3, DenoiseConfig(**base, head="linear", prototypes="weights"))
    with pytest.raises(ValueError, match="denoise.head"):
        denoise(src, labels, 3, DenoiseConfig(**base, head="arcface"))


def test_head_prototypes_make_the_nearest_prototype_hs_own_prediction():
    torch.manual_seed(0)
    h = Classifier(6, 5, hidden_dim=8, head="cosine")
    x = np.random.default_rng(0).standard_normal((200, 6)).astype(np.float32)
    protos = head_prototypes(h)
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1, rtol=1e-6)
    emb = embed_features(h, x)
    nearest = ((emb[:, None] - protos[None]) ** 2).sum(-1).argmin(1)
    with torch.no_grad():
        assert nearest.tolist() == h(torch.from_numpy(x)).argmax(1).tolist()
    with pytest.raises(ValueError, match="cosine head"):
        head_prototypes(Classifier(6, 5, hidden_dim=8, head="linear"))


# ---- heads and centring -------------------------------------------------------------------------
def test_cosine_head_scores_scaled_cosines_of_the_centred_input():
    centre = np.array([0.5, 0.0, 0.0], dtype=np.float32)
    model = Classifier(3, 2, head="cosine", logit_scale=10.0, centre=centre)
    with torch.no_grad():
        model.out.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]))
    x = torch.tensor([[4.0, 3.0, 0.0]])  # normalised (0.8, 0.6, 0), minus centre (0.3, 0.6, 0)
    z = np.array([0.3, 0.6, 0.0]) / np.hypot(0.3, 0.6)
    expected = 10.0 * np.array([z[0], z[2]])  # cosines with e0 and e2
    np.testing.assert_allclose(model(x).detach().numpy()[0], expected, rtol=1e-6)
    assert model.out.bias is None  # a cosine head has no bias
    # linear in the unit inputs: the pair shortcut is still the mean of the logits
    xf = torch.tensor([[0.0, 1.0, 1.0]])
    torch.testing.assert_close(model.pair_logits(x, xf), (model(x) + model(xf)) / 2)


def test_cosine_mlp_round_trips_and_embeds_patches_scale_free():
    torch.manual_seed(0)
    h = Classifier(16, 5, hidden_dim=8, head="cosine", logit_scale=12.0)
    patches = torch.randn(2, 3, 16)
    torch.testing.assert_close(h.embed(patches[1, 2] * 5.0), h.embed(patches)[1, 2])
    rebuilt = Classifier.from_state_dict(h.state_dict())
    assert rebuilt.cosine and float(rebuilt.logit_scale) == 12.0 and rebuilt.centre is None
    torch.testing.assert_close(rebuilt(patches), h(patches))
    logits = h(patches).detach()
    assert logits.abs().max() <= 12.0 + 1e-5  # scale · cosine
    # checkpoints of the linear head (no logit_scale, no centre) still load
    old = Classifier(16, 5, hidden_dim=8)
    assert not Classifier.from_state_dict(old.state_dict()).cosine
    centred = Classifier(16, 5, centre=np.ones(16, np.float32) / 4)
    torch.testing.assert_close(Classifier.from_state_dict(centred.state_dict())(patches), centred(patches))
    with pytest.raises(ValueError, match="centre must have shape"):
        Classifier(16, 5, centre=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="head must be one of"):
        Classifier(16, 5, head="softmax")


def test_feature_mean_of_normalised_rows():
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)  # unit: (0.6, 0.8) and (0, 1)
    np.testing.assert_allclose(feature_mean(ChunkedFeatures.from_arrays(x, x)), [0.3, 0.9], rtol=1e-6)


def test_cosine_head_with_centring_fits_features_sharing_a_large_common_direction():
    # DINO-like: every feature = a big shared direction + a small class part
    rng = np.random.default_rng(1)
    classes, dim = 6, 16
    common = np.zeros(dim, np.float32)
    common[0] = 3.0
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    truth = rng.integers(0, classes, 600)
    x = common + centres[truth] + 0.3 * rng.standard_normal((600, dim)).astype(np.float32)
    src = ChunkedFeatures.from_arrays(x, x)
    model = train_classifier(src, truth, classes, epochs=3, lr=1e-2, batch_size=64, seed=0, head="cosine",
                             centre=feature_mean(src))
    _, pred = score(model, src)
    assert (pred == truth).mean() > 0.95


# ---- prototypes and the starts of k-means #2/#3 -------------------------------------------------
def test_class_prototypes_are_masked_class_means_of_the_embedding():
    torch.manual_seed(0)
    h = Classifier(6, 3, hidden_dim=4, head="cosine")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    labels = np.where(np.arange(40) < 20, 0, 2)  # class 1 has no image
    mask = rng.random(40) < 0.6
    sizes = [7, 13, 20]  # several blocks
    offsets = np.cumsum([0] + sizes)
    src = ChunkedFeatures(sizes, lambda i: (x[offsets[i]:offsets[i + 1]],) * 2, dim=6)
    protos, counts = class_prototypes(h, src, labels, mask, 3)
    emb = embed_features(h, x)
    assert counts.tolist() == [int((mask & (labels == 0)).sum()), 0, int((mask & (labels == 2)).sum())]
    np.testing.assert_allclose(protos[0], emb[mask & (labels == 0)].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(protos[2], emb[mask & (labels == 2)].mean(0), rtol=1e-5, atol=1e-6)
    assert not protos[1].any()


def test_missing_prototypes_take_distinct_random_rows():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    protos = np.full((4, 2), -1.0, dtype=np.float32)
    init = fill_missing_prototypes(protos, np.array([3, 0, 1, 0]), x.__getitem__, 10, seed=5)
    assert (init[[0, 2]] == -1).all()  # classes with members keep their prototype
    picked = init[[1, 3], 0] / 2
    assert len(set(picked.tolist())) == 2 and all(p in range(10) for p in picked)
    again = fill_missing_prototypes(protos, np.array([3, 0, 1, 0]), x.__getitem__, 10, seed=5)
    assert np.array_equal(init, again)
    with pytest.raises(ValueError, match="3 classes have no prototype"):
        fill_missing_prototypes(protos[:3], np.zeros(3, int), x.__getitem__, 2, seed=0)


def _recording_kmeans(calls):
    def run(x, k, *, seed, nredo, niter, init):
        calls.append({"n": len(x), "seed": seed, "nredo": nredo, "niter": niter,
                      "init": None if init is None else init.copy()})
        centroids = x[:k].copy() if init is None else init + 0.5  # "moved" centroids, to see them passed on
        d = ((x[:, None] - centroids[None]) ** 2).sum(-1)
        return centroids, d.argmin(1), d.min(1)
    return run


def test_purify_starts_kmeans_as_configured():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    calls = []
    purify(x, 3, _recording_kmeans(calls), dist_quantile=0.8, alpha=2.0, topk=2, seed=4, nredo=7)
    assert [(c["n"], c["seed"], c["nredo"], c["niter"], c["init"]) for c in calls] == [
        (50, 4, 7, 20, None), (calls[1]["n"], 5, 7, 20, None)]
    assert calls[1]["n"] < 50  # k-means #3 trains on the kept rows
    calls.clear()
    init = x[[0, 10, 20]]
    result = purify(x, 3, _recording_kmeans(calls), dist_quantile=0.8, alpha=2.0, topk=2, seed=4, nredo=7,
                    niter=(0, 1), init=init)
    assert [(c["nredo"], c["niter"]) for c in calls] == [(1, 0), (1, 1)]  # a given start is run once
    np.testing.assert_array_equal(calls[0]["init"], init)
    np.testing.assert_array_equal(calls[1]["init"], init + 0.5)  # #3 continues from #2's centroids
    d2 = ((x[:, None] - (init + 0.5)[None]) ** 2).sum(-1)
    assert result.assignments2.tolist() == d2.argmin(1).tolist()
    assert result.kept.tolist() == purification_mask(d2.min(1), d2.argmin(1), 3, 0.8, 2.0).tolist()
    with pytest.raises(ValueError, match="init must be 3×3"):
        purify(x, 3, _recording_kmeans([]), dist_quantile=0.8, alpha=2.0, topk=2, seed=0, init=init[:2])
    with pytest.raises(ValueError, match=">= 1 for random starts"):
        purify(x, 3, _recording_kmeans([]), dist_quantile=0.8, alpha=2.0, topk=2, seed=0, niter=(0, 1))


def test_prototype_start_with_no_iterations_is_nearest_prototype_then_kept_means():
    """niter=(0, 1): k-means #2 assigns every image to its nearest prototype, and each final
    centroid is the mean of its #2 cluster's kept images (one Lloyd step from #2's centroids)."""
    def lloyd_kmeans(data, k, *, seed, nredo, niter, init):
        centroids, _ = km.lloyd(lambda c: km.lloyd_partial(data, c), init, niter, seed)
        d = ((data[:, None] - centroids[None]) ** 2).sum(-1)
        return centroids, d.argmin(1), d.min(1)

    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [4, 0], [0, 4]], dtype=np.float32)
    truth = np.repeat(np.arange(3), 30)
    x = (centres[truth] + rng.normal(0, 0.6, (90, 2))).astype(np.float32)
    protos = centres + np.float32(0.3)  # off-centre: Lloyd would move them
    result = purify(x, 3, lloyd_kmeans, dist_quantile=0.8, alpha=2.0, topk=3, seed=0, niter=(0, 1), init=protos)
    d = ((x[:, None] - protos[None]) ** 2).sum(-1)
    assert result.assignments2.tolist() == d.argmin(1).tolist()
    assert result.kept.tolist() == purification_mask(d.min(1), d.argmin(1), 3, 0.8, 2.0).tolist()
    means = np.stack([x[result.kept & (result.assignments2 == c)].mean(0) for c in range(3)])
    np.testing.assert_allclose(result.centroids, means, rtol=1e-5, atol=1e-5)
    assert result.kept.sum() == sum(int(np.ceil(0.8 * n)) for n in np.bincount(d.argmin(1), minlength=3))


def test_metric_and_rule_modules_import_no_ray_fsspec_or_torch():
    code = ("import sys, pdso_ray.method.cluster_metrics, pdso_ray.method.purify; "
            "print(sorted({'ray', 'fsspec', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_feature_space_embeds_the_normalised_input_and_survives_saving():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 60)
    src = ChunkedFeatures.from_arrays(x, x)
    result = denoise(src, labels, 3, DenoiseConfig(epochs_f=1, epochs_g=1, epochs_h=1, hidden_dim=4, batch_size=16,
                                                    seed=0, space="features", prototypes="means"))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(embed_features(result.classifier, x), unit, rtol=1e-5, atol=1e-6)
    assert result.prototypes.shape == (3, 8)  # feature means, not h's 4-wide hidden layer
    reloaded = Classifier.from_state_dict(result.classifier.state_dict())
    np.testing.assert_allclose(embed_features(reloaded, x), unit, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs denoise.space=embedding"):
        denoise(src, labels, 3, DenoiseConfig(epochs_f=1, epochs_g=1, epochs_h=1, hidden_dim=4, seed=0,
                                              space="features", prototypes="weights"))


def test_without_dff_the_kmeans_labels_and_their_means_pass_on_unchanged():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    labels = np.arange(40) % 4
    src = ChunkedFeatures.from_arrays(x, x)
    result = denoise(src, labels, 4, DenoiseConfig(dff=False, space="features", prototypes="means", seed=0))
    assert result.labels.tolist() == labels.tolist() and result.clean_mask.all() and result.subset1.all()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c in range(4):
        np.testing.assert_allclose(result.prototypes[c], unit[labels == c].mean(0), rtol=1e-5, atol=1e-6)
    assert result.prototype_counts.tolist() == [10, 10, 10, 10]
    np.testing.assert_allclose(embed_features(result.classifier, x), unit, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dff=false needs denoise.space=features"):
        denoise(src, labels, 4, DenoiseConfig(dff=False, prototypes="means", seed=0))
