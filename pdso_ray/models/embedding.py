"""The embedding the clusters live in after denoising: the DINO backbone followed by the denoised
classifier h's embedding (docs/method.md §3–§5).

k-means #2/#3 cluster ``e(pooled feature)`` of every train image (written by the ``denoise``
stage); pixel pseudo labels compare ``e(patch token)`` with the final centroids. An
:class:`Embedder` computes both for an image the pipeline has not embedded yet (validation
images, whose candidate classes the pseudo-label sweep needs) exactly as the stages did: the
pooled feature at the features stage's input size (square resize, saliency-weighted mean of the
patch tokens), the patch tokens at the pseudo-label input size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pdso_ray.data.decode import resize_square
from pdso_ray.method.features import pooled_feature, saliency_from_attention
from pdso_ray.models.dino import DinoBackbone, to_model_input


class Embedder:
    """``backbone`` (a :class:`~pdso_ray.models.dino.DinoBackbone`) and ``head`` (a module mapping
    …×D features to L2-normalised …×D' embeddings), on ``device``, in eval mode."""

    def __init__(self, backbone: DinoBackbone, head: torch.nn.Module, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.head = head.to(self.device).eval()

    def _forward(self, image: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_model_input(image[None], size, device=self.device)
        with torch.inference_mode(), torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            tokens, attention = self.backbone(x)
        return tokens.float(), saliency_from_attention(attention.float())

    @torch.inference_mode()
    def patches(self, image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(h×w×D' float32 embedded patch tokens, H×W float32 saliency in [0, 1])`` of an
        ``H×W×3`` uint8 image fed at ``size``×``size``; the saliency is upsampled bilinearly to
        the image's size."""
        tokens, saliency = self._forward(image, size)
        emb = self.head(tokens)
        saliency = F.interpolate(saliency[:, None], size=image.shape[:2], mode="bilinear",
                                 align_corners=False)[0, 0]
        return emb[0].float().cpu().numpy(), saliency.clamp(0, 1).cpu().numpy()

    @torch.inference_mode()
    def image(self, image: np.ndarray, size: int) -> np.ndarray:
        """``D'`` float32: the embedding of the image's pooled feature (what k-means #2/#3 saw),
        the image resized to ``size``×``size`` as the features stage does."""
        tokens, saliency = self._forward(resize_square(image, size), size)
        return self.head(pooled_feature(tokens, saliency))[0].float().cpu().numpy()
