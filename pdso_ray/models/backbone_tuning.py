"""DFF's backbone fine-tuning (docs/method.md §3): h trained together with the DINO backbone's last
blocks, so that the features every later stage reads (k-means #2/#3, pixel pseudo labels) carry
the denoised partition.

In the paper f, g and h each fine-tune the whole backbone. Here f and g stay heads on the frozen
pooled features (they only choose S1 and S2, and a head is cheap to train 15 + 50 epochs at 1.28 M
images); h first trains on the frozen features as well, then :class:`BackboneTuner` continues it
jointly with the backbone's last ``blocks`` blocks on h's training rows. The image → feature path
is the features stage's: a square resize to the backbone's input size, the saliency-weighted mean of
the final-norm patch tokens (:func:`~pdso_ray.method.features.pooled_feature`); the loss is DFF's:
cross-entropy of the mean logits of the image and its horizontal flip.

Pure torch: the Ray Train worker loop (:mod:`pdso_ray.stages.denoise`) feeds it batches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdso_ray.method.denoise import Classifier
from pdso_ray.method.features import pooled_feature, saliency_from_attention
from pdso_ray.models.dino import DinoBackbone, to_model_input


def unfreeze_last_blocks(backbone: DinoBackbone, blocks: int) -> list[nn.Parameter]:
    """Freeze ``backbone`` except its last ``blocks`` transformer blocks and the final norm
    (``blocks`` >= the depth: every parameter, patch embedding and tokens included). Returns the
    trainable parameters."""
    vit = backbone.vit
    depth = len(vit.blocks)
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    for p in vit.parameters():
        p.requires_grad_(blocks >= depth)
    if blocks < depth:
        for module in [*vit.blocks[depth - blocks:], vit.norm]:
            for p in module.parameters():
                p.requires_grad_(True)
    return [p for p in vit.parameters() if p.requires_grad]


class BackboneTuner:
    """The backbone (last ``blocks`` trainable) and h, trained with AdamW on DFF's pair loss.

    Args:
        backbone: the run's DINO backbone (its weights are updated in place).
        head: h, an MLP :class:`~pdso_ray.method.denoise.Classifier` trained on the frozen features.
        blocks: how many of the last blocks train (see :func:`unfreeze_last_blocks`).
        image_size: the square input side (the features stage's ``models.dino.image_size``).
        backbone_lr / head_lr: peak learning rates; both follow one cosine decay over ``total_steps``.
        clip_grad: max global gradient norm (0 = none): a few noisy labels must not tear the
            pretrained features apart.
    """

    def __init__(self, backbone: DinoBackbone, head: Classifier, *, blocks: int, image_size: int,
                 backbone_lr: float, head_lr: float, total_steps: int, clip_grad: float = 1.0,
                 device: torch.device | str = "cpu"):
        if total_steps < 1 or backbone_lr <= 0 or head_lr <= 0:
            raise ValueError(f"bad tuning settings: total_steps={total_steps} backbone_lr={backbone_lr} "
                             f"head_lr={head_lr}")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device)
        self.head = head.to(self.device)
        self.image_size = int(image_size)
        self.total_steps = int(total_steps)
        self.clip_grad = float(clip_grad)
        self.step_count = 0
        trainable = unfreeze_last_blocks(self.backbone, blocks)
        self.optimizer = torch.optim.AdamW(
            [{"params": trainable, "lr": backbone_lr, "peak": backbone_lr},
             {"params": list(self.head.parameters()), "lr": head_lr, "peak": head_lr}], weight_decay=0.0)
        # wrap(): DDP in the Ray Train worker; the identity otherwise
        self.model: nn.Module = _PairLogits(self.backbone, self.head)

    def wrap(self, wrap) -> None:
        """Replace the trained module by ``wrap(module)`` (DistributedDataParallel)."""
        self.model = wrap(self.model)

    def step(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
        """One optimiser step on B×S×S×3 uint8 images and their (B,) int64 labels; returns the loss."""
        frac = min(self.step_count, self.total_steps) / self.total_steps
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak"] * 0.5 * (1 + math.cos(math.pi * frac))
        self.model.train()
        x = to_model_input(images, self.image_size, device=self.device)
        y = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad > 0:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.clip_grad)
        self.optimizer.step()
        self.step_count += 1
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.vit.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.vit.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])


class _PairLogits(nn.Module):
    """B×3×S×S normalised images → B×C: h's mean logits of each image's pooled feature and of its
    flip's (:meth:`Classifier.pair_logits`), through the backbone."""

    def __init__(self, backbone: DinoBackbone, head: Classifier):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tokens, attention = self.backbone(torch.cat([x, torch.flip(x, dims=[3])]))
        pooled = pooled_feature(tokens.float(), saliency_from_attention(attention.float()))
        return self.head.pair_logits(pooled[:b], pooled[b:])


@torch.no_grad()
def pooled_embedding(backbone: DinoBackbone, head: Classifier, images: np.ndarray, image_size: int,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """The L2-normalised e(pooled feature) of B×S×S×3 uint8 images (no flip): B×D' float32, what
    k-means #2/#3 cluster after a backbone fine-tuning (the features stage's pooling)."""
    device = torch.device(device)
    backbone.to(device).eval()
    head.to(device).eval()
    x = to_model_input(images, image_size, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tokens, attention = backbone(x)
    pooled = pooled_feature(tokens.float(), saliency_from_attention(attention.float()))
    return F.normalize(head.embed(pooled).float(), dim=-1).cpu().numpy()
