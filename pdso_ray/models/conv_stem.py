"""A convolutional patchify for small ViTs trained from scratch (Xiao et al. 2021, "Early
convolutions help transformers see better").

A ViT's patch embedding is one linear map of each P×P patch: every notion of an edge, a corner or a
stripe inside a patch must be learned from data by that map and the blocks above it. A 2-block ViT
of width 48 trained on a few thousand images never gets there: on the ``shapes`` world even a
*supervised* 128-way classifier of that layout stays at chance on unseen classes after 1,000 steps,
where the same ViT with this stem reaches 0.20 image-level k-means purity, 0.26 after 3,000 (chance
0.16; ``benchmarks/learnability.py``, README "The synthetic worlds"). Replacing the patchify by
log2(P) stride-2 3×3 convolutions gives the tokens local shape detectors from the start and leaves
everything above untouched: the same token grid (one token per P×P patch), the same blocks, CLS and
register tokens, attention maps and checkpoint layout (the stem's weights are
``patch_embed.proj.N.*`` keys beside the blocks').

The SAM stand-in's encoder uses the same stem (:mod:`pdso_ray.models.sam`, ``SamSpec.stem_width``):
trained the same way on the same scenes for 1,000 steps, box-prompted mask IoU on held-out
``shapes``-world scenes is 0.580 with it against 0.509 with the linear patchify.

BatchNorm inside the stem, as in the paper: with GroupNorm, a per-pixel LayerNorm or no
normalisation the same supervised probe stays at chance after 1,000 steps (loss ln 128), with
BatchNorm it learns. In eval mode (features, a DINO teacher) it uses running statistics, and a
DINO teacher takes them from its student with the weights
(:func:`pdso_ray.method.self_distillation.ema_update`). Under DDP each worker normalises by its
own batch, as DINO's ResNet-50 would without SyncBatchNorm.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with ``proj`` a stack of stride-2 3×3 convolutions.

    Args:
        stem_width: channels of the first convolution (≥ 1); each next one doubles them.
        *args, **kwargs: ``PatchEmbed``'s (``img_size``, ``patch_size``, ``in_chans``,
            ``embed_dim``, ...), as a timm ``VisionTransformer`` passes them to its
            ``embed_layer``. ``patch_size`` must be a power of two ≥ 2.

    Input B×C×H×W, output as ``PatchEmbed`` (B×(H/P)·(W/P)×D, or B×H/P×W/P×D with
    ``dynamic_img_size``): ``log2(P)`` blocks of conv 3×3 stride 2 → BatchNorm → ReLU, then a
    1×1 convolution to ``embed_dim``.
    """

    def __init__(self, *args, stem_width: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"a convolutional stem needs a square patch size, got {self.patch_size}")
        self.proj = conv_stem(self.proj.in_channels, self.proj.out_channels, self.patch_size[0], stem_width)


def conv_stem(in_channels: int, out_channels: int, patch: int, stem_width: int) -> nn.Sequential:
    """The stem itself: ``log2(patch)`` blocks of conv 3×3 stride 2 (``stem_width`` channels,
    doubling each block) → BatchNorm → ReLU, then a 1×1 convolution to ``out_channels``. Maps
    B×``in_channels``×H×W to B×``out_channels``×H/patch×W/patch, like the ``patch``-strided
    convolution it replaces (timm's and segment-anything's ``patch_embed.proj``).

    Raises:
        ValueError: ``patch`` not a power of two ≥ 2, or ``stem_width`` < 1.
    """
    if patch < 2 or patch & (patch - 1):
        raise ValueError(f"a convolutional stem needs a power-of-two patch size, got {patch}")
    if stem_width < 1:
        raise ValueError(f"stem_width must be >= 1, got {stem_width}")
    layers: list[nn.Module] = []
    channels_in, width = in_channels, stem_width
    for _ in range(int(math.log2(patch))):
        layers += [nn.Conv2d(channels_in, width, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        channels_in, width = width, 2 * width
    layers.append(nn.Conv2d(channels_in, out_channels, 1))
    return nn.Sequential(*layers)
