"""Distributed k-means (pdso_ray.kmeans on a local Ray) against faiss.Kmeans in one process.

Same data, k, niter and seed; both train on every row (faiss's subsampling to 256 points per
centroid is switched off, so both do the same work) and both objectives are measured the same
way: the sum of squared distances of all rows to the final centroids. The two take turns for
``--rounds`` rounds (faiss, ours, faiss, ours, ...; benchmarks/timing.py); ours includes putting
the data and starting the shard actors, every round. Prints each round and the medians, the
objective ratio (target <= 1.005; both are deterministic for a seed, so every round gives the
same) and the time ratio ours / faiss, the median of the per-round ratios (target <= 1.5).
``--faiss-default`` also runs both with faiss's default subsampling (``max_points_per_centroid=256``).

    python benchmarks/kmeans_vs_faiss.py [--n 200000 --d 384 --k 300 --niter 20 --cpus 2 --rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from timing import MIN_ROUNDS, interleave


def make_data(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """L2-normalised Gaussian mixture (like DINO image features): k centres plus heavy noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d), dtype=np.float32)
    x = centres[rng.integers(0, k, n)] + 1.5 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_faiss(x: np.ndarray, k: int, niter: int, seed: int, threads: int, max_points: int) -> tuple[float, float, int]:
    import faiss

    faiss.omp_set_num_threads(threads)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max_points)
    t0 = time.perf_counter()
    km.train(x)
    seconds = time.perf_counter() - t0
    dist, _ = km.index.search(x, 1)  # not timed: faiss's train does not assign all rows
    return seconds, float(dist.sum(dtype=np.float64)), len(km.obj)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=300)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs = shards (1 thread each) = faiss threads")
    p.add_argument("--faiss-default", action="store_true", help="also compare with 256 points per centroid")
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="interleaved rounds (>= 3)")
    args = p.parse_args()

    import ray

    from pdso_ray.kmeans import KMeansShards, kmeans

    x = make_data(args.n, args.d, args.k, args.seed)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    print(f"n={args.n} d={args.d} k={args.k} niter={args.niter} seed={args.seed} cpus={args.cpus}")

    modes = [("all rows", None)] + ([("256/centroid", 256)] if args.faiss_default else [])
    for label, max_points in modes:
        def faiss_run(max_points=max_points) -> dict[str, float]:
            seconds, objective, iterations = run_faiss(x, args.k, args.niter, args.seed, args.cpus,
                                                       max_points or args.n)
            return {"seconds": seconds, "objective": objective, "iterations": iterations}

        def ours_run(max_points=max_points) -> dict[str, float]:
            t0 = time.perf_counter()
            with KMeansShards.create(x, num_shards=args.cpus) as shards:
                t_load = time.perf_counter() - t0
                res = kmeans(shards, args.k, niter=args.niter, seed=args.seed,
                             max_points_per_centroid=max_points, progress=False)
            # the iterations, then assigning every row to the final centroids
            return {"seconds": time.perf_counter() - t0, "load": t_load, "objective": res.objective,
                    "passes": len(res.history) + 1}

        rounds = interleave({"faiss": faiss_run, "ours": ours_run}, args.rounds)
        f_s, f_it = rounds.median("faiss", "seconds"), rounds.median("faiss", "iterations")
        ours_s, t_load, passes = (rounds.median("ours", k) for k in ("seconds", "load", "passes"))
        each = " ".join(f"{v:.2f}" for v in rounds.values("faiss", "seconds"))
        print(
            f"[{label}] faiss.Kmeans ({args.cpus} threads): {f_s:.2f} s median ({each}), {f_it:.0f} iterations "
            f"({f_s / f_it:.3f} s each), objective {rounds.median('faiss', 'objective'):.6g}"
        )
        each = " ".join(f"{v:.2f}" for v in rounds.values("ours", "seconds"))
        print(
            f"[{label}] pdso_ray.kmeans ({args.cpus} shards): {ours_s:.2f} s median ({each}) = {t_load:.2f} s putting "
            f"data and starting actors + {passes:.0f} passes ({(ours_s - t_load) / passes:.3f} s each: "
            f"{passes - 1:.0f} iterations and the final assignment), objective {rounds.median('ours', 'objective'):.6g}"
        )
        print(f"[{label}] objective ratio ours/faiss: {rounds.ratio('ours', 'faiss', 'objective'):.5f} "
              "(target <= 1.005)")
        each = " ".join(f"{v:.2f}" for v in rounds.ratios("ours", "faiss", "seconds"))
        print(f"[{label}] time ratio ours/faiss: {rounds.ratio('ours', 'faiss', 'seconds'):.2f}x, median of "
              f"{rounds.count} interleaved rounds ({each}) (target <= 1.5x)")
    ray.shutdown()


if __name__ == "__main__":
    main()
