"""Per-group selection of the lowest scores: the numpy core that denoising (smallest losses per
label) and purification (closest samples per cluster) share. Kept apart from
:mod:`pdso_ray.method.denoise` so that purification does not import torch (~0.6 GiB and seconds
of start-up in the driver)."""

from __future__ import annotations

import numpy as np


def keep_lowest_per_group(scores: np.ndarray, groups: np.ndarray, keep_counts: np.ndarray) -> np.ndarray:
    """Per group g, mark its ``keep_counts[g]`` lowest-scoring members (ties: lower index first).

    Args:
        scores: (N,) float, no NaN.
        groups: (N,) int in [0, G).
        keep_counts: (G,) int, how many to keep in each group (more than the group holds = all).

    Returns:
        (N,) bool mask.
    """
    scores, groups = np.asarray(scores), np.asarray(groups)
    keep_counts = np.asarray(keep_counts)
    if scores.shape != groups.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and groups {groups.shape} must be equal-length vectors")
    if np.isnan(scores).any():
        raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN values")
    if len(groups) and (groups.min() < 0 or groups.max() >= len(keep_counts)):
        raise ValueError(f"groups must lie in [0, {len(keep_counts)}), got [{groups.min()}, {groups.max()}]")
    order = np.lexsort((scores, groups))  # by group, then score; stable, so ties keep index order
    sorted_groups = groups[order]
    starts = np.searchsorted(sorted_groups, np.arange(len(keep_counts)))
    rank = np.arange(len(order)) - starts[sorted_groups]
    mask = np.zeros(len(order), dtype=bool)
    mask[order] = rank < keep_counts[sorted_groups]
    return mask
