"""The DINO projection head: MLP → bottleneck → L2 normalisation → weight-normalised prototypes.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", §3.1 and App. C:
a 3-layer MLP (hidden 2048, GELU) to a 256-d bottleneck, then L2 normalisation and a
weight-normalised linear layer without bias to K "prototype" logits. With ``norm_last_layer``
the weight norm's magnitude ``g`` is fixed at 1, so each logit is a cosine similarity between the
bottleneck vector and a prototype direction (the published default, which stabilises training).

Parameter names follow the official checkpoints (``mlp.{0,2,4}.*``, ``last_layer.weight_g``,
``last_layer.weight_v``), so a DINO training checkpoint's ``head.*`` loads into this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """``y = x @ (g · v / ‖v‖)ᵀ`` with one norm per output row; no bias.

    Written out (instead of ``torch.nn.utils.weight_norm``, deprecated, or its parametrization,
    whose state-dict keys differ) so the keys are exactly DINO's ``weight_g`` (K×1) and
    ``weight_v`` (K×D).
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, weight)


class DinoHead(nn.Module):
    """Projects backbone embeddings to ``out_dim`` prototype logits.

    Args:
        in_dim: backbone embedding width D.
        out_dim: number of prototypes K (65,536 in the paper; a few hundred to a few thousand
            suit small data).
        hidden_dim: MLP width.
        bottleneck_dim: width of the L2-normalised bottleneck.
        num_layers: MLP depth (>= 1; 1 = a single linear map to the bottleneck).
        norm_last_layer: fix the prototypes' norms at 1 (cosine logits).

    Input N×D float; output N×K float (logits, not yet divided by a temperature).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) < 1:
            raise ValueError(f"head widths must be positive, got in={in_dim} out={out_dim} "
                             f"hidden={hidden_dim} bottleneck={bottleneck_dim}")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    @property
    def out_dim(self) -> int:
        return int(self.last_layer.weight_v.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(z)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototype parameters, whose gradients DINO discards during the first epoch(s)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]
