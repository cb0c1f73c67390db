"""DINO pretraining trainer (models/dino_pretrain.py): resume, export, freezing, EMA, wrapping."""

import io

import pytest
import torch
from torch import nn

from pdso_ray.method.multicrop import CropSpec, MultiCropConfig
from pdso_ray.models.dino import build_dino
from pdso_ray.models.dino_pretrain import DinoPretrainConfig, DinoPretrainer

TINY = DinoPretrainConfig(
    arch="vit_tiny_reg4", img_size=32, epochs=2, steps_per_epoch=2, out_dim=64, head_hidden_dim=32,
    head_bottleneck_dim=16, warmup_epochs=0.5, freeze_last_layer_epochs=1.0,
    crops=MultiCropConfig(global_crop=CropSpec(32, (0.4, 1.0)), local_crop=CropSpec(16, (0.1, 0.4)), num_local=2),
)


def _batch(seed, b=4):
    return torch.randint(0, 256, (b, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.mark.parametrize("patch_loss_weight", [0.0, 1.0])
def test_resume_from_a_checkpoint_gives_the_same_next_step(patch_loss_weight):
    cfg = DinoPretrainConfig(**{**TINY.__dict__, "patch_loss_weight": patch_loss_weight})
    a = DinoPretrainer(cfg)
    for s in range(3):
        a.step(_batch(s))
    state = _roundtrip(a.state_dict())
    next_a = a.step(_batch(3))
    b = DinoPretrainer(DinoPretrainConfig.from_dict(state["config"]))
    b.load_state_dict(state)
    next_b = b.step(_batch(3))
    assert next_b["step"] == 3 and next_b["loss"] == next_a["loss"]
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        assert torch.equal(pa, pb)
    assert torch.equal(a.dino_loss.centering.center, b.dino_loss.centering.center)
    # a fresh trainer (same seed) does not reproduce step 3: the checkpoint carried the state
    assert DinoPretrainer(cfg).step(_batch(3))["loss"] != next_a["loss"]


def test_config_round_trips_through_a_plain_dict():
    state = _roundtrip(DinoPretrainer(TINY).state_dict())
    assert DinoPretrainConfig.from_dict(state["config"]) == TINY


def test_teacher_export_loads_into_build_dino(tmp_path):
    trainer = DinoPretrainer(TINY)
    trainer.step(_batch(0))
    weights = trainer.teacher_backbone_state_dict()
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(weights)
    assert not any(k.startswith(("head.", "backbone.", "module.")) for k in weights)
    path = tmp_path / "teacher.pth"
    torch.save(weights, path)
    model = build_dino("vit_tiny_reg4", checkpoint=str(path), img_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, attention = model(x)
        ref_tokens, ref_attention = trainer.teacher_backbone()(x)
    assert tokens.shape == (2, 4, 4, 48) and attention.shape == (2, 4, 4)
    assert torch.equal(tokens, ref_tokens) and torch.equal(attention, ref_attention)
    # with 4 registers the CLS row also spends attention on them: patches get less than 1 - CLS
    assert model.vit.num_prefix_tokens == 5


def test_last_layer_is_frozen_in_the_first_epoch_then_trains():
    trainer = DinoPretrainer(TINY)
    assert trainer.backbone is trainer.student.backbone
    v0 = trainer.student.head.last_layer.weight_v.detach().clone()
    mlp0 = trainer.student.head.mlp[0].weight.detach().clone()
    trainer.step(_batch(0))
    trainer.step(_batch(1))  # steps 0 and 1 are epoch 0
    assert torch.equal(trainer.student.head.last_layer.weight_v, v0)
    assert not torch.equal(trainer.student.head.mlp[0].weight, mlp0)
    trainer.step(_batch(2))  # epoch 1
    assert not torch.equal(trainer.student.head.last_layer.weight_v, v0)


def test_teacher_is_the_ema_of_the_student():
    trainer = DinoPretrainer(TINY)
    teacher0 = [p.detach().clone() for p in trainer.teacher.parameters()]
    m = trainer.schedule()["momentum"]
    metrics = trainer.step(_batch(0))
    assert metrics["momentum"] == m
    for t, t0, s in zip(trainer.teacher.parameters(), teacher0, trainer.student.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s, rtol=1e-5, atol=1e-7)
    assert all(not p.requires_grad for p in trainer.teacher.parameters())


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: holds the model as ``.module`` and forwards to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_a_wrapped_student_trains_the_same_and_checkpoints_without_the_wrapper():
    plain, wrapped = DinoPretrainer(TINY), DinoPretrainer(TINY)
    wrapped.wrap_student(_Wrapper)
    reduced = []
    wrapped.reduce_mean = lambda x: reduced.append(x.shape) or x
    assert plain.step(_batch(0))["loss"] == wrapped.step(_batch(0))["loss"]
    assert reduced == [(1, TINY.out_dim)]  # the centre update went through the cross-worker mean
    assert set(wrapped.state_dict()["student"]) == set(plain.state_dict()["student"])


def test_metrics_and_epoch_summary():
    trainer = DinoPretrainer(TINY)
    m = trainer.step(_batch(0))
    assert {"loss", "lr", "weight_decay", "momentum", "teacher_temp", "teacher_entropy",
            "mean_output_entropy", "augment_s", "step_s"} <= set(m)
    assert m["lr"] == 0.0 and m["step"] == 0  # warm-up starts at 0
    summary = trainer.end_epoch()
    assert 1 <= summary["prototypes_used"] <= TINY.out_dim
    assert 0 <= trainer.saliency_probe(_batch(1))["border_ring_share"] <= 1


def test_workers_share_the_initial_weights_but_not_the_views():
    a, b = DinoPretrainer(TINY, rank=0), DinoPretrainer(TINY, rank=1)
    for pa, pb in zip(a.student.parameters(), b.student.parameters()):
        assert torch.equal(pa, pb)
    assert a.step(_batch(0))["loss"] != b.step(_batch(0))["loss"]
