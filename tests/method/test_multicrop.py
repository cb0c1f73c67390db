"""Batched multi-crop augmentation (method/multicrop.py): shapes, layout, determinism, geometry."""

import pytest
import torch
import torch.nn.functional as F

from pdso_ray.method.multicrop import (
    CropSpec,
    MultiCropConfig,
    multicrop,
    normalize,
    sample_boxes,
)


def _images(b=3, h=40, w=48, seed=0):
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_shapes_dtype_and_determinism_for_a_seed():
    cfg = MultiCropConfig(global_crop=CropSpec(32, (0.4, 1.0), blur_p=0.5),
                          local_crop=CropSpec(16, (0.1, 0.4), blur_p=0.5), num_local=3, hue=0.02)
    x = _images()
    a = multicrop(x, cfg, torch.Generator().manual_seed(7))
    b = multicrop(x, cfg, torch.Generator().manual_seed(7))
    c = multicrop(x, cfg, torch.Generator().manual_seed(8))
    assert a.global_crops.shape == (6, 3, 32, 32) and a.local_crops.shape == (9, 3, 16, 16)
    assert a.global_crops.dtype == torch.float32
    assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.local_crops, b.local_crops)
    assert not torch.equal(a.global_crops, c.global_crops)
    assert torch.isfinite(a.global_crops).all()


def test_no_local_crops():
    cfg = MultiCropConfig(num_local=0)
    out = multicrop(_images(2, 64, 64), cfg, torch.Generator().manual_seed(0))
    assert out.global_crops.shape == (4, 3, 64, 64) and out.local_crops.shape == (0, 3, 32, 32)


def test_whole_image_view_is_a_resize_and_views_are_crop_major():
    # scale 1 and aspect 1 on square images: every box is the whole image, so with no flip and
    # no jitter each view is the image resized, and row c·B + i holds image i.
    spec = CropSpec(16, (1.0, 1.0), flip_p=0.0, jitter_p=0.0)
    cfg = MultiCropConfig(global_crop=spec, local_crop=spec, num_local=1, ratio=(1.0, 1.0))
    x = _images(2, 32, 32)
    out = multicrop(x, cfg, torch.Generator().manual_seed(0))
    expected = normalize(F.avg_pool2d(x.permute(0, 3, 1, 2).float() / 255, 2))  # 2×2 mean = exact 2× downscale
    torch.testing.assert_close(out.global_crops, torch.cat([expected, expected]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.local_crops, expected, atol=1e-5, rtol=0)


def test_flip_mirrors_the_view():
    spec = CropSpec(32, (1.0, 1.0), flip_p=1.0, jitter_p=0.0)
    cfg = MultiCropConfig(global_crop=spec, num_local=0, ratio=(1.0, 1.0))
    x = _images(1, 32, 32)
    out = multicrop(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.global_crops[0], normalize(x.permute(0, 3, 1, 2).float() / 255)[0].flip(-1),
                               atol=1e-5, rtol=0)


def test_sample_boxes_follow_scale_and_ratio():
    boxes = sample_boxes(2000, 60, 80, (0.2, 0.5), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (60 * 80)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80 + 1e-4).all() and (boxes[:, 3] <= 60 + 1e-4).all()
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.5 + 1e-4
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    # boxes that cannot fit (area 1 at aspect 2 in a square) fall back to the whole image
    whole = sample_boxes(5, 10, 10, (1.0, 1.0), (2.0, 2.0), torch.Generator().manual_seed(0))
    assert torch.equal(whole, torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 5))


def test_colour_jitter_keeps_range_and_hue_zero_keeps_gray_gray():
    gray = torch.full((4, 24, 24, 3), 100, dtype=torch.uint8)
    spec = CropSpec(24, (1.0, 1.0), flip_p=0.0, jitter_p=1.0)
    cfg = MultiCropConfig(global_crop=spec, num_local=0, ratio=(1.0, 1.0), hue=0.02)
    out = multicrop(gray, cfg, torch.Generator().manual_seed(0)).global_crops
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = out * std + mean
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-4, rtol=0)  # no chroma created
    assert rgb.std() > 0.01  # brightness did change between views


def test_bad_input_is_rejected():
    cfg = MultiCropConfig()
    with pytest.raises(ValueError, match="uint8"):
        multicrop(torch.zeros(2, 3, 32, 32), cfg, torch.Generator())
    with pytest.raises(ValueError, match="scale"):
        MultiCropConfig(local_crop=CropSpec(16, (0.5, 0.2)))


def _sequential_jitter(x, on, cfg, gen):
    """The colour ops one after another, the obvious way (draws in the module's order)."""
    k = x.shape[0]
    one = torch.ones(k, dtype=torch.float64)

    def factor(strength):
        lo, hi = 1 - strength, 1 + strength
        f = lo + (hi - lo) * torch.rand(k, generator=gen, dtype=torch.float64)
        return torch.where(on, f, one).float().view(k, 1, 1, 1)

    b, c, s = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    angle = -cfg.hue + 2 * cfg.hue * torch.rand(k, generator=gen, dtype=torch.float64)
    angle = torch.where(on, angle * 2 * torch.pi, torch.zeros(k, dtype=torch.float64)).float()
    gains = (1 - cfg.channel_gain) + 2 * cfg.channel_gain * torch.rand(3 * k, generator=gen, dtype=torch.float64)
    gains = torch.where(on[:, None], gains.view(k, 3), torch.ones(k, 3, dtype=torch.float64)).float()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = x * b
    mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = (x * luma).sum(1, keepdim=True)
    x = (grey + (x - grey) * s) * gains.view(k, 3, 1, 1)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(k, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    return torch.einsum("kij,kjhw->kihw", torch.linalg.inv(yiq) @ rot @ yiq, x).clamp(0, 1)


def test_fused_colour_jitter_equals_the_ops_applied_one_by_one():
    from pdso_ray.method.multicrop import _colour_jitter

    cfg = MultiCropConfig(brightness=0.5, contrast=0.4, saturation=0.3, channel_gain=0.2, hue=0.05)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    on = torch.tensor([True, False, True, True, False, True])
    got = _colour_jitter(x, on, cfg, torch.Generator().manual_seed(1))
    expected = _sequential_jitter(x, on, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[~on], x[~on].clamp(0, 1), atol=1e-6, rtol=0)
