"""DINO loss, centring, schedules, EMA, clipping and collapse diagnostics (method/self_distillation.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdso_ray.method.self_distillation import (
    CollapseMeter,
    DinoLoss,
    MaskedPatchLoss,
    border_ring_excess,
    border_ring_share,
    clip_gradients,
    cosine_schedule,
    ema_update,
    last_layer_frozen,
    random_patch_masks,
    teacher_temperature,
    weight_decay_groups,
)


def _published_dino_loss(student, teacher, center, n_crops, student_temp, teacher_temp):
    """DINO's loss as the paper's Algorithm 1 / reference code writes it: a double loop."""
    s = (student / student_temp).chunk(n_crops)
    t = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    total, terms = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def test_dino_loss_matches_the_published_double_loop_and_updates_the_centre():
    g = torch.Generator().manual_seed(0)
    b, k, crops = 3, 7, 5
    student = torch.randn(crops * b, k, generator=g)
    teacher = torch.randn(2 * b, k, generator=g)
    loss_fn = DinoLoss(k, student_temp=0.1, center_momentum=0.9)
    loss_fn.centering.center.copy_(torch.randn(1, k, generator=g))
    old_center = loss_fn.centering.center.clone()
    expected = _published_dino_loss(student, teacher, old_center, crops, 0.1, 0.05)
    got = loss_fn(student, teacher, teacher_temp=0.05)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fn.centering.center, 0.9 * old_center + 0.1 * teacher.mean(0, keepdim=True))


def test_dino_loss_gradient_flows_to_the_student_only():
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    DinoLoss(5)(student, teacher, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_centre_update_uses_the_cross_worker_mean():
    loss_fn = DinoLoss(3, center_momentum=0.5)
    teacher = torch.ones(4, 3)
    loss_fn(torch.zeros(8, 3), teacher, 0.04, reduce_mean=lambda x: x * 3)  # a fake all-reduce
    torch.testing.assert_close(loss_fn.centering.center, torch.full((1, 3), 1.5))


def test_dino_loss_rejects_views_that_do_not_divide():
    with pytest.raises(ValueError, match="2 views"):
        DinoLoss(4)(torch.zeros(7, 4), torch.zeros(4, 4), 0.04)


def test_centring_and_sharpening_pull_against_each_other():
    # One dominant prototype: centring removes it from the target, sharpening makes it peaked.
    loss_fn = DinoLoss(4)
    teacher = torch.tensor([[5.0, 1.0, 0.0, 0.0], [5.0, 0.0, 1.0, 0.0]])
    loss_fn.centering.center.copy_(torch.tensor([[5.0, 0.0, 0.0, 0.0]]))
    q = loss_fn.teacher_probs(teacher, 0.1)
    assert (q.argmax(dim=1) == torch.tensor([1, 2])).all()
    assert q.max(dim=1).values.min() > 0.99


def test_masked_patch_loss_averages_masked_patches_per_view():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 6, generator=g)
    teacher = torch.randn(2, 4, 6, generator=g)
    masks = torch.tensor([[True, False, True, False], [False, False, False, False]])
    loss_fn = MaskedPatchLoss(6, student_temp=0.1)
    per_patch = -(F.softmax(teacher / 0.07, -1) * F.log_softmax(student / 0.1, -1)).sum(-1)
    expected = (per_patch[0, 0] + per_patch[0, 2]) / 2 / 2  # the second view has no masked patch
    torch.testing.assert_close(loss_fn(student[masks], teacher[masks], masks, 0.07), expected)
    torch.testing.assert_close(loss_fn.centering.center, 0.1 * teacher[masks].mean(0, keepdim=True))
    with pytest.raises(ValueError, match="masks.sum"):
        loss_fn(student[0], teacher[0], masks, 0.07)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    assert loss_fn(student[empty], teacher[empty], empty, 0.07) == 0


def test_random_patch_masks_counts_and_determinism():
    masks = random_patch_masks(200, 8, (0.25, 0.25), prob=0.5, gen=torch.Generator().manual_seed(0))
    counts = masks.sum(dim=1)
    assert set(counts.tolist()) == {0, 16}
    assert 60 < int((counts > 0).sum()) < 140
    again = random_patch_masks(200, 8, (0.25, 0.25), prob=0.5, gen=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_cosine_schedule_endpoints_warmup_and_monotone():
    values = [cosine_schedule(s, 100, base=1.0, final=0.1, warmup_steps=10) for s in range(100)]
    assert values[0] == 0.0 and values[5] == pytest.approx(0.5)
    assert values[10] == pytest.approx(1.0) and values[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert cosine_schedule(500, 100, 1.0, 0.1) == pytest.approx(0.1)  # past the end: final
    # teacher momentum rises to 1
    assert cosine_schedule(0, 50, 0.99, 1.0) == 0.99 and cosine_schedule(49, 50, 0.99, 1.0) == 1.0
    with pytest.raises(ValueError):
        cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=11)


def test_teacher_temperature_warms_up_linearly():
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == 0.07
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07


def test_ema_update_moves_teacher_towards_student():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=0.75)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.75 * t0 + 0.25 * s)
    ema_update(teacher, student, momentum=1.0)  # momentum 1: frozen
    ema_update(teacher, student, momentum=0.0)  # momentum 0: a copy
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)


def test_ema_update_carries_batch_norm_statistics_to_the_eval_mode_teacher():
    torch.manual_seed(0)
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3).eval()
    student(torch.randn(64, 3) * 4 + 2)  # train mode: running statistics move
    ema_update(teacher, student, momentum=0.75)
    torch.testing.assert_close(teacher.running_mean, 0.25 * student.running_mean)  # from 0
    torch.testing.assert_close(teacher.running_var, 0.75 * torch.ones(3) + 0.25 * student.running_var)
    assert teacher.num_batches_tracked == student.num_batches_tracked == 1


def test_clip_gradients_is_per_parameter():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> clipped to 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> unchanged
    norms = clip_gradients([a, b], max_norm=1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))


def test_last_layer_freezing_rule_and_weight_decay_groups():
    assert last_layer_frozen(0.5, 1.0) and not last_layer_frozen(1.0, 1.0) and not last_layer_frozen(0.0, 0.0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    decay, no_decay = weight_decay_groups(model)
    assert [p.shape for p in decay["params"]] == [(4, 3)]
    assert [p.shape for p in no_decay["params"]] == [(4,), (4,)]  # the two biases; frozen weight left out
    assert no_decay["weight_decay"] == 0.0


def test_collapse_meter_tells_uniform_from_one_hot_from_healthy():
    k = 8
    uniform = CollapseMeter(k)
    uniform.update(torch.full((16, k), 1 / k))
    s = uniform.summary()
    assert s["teacher_entropy"] == pytest.approx(math.log(k)) and s["kl_div"] == pytest.approx(0, abs=1e-6)
    one_prototype = CollapseMeter(k)
    one_prototype.update(F.one_hot(torch.zeros(16, dtype=torch.long), k).float())
    s = one_prototype.summary()
    assert s["mean_output_entropy"] == pytest.approx(0, abs=1e-6) and s["prototypes_used"] == 1
    healthy = CollapseMeter(k)
    healthy.update(F.one_hot(torch.arange(16) % k, k).float())
    s = healthy.summary()
    assert s["teacher_entropy"] == pytest.approx(0, abs=1e-6)
    assert s["kl_div"] == pytest.approx(math.log(k)) and s["prototypes_used"] == k
    healthy.reset()
    with pytest.raises(ValueError):
        healthy.summary()


def test_border_ring_score():
    centre = torch.zeros(1, 5, 5)
    centre[0, 1:4, 1:4] = 1.0
    background = 1.0 - centre
    excess = border_ring_excess(torch.cat([centre, background]))
    torch.testing.assert_close(excess, torch.tensor([-1.0, 1.0]))
    assert border_ring_share(torch.cat([centre, centre, centre, background])) == 0.25
    with pytest.raises(ValueError):
        border_ring_excess(torch.zeros(2, 2, 5))
