"""Cluster purification (method/purify.py): the rules on hand arrays, their invariants, the composition."""

import numpy as np
import pytest

from pdso_ray.method.purify import (
    assigned_distances,
    cap_large_clusters,
    cluster_cap,
    cluster_means,
    distance_filter,
    purify,
)

# Three clusters: 0 has 5 members, 1 has 3, 2 has 1; distances chosen by hand.
ASSIGN = np.array([0, 1, 0, 2, 0, 1, 0, 0, 1])
DIST = np.array([0.5, 0.2, 0.1, 3.0, 0.9, 0.4, 0.3, 0.7, 0.6])


def simple_kmeans(x, k, *, seed, nredo, init=None, niter=25):
    """Lloyd's k-means from ``init`` or best of ``nredo`` random starts: (centroids, assignments,
    sq. distances)."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(1 if init is not None else nredo):
        centroids = (x[rng.choice(len(x), k, replace=False)] if init is None else init).astype(np.float64)
        for _ in range(niter):
            assign = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
            for c in range(k):
                if (assign == c).any():
                    centroids[c] = x[assign == c].mean(0)
        d = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
        assign = d.argmin(1)
        dist = d[np.arange(len(x)), assign]
        if best is None or dist.sum() < best[2].sum():
            best = (centroids.astype(np.float32), assign, dist)
    return best


def test_distance_filter_by_hand():
    keep = distance_filter(DIST, ASSIGN, k=3, quantile=0.8)
    # cluster 0 (0.5, 0.1, 0.9, 0.3, 0.7): ceil(4.0) = 4 closest -> drops 0.9 (index 4)
    # cluster 1 (0.2, 0.4, 0.6): ceil(2.4) = 3 -> all; cluster 2: its only member
    assert np.flatnonzero(~keep).tolist() == [4]
    keep_half = distance_filter(DIST, ASSIGN, k=3, quantile=0.5)
    assert np.flatnonzero(keep_half).tolist() == [0, 1, 2, 3, 5, 6]  # ceil: 3 of 5, 2 of 3, 1 of 1
    assert distance_filter(DIST, ASSIGN, k=3, quantile=1.0).all()
    with pytest.raises(ValueError, match="quantile"):
        distance_filter(DIST, ASSIGN, k=3, quantile=0.0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        distance_filter(DIST, ASSIGN, k=2, quantile=0.5)


def test_distance_filter_invariants():
    rng = np.random.default_rng(0)
    assign = rng.integers(0, 7, 500)
    dist = rng.random(500) * 4
    counts = np.bincount(assign, minlength=7)
    previous = np.zeros(500, dtype=bool)
    for q in (0.2, 0.5, 0.8, 1.0):
        keep = distance_filter(dist, assign, 7, q)
        kept_counts = np.bincount(assign[keep], minlength=7)
        assert kept_counts.tolist() == np.ceil(q * counts).astype(int).tolist()
        assert (previous <= keep).all()  # monotone: a larger quantile keeps a superset
        for c in range(7):  # the kept are the closest of their cluster
            assert dist[keep & (assign == c)].max() <= dist[~keep & (assign == c)].min(initial=np.inf)
        # only the order of distances matters: the Euclidean (not squared) distance gives the same mask
        assert (distance_filter(np.sqrt(dist), assign, 7, q) == keep).all()
        previous = keep
    # a relative rule: applied again to what it kept, it drops more (it is not idempotent)
    keep = distance_filter(dist, assign, 7, 0.8)
    again = distance_filter(dist[keep], assign[keep], 7, 0.8)
    assert again.sum() < keep.sum()


def test_cap_large_clusters_by_hand():
    assert cluster_cap(9, 3, 1.0) == 3 and cluster_cap(10, 3, 2.0) == 6 and cluster_cap(1, 5, 1.0) == 1
    keep = cap_large_clusters(ASSIGN, DIST, k=3, alpha=1.0)  # cap = 9/3 = 3
    # cluster 0 keeps its 3 closest (0.1, 0.3, 0.5 at indices 2, 6, 0); 1 and 2 are within the cap
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 3, 5, 6, 8]
    assert cap_large_clusters(ASSIGN, DIST, k=3, alpha=2.0).all()  # cap 6: nobody is over


def test_cap_is_idempotent_for_a_fixed_total():
    rng = np.random.default_rng(1)
    assign = np.concatenate([np.zeros(300, int), rng.integers(1, 10, 700)])  # one giant cluster
    dist = rng.random(1000)
    keep = cap_large_clusters(assign, dist, 10, alpha=2.0)
    assert np.bincount(assign[keep], minlength=10).max() == 200  # 2 * 1000 / 10
    assert np.bincount(assign[keep], minlength=10)[0] == 200
    again = cap_large_clusters(assign[keep], dist[keep], 10, alpha=2.0, n_total=1000)
    assert again.all()  # same cap: nothing more to drop
    # with the cap recomputed from the smaller set (N = 900 -> cap 180) it is not a fixed point
    assert not cap_large_clusters(assign[keep], dist[keep], 10, alpha=2.0).all()


def test_purify_drops_planted_outliers_and_finds_the_blobs():
    rng = np.random.default_rng(3)
    k, per = 4, 60
    centers = np.eye(k, 8, dtype=np.float32) * 3
    truth = np.repeat(np.arange(k), per)
    x = centers[truth] + 0.3 * rng.normal(size=(k * per, 8)).astype(np.float32)
    outliers = rng.choice(len(x), 12, replace=False)
    x[outliers] += rng.normal(size=(12, 8)).astype(np.float32) * 2.5  # far from every blob
    result = purify(x, k, simple_kmeans, dist_quantile=0.8, alpha=2.0, topk=3, seed=0, nredo=5)

    assert result.centroids.shape == (k, 8) and result.topk_ids.shape == (len(x), 3)
    assert (result.assignments == result.topk_ids[:, 0]).all()
    brute = ((x[:, None, :] - result.centroids[None]) ** 2).sum(-1)
    assert result.topk_ids.tolist() == np.argsort(brute, axis=1, kind="stable")[:, :3].tolist()
    np.testing.assert_allclose(result.topk_dist, np.take_along_axis(brute, result.topk_ids, 1),
                               rtol=1e-4, atol=1e-4)
    assert result.kept.sum() < len(x)
    assert result.kept[outliers].mean() < 0.5  # the planted outliers are mostly purified away
    # every clean point lands with its blob-mates: one final cluster per blob
    clean = np.setdiff1d(np.arange(len(x)), outliers)
    for blob in range(k):
        members = clean[truth[clean] == blob]
        assert len(set(result.assignments[members].tolist())) == 1
    assert len(set(result.assignments[clean].tolist())) == k


def test_purify_kept_count_is_the_intersection_of_both_rules():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 0.1, (90, 2)), rng.normal(5, 0.1, (10, 2))]).astype(np.float32)

    def two_blob_kmeans(data, k, **_):
        assign = (data[:, 0] > 2.5).astype(int)
        cents = np.stack([data[assign == c].mean(0) for c in range(k)])
        return cents, assign, ((data - cents[assign]) ** 2).sum(1)

    result = purify(x, 2, two_blob_kmeans, dist_quantile=0.8, alpha=1.0, topk=2, seed=0)
    # big blob: min(ceil(0.8 * 90) = 72, floor(1.0 * 100 / 2) = 50) = 50; small: min(8, 50) = 8
    assert result.kept[:90].sum() == 50 and result.kept[90:].sum() == 8
    assert result.topk_ids.shape == (100, 2)  # topk clipped to the number of clusters
    assert purify(x, 2, two_blob_kmeans, dist_quantile=0.8, alpha=1.0, topk=50, seed=0).topk_ids.shape == (100, 2)

    def one_cluster_kmeans(data, k, **_):  # leaves cluster 1 empty
        return np.zeros((k, 2), np.float32), np.zeros(len(data), int), np.ones(len(data))

    with pytest.raises(ValueError, match="kept 1 images, fewer than k=2"):
        purify(x[:3], 2, one_cluster_kmeans, dist_quantile=0.1, alpha=1.0, topk=1, seed=0)


def test_purify_stage_does_not_import_torch():
    # The purify stage runs in the driver at S919 scale; torch would cost it ~0.6 GiB for nothing.
    import subprocess
    import sys

    code = "import sys, pdso_ray.stages.purify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stage_lloyd_from_runs_the_kmeans_steps_from_the_given_start():
    """The purify stage's k-means #2/#3 from prototypes: 0 iterations keep the start; n
    iterations (on all rows or a subset) equal the in-memory Lloyd iterations from it."""
    from pdso_ray.kmeans import KMeansShards
    from pdso_ray.method import kmeans_math as km
    from pdso_ray.stages.purify import lloyd_from

    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    init = x[[0, 1, 2]] + 0.1
    subset = np.sort(rng.choice(300, 120, replace=False))
    with KMeansShards.create(x, 0, kernel="numpy") as shards:
        assert np.array_equal(lloyd_from(shards, init, 0, seed=3), init)
        on_all = lloyd_from(shards, init, 4, seed=3)
        on_subset = lloyd_from(shards, init, 4, seed=3, subset=subset)
    expected_all, _ = km.lloyd(lambda c: km.lloyd_partial(x, c), init, 4, 3)
    expected_subset, _ = km.lloyd(lambda c: km.lloyd_partial(x[subset], c), init, 4, 3)
    np.testing.assert_allclose(on_all, expected_all, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(on_subset, expected_subset, rtol=1e-5, atol=1e-6)
    assert not np.allclose(on_all, on_subset)  # the subset is what #3 trains on


def test_cluster_means_and_assigned_distances_by_hand():
    sums = np.array([[2.0, 4.0], [0.0, 0.0], [3.0, -3.0]])
    fallback = np.array([[9.0, 9.0], [7.0, 7.0], [5.0, 5.0]], np.float32)
    means = cluster_means(sums, np.array([2, 0, 3]), fallback)
    assert means.tolist() == [[1.0, 2.0], [7.0, 7.0], [1.0, -1.0]]  # the empty cluster keeps its row
    x = np.array([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]], np.float32)
    # to the given centroid, not the nearest: row 1 lies 2 from mean 2 but is measured to mean 0 (5)
    d = assigned_distances(x, means, np.array([0, 0, 2]), block_rows=2)
    assert d.tolist() == [0.0, 5.0, 4.0]
    with pytest.raises(ValueError):
        assigned_distances(x, means, np.array([0, 1]))


def test_kept_distance_mean_ranks_by_the_members_mean_not_the_centroid():
    # one cluster, its centroid (a prototype) off-centre at 0; members -1, 1, 2, 3, 4 (mean 1.8);
    # quantile 0.6 keeps ceil(3) = 3: by the centroid -1, 1, 2; by the mean 1, 2, 3
    x = np.array([[-1.0], [1.0], [2.0], [3.0], [4.0]], np.float32)
    proto = np.zeros((1, 1), np.float32)

    def fixed_kmeans(data, k, *, init, **_):
        return init, np.zeros(len(data), int), ((data - init[0]) ** 2).sum(1)

    common = dict(dist_quantile=0.6, alpha=5.0, topk=1, seed=0, niter=(0, 0), init=proto)
    by_centroid = purify(x, 1, fixed_kmeans, kept_distance="centroid", **common)
    by_mean = purify(x, 1, fixed_kmeans, kept_distance="mean", **common)
    assert by_centroid.kept.tolist() == [True, True, True, False, False]
    assert by_mean.kept.tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="kept_distance"):
        purify(x, 1, fixed_kmeans, kept_distance="median", **common)


@pytest.mark.parametrize("kernel", ["numpy", "torch"])
def test_shards_assigned_distances_match_the_in_memory_rule(kernel):
    """The stage's kept_distance=mean over shards (one Lloyd update's means, then each row's
    distance to its own cluster's mean) equals purify's in-memory computation."""
    from pdso_ray.kmeans import KMeansShards
    from pdso_ray.method import kmeans_math as km

    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    centroids = x[[0, 1, 2, 3]] + 0.5
    assign = km.search_blocks(x, centroids, 1)[0][:, 0]
    with KMeansShards.create(x, 0, kernel=kernel) as shards:
        part = shards.step(centroids)
        got = shards.assigned_distances(cluster_means(part.sums, part.counts, centroids), assign)
        with pytest.raises(ValueError):
            shards.assigned_distances(centroids, assign[:10])
    means = np.stack([x[assign == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(got, ((x - means[assign]) ** 2).sum(1), rtol=1e-5, atol=1e-5)
