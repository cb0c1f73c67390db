"""DINO projection head (models/dino_head.py): shapes, cosine logits, freezing, official key names."""

import pytest
import torch
import torch.nn.functional as F

from pdso_ray.models.dino_head import DinoHead


def test_shapes_and_official_key_layout():
    head = DinoHead(16, 32, hidden_dim=24, bottleneck_dim=8, num_layers=3)
    assert head(torch.randn(5, 16)).shape == (5, 32) and head.out_dim == 32
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"mlp.0.weight": (24, 16), "mlp.0.bias": (24,), "mlp.2.weight": (24, 24),
                      "mlp.2.bias": (24,), "mlp.4.weight": (8, 24), "mlp.4.bias": (8,),
                      "last_layer.weight_v": (32, 8), "last_layer.weight_g": (32, 1)}
    assert DinoHead(16, 32, bottleneck_dim=8, num_layers=1)(torch.randn(2, 16)).shape == (2, 32)
    with pytest.raises(ValueError):
        DinoHead(16, 32, num_layers=0)


def test_normalised_last_layer_gives_cosine_logits():
    head = DinoHead(6, 10, hidden_dim=12, bottleneck_dim=4, norm_last_layer=True)
    x = torch.randn(7, 6)
    z = F.normalize(head.mlp(x), dim=-1)
    expected = z @ F.normalize(head.last_layer.weight_v, dim=1).T
    torch.testing.assert_close(head(x), expected)
    assert head(x).abs().max() <= 1 + 1e-5
    assert not head.last_layer.weight_g.requires_grad
    assert head.last_layer_parameters() == [head.last_layer.weight_v]


def test_unnormalised_last_layer_trains_its_norms():
    head = DinoHead(6, 10, hidden_dim=12, bottleneck_dim=4, norm_last_layer=False)
    assert head.last_layer.weight_g.requires_grad
    assert len(head.last_layer_parameters()) == 2
    head(torch.randn(3, 6)).sum().backward()
    assert head.last_layer.weight_g.grad is not None
