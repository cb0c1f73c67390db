"""The convolutional patchify (models/conv_stem.py) and the architecture that uses it."""

import pytest
import torch
from timm.layers import PatchEmbed

from pdso_ray.models.conv_stem import ConvStemPatchEmbed
from pdso_ray.models.dino import build_dino, save_dino_checkpoint
from pdso_ray.models.dino_pretrain import DinoPretrainConfig, DinoPretrainer
from pdso_ray.method.multicrop import CropSpec, MultiCropConfig


@pytest.mark.parametrize("patch", [2, 8, 16])
def test_the_stem_gives_the_token_grid_of_a_linear_patchify(patch):
    x = torch.randn(2, 3, 4 * patch, 3 * patch)
    linear = PatchEmbed(img_size=4 * patch, patch_size=patch, embed_dim=24, strict_img_size=False, output_fmt="NHWC")
    conv = ConvStemPatchEmbed(img_size=4 * patch, patch_size=patch, embed_dim=24, strict_img_size=False,
                              output_fmt="NHWC", stem_width=8)
    assert conv(x).shape == linear(x).shape == (2, 4, 3, 24)
    strides = [m.stride[0] for m in conv.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2] * (patch.bit_length() - 1) + [1]  # log2(P) halvings, then the 1×1 projection


@pytest.mark.parametrize("kwargs, message", [
    ({"patch_size": 6}, "power-of-two"),
    ({"patch_size": 8, "stem_width": 0}, "stem_width must be >= 1"),
])
def test_bad_stem_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvStemPatchEmbed(img_size=48, embed_dim=24, **kwargs)


def test_each_token_sees_only_its_own_neighbourhood():
    """A change in one 8×8 patch moves its own token and its neighbours' (the 3×3 convolutions
    overlap by a few pixels), never a token two patches away: no statistic over the image."""
    torch.manual_seed(0)
    stem = ConvStemPatchEmbed(img_size=64, patch_size=8, embed_dim=16, stem_width=8, output_fmt="NHWC").eval()
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[:, :, 24:32, 24:32] += 1.0  # patch (3, 3)
    with torch.no_grad():
        moved = (stem(x) - stem(y)).abs().sum(-1)[0] > 1e-6
    assert moved[3, 3]
    assert not moved[:, :2].any() and not moved[:, 5:].any() and not moved[:2].any() and not moved[5:].any()


def test_the_architecture_round_trips_through_the_dino_layout_and_pretrains(tmp_path):
    cfg = DinoPretrainConfig(arch="vit_tiny_convstem_reg4", img_size=32, epochs=1, steps_per_epoch=2, out_dim=64,
                             head_hidden_dim=32, head_bottleneck_dim=16, warmup_epochs=0.5, freeze_last_layer_epochs=0.0,
                             crops=MultiCropConfig(global_crop=CropSpec(32, (0.4, 1.0)), num_local=0))
    trainer = DinoPretrainer(cfg)
    stem_before = trainer.student.backbone.vit.patch_embed.proj[0].weight.detach().clone()
    batch = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    trainer.step(batch)
    trainer.step(batch)  # the first step's learning rate is 0 (warm-up)
    assert not torch.equal(trainer.student.backbone.vit.patch_embed.proj[0].weight, stem_before)  # the stem learns
    path = str(tmp_path / "teacher.pth")
    save_dino_checkpoint(trainer.teacher_backbone(), path)
    assert "patch_embed.proj.0.weight" in torch.load(path, weights_only=True)
    model = build_dino("vit_tiny_convstem_reg4", checkpoint=path, img_size=32)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, attention = model(x)
        ref_tokens, _ = trainer.teacher_backbone()(x)
    assert tokens.shape == (2, 4, 6, 48) and attention.shape == (2, 4, 6)
    assert torch.equal(tokens, ref_tokens)
