"""Clustering quality against known classes (method/cluster_metrics.py): exact values by hand."""

import math

import numpy as np
import pytest

from pdso_ray.method.cluster_metrics import cluster_scores, contingency, hungarian_accuracy, nmi, purity


def test_perfect_and_permuted_assignments_score_one():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 7, 300)
    relabel = rng.permutation(7) + 100  # other ids, in another order
    for pred in (truth, relabel[truth]):
        assert purity(pred, truth) == 1.0
        assert hungarian_accuracy(pred, truth) == 1.0
        assert nmi(pred, truth) == pytest.approx(1.0, abs=1e-12)


def test_split_class_by_hand():
    # clusters 0 and 1 split class 0; cluster 2 is class 1
    pred = np.array([0, 0, 1, 1, 2, 2])
    truth = np.array([0, 0, 0, 0, 1, 1])
    assert contingency(pred, truth).tolist() == [[2, 0], [2, 0], [0, 2]]
    assert purity(pred, truth) == 1.0  # every cluster is pure
    assert hungarian_accuracy(pred, truth) == pytest.approx(4 / 6)  # only one cluster may be class 0
    h_truth = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    # truth is a function of pred, so I = H(truth); H(pred) = log 3
    assert nmi(pred, truth) == pytest.approx(h_truth / ((math.log(3) + h_truth) / 2))
    scores = cluster_scores(pred, truth)
    assert scores == pytest.approx({"purity": 1.0, "nmi": nmi(pred, truth), "accuracy": 4 / 6, "images": 6})


def test_mixed_clusters_by_hand():
    # cluster 0 = 3 of class 0 + 1 of class 1; cluster 1 = 1 of class 0 + 1 of class 2
    pred = np.array([0, 0, 0, 0, 1, 1])
    truth = np.array([0, 0, 0, 1, 0, 2])
    assert purity(pred, truth) == pytest.approx(4 / 6)  # majorities: 3 + 1 (a tie counts once)
    assert hungarian_accuracy(pred, truth) == pytest.approx(4 / 6)  # 0 -> 0 (3), 1 -> 2 (1)
    independent = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert nmi(*independent) == 0.0
    assert purity(*independent) == 0.5 and hungarian_accuracy(*independent) == 0.5


def test_mask_scores_only_the_subset():
    pred = np.array([0, 0, 0, 1, 1, 1])
    truth = np.array([0, 0, 1, 1, 1, 0])
    assert purity(pred, truth) == pytest.approx(4 / 6)
    keep = np.array([True, True, False, True, True, False])  # drops the two misfits
    assert purity(pred, truth, keep) == 1.0 and hungarian_accuracy(pred, truth, keep) == 1.0
    assert cluster_scores(pred, truth, keep)["images"] == 4
    empty = cluster_scores(pred, truth, np.zeros(6, bool))
    assert empty["images"] == 0 and math.isnan(empty["purity"]) and math.isnan(empty["nmi"])


def test_more_clusters_than_classes_and_constant_labelings():
    truth = np.array([0, 0, 0, 1, 1, 1])
    singletons = np.arange(6)
    assert purity(singletons, truth) == 1.0  # purity rewards over-clustering...
    assert hungarian_accuracy(singletons, truth) == pytest.approx(2 / 6)  # ...accuracy does not
    assert nmi(np.zeros(4, int), np.zeros(4, int)) == 1.0
    assert nmi(np.zeros(6, int), truth) == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="equal-length"):
        purity(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="integers"):
        nmi(np.zeros(3), np.zeros(3, int))
    with pytest.raises(ValueError, match="mask must be 3 bools"):
        hungarian_accuracy(np.zeros(3, int), np.zeros(3, int), np.ones(3, int))
