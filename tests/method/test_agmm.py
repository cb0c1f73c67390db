"""AGMM loss and its online-EM mixture (pdso_ray/method/agmm.py)."""

import math

import numpy as np
import pytest
import torch

from pdso_ray.method.agmm import (
    IGNORE,
    UNLABELLED,
    AgmmWeights,
    GaussianMixture,
    agmm_loss,
    cell_labels,
    em_statistics,
    log_likelihood,
)

TRUE_MEANS = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 1.0], [0.0, 3.0, -1.0]], dtype=torch.float64)
TRUE_STD = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.3, 0.6], [0.4, 0.8, 0.5]], dtype=torch.float64)


def _mixture_batch(seed=0, b=2, side=12, flip=0.1):
    """Images of ``side``×``side`` pixels (one cell per pixel) in three regions, classes 0/1/2,
    features drawn from the class's Gaussian; ``flip`` of the labels replaced by another class."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(b, side, side, dtype=torch.int64)
    truth[:, :, side // 3:] = 1
    truth[:, side // 2:, 2 * side // 3:] = 2
    noise = torch.randn(b, side, side, 3, generator=g, dtype=torch.float64)
    feats = (TRUE_MEANS[truth] + TRUE_STD[truth] * noise).permute(0, 3, 1, 2).contiguous()
    labels = truth.clone()
    wrong = torch.rand(b, side, side, generator=g) < flip
    labels[wrong] = (labels[wrong] + 1) % 3
    return feats, labels, truth


def _fitted(feats, target, momentum=0.0):
    mixture = GaussianMixture(3, feats.shape[1])
    labels = cell_labels(target, feats.shape[-2:], 3)
    mixture.update(em_statistics(feats, labels, mixture), momentum)
    return mixture, labels


def test_cell_labels_count_labelled_pixels_per_cell_and_skip_ignore():
    target = torch.tensor([[[0, 0, 2, 2],
                            [0, IGNORE, 2, 5],
                            [IGNORE, IGNORE, 0, 0],
                            [IGNORE, IGNORE, 0, 2]]])
    labels = cell_labels(target, (2, 2), 6)
    assert labels.classes.tolist() == [0, 2, 5] and labels.present.tolist() == [[True, True, True]]
    # cells (row-major) of 2×2 pixels: counts of classes 0, 2, 5
    assert labels.counts[0].T.tolist() == [[3, 0, 0], [0, 3, 1], [0, 0, 0], [3, 1, 0]]
    assert labels.pixel_cell.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert int(labels.valid.sum()) == 11
    with pytest.raises(ValueError, match="target holds 6"):
        cell_labels(torch.where(target == 5, 6, target), (2, 2), 6)
    with pytest.raises(ValueError, match="feature size 5×2"):
        cell_labels(target, (5, 2), 6)


def test_first_update_takes_the_labelled_moments():
    feats, target, _ = _mixture_batch(flip=0.0)
    mixture, _ = _fitted(feats, target, momentum=0.9)  # momentum does not apply to unseen classes
    x = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    y = target.reshape(-1)
    for k in range(3):
        torch.testing.assert_close(mixture.means[k], x[y == k].mean(0))
        torch.testing.assert_close(mixture.variances[k], x[y == k].var(0, unbiased=False))
    assert mixture.updates.tolist() == [1, 1, 1]


def test_em_step_increases_the_log_likelihood_and_labels_the_unlabelled_pixels():
    feats, target, truth = _mixture_batch(flip=0.0)
    hidden = torch.rand(target.shape, generator=torch.Generator().manual_seed(3)) < 0.9
    target = torch.where(hidden, UNLABELLED, target)  # 90% unlabelled, the rest labelled right
    mixture, labels = _fitted(feats, target)  # a first component is seen on its labelled pixels
    assert labels.unlabelled.sum() == hidden.sum() and labels.unlabelled_counts.sum() == hidden.sum()
    mixture.means += 0.8  # a poor start
    start = float(log_likelihood(feats, labels, mixture))
    history = [start]
    for _ in range(6):
        mixture.update(em_statistics(feats, labels, mixture), momentum=0.0)
        history.append(float(log_likelihood(feats, labels, mixture)))
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:]))
    assert history[1] > start + 0.05 and history[-1] > start + 0.2
    # EM recovers the true Gaussians from 10% labels, and the unlabelled pixels' classes
    assert (mixture.means - TRUE_MEANS).abs().max() < 0.25
    x = feats.permute(0, 2, 3, 1).reshape(-1, 3)
    ll = -0.5 * (((x[:, None] - mixture.means) ** 2 / mixture.variances) + torch.log(mixture.variances)).sum(2)
    recovered = ll.argmax(1) == truth.reshape(-1)
    assert recovered[hidden.reshape(-1)].double().mean() > 0.9


def test_labelled_pixels_count_for_their_own_class_only():
    feats, target, _ = _mixture_batch(flip=0.2)  # wrong labels stay what they say
    mixture, labels = _fitted(feats, target)
    again = em_statistics(feats, labels, mixture)
    x, y = feats.permute(0, 2, 3, 1).reshape(-1, 3), target.reshape(-1)
    for k in range(3):
        torch.testing.assert_close(again[k, 0], (y == k).sum().double())
        torch.testing.assert_close(again[k, 1:4], x[y == k].sum(0))


def test_momentum_blends_the_moments_of_old_and_new_data_exactly():
    old, old_target, _ = _mixture_batch(seed=1, flip=0.0)
    new, new_target, _ = _mixture_batch(seed=2, flip=0.0)
    new = new + 0.7  # a shifted batch
    mixture, _ = _fitted(old, old_target)
    # the M-step alone: statistics of the new batch with hard (labelled) responsibilities
    stats = torch.zeros(3, 7, dtype=torch.float64)
    x, y = new.permute(0, 2, 3, 1).reshape(-1, 3), new_target.reshape(-1)
    for k in range(3):
        stats[k] = torch.cat([torch.tensor([float((y == k).sum())]), x[y == k].sum(0), (x[y == k] ** 2).sum(0)])
    a = 0.75
    m0, v0 = mixture.means.clone(), mixture.variances.clone()
    mixture.update(stats, momentum=a)
    xo, yo = old.permute(0, 2, 3, 1).reshape(-1, 3), old_target.reshape(-1)
    for k in range(3):
        m1, v1 = x[y == k].mean(0), x[y == k].var(0, unbiased=False)
        # moments of the mixture a·P_old + (1-a)·P_new
        mean = a * m0[k] + (1 - a) * m1
        second = a * (v0[k] + m0[k] ** 2) + (1 - a) * (v1 + m1 ** 2)
        torch.testing.assert_close(mixture.means[k], mean)
        torch.testing.assert_close(mixture.variances[k], second - mean ** 2)
        torch.testing.assert_close(m0[k], xo[yo == k].mean(0))
    assert mixture.updates.tolist() == [2, 2, 2]


def test_classes_absent_from_a_batch_keep_their_parameters():
    feats, target, _ = _mixture_batch(flip=0.0)
    mixture, _ = _fitted(feats, target)
    before = mixture.state_dict()
    only_zero = torch.zeros_like(target)
    labels = cell_labels(only_zero, feats.shape[-2:], 3)
    mixture.update(em_statistics(feats, labels, mixture), momentum=0.5)
    for k in (1, 2):
        assert torch.equal(mixture.means[k], before["means"][k])
        assert torch.equal(mixture.variances[k], before["variances"][k])
    assert mixture.updates.tolist() == [2, 1, 1]


def _separated_scene(seed=0):
    """Two images of 8×8 cells at stride 2 (16×16 labels): background and classes 1, 2 (image 0),
    background and class 3 (image 1), features far apart per class; C = 4."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.zeros(2, 8, 8, dtype=torch.int64)
    cells[0, :, 4:] = 1
    cells[0, 5:, :3] = 2
    cells[1, 2:6, 2:6] = 3
    centres = 4.0 * torch.eye(5, 6)
    feats = (centres[cells] + 0.3 * torch.randn(2, 8, 8, 6, generator=g)).permute(0, 3, 1, 2).contiguous()
    target = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return feats, target


def _loss(feats, logits, target, weights=AgmmWeights()):
    labels = cell_labels(target, feats.shape[-2:], logits.shape[1])
    mixture = GaussianMixture(logits.shape[1], feats.shape[1])
    mixture.update(em_statistics(feats, labels, mixture), momentum=0.9)
    return agmm_loss(feats, logits, labels, mixture, weights), labels, mixture


def test_loss_is_finite_differentiable_and_prefers_a_prediction_that_agrees():
    feats, target = _separated_scene()
    agree = 6.0 * torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float()
    permuted = agree[:, [0, 2, 1, 4, 3]]  # classes 1 <-> 2 and 3 <-> 4 swapped
    feats.requires_grad_(True)
    logits = agree.clone().requires_grad_(True)
    good, _, _ = _loss(feats, logits, target)
    bad, _, _ = _loss(feats, permuted, target)
    assert math.isfinite(float(good.total.detach())) and all(math.isfinite(float(v)) for v in good.terms.values())
    good.total.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert float(good.total.detach()) < float(bad.total.detach())
    assert float(good.terms["soft_target"]) < float(bad.terms["soft_target"])
    assert float(good.terms["absent"]) < float(bad.terms["absent"])  # class 4 is absent everywhere
    # terms that see no prediction do not change
    for name in ("response", "repulsion", "likelihood"):
        assert float(good.terms[name]) == pytest.approx(float(bad.terms[name]))
    # well-separated classes: responses near one-hot, prototypes far apart
    assert float(good.terms["repulsion"]) < 1e-3
    total = sum(getattr(AgmmWeights(), k) * float(v) for k, v in good.terms.items())
    assert float(good.total.detach()) == pytest.approx(total, rel=1e-6)


def test_weights_scale_their_terms():
    feats, target = _separated_scene()
    logits = torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(3))
    base, _, _ = _loss(feats, logits, target)
    only = AgmmWeights(soft_target=0, response=0, repulsion=0, absent=2.0, likelihood=0)
    scaled, _, _ = _loss(feats, logits, target, only)
    assert float(scaled.total) == pytest.approx(2.0 * float(base.terms["absent"]))
    with pytest.raises(ValueError, match="weight absent"):
        AgmmWeights(absent=-1.0)


def test_ignored_pixels_do_not_contribute():
    feats, target = _separated_scene()
    target[0, 4:8, 0:6] = IGNORE  # whole cells (2..3, 0..2) of image 0
    target[1, 0:2, :] = IGNORE  # the first cell row of image 1
    logits = torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(1))
    ignored = target == IGNORE
    cell_ignored = ignored[:, ::2, ::2]
    out, labels, mixture = _loss(feats, logits, target)

    garbage_feats = feats.clone()
    garbage_feats.permute(0, 2, 3, 1)[cell_ignored] = 50.0 * torch.randn(int(cell_ignored.sum()), 6)
    garbage_logits = logits.clone()
    garbage_logits.permute(0, 2, 3, 1)[ignored] = 30.0 * torch.randn(int(ignored.sum()), 5)
    garbage_feats.requires_grad_(True)
    garbage_logits.requires_grad_(True)
    again, _, mixture_again = _loss(garbage_feats, garbage_logits, target)
    for name, value in out.terms.items():
        assert float(again.terms[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    torch.testing.assert_close(mixture_again.means, mixture.means)
    torch.testing.assert_close(mixture_again.variances, mixture.variances)
    again.total.backward()
    assert garbage_logits.grad.permute(0, 2, 3, 1)[ignored].abs().max() == 0
    assert garbage_feats.grad.permute(0, 2, 3, 1)[cell_ignored].abs().max() == 0
    assert garbage_logits.grad.abs().sum() > 0 and garbage_feats.grad.abs().sum() > 0


def test_a_batch_without_labelled_pixels_costs_nothing():
    feats, target = _separated_scene()
    target[:] = IGNORE
    logits = torch.randn(2, 5, 16, 16, requires_grad=True)
    out, labels, mixture = _loss(feats, logits, target)
    assert len(labels.classes) == 0 and float(out.total.detach()) == 0.0
    assert mixture.updates.tolist() == [0] * 5


def test_mixture_state_round_trip_and_errors():
    feats, target = _separated_scene()
    _, labels, mixture = _loss(feats, torch.zeros(2, 5, 16, 16), target)
    copy = GaussianMixture(5, 6)
    copy.load_state_dict(mixture.state_dict())
    for name, value in mixture.state_dict().items():
        assert torch.equal(copy.state_dict()[name], value)
    with pytest.raises(RuntimeError, match="size mismatch"):
        GaussianMixture(5, 7).load_state_dict(mixture.state_dict())
    with pytest.raises(ValueError, match="momentum must lie in"):
        mixture.update(torch.zeros(5, 13), momentum=1.0)
    with pytest.raises(ValueError, match="stats must be 5×13"):
        mixture.update(torch.zeros(5, 7), momentum=0.5)
    with pytest.raises(ValueError, match="mixture is \\(5, 6\\)"):
        em_statistics(feats[:, :4], labels, mixture)
    fresh = GaussianMixture(5, 6)
    with pytest.raises(ValueError, match="never been seen"):
        agmm_loss(feats, torch.zeros(2, 5, 16, 16), labels, fresh)
    with pytest.raises(ValueError, match="logits must be 2×5×\\(16, 16\\)"):
        agmm_loss(feats, torch.zeros(2, 5, 8, 8), labels, mixture)


def test_unlabelled_pixels_are_supervised_by_the_responses_alone():
    feats, target = _separated_scene()
    unsure = torch.zeros_like(target, dtype=torch.bool)
    unsure[0, 0:8, 10:16] = True  # whole cells of class 1 in image 0
    target = torch.where(unsure, UNLABELLED, target)
    agree = 6.0 * torch.nn.functional.one_hot(torch.where(unsure, 1, target).clamp_max(4), 5).permute(0, 3, 1, 2).float()
    wrong = agree.clone()
    wrong.permute(0, 2, 3, 1)[unsure] = 6.0 * torch.nn.functional.one_hot(torch.tensor(2), 5).float()
    logits = agree.clone().requires_grad_(True)
    good, labels, _ = _loss(feats, logits, target)
    bad, _, _ = _loss(feats, wrong, target)
    assert labels.unlabelled.sum() == unsure.sum() and not labels.valid[unsure].any()
    # the responses there say class 1 (its features): predicting it costs less
    assert float(good.terms["soft_target"]) < float(bad.terms["soft_target"])
    for name in ("response", "likelihood", "repulsion"):  # terms of labelled pixels only
        assert float(good.terms[name]) == pytest.approx(float(bad.terms[name]))
    good.total.backward()
    assert logits.grad.permute(0, 2, 3, 1)[unsure].abs().sum() > 0
    # without a labelled pixel in its image an unlabelled pixel has no response: no supervision
    alone = target.clone()
    alone[1] = UNLABELLED
    logits_alone = logits.detach().clone().requires_grad_(True)
    out = _loss(feats, logits_alone, alone)[0]
    out.total.backward()
    assert logits_alone.grad[1].abs().max() == 0


def test_mark_unlabelled_rules():
    from pdso_ray.method.agmm import mark_unlabelled

    refined = np.zeros((8, 8), np.int32)
    refined[2:6, 2:6] = 3
    refined[0, :] = IGNORE
    raw = refined.copy()
    raw[2:4, 2:6] = 0  # SPO added the upper half of the object
    raw[0, :] = 0  # raw labels have no ignore band: an ignored pixel stays ignored
    assert np.array_equal(mark_unlabelled(refined, raw, "none"), refined)
    out = mark_unlabelled(refined, raw, "disagreement")
    assert np.array_equal(out == UNLABELLED, (raw != refined) & (refined != IGNORE))
    assert (out[0] == IGNORE).all() and (out[4:6, 2:6] == 3).all()
    band = mark_unlabelled(refined, None, "border", width=1)
    # one pixel each side of the object's border (row 1 touches the ignore row above it)
    assert (band[1] == UNLABELLED).all() and (band[0] == IGNORE).all()
    assert (band[3:5, 3:5] == 3).all() and band[7, 0] == 0
    assert (band[1:7, 1:7][[0, -1]] == UNLABELLED).all() and (band[2:6, 1] == UNLABELLED).all()
    with pytest.raises(ValueError, match="disagreement needs the raw label"):
        mark_unlabelled(refined, None, "disagreement")
    with pytest.raises(ValueError, match="finetune.unlabelled must be one of"):
        mark_unlabelled(refined, raw, "uncertain")
