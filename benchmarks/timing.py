"""How every benchmark in ``benchmarks/`` times a path against its baseline: interleaved rounds,
the median of the per-round ratios, and a flag where a path beats the bare loop it is judged by.

A machine's speed drifts (clocks, other jobs on a shared host, a GPU warming up), so a baseline
measured once before or after the path can land on a fast or slow stretch that the path never saw.
:func:`interleave` runs the contenders in turns — A, B, A, B, ... — for at least
:data:`MIN_ROUNDS` rounds and keeps every round's result; :meth:`Rounds.ratio` is the median over
rounds of ``A_r / B_r``, each ratio taken between neighbours in time, so one slow stretch moves one
round's ratio and the median ignores it.

A path that does the work of a bare loop *plus* its own overhead (a pipeline against a bare
forward, a training loop against the same steps without data loading) cannot be faster than that
loop: a ratio above 1 there is noise or a measurement that does not compare like with like, and
:func:`bare_loop_flag` says so in the output instead of letting it pass as a result.

No torch at import: CPU-only benchmarks (faiss against Ray k-means) use this module too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MIN_ROUNDS = 3
BARE_LOOP_FLAG = "MEASUREMENT ERROR: faster than the bare loop it is judged against (ratio > 1)"

# What a contender returns: one number (stored as "rate") or several named ones.
Measurement = float | Mapping[str, float]


@dataclass
class Rounds:
    """Per contender, one dict of named values per round (``"rate"`` for a bare number)."""

    results: dict[str, list[dict[str, float]]]

    @property
    def count(self) -> int:
        return min(len(v) for v in self.results.values())

    def values(self, name: str, key: str = "rate") -> list[float]:
        """``name``'s ``key`` in every round, in order."""
        return [r[key] for r in self.results[name]]

    def median(self, name: str, key: str = "rate") -> float:
        return statistics.median(self.values(name, key))

    def ratios(self, name: str, baseline: str, key: str = "rate",
               baseline_key: str | None = None) -> list[float]:
        """``name``'s ``key`` over ``baseline``'s ``baseline_key`` (default: the same key) within
        each round."""
        return [a / b for a, b in zip(self.values(name, key), self.values(baseline, baseline_key or key))]

    def ratio(self, name: str, baseline: str, key: str = "rate", baseline_key: str | None = None) -> float:
        """The median over rounds of :meth:`ratios`. For rates (higher is better) pass ``name`` =
        the path: > 1 means the path is faster; for durations pass them the other way round to
        get the same reading."""
        return statistics.median(self.ratios(name, baseline, key, baseline_key))


def interleave(contenders: Mapping[str, Callable[[], Measurement]], rounds: int = MIN_ROUNDS,
               warmup: bool = False) -> Rounds:
    """Call every contender once per round, in the order given, for ``rounds`` rounds.

    Args:
        contenders: name -> a function that does one measurement and returns it (a number, or a
            dict of named numbers such as ``{"wall": img/s, "cpu": img/s}``).
        rounds: at least :data:`MIN_ROUNDS`.
        warmup: call each contender once first and drop the result (lazy initialisation,
            allocator growth, autotuning).

    Raises:
        ValueError: fewer than :data:`MIN_ROUNDS` rounds, or fewer than two contenders.
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"rounds must be >= {MIN_ROUNDS}, got {rounds}")
    if len(contenders) < 2:
        raise ValueError(f"need a path and a baseline, got {list(contenders)}")
    if warmup:
        for fn in contenders.values():
            fn()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            value = fn()
            results[name].append({"rate": float(value)} if isinstance(value, (int, float))
                                 else {k: float(v) for k, v in value.items()})
    return Rounds(results)


def bare_loop_flag(ratio: float) -> str | None:
    """:data:`BARE_LOOP_FLAG` when a path is faster than its bare-loop baseline (ratio > 1)."""
    return BARE_LOOP_FLAG if ratio > 1.0 else None


def repeat(fn: Callable[[], Any], times: int) -> None:
    """Call ``fn`` ``times`` times and keep no result (a list of model outputs can hold GBs)."""
    for _ in range(times):
        fn()


def cuda_sync(device: Any = None) -> None:
    """Wait for the GPU when ``device`` is a CUDA device (torch only imported then)."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any = None) -> tuple[float, float, Any]:
    """``(wall seconds, this process's CPU seconds, fn())``; on a CUDA ``device`` the GPU is
    synchronised before the clock starts and before it stops, so queued work is counted where it
    belongs."""
    cuda_sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    cuda_sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, result
