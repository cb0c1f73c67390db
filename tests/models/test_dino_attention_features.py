"""DinoBackbone.attention_features: last-block q/k/v per patch, CLS token, region-restricted CLS."""

import pytest
import torch

from pdso_ray.models.dino import ATTENTION_FEATURE_KINDS, build_dino


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_dino("vit_tiny_test", img_size=64)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _timm_qkv(model, images):
    """The last block's qkv projection output (B×N×3D), read with a hook on timm's own forward."""
    captured = {}
    handle = model.vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, out: captured.setdefault("qkv", out))
    try:
        cls_token = model.vit.forward_features(images)[:, 0]
    finally:
        handle.remove()
    return captured["qkv"], cls_token


@pytest.mark.parametrize("kind", ATTENTION_FEATURE_KINDS)
def test_features_are_timms_own_projection_and_forward_is_unchanged(tiny, images, kind):
    with torch.no_grad():
        out = tiny.attention_features(images, kind=kind)
        tokens, attention = tiny(images)
        qkv, cls_token = _timm_qkv(tiny, images)
    part = ATTENTION_FEATURE_KINDS.index(kind)
    expected = qkv[:, 1:, part * 48:(part + 1) * 48].reshape(2, 8, 8, 48)
    assert out.features.shape == (2, 8, 8, 48) and out.features.dtype == torch.float32
    torch.testing.assert_close(out.features, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cls_token, cls_token, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.patch_tokens, tokens) and torch.equal(out.cls_attention, attention)


def test_keys_differ_from_queries_and_kind_none_skips_them(tiny, images):
    with torch.no_grad():
        keys = tiny.attention_features(images, kind="key").features
        queries = tiny.attention_features(images, kind="query").features
        none = tiny.attention_features(images, kind=None)
    assert not torch.allclose(keys, queries)
    assert none.features is None and none.cls_token.shape == (2, 48)


def test_full_mask_changes_nothing(tiny, images):
    with torch.no_grad():
        plain = tiny.attention_features(images)
        masked = tiny.attention_features(images, patch_mask=torch.ones(2, 8, 8, dtype=torch.bool))
    for name in ("patch_tokens", "cls_attention", "features", "cls_token"):
        torch.testing.assert_close(getattr(masked, name), getattr(plain, name), rtol=1e-5, atol=1e-6)


def _region_mask():
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 2:6, 1:5] = True  # a 4×4 object
    mask[1, :, 4:] = True  # the right half
    return mask


def test_masked_cls_token_equals_running_on_the_region_alone(tiny, images):
    """Reference: keep only CLS + the region's tokens (after the position embedding) and run the
    blocks on that shorter sequence, the obvious way to get the region's CLS token."""
    mask = _region_mask()
    vit = tiny.vit
    with torch.no_grad():
        out = tiny.attention_features(images, patch_mask=mask)
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        for i in range(2):
            keep = torch.cat([torch.tensor([True]), mask[i].flatten()])
            y = x[i:i + 1, keep]
            y = vit.norm(vit.blocks(y))
            torch.testing.assert_close(out.cls_token[i], y[0, 0], rtol=1e-4, atol=1e-5)
    assert torch.all(out.cls_attention[~mask] == 0) and torch.all(out.cls_attention[mask] > 0)


def test_masked_cls_token_ignores_pixels_outside_the_region(tiny, images):
    mask = _region_mask()
    outside = images.clone()
    outside[0, :, :, 48:] += 5.0  # columns 6..7 of image 0: outside its object
    inside = images.clone()
    inside[0, :, 16:24, 8:16] += 5.0  # patch (2, 1) of image 0: inside its object
    with torch.no_grad():
        base = tiny.attention_features(images, patch_mask=mask).cls_token
        moved_outside = tiny.attention_features(outside, patch_mask=mask).cls_token
        moved_inside = tiny.attention_features(inside, patch_mask=mask).cls_token
        unmasked = tiny.attention_features(outside).cls_token
    torch.testing.assert_close(moved_outside, base, rtol=1e-5, atol=1e-6)
    assert (moved_inside[0] - base[0]).abs().max() > 1e-2
    assert (unmasked[0] - tiny.attention_features(images).cls_token[0]).abs().max() > 1e-2


def test_bf16_autocast_features_close_to_fp32(tiny, images):
    with torch.no_grad():
        full = tiny.attention_features(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = tiny.attention_features(images, patch_mask=torch.ones(2, 8, 8, dtype=torch.bool))
    assert half.features.dtype == torch.float32 and half.cls_token.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(half.features.flatten(1), full.features.flatten(1))
    assert (cos > 0.999).all()


def test_bad_kind_and_mask_are_value_errors(tiny, images):
    with pytest.raises(ValueError, match="kind must be one of"):
        tiny.attention_features(images, kind="keys")
    with pytest.raises(ValueError, match="patch_mask must be a 2×8×8 bool tensor"):
        tiny.attention_features(images, patch_mask=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="patch_mask must be a 2×8×8 bool tensor"):
        tiny.attention_features(images, patch_mask=torch.ones(2, 4, 4, dtype=torch.bool))
