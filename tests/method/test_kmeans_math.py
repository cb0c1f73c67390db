"""Property tests of the pure k-means math (no Ray)."""


import numpy as np
import pytest
import torch

from pdso_ray.method import kmeans_math as km


def _blobs(n_per: int, k: int, d: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (k, d))
    labels = np.repeat(np.arange(k), n_per)
    x = centers[labels] + rng.normal(0, spread, (labels.size, d))
    return x.astype(np.float32), labels


def _brute_force(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)


@pytest.mark.parametrize("kernel", ["numpy", "torch"])
def test_search_matches_brute_force_argmin_and_topk(kernel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 12)).astype(np.float32)
    c = rng.normal(size=(25, 12)).astype(np.float32)
    exact = _brute_force(x, c)
    rows = x if kernel == "numpy" else torch.from_numpy(x)
    search = km.KERNELS[kernel]
    ids, dist = km.search_blocks(rows, c, topk=1, search=search, block_rows=128)
    assert ids.dtype == np.int64 and dist.dtype == np.float32 and ids.shape == (700, 1)
    np.testing.assert_array_equal(ids[:, 0], exact.argmin(1))
    np.testing.assert_allclose(dist[:, 0], exact.min(1), rtol=1e-4, atol=1e-4)
    ids5, dist5 = km.search_blocks(rows, c, topk=5, search=search, block_rows=100)
    np.testing.assert_array_equal(ids5, np.argsort(exact, axis=1)[:, :5])
    np.testing.assert_allclose(dist5, np.sort(exact, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="topk"):
        km.search_blocks(x, c, topk=26)
    with pytest.raises(ValueError, match="centroids must be"):
        km.search_blocks(x, c[:, :5])


def test_partials_of_any_split_reduce_to_the_full_statistics():
    x, _ = _blobs(150, 4, 6, 3.0, seed=1)
    c = x[[0, 200, 400, 590]]
    assign = _brute_force(x, c).argmin(1)
    want_sums = np.stack([x[assign == j].astype(np.float64).sum(0) for j in range(4)])
    want_obj = _brute_force(x, c).min(1).sum()

    full = km.lloyd_partial(x, c, block_rows=50)
    parts = [km.lloyd_partial(x[a:b], c, block_rows=64) for a, b in [(0, 7), (7, 333), (333, 600)]]
    reduced = km.reduce_partials(parts)
    for p in (full, reduced):
        np.testing.assert_array_equal(p.counts, np.bincount(assign, minlength=4))
        np.testing.assert_allclose(p.sums, want_sums, rtol=1e-5, atol=1e-3)
        assert p.objective == pytest.approx(want_obj, rel=1e-5)
    assert p.counts.sum() == 600
    with pytest.raises(ValueError, match="at least one"):
        km.reduce_partials([])


def test_objective_never_increases_across_lloyd_steps():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 8)).astype(np.float32)  # no structure: many small moves
    start = x[km.init_indices(len(x), 12, seed=3)]
    splits = []
    centroids, history = km.lloyd(
        lambda c: km.lloyd_partial(x, c), start, niter=25, seed=3, on_iteration=lambda i, o, s: splits.append(s)
    )
    assert len(history) >= 10 and sum(splits) == 0
    steps = np.diff(history)
    assert np.all(steps <= 1e-6 * history[0]), steps
    assert history[-1] < 0.9 * history[0]
    # the returned centroids are the means of their own assignment's previous step
    final = km.lloyd_partial(x, centroids).objective
    assert final <= history[-1] * (1 + 1e-6)


def test_lloyd_stops_when_centroids_stop_changing():
    x, _ = _blobs(50, 3, 4, 0.5, seed=4)
    start = x[[0, 50, 100]]
    calls = []

    def step(c):
        calls.append(c)
        return km.lloyd_partial(x, c)

    centroids, history = km.lloyd(step, start, niter=20, seed=0)
    assert len(history) == 2  # one move to the true means, then a step that changes nothing
    np.testing.assert_array_equal(calls[-1], centroids)


def test_empty_clusters_are_split_and_filled_again():
    rng = np.random.default_rng(5)
    x = (5.0 + rng.normal(size=(400, 6))).astype(np.float32)  # one blob
    c = np.stack([x.mean(0), np.full(6, 100.0), np.full(6, -100.0)]).astype(np.float32)
    part = km.lloyd_partial(x, c)
    np.testing.assert_array_equal(part.counts, [400, 0, 0])
    new, nsplit = km.update_centroids(part, np.random.default_rng(0))
    assert nsplit == 2
    assert np.all(np.abs(new - x.mean(0)) < 5.0 * km.SPLIT_EPS * 2 * np.abs(x.mean(0)) + 1e-6)
    assert len({tuple(r) for r in new}) == 3  # three distinct centroids
    after = km.lloyd_partial(x, new)
    assert after.counts.min() > 0 and after.counts.sum() == 400


def test_split_takes_a_perturbed_copy_of_a_large_donor():
    c = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    counts = np.array([0, 1, 1, 1000])
    new, nsplit = km.split_empty_clusters(c, counts, np.random.default_rng(0))
    eps = np.float32(km.SPLIT_EPS)
    assert nsplit == 1
    np.testing.assert_array_equal(new[0], c[3] * np.array([1 + eps, 1 - eps, 1 + eps], np.float32))
    np.testing.assert_array_equal(new[3], c[3] * np.array([1 - eps, 1 + eps, 1 - eps], np.float32))
    np.testing.assert_array_equal(new[1:3], c[1:3])
    np.testing.assert_array_equal(c[0], [1, 2, 3])  # input untouched
    same, none = km.split_empty_clusters(c, np.array([2, 1, 1, 5]), np.random.default_rng(0))
    assert none == 0 and np.array_equal(same, c)
    with pytest.raises(ValueError, match="at least k=4"):
        km.split_empty_clusters(c, np.array([0, 1, 1, 1]), np.random.default_rng(0))


def test_split_donors_follow_cluster_sizes():
    c = np.ones((3, 2), dtype=np.float32)
    donors = []
    for seed in range(400):
        new, _ = km.split_empty_clusters(c * [[1], [2], [3]], np.array([0, 31, 91]), np.random.default_rng(seed))
        donors.append(int(round(new[0, 0] / (1 + km.SPLIT_EPS))))
    share = np.mean(np.array(donors) == 3)
    assert 0.68 < share < 0.82  # expected 90 / 120 = 0.75


def test_init_and_sample_indices_are_distinct_and_seeded():
    a = km.init_indices(1000, 50, seed=7)
    assert a.dtype == np.int64 and len(set(a.tolist())) == 50 and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, km.init_indices(1000, 50, seed=7))
    assert not np.array_equal(a, km.init_indices(1000, 50, seed=7, redo=1))
    with pytest.raises(ValueError, match="k must be in 1..n=10"):
        km.init_indices(10, 11, seed=0)
    assert km.sample_indices(1000, 10, 100, seed=0) is None
    s = km.sample_indices(1000, 10, 20, seed=0)
    assert s.size == 200 and np.all(np.diff(s) > 0)
    local = km.split_by_offsets(s, [300, 0, 700])
    assert [len(p) for p in local] == [np.sum(s < 300), 0, np.sum(s >= 300)]
    np.testing.assert_array_equal(np.concatenate([local[0], local[2] + 300]), s)


def test_torch_rows_give_the_numpy_partials_and_read_only_arrays_work():
    x, _ = _blobs(500, 3, 5, 1.0, seed=8)
    x.setflags(write=False)  # as Ray's object store hands them out
    p = km.lloyd_partial(x, x[[0, 500, 1000]], block_rows=256)
    q = km.lloyd_partial(torch.from_numpy(x.copy()), x[[0, 500, 1000]], search=km.search_torch, block_rows=256)
    np.testing.assert_array_equal(p.counts, [500, 500, 500])
    np.testing.assert_array_equal(p.counts, q.counts)
    np.testing.assert_allclose(p.sums, q.sums, rtol=1e-6)
    assert p.objective == pytest.approx(q.objective, rel=1e-5)
