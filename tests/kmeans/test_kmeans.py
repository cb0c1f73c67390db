"""pdso_ray.kmeans: quality against faiss, in-process and on a two-node Ray cluster, inputs from
arrays, Parquet and Ray Data, and a shard actor killed mid-run."""

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from pdso_ray.kmeans import KMeansShards, assign, kmeans
from pdso_ray.kmeans.sources import ParquetSource
from pdso_ray.storage import Storage

K = 20


def _blobs(n_per: int, k: int, d: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 10, (k, d))
    labels = np.repeat(np.arange(k), n_per)
    return (centers[labels] + rng.normal(0, spread, (labels.size, d))).astype(np.float32), labels


def _uniform(n: int = 6000, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d), dtype=np.float32)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)


def _faiss_objective(x: np.ndarray, k: int, niter: int, seed: int) -> float:
    """faiss.Kmeans on every row (no subsampling), scored like ours: all rows to final centroids."""
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=x.shape[0])
    km.train(x)
    dist, _ = km.index.search(x, 1)
    return float(dist.sum(dtype=np.float64))


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the two labelings are equal up to a renaming of the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---- in-process (no Ray) --------------------------------------------------------------------------
def test_separated_clusters_are_recovered_exactly():
    x, labels = _blobs(200, 4, 16, 1.0, seed=1)
    single = kmeans(x, 4, niter=20, seed=0, progress=False)
    best = kmeans(x, 4, niter=20, nredo=5, seed=0, progress=False)
    assert _same_partition(best.assignments, labels)
    assert best.objective <= single.objective
    assert best.centroids.shape == (4, 16) and best.centroids.dtype == np.float32
    assert best.assignments.dtype == np.int64 and sorted(best.counts.tolist()) == [200] * 4
    means = np.stack([x[labels == j].mean(0) for j in range(4)])
    order = [int(best.assignments[labels == j][0]) for j in range(4)]
    np.testing.assert_allclose(best.centroids[order], means, atol=1e-4)
    assert best.objective == pytest.approx(_sq_dist(x, best.centroids).min(1).sum(), rel=1e-5)


def test_objective_within_half_a_percent_of_faiss_in_process():
    x = _uniform()
    ours = kmeans(x, K, niter=20, seed=3, progress=False)
    ratio = ours.objective / _faiss_objective(x, K, 20, seed=3)
    assert ratio <= 1.005, ratio
    assert len(ours.history) == 20 and ours.history[-1] <= ours.history[0]


def test_assign_topk_matches_brute_force_and_kernels_agree():
    x = _uniform(900, 8, seed=4)
    c = x[:30].copy()
    exact = _sq_dist(x, c)
    for kernel in ("faiss", "numpy", "torch"):
        ids, dist = assign(x, c, topk=5, kernel=kernel)
        assert ids.shape == (900, 5) and ids.dtype == np.int64 and dist.dtype == np.float32
        np.testing.assert_array_equal(ids, np.argsort(exact, axis=1, kind="stable")[:, :5])
        np.testing.assert_allclose(dist, np.sort(exact, axis=1)[:, :5], atol=1e-5)


def test_subsampled_training_still_assigns_every_row():
    x = _uniform(5000, 8, seed=5)
    res = kmeans(x, 10, niter=5, seed=0, max_points_per_centroid=20, progress=False)
    full = kmeans(x, 10, niter=5, seed=0, progress=False)
    assert res.assignments.shape == (5000,) and res.counts.sum() == 5000
    np.testing.assert_array_equal(res.assignments, _sq_dist(x, res.centroids).argmin(1))
    # the training objective covers the 200 sampled rows only
    assert res.history[0] < 0.1 * full.history[0]
    assert res.objective == pytest.approx(_sq_dist(x, res.centroids).min(1).sum(), rel=1e-5)


def test_subset_trains_on_its_rows_and_assigns_all():
    x = _uniform(3000, 8, seed=7)
    idx = np.sort(np.random.default_rng(0).choice(3000, 1000, replace=False))
    res = kmeans(x, 6, niter=8, seed=2, subset=idx, progress=False)
    alone = kmeans(x[idx], 6, niter=8, seed=2, progress=False)
    np.testing.assert_array_equal(res.centroids, alone.centroids)
    assert res.history == alone.history
    assert res.assignments.shape == (3000,) and res.counts.sum() == 3000
    np.testing.assert_array_equal(res.assignments[idx], alone.assignments)
    mask = np.zeros(3000, dtype=bool)
    mask[idx] = True
    np.testing.assert_array_equal(kmeans(x, 6, niter=8, seed=2, subset=mask, progress=False).centroids, res.centroids)
    capped = kmeans(x, 6, niter=3, seed=2, subset=idx, max_points_per_centroid=50, progress=False)
    assert capped.history[0] < 0.5 * res.history[0]  # 300 of the 1000 subset rows
    with pytest.raises(ValueError, match="repeats 1 row ids"):
        kmeans(x, 6, subset=np.array([1, 2, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="outside 0..2999"):
        kmeans(x, 2, subset=np.array([0, 3000]))
    with pytest.raises(ValueError, match="k=6 exceeds the number of training rows 5"):
        kmeans(x, 6, subset=np.arange(5))


def test_row_order_makes_the_starts_independent_of_how_the_rows_are_ordered():
    x = _uniform(2000, 8, seed=3)
    shuffled = np.random.default_rng(1).permutation(2000)  # the same rows, arrived in another order
    inverse = np.argsort(shuffled)  # x[shuffled] position of each canonical row
    res = kmeans(x, 7, niter=6, nredo=2, seed=4, row_order=np.arange(2000), progress=False)
    again = kmeans(x[shuffled], 7, niter=6, nredo=2, seed=4, row_order=inverse, progress=False)
    np.testing.assert_allclose(again.centroids, res.centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again.assignments, res.assignments[shuffled])
    without = kmeans(x[shuffled], 7, niter=6, nredo=2, seed=4, progress=False)
    assert not np.allclose(without.centroids, res.centroids)  # plain starts depend on the order
    # with a subset: its rows in the canonical order
    idx = np.arange(0, 2000, 3)
    sub = kmeans(x, 7, niter=6, seed=4, subset=idx, row_order=np.arange(2000), progress=False)
    sub_again = kmeans(x[shuffled], 7, niter=6, seed=4, subset=inverse[idx], row_order=inverse, progress=False)
    np.testing.assert_allclose(sub_again.centroids, sub.centroids, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="row_order must be a permutation of 0..1999"):
        kmeans(x, 7, row_order=np.zeros(2000, dtype=np.int64))


@pytest.mark.gpu
def test_gpu_shard_is_deterministic_and_matches_cpu():
    x = _uniform(40000, 32, seed=9)
    gpu = kmeans(x, 16, niter=10, seed=0, num_shards=0, use_gpu=True, progress=False)
    again = kmeans(x, 16, niter=10, seed=0, num_shards=0, use_gpu=True, progress=False)
    cpu = kmeans(x, 16, niter=10, seed=0, num_shards=0, use_gpu=False, progress=False)
    np.testing.assert_array_equal(gpu.centroids, again.centroids)
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-3)
    np.testing.assert_array_equal(gpu.assignments[:2000], _sq_dist(x[:2000], gpu.centroids).argmin(1))


def test_bad_inputs_raise_value_errors():
    x = _uniform(100, 4)
    with pytest.raises(ValueError, match="float32"):
        kmeans(x.astype(np.float64), 3)
    with pytest.raises(ValueError, match="k=101 exceeds"):
        kmeans(x, 101, progress=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="nredo"):
        kmeans(x, 3, nredo=0)
    with pytest.raises(ValueError, match="topk must be in 1..3"):
        assign(x, x[:3], topk=4)
    with pytest.raises(ValueError, match="dimension 2"):
        assign(x, x[:3, :2].copy())
    with pytest.raises(ValueError, match="unknown k-means kernel 'nope'"):
        kmeans(x, 3, kernel="nope")
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans(bad, 3)


def test_parquet_source_reads_row_groups_in_order_and_names_bad_files(tmp_path):
    rows = _uniform(50, 8, seed=3)
    urls = []
    for name, (a, b), group in [("a", (0, 23), 5), ("empty", (23, 23), 5), ("b", (23, 50), 4)]:
        pq.write_table(pa.table({"feat": list(rows[a:b])}, schema=pa.schema([("feat", pa.list_(pa.float32()))])),
                       tmp_path / f"{name}.parquet", row_group_size=group)
        urls.append(str(tmp_path / f"{name}.parquet"))
    assert pq.ParquetFile(urls[0]).num_row_groups == 5
    np.testing.assert_array_equal(ParquetSource(tuple(urls), "feat", Storage()).load(), rows)

    pq.write_table(pa.table({"feat": list(_uniform(3, 4, seed=1))}), tmp_path / "narrow.parquet")
    with pytest.raises(ValueError, match="narrow.parquet has 4-dimensional vectors, earlier files 8"):
        ParquetSource((urls[0], str(tmp_path / "narrow.parquet")), "feat", Storage()).load()


# ---- Ray: one two-node cluster (1 CPU each) for the module ---------------------------------------
@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_ray_dataset_column_input(cluster):
    # before the shard fixtures below take CPUs: Ray Data needs whole CPUs for its tasks
    data = _uniform(2000, 16, seed=6)
    ds = ray.data.from_arrow(pa.table({"id": np.arange(2000), "feat": list(data)}))
    res = kmeans(ds, 8, niter=5, seed=2, num_shards=0, column="feat", progress=False)
    ref = kmeans(data, 8, niter=5, seed=2, num_shards=0, progress=False)
    np.testing.assert_array_equal(res.assignments, ref.assignments)
    np.testing.assert_array_equal(res.centroids, ref.centroids)


@pytest.fixture(scope="module")
def data():
    return _uniform(6000, 16, seed=6)


@pytest.fixture(scope="module")
def shards(cluster, data):
    # half a CPU each, so a second set of shards fits beside them on the 2-CPU cluster
    with KMeansShards.create(data, num_shards=2, cpus_per_shard=0.5) as s:
        yield s


@pytest.fixture(scope="module")
def baseline(shards):
    return kmeans(shards, K, niter=12, seed=1, progress=False)


def test_shards_are_spread_over_both_nodes(shards):
    info = shards.info()
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    assert {i["node_id"] for i in info} == alive
    assert [i["n"] for i in info] == [3000, 3000]


def test_ray_run_is_deterministic_and_close_to_faiss(shards, data, baseline):
    again = kmeans(shards, K, niter=12, seed=1, progress=False)
    np.testing.assert_array_equal(again.centroids, baseline.centroids)
    np.testing.assert_array_equal(again.assignments, baseline.assignments)
    assert again.objective == baseline.objective
    assert baseline.objective / _faiss_objective(data, K, 12, seed=1) <= 1.005
    # the same algorithm in-process; shard boundaries change float32 rounding only
    local = kmeans(data, K, niter=12, seed=1, num_shards=0, progress=False)
    assert local.objective == pytest.approx(baseline.objective, rel=2e-3)
    np.testing.assert_array_equal(baseline.assignments, _sq_dist(data, baseline.centroids).argmin(1))


def test_killed_shard_actor_is_reloaded_and_the_result_is_identical(shards, baseline):
    pid_before = shards.info()[0]["pid"]
    killed = []

    def kill_at_third_iteration(redo: int, iteration: int, objective: float) -> None:
        if iteration == 2:
            ray.kill(shards.actors[0], no_restart=False)
            killed.append(iteration)

    res = kmeans(shards, K, niter=12, seed=1, progress=False, on_iteration=kill_at_third_iteration)
    assert killed == [2]
    assert shards.info()[0]["pid"] != pid_before  # a new process reloaded the shard
    np.testing.assert_array_equal(res.centroids, baseline.centroids)
    np.testing.assert_array_equal(res.assignments, baseline.assignments)
    assert res.objective == baseline.objective and res.history == baseline.history


def test_parquet_shards_match_array_shards(cluster, shards, data, baseline, tmp_path):
    for i, (a, b) in enumerate([(0, 3000), (3000, 6000)]):
        table = pa.table({"id": [str(j) for j in range(a, b)], "feat": list(data[a:b])})
        pq.write_table(table, tmp_path / f"part-{i}.parquet")
    with KMeansShards.create(str(tmp_path), num_shards=2, cpus_per_shard=0.5) as from_files:
        assert from_files.sizes == [3000, 3000]
        res = kmeans(from_files, K, niter=12, seed=1, progress=False)
        top = assign(from_files, res.centroids, topk=3)
    # same rows per shard as the array shards: the very same result
    np.testing.assert_array_equal(res.centroids, baseline.centroids)
    np.testing.assert_array_equal(res.assignments, baseline.assignments)
    np.testing.assert_array_equal(top.ids[:, 0], baseline.assignments)
    # closing gave back the second set's resources: only the module's shards hold CPUs now
    states = [g["state"] for g in ray.util.placement_group_table().values()]
    assert states.count("CREATED") == 1 and states.count("REMOVED") == 1
    exact = _sq_dist(data, res.centroids)
    np.testing.assert_array_equal(top.ids, np.argsort(exact, axis=1)[:, :3])
    np.testing.assert_allclose(top.distances, np.sort(exact, axis=1)[:, :3], rtol=1e-4, atol=1e-4)
