"""The fine-tuned segmentation model (docs/method.md §7–§8): a backbone feature map and a 1×1 conv head
with C+1 outputs (0 background, 1..C classes), plus saving, loading and full-resolution prediction.

Backbones are registry entries (:data:`BACKBONES`), each producing a ``B×D×h×w`` map at a fixed
stride: ``dino`` is the stage-1 DINO ViT (patch tokens reshaped to the patch grid, stride = patch
size), ``resnet50`` timm's ResNet-50 (last stage, stride 32; random init — no hub weights are
ever fetched).

``finetune/model.pt`` is ``{"state_dict": ..., "meta": {...}}`` written with ``torch.save``; the
meta (:func:`segmenter_meta`) is enough to rebuild the architecture, so prediction loads it with
``weights_only=True`` and never needs the stage-1 checkpoint.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pdso_ray.models.checkpoints import check_keys, load_state_dict_from_url
from pdso_ray.models.dino import create_vit
from pdso_ray.storage import Storage

logger = logging.getLogger(__name__)

MODEL_FORMAT = "pdso_ray.segmenter"
MODEL_VERSION = 1


class ViTFeatureMap(nn.Module):
    """A timm ViT (``dynamic_img_size`` on) as a feature map: final-norm patch tokens, ``B×D×h×w``
    with ``h = H / patch``, ``w = W / patch``."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.stride = int(vit.patch_embed.patch_size[0])
        self.out_channels = int(vit.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        p = self.stride
        if height % p or width % p:
            raise ValueError(f"input size {height}×{width} is not a multiple of the patch size {p}")
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        return tokens.reshape(b, height // p, width // p, -1).permute(0, 3, 1, 2)


class TimmFeatureMap(nn.Module):
    """The deepest level of a timm ``features_only`` CNN: ``B×D×ceil(H/s)×ceil(W/s)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.stride = int(model.feature_info.reduction()[-1])
        self.out_channels = int(model.feature_info.channels()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[-1]


class Segmenter(nn.Module):
    """Backbone feature map → 1×1 conv → ``C+1`` logits per feature cell.

    ``forward(x)``: ``x`` is ``B×3×H×W`` float, ImageNet-normalised
    (:func:`pdso_ray.models.dino.to_model_input`), H and W multiples of :attr:`stride` for ViT
    backbones; returns ``B×(C+1)×h×w`` logits (``h = H / stride``), channel 0 background.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = nn.Conv2d(backbone.out_channels, num_classes + 1, kernel_size=1)

    @property
    def stride(self) -> int:
        return self.backbone.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be B×3×H×W, got shape {tuple(x.shape)}")
        return self.head(self.backbone(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward that also returns the pixel features (for the AGMM loss, docs/method.md §7):
        ``(features B×D×h×w, logits B×(C+1)×h×w)``, the backbone feature map (D =
        ``backbone.out_channels``) and the head's output on it, which :meth:`forward` returns."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"input must be B×3×H×W, got shape {tuple(x.shape)}")
        features = self.backbone(x)
        return features, self.head(features)


# ---- building -------------------------------------------------------------------------------------
def _resnet50() -> nn.Module:
    return TimmFeatureMap(timm.create_model("resnet50", pretrained=False, features_only=True,
                                            out_indices=(4,)))


# name -> builder of the architecture from the meta (arch, img_size); weights come separately.
BACKBONES = {
    "dino": lambda meta: ViTFeatureMap(create_vit(meta["arch"], int(meta["img_size"]))),
    "resnet50": lambda meta: _resnet50(),
}


def build_segmenter(backbone: str, num_classes: int, dino=None, storage: Storage | None = None) -> Segmenter:
    """The model fine-tuning starts from.

    ``backbone``: a :data:`BACKBONES` name. ``dino`` (the backbone ``dino`` needs): a
    :class:`pdso_ray.models.loading.DinoSource`, whose weights are loaded (its checkpoint, or
    random weights drawn from the run's seed). ``resnet50``: timm's ResNet-50, random init. The head
    is freshly initialised either way (from torch's global RNG: seed it first).

    Args:
        backbone: ``dino`` or ``resnet50``.
        num_classes: C (the head has C+1 outputs).
        dino: where the DINO backbone comes from (``backbone="dino"`` only).
        storage: reads the DINO checkpoint; ``None`` = local defaults.
    """
    if backbone == "dino":
        if dino is None:
            raise ValueError("backbone 'dino' needs a DinoSource")
        feature_map: nn.Module = ViTFeatureMap(dino.build(storage).vit)
    elif backbone == "resnet50":
        logger.info("fine-tuning a randomly initialised ResNet-50 (no pretrained weights are loaded)")
        feature_map = _resnet50()
    else:
        raise ValueError(f"unknown finetune.backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    return Segmenter(feature_map, num_classes)


def segmenter_meta(cfg, num_classes: int) -> dict[str, Any]:
    """What :func:`build_segmenter_from_meta` needs to rebuild the architecture of ``cfg``
    (``img_size``: the configured input size; :func:`with_native_grid` replaces it by the grid the
    built model's position embedding has, which a checkpoint decides)."""
    backbone = cfg.finetune.backbone
    arch = cfg.models.dino.arch if backbone == "dino" else backbone
    return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "num_classes": int(num_classes),
            "backbone": backbone, "arch": arch, "img_size": int(cfg.models.dino.image_size)}


def with_native_grid(meta: dict[str, Any], model: Segmenter) -> dict[str, Any]:
    """``meta`` with ``img_size`` set to the position-embedding grid of ``model``'s ViT backbone in
    pixels (a DINOv2 checkpoint brings 518 px), so that the saved weights rebuild."""
    vit = getattr(model.backbone, "vit", None)
    if vit is None:
        return dict(meta)
    return {**meta, "img_size": int(vit.patch_embed.img_size[0])}


def build_segmenter_from_meta(meta: dict[str, Any]) -> Segmenter:
    """A randomly initialised :class:`Segmenter` with the architecture described by ``meta``."""
    for key in ("num_classes", "backbone", "arch", "img_size"):
        if key not in meta:
            raise ValueError(f"segmenter meta lacks {key!r}: {meta}")
    if meta["backbone"] not in BACKBONES:
        raise ValueError(f"unknown backbone {meta['backbone']!r} in meta; known: {', '.join(BACKBONES)}")
    return Segmenter(BACKBONES[meta["backbone"]](meta), int(meta["num_classes"]))


def segmenter_bytes(state_dict: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """``torch.save`` bytes of ``{"state_dict", "meta"}`` (CPU tensors), the ``model.pt`` format.
    ``state_dict`` is a :class:`Segmenter`'s (unwrapped from DDP)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "meta": dict(meta)}, buf)
    return buf.getvalue()


def load_segmenter(url: str, storage: Storage | None = None) -> tuple[Segmenter, dict[str, Any]]:
    """Rebuild the model saved at ``url`` (weights only, strict key check) and return it in eval
    mode with its meta. ``url`` is a ``model.pt`` (:func:`segmenter_bytes`) or an exported model
    folder (:data:`EXPORTED_CONFIG` + :data:`EXPORTED_WEIGHTS`, :func:`save_exported`). Errors
    name the file."""
    storage = storage or Storage()
    if not url.endswith(".pt") and storage.exists(Storage.join(url, EXPORTED_CONFIG)):
        return _load_exported(url, storage)
    obj = load_state_dict_from_url(url, storage)
    meta, state = obj.get("meta"), obj.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{url} is not a segmenter file: expected keys 'state_dict' and 'meta' "
                         f"with format {MODEL_FORMAT!r}, got keys {sorted(obj)}")
    return _rebuild(meta, state, url), meta


def _rebuild(meta: dict[str, Any], state: Mapping[str, torch.Tensor], url: str) -> Segmenter:
    model = build_segmenter_from_meta(meta)
    check_keys(model, state, url)
    model.load_state_dict(state, strict=True)
    return model.eval()


# An exported model (pdso-ray export-model): a folder with these two files. config.json holds the
# meta's keys at its top level, beside what people and other tools need (pdso_ray.model_export).
EXPORTED_CONFIG = "config.json"
EXPORTED_WEIGHTS = "model.safetensors"


def save_exported(storage: Storage, folder: str, state_dict: Mapping[str, torch.Tensor],
                  config: dict[str, Any]) -> None:
    """Write ``state_dict`` (a :class:`Segmenter`'s) as ``folder/model.safetensors`` and ``config``
    (which must hold the meta's keys) as ``folder/config.json``."""
    from safetensors.torch import save as save_safetensors

    if config.get("format") != MODEL_FORMAT:
        raise ValueError(f"config must carry format {MODEL_FORMAT!r}, got {config.get('format')!r}")
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    storage.write_bytes(Storage.join(folder, EXPORTED_WEIGHTS),
                        save_safetensors(state, metadata={"format": "pt"}))
    storage.write_json(Storage.join(folder, EXPORTED_CONFIG), config)


def _load_exported(folder: str, storage: Storage) -> tuple[Segmenter, dict[str, Any]]:
    from safetensors.torch import load as load_safetensors

    config_url = Storage.join(folder, EXPORTED_CONFIG)
    config = storage.read_json(config_url)
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ValueError(f"{config_url} is not a pdso-ray model config (format {MODEL_FORMAT!r})")
    weights_url = Storage.join(folder, EXPORTED_WEIGHTS)
    if not storage.exists(weights_url):
        raise FileNotFoundError(f"exported model {folder} has {EXPORTED_CONFIG} but no {EXPORTED_WEIGHTS}")
    state = load_safetensors(storage.read_bytes(weights_url))
    return _rebuild(config, state, weights_url), config


# ---- prediction helpers ---------------------------------------------------------------------------
def model_input_size(height: int, width: int, short_side: int, multiple: int) -> tuple[int, int]:
    """``(h, w)`` with the short side scaled to ``short_side``, the aspect kept, and each side
    rounded to the nearest positive multiple of ``multiple`` (the model's stride)."""
    if height < 1 or width < 1 or short_side < 1 or multiple < 1:
        raise ValueError(f"sizes must be positive: {height}x{width}, short side {short_side}, "
                         f"multiple {multiple}")
    scale = short_side / min(height, width)

    def fit(side: int) -> int:
        return max(multiple, int(round(side * scale / multiple)) * multiple)

    return fit(height), fit(width)


class Prediction(NamedTuple):
    """One image's decision at full resolution (``H×W`` tensors).

    ``label``: int64 argmax over the C+1 outputs, background (0) included — the official
    decision rule (PASS and PDSO write and score this). ``foreground_label``: int64 argmax over the
    C foreground channels (ids 1..C). ``foreground``: float32 ``1 - softmax(...)[0]`` in [0, 1];
    with ``foreground_label`` it serves PASS's foreground-threshold rule
    (``predict.background: threshold``)."""

    label: torch.Tensor
    foreground_label: torch.Tensor
    foreground: torch.Tensor


def logits_to_prediction(logits: torch.Tensor, size: tuple[int, int], chunk: int = 64) -> Prediction:
    """Upsample one image's logits to ``size`` and take the per-pixel decisions.

    Logits are upsampled bilinearly (``align_corners=False``) before the argmax and softmax, in
    chunks of ``chunk`` channels with a running max and log-sum-exp, so memory stays
    ``O(chunk·H·W)`` even for C = 919 at full image size. Ties go to the lower id.

    Args:
        logits: ``(C+1)×h×w`` float, channel 0 background.
        size: ``(H, W)`` output size.
    """
    if logits.ndim != 3 or logits.shape[0] < 2:
        raise ValueError(f"logits must be (C+1)×h×w with C >= 1, got shape {tuple(logits.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    height, width = size
    best = torch.full((height, width), -torch.inf, device=logits.device)
    label = torch.zeros((height, width), dtype=torch.int64, device=logits.device)
    lse = torch.full((height, width), -torch.inf, device=logits.device)
    background = None
    for start in range(0, logits.shape[0], chunk):
        up = F.interpolate(logits[None, start:start + chunk].float(), size=(height, width),
                           mode="bilinear", align_corners=False)[0]
        lse = torch.logaddexp(lse, torch.logsumexp(up, dim=0))
        if background is None:
            background = up[0].clone()
            up[0] = -torch.inf  # the running argmax is over the foreground channels
        top, idx = up.max(dim=0)
        better = top > best
        label = torch.where(better, idx + start, label)
        best = torch.where(better, top, best)
    foreground = (1.0 - torch.exp(background - lse)).clamp_(0.0, 1.0)
    # Background wins where its logit is at least the best foreground one (ties: lower id).
    argmax = torch.where(background >= best, torch.zeros_like(label), label)
    return Prediction(argmax, label, foreground)


def foreground_to_uint8(foreground: np.ndarray) -> np.ndarray:
    """``H×W`` probabilities in [0, 1] → uint8 ``round(255 p)`` (the ``*_fg`` PNG values)."""
    return np.clip(np.rint(np.asarray(foreground, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
