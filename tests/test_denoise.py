"""DFF denoising (method/denoise.py): selection rules, classifier, streaming, and the whole procedure."""

import numpy as np
import pytest
import torch

from pdso_ray.config import DenoiseConfig
from pdso_ray.method.denoise import (
    ChunkedFeatures,
    Classifier,
    FeatureBlock,
    denoise,
    embed_features,
    score,
    small_loss_subset,
    train_classifier,
)
from pdso_ray.method.selection import keep_lowest_per_group


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # minibatches of a few dozen rows: extra threads only add synchronisation on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _blobs(n_per=200, classes=10, dim=32, spread=2.0, noise=0.3, seed=0):
    """L2-normalised Gaussian clusters, flip features, true labels and labels with ``noise`` flipped."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    truth = np.repeat(np.arange(classes), n_per)
    x = centers[truth] + spread * rng.normal(size=(len(truth), dim)).astype(np.float32)
    xf = x + 0.1 * rng.normal(size=x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xf /= np.linalg.norm(xf, axis=1, keepdims=True)
    noisy = truth.copy()
    flipped = rng.random(len(truth)) < noise
    noisy[flipped] = (truth[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    return x, xf, truth, noisy


# ---- selection ----------------------------------------------------------------------------------
def test_small_loss_subset_keeps_ceil_of_ratio_per_cluster():
    rng = np.random.default_rng(0)
    sizes = [10, 7, 1, 0, 4]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    rng.shuffle(labels)
    losses = rng.random(len(labels)).astype(np.float32)
    mask = small_loss_subset(losses, labels, num_classes=5, keep_ratio=0.7)
    kept = np.bincount(labels[mask], minlength=5)
    assert kept.tolist() == [7, 5, 1, 0, 3]  # ceil(0.7 n): 7 (not 8: 0.7*10 rounds), 4.9->5, 0.7->1, 2.8->3
    for c in range(5):  # the kept ones are the lowest losses of their cluster
        in_c = labels == c
        if kept[c]:
            assert losses[mask & in_c].max() <= losses[~mask & in_c].min(initial=np.inf)
    assert small_loss_subset(losses, labels, 5, 1.0).all()
    assert small_loss_subset(losses, labels, 5, 0.5).sum() == 5 + 4 + 1 + 0 + 2


def test_small_loss_ties_and_bad_input():
    mask = small_loss_subset(np.zeros(4, np.float32), np.array([0, 0, 0, 0]), 1, 0.5)
    assert mask.tolist() == [True, True, False, False]  # equal losses: lower index first
    with pytest.raises(ValueError, match="keep_ratio"):
        small_loss_subset(np.zeros(2), np.zeros(2, int), 1, 0.0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        small_loss_subset(np.zeros(2), np.array([0, 2]), 2, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        keep_lowest_per_group(np.array([np.nan, 1.0]), np.array([0, 0]), np.array([1]))


def test_keep_lowest_per_group_by_hand():
    scores = np.array([5.0, 1.0, 3.0, 2.0, 9.0, 0.5])
    groups = np.array([0, 0, 1, 1, 1, 0])
    mask = keep_lowest_per_group(scores, groups, np.array([2, 1]))
    assert mask.tolist() == [False, True, False, True, False, True]


# ---- classifier ---------------------------------------------------------------------------------
def test_linear_pair_logits_equal_mean_of_logits():
    g = torch.Generator().manual_seed(0)
    x, xf = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    torch.manual_seed(0)
    model = Classifier(16, 5)
    torch.testing.assert_close(model.pair_logits(x, xf), (model(x) + model(xf)) / 2)
    with pytest.raises(ValueError, match="no hidden layer"):
        model.embed(x)


def test_mlp_embeds_pooled_and_per_patch_features_alike():
    torch.manual_seed(0)
    h = Classifier(16, 5, hidden_dim=8)
    patches = torch.randn(2, 3, 4, 16)
    per_patch = h.embed(patches)
    assert per_patch.shape == (2, 3, 4, 8)
    # a patch embedded alone equals its entry in the map; the input scale does not matter
    torch.testing.assert_close(h.embed(patches[1, 2, 3] * 7.0), per_patch[1, 2, 3])
    rebuilt = Classifier.from_state_dict(h.state_dict())
    torch.testing.assert_close(rebuilt(patches), h(patches))
    emb = embed_features(h, patches.reshape(-1, 16).numpy(), batch_size=5)
    assert emb.shape == (24, 8) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    x, xf, _, noisy = _blobs(n_per=20, classes=3, dim=8)
    src = ChunkedFeatures.from_arrays(x, xf)
    torch.manual_seed(42)
    before = torch.rand(1)
    torch.manual_seed(42)
    a = train_classifier(src, noisy, 3, epochs=2, lr=1e-2, batch_size=16, seed=7)
    after = torch.rand(1)
    b = train_classifier(src, noisy, 3, epochs=2, lr=1e-2, batch_size=16, seed=7)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_score_losses_against_labels_and_own_predictions():
    x, xf, _, noisy = _blobs(n_per=10, classes=3, dim=8)
    src = ChunkedFeatures.from_arrays(x, xf)
    torch.manual_seed(0)
    model = Classifier(8, 3)
    losses, pred = score(model, src, noisy)
    with torch.no_grad():
        logits = model.pair_logits(torch.from_numpy(x), torch.from_numpy(xf))
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(noisy), reduction="none")
    np.testing.assert_allclose(losses, expected.numpy(), rtol=1e-5)
    assert pred.tolist() == logits.argmax(1).tolist()
    own_losses, _ = score(model, src, None)
    np.testing.assert_allclose(own_losses, -torch.log_softmax(logits, 1).max(1).values.numpy(), rtol=1e-5)


def test_score_rejects_a_source_that_skips_rows():
    x = np.eye(4, dtype=np.float32)

    class Skipping:
        num_rows, dim = 4, 4

        def blocks(self, rng=None):
            yield FeatureBlock(np.array([0, 2]), x[[0, 2]], x[[0, 2]])

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="skipped 2 of its 4 rows"):
        score(Classifier(4, 2), Skipping())


# ---- streaming source ---------------------------------------------------------------------------
def test_chunked_blocks_cover_every_row_once():
    x, xf, _, _ = _blobs(n_per=10, classes=5, dim=4)  # 50 rows
    sizes = [7, 0, 13, 20, 10]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    src = ChunkedFeatures(sizes, lambda i: (x[offsets[i]:offsets[i + 1]], xf[offsets[i]:offsets[i + 1]]),
                          dim=4, shuffle_rows=15)
    assert src.num_rows == 50
    ordered = [b.rows for b in src.blocks(None)]
    assert np.concatenate(ordered).tolist() == list(range(50))
    shuffled = list(src.blocks(np.random.default_rng(3)))
    rows = np.concatenate([b.rows for b in shuffled])
    assert sorted(rows.tolist()) == list(range(50)) and rows.tolist() != list(range(50))
    assert all(len(b.rows) >= 15 for b in shuffled[:-1])  # chunks merged up to shuffle_rows
    for b in shuffled:  # each row still carries its own features
        np.testing.assert_array_equal(b.feat, x[b.rows])
        np.testing.assert_array_equal(b.feat_flip, xf[b.rows])
    bad = ChunkedFeatures([3], lambda i: (x[:2], xf[:2]), dim=4)
    with pytest.raises(ValueError, match="chunk 0 has shapes"):
        list(bad.blocks(None))


def test_streamed_chunks_train_as_well_as_in_memory_arrays():
    x, xf, truth, _ = _blobs(n_per=100, classes=5, dim=16, spread=1.5)
    perm = np.random.default_rng(0).permutation(len(x))  # rows in class order -> chunks by class
    order = np.argsort(truth[perm], kind="stable")
    x, xf, truth = x[perm][order], xf[perm][order], truth[perm][order]
    chunks = ChunkedFeatures([50] * 10, lambda i: (x[50 * i:50 * i + 50], xf[50 * i:50 * i + 50]),
                             dim=16, shuffle_rows=200)
    accuracy = {}
    for name, src in (("chunks", chunks), ("arrays", ChunkedFeatures.from_arrays(x, xf))):
        model = train_classifier(src, truth, 5, epochs=10, lr=1e-2, batch_size=32, seed=0)
        _, pred = score(model, src)
        accuracy[name] = (pred == truth).mean()
    assert accuracy["arrays"] > 0.85  # these blobs overlap: ~0.89 is the ceiling
    assert accuracy["chunks"] >= accuracy["arrays"] - 0.02


# ---- the whole procedure ------------------------------------------------------------------------
def test_denoise_recovers_clean_labels_from_30_percent_noise():
    x, xf, truth, noisy = _blobs()
    noise_rate = (noisy != truth).mean()
    assert 0.25 < noise_rate < 0.35
    settings = DenoiseConfig(epochs_f=15, epochs_g=30, epochs_h=30, hidden_dim=32, lr=1e-2, batch_size=128, seed=0)
    result = denoise(ChunkedFeatures.from_arrays(x, xf), noisy, 10, settings)
    clean = result.clean_mask
    assert clean.sum() == result.stats["subset2"] and 0.4 * len(x) <= clean.sum() <= 0.6 * len(x)
    assert (noisy[result.subset1] != truth[result.subset1]).mean() < 0.10
    assert (result.labels[clean] != truth[clean]).mean() < 0.10  # S2 is far cleaner than 30 %
    _, pred = score(result.classifier, ChunkedFeatures.from_arrays(x, xf))
    assert (pred == truth).mean() > (noisy == truth).mean() + 0.05
    emb = result.embed(x)
    assert emb.shape == (len(x), 32)


def test_denoise_tiny_inputs():
    x = np.eye(3, 4, dtype=np.float32)
    settings = DenoiseConfig(epochs_f=1, epochs_g=1, epochs_h=1, hidden_dim=4, batch_size=2, seed=0)
    result = denoise(ChunkedFeatures.from_arrays(x, x), np.array([0, 1, 1]), 2, settings)
    assert result.subset1.tolist() == [True, True, False] or result.subset1.tolist() == [True, False, True]
    assert result.clean_mask.shape == (3,) and result.clean_mask.any()
    one = denoise(ChunkedFeatures.from_arrays(x[:1], x[:1]), np.array([0]), 1, settings)
    assert one.subset1.tolist() == [True] and one.clean_mask.tolist() == [True]
    with pytest.raises(ValueError, match="labels must be 3 integers"):
        denoise(ChunkedFeatures.from_arrays(x, x), np.array([0, 1]), 2, settings)
