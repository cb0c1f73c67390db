"""Saliency and pooled features (method/features.py), and the purity of the method modules."""


import pytest
import torch

from pdso_ray.method.features import pooled_feature, saliency_from_attention, saliency_peak, upsample_saliency


def test_saliency_is_min_max_normalised_per_image():
    attention = torch.tensor([[[0.1, 0.3], [0.2, 0.5]],
                              [[2.0, 2.0], [2.0, 2.0]],
                              [[-1.0, 0.0], [1.0, 3.0]]])
    s = saliency_from_attention(attention)
    assert s.dtype == torch.float32 and s.shape == (3, 2, 2)
    torch.testing.assert_close(s[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(s[1], torch.zeros(2, 2))  # no contrast: nothing salient
    torch.testing.assert_close(s[2], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    with pytest.raises(ValueError, match="B×h×w"):
        saliency_from_attention(torch.zeros(4, 4))


def test_saliency_from_tiny_dino_attention_has_grid_shape_and_unit_range():
    from pdso_ray.models.dino import build_dino

    torch.manual_seed(0)
    model = build_dino("vit_tiny_test", img_size=64)
    with torch.no_grad():
        tokens, attention = model(torch.randn(3, 3, 64, 48, generator=torch.Generator().manual_seed(0)))
    s = saliency_from_attention(attention)
    assert s.shape == (3, 8, 6)
    assert torch.allclose(s.amin(dim=(1, 2)), torch.zeros(3)) and torch.allclose(s.amax(dim=(1, 2)), torch.ones(3))
    feats = pooled_feature(tokens, s)
    assert feats.shape == (3, 48)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))


def test_pooled_feature_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 3, 4, 5, generator=g)
    saliency = torch.rand(2, 3, 4, generator=g)
    out = pooled_feature(tokens, saliency)
    for b in range(2):
        weighted = sum(saliency[b, i, j] * tokens[b, i, j] for i in range(3) for j in range(4))
        mean = weighted / saliency[b].sum()
        torch.testing.assert_close(out[b], mean / mean.norm())
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_pooled_feature_with_zero_saliency_is_plain_mean():
    tokens = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3)
    out = pooled_feature(tokens, torch.zeros(1, 2, 2))
    mean = tokens.reshape(4, 3).mean(dim=0)
    torch.testing.assert_close(out[0], mean / mean.norm())
    with pytest.raises(ValueError, match=">= 0"):
        pooled_feature(tokens, -torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="B×h×w×D"):
        pooled_feature(tokens, torch.ones(1, 2, 3))


def test_saliency_peak_relative_coordinates():
    s = torch.zeros(2, 4, 5)
    s[0, 1, 3] = 1.0
    s[1, 3, 0] = 0.7
    s[1, 0, 4] = 0.7  # a tie: the first cell in row-major order wins
    peaks = saliency_peak(s)
    torch.testing.assert_close(peaks, torch.tensor([[1.5 / 4, 3.5 / 5], [0.5 / 4, 4.5 / 5]]))
    assert ((peaks > 0) & (peaks < 1)).all()


def test_upsample_saliency():
    s = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    up = upsample_saliency(s, (20, 30))
    assert up.shape == (1, 20, 30)
    assert up.min() >= 0 and up.max() <= 1
    assert up[0, 0, 0] == 0 and up[0, 0, -1] == 1  # corners keep their cell's value
    torch.testing.assert_close(upsample_saliency(torch.full((2, 3, 3), 0.4), (7, 5)), torch.full((2, 7, 5), 0.4))
    with pytest.raises(ValueError, match="out_hw"):
        upsample_saliency(s, (0, 5))
