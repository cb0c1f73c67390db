"""DINO ViT backbones: builders, a name registry, checkpoint loading, and the patch-token forward.

``build_dino(arch, checkpoint, storage, img_size)`` returns a :class:`DinoBackbone`, a timm
``VisionTransformer`` (built with ``pretrained=False``: nothing is ever fetched from a model hub)
whose forward gives what PDSO needs: the last layer's patch tokens and the CLS->patch attention of
the last block, averaged over heads (docs/method.md §1). ``attention_features`` also returns the last
block's per-patch keys (or queries, values) and the CLS token, optionally with attention restricted
to a region: what LightCluster clusters and labels by.

Checkpoints that load (see :func:`load_dino_weights`):
- the official DINO release files, e.g. ``dino_deitsmall8_pretrain.pth``: a flat state dict
  ``cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
  mlp.fc2}.*, norm.*`` (no head);
- DINO full training checkpoints (``teacher``/``student`` dicts with ``module.``/``backbone.``
  prefixes and the projection head ``head.*``, which is dropped; the teacher is used, as DINO does
  for evaluation);
- timm weights for the same architectures (``vit_small_patch8_224.dino`` etc.: the same key layout),
  as a plain state dict, a timm training checkpoint (``state_dict``/``model`` key) or
  ``.safetensors``.
A checkpoint trained at another resolution loads: ``pos_embed`` is resampled (bicubic) to the
model's grid. Inputs of any size that is a multiple of the patch size run (the position embedding is
resampled on the fly when the grid differs from ``img_size``).
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from pdso_ray.models.checkpoints import check_keys, load_state_dict_from_url
from pdso_ray.storage import Storage

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DINO_DOWNLOADS = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class DinoSpec:
    """One backbone variant: the timm architecture it is built as, and where its weights come from."""

    timm_name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # timm kwargs that change the architecture
    download: str | None = None  # official DINO release file (for error messages only)


DINO_SPECS: dict[str, DinoSpec] = {
    "vit_small_patch8": DinoSpec(
        "vit_small_patch8_224.dino",
        download=f"{_DINO_DOWNLOADS}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "vit_small_patch16": DinoSpec(
        "vit_small_patch16_224.dino",
        download=f"{_DINO_DOWNLOADS}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "vit_base_patch8": DinoSpec(
        "vit_base_patch8_224.dino",
        download=f"{_DINO_DOWNLOADS}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "vit_base_patch16": DinoSpec(
        "vit_base_patch16_224.dino",
        download=f"{_DINO_DOWNLOADS}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    # Tests and the demo: the ViT-S/8 layout shrunk to 2 blocks of width 48 (random init or tiny files).
    "vit_tiny_test": DinoSpec("vit_small_patch8_224", overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
    # The demo's learned stand-in (pdso_ray.models.dino_pretrain): the tiny layout plus 4 register
    # tokens (Darcet et al. 2023; checkpoint key ``reg_token``). Without them the last block's CLS
    # attention settles on the background and saliency pooling averages it.
    "vit_tiny_reg4": DinoSpec("vit_small_patch8_224",
                              overrides={"embed_dim": 48, "depth": 2, "num_heads": 2, "reg_tokens": 4}),
}


class DinoBackbone(nn.Module):
    """A DINO ViT returning last-layer patch tokens and the last block's CLS->patch attention.

    Attributes:
        vit: the timm ``VisionTransformer`` (no head; ``dynamic_img_size`` on).
        arch: registry name, e.g. ``"vit_small_patch8"``.
        pretrained: whether weights came from a checkpoint (``False`` = random init).
    """

    def __init__(self, vit: nn.Module, arch: str, pretrained: bool):
        super().__init__()
        self.vit = vit
        self.arch = arch
        self.pretrained = pretrained

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def img_size(self) -> int:
        return int(self.vit.patch_embed.img_size[0])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens and CLS attention of a batch.

        Args:
            images: B×3×H×W float, ImageNet-normalised (see :func:`to_model_input`); H and W
                multiples of the patch size. bf16 autocast is supported.

        Returns:
            patch_tokens: B×h×w×D float32 (h = H/patch, w = W/patch), after the final norm.
            cls_attention: B×h×w float32, the last block's softmax attention of the CLS query to
                each patch, averaged over heads (rows sum to 1 minus the CLS->prefix share).
        """
        out = self.attention_features(images, kind=None)
        return out.patch_tokens, out.cls_attention

    def attention_features(self, images: torch.Tensor, kind: str | None = "key",
                           patch_mask: torch.Tensor | None = None) -> AttentionFeatures:
        """:meth:`forward`'s outputs plus the last block's per-patch attention features and the
        CLS token, in one pass (LightCluster's inputs, ``pdso_ray.method.lightcluster``).

        Args:
            images: B×3×H×W float, as for :meth:`forward`.
            kind: which projection of the last block to return per patch: ``"query"``, ``"key"``
                or ``"value"`` (see :data:`ATTENTION_FEATURE_KINDS`); None returns none
                (``features`` is None), which is all :meth:`forward` needs.
            patch_mask: optional B×h×w bool. Where given, every block lets each token attend only
                to the prefix (CLS) token and the patches where the mask is True, so the CLS token
                summarises that region alone, each kept patch at its own position (as if the rest
                of the image were cut away): the CLS token of an object region. An all-False row
                gives the CLS token of the prefix alone.

        Returns:
            :class:`AttentionFeatures`, float32 (bf16 autocast supported). Without ``patch_mask``
            its ``patch_tokens`` and ``cls_attention`` equal :meth:`forward`'s.
        """
        if kind is not None and kind not in ATTENTION_FEATURE_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_FEATURE_KINDS}, got {kind!r}")
        b, h, w = self._grid(images)
        vit = self.vit
        prefix = vit.num_prefix_tokens
        key_mask = None
        if patch_mask is not None:
            if patch_mask.dtype != torch.bool or tuple(patch_mask.shape) != (b, h, w):
                raise ValueError(f"patch_mask must be a {b}×{h}×{w} bool tensor, got "
                                 f"{tuple(patch_mask.shape)} {patch_mask.dtype}")
            keep = torch.cat([patch_mask.new_ones(b, prefix), patch_mask.flatten(1)], dim=1)
            key_mask = keep.to(images.device)[:, None, None, :]  # B×1×1×N: same keys for every head and query
        # forward_features, unrolled so the last block's input is at hand for the attention.
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        for block in vit.blocks[:-1]:
            x = block(x, attn_mask=key_mask)
        last = vit.blocks[-1]
        attention, features = _last_block_features(last, x, prefix, kind, key_mask)
        x = vit.norm(last(x, attn_mask=key_mask))
        return AttentionFeatures(
            patch_tokens=x[:, prefix:].reshape(b, h, w, -1).float(),
            cls_attention=attention.reshape(b, h, w),
            features=None if features is None else features[:, prefix:].reshape(b, h, w, -1).float(),
            cls_token=x[:, 0].float(),
        )

    def _grid(self, images: torch.Tensor) -> tuple[int, int, int]:
        """(B, h, w) of a B×3×H×W batch on the patch grid; ValueError for other shapes."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be B×3×H×W, got shape {tuple(images.shape)}")
        b, _, height, width = images.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}×{width} is not a multiple of the patch size {p}")
        return b, height // p, width // p


# Projections of the last block that :meth:`DinoBackbone.attention_features` returns per patch.
ATTENTION_FEATURE_KINDS = ("query", "key", "value")


@dataclass
class AttentionFeatures:
    """One batch through :meth:`DinoBackbone.attention_features` (float32, on the input's device).

    Attributes:
        patch_tokens: B×h×w×D last-layer patch tokens after the final norm.
        cls_attention: B×h×w last block's CLS->patch attention, averaged over heads (0 on patches
            a ``patch_mask`` left out).
        features: B×h×w×D the last block's per-patch queries, keys or values (None for
            ``kind=None``): the qkv projection
            of the block's normalised input, heads concatenated in head order (head i holds
            columns ``i*head_dim:(i+1)*head_dim``), after timm's q/k norm (identity for DINO),
            not L2-normalised.
        cls_token: B×D the CLS token after the final norm.
    """

    patch_tokens: torch.Tensor
    cls_attention: torch.Tensor
    features: torch.Tensor | None
    cls_token: torch.Tensor


def _last_block_features(block: nn.Module, x: torch.Tensor, num_prefix: int, kind: str | None,
                         key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CLS query's attention to the patches in ``block`` (B×N_patches float32, averaged over
    heads) and the block's B×N×D queries, keys or values (``kind``; None for ``kind=None``) for
    its input ``x``, heads concatenated.

    timm runs attention fused (SDPA), which never materialises the weights. Only the CLS row is
    needed, so it is recomputed from the block's own q/k projections: one query against all keys,
    about a third of one qkv projection, instead of the full N×N attention of an unfused block.
    ``key_mask`` (B×1×1×N bool, True = may be attended to) removes keys from that softmax, as the
    block itself does when it gets the same mask.
    """
    attn = block.attn
    b, n, _ = x.shape
    heads, head_dim, dim = attn.num_heads, attn.head_dim, attn.attn_dim
    xn = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias

    def project(part: int, rows: torch.Tensor) -> torch.Tensor:  # part 0 = q, 1 = k, 2 = v; B×heads×n×hd
        cut = slice(part * dim, (part + 1) * dim)
        out = F.linear(rows, weight[cut], None if bias is None else bias[cut])
        return out.reshape(b, rows.shape[1], heads, head_dim).transpose(1, 2)

    q = attn.q_norm(project(0, xn[:, :1]))
    k = attn.k_norm(project(1, xn))
    # float32 logits, autocast off: a bf16 softmax over ~800 keys loses visible precision.
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # B×heads×1×N
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask, float("-inf"))
        attention = logits.softmax(dim=-1)[:, :, 0, num_prefix:].mean(dim=1)
    if kind is None:
        return attention, None
    if kind == "key":
        features = k
    elif kind == "query":
        features = attn.q_norm(project(0, xn))
    else:
        features = project(2, xn)
    return attention, features.transpose(1, 2).reshape(b, n, dim)


# ---- building -------------------------------------------------------------------------------------
def build_dino(arch: str, checkpoint: str | None = None, storage: Storage | None = None,
               img_size: int = 224) -> DinoBackbone:
    """Build the backbone ``arch`` (a :data:`DINO_REGISTRY` name) and load ``checkpoint``.

    Args:
        arch: registry name, e.g. ``"vit_small_patch8"``.
        checkpoint: URL of a DINO/timm checkpoint; ``None`` = random weights (tests and demos only;
            logged as a warning).
        storage: the run's storage for reading ``checkpoint``; ``None`` = local defaults.
        img_size: the model's native input size (its ``pos_embed`` grid).

    Raises:
        ValueError: unknown ``arch``, bad ``img_size``, or a checkpoint that does not fit.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    if arch not in DINO_REGISTRY:
        raise ValueError(f"unknown DINO architecture {arch!r}; known: {', '.join(DINO_REGISTRY)}")
    return DINO_REGISTRY[arch](checkpoint=checkpoint, storage=storage, img_size=img_size)


def create_vit(arch: str, img_size: int) -> nn.Module:
    """The timm ViT of ``arch`` (a ``DINO_SPECS`` name) at ``img_size``, randomly initialised (no
    hub access); ``img_size`` must be a multiple of its patch size."""
    spec = DINO_SPECS[arch]
    vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                            dynamic_img_size=True, **spec.overrides)
    if img_size % vit.patch_embed.patch_size[0]:
        raise ValueError(f"img_size {img_size} is not a multiple of {arch}'s patch size "
                         f"{vit.patch_embed.patch_size[0]}")
    return vit


def _build(arch: str, checkpoint: str | None = None, storage: Storage | None = None,
           img_size: int = 224) -> DinoBackbone:
    model = DinoBackbone(create_vit(arch, img_size), arch, pretrained=checkpoint is not None)
    if checkpoint is None:
        logger.warning("DINO %s has RANDOM WEIGHTS (no checkpoint given): its features are "
                       "meaningless; use this only for tests and demos", arch)
    else:
        load_dino_weights(model, checkpoint, storage)
    return model.eval()


DINO_REGISTRY = {name: functools.partial(_build, name) for name in DINO_SPECS}


def load_dino_weights(model: DinoBackbone, url: str, storage: Storage | None = None) -> None:
    """Load a DINO or timm checkpoint into ``model`` (strict, after normalising the layout)."""
    spec = DINO_SPECS.get(model.arch)
    hint = f"set models.dino.checkpoint to a DINO or timm checkpoint of {model.arch}"
    if spec is not None and spec.download:
        hint = (f"the official DINO weights for {model.arch} are {spec.download} "
                "(download once, then point models.dino.checkpoint at your copy)")
    raw = load_state_dict_from_url(url, storage, hint=hint)
    state_dict = normalize_dino_state_dict(raw)
    state_dict = _fit_pos_embed(state_dict, model.vit, url)
    check_keys(model.vit, state_dict, url)
    model.vit.load_state_dict(state_dict, strict=True)
    logger.info("loaded DINO %s weights from %s", model.arch, url)


def normalize_dino_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone state dict inside any supported checkpoint, with timm/DINO flat keys.

    Picks the ``teacher`` (else ``student``, ``state_dict``, ``model``) entry of a training
    checkpoint, strips ``module.`` and ``backbone.`` prefixes, and drops ``head.*`` (DINO's
    projection head or a classifier: not part of the backbone).
    """
    for key in ("teacher", "student", "state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    out: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("head."):
            continue
        out[key] = value
    return out


def _fit_pos_embed(state_dict: dict[str, torch.Tensor], vit: nn.Module, url: str) -> dict[str, torch.Tensor]:
    """Resample a square checkpoint ``pos_embed`` grid to the model's grid when they differ."""
    pos = state_dict.get("pos_embed")
    target = vit.pos_embed
    if not isinstance(pos, torch.Tensor) or pos.shape == target.shape or pos.ndim != 3:
        return state_dict
    prefix = vit.num_prefix_tokens
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix or pos.shape[2] != target.shape[2]:
        return state_dict  # not a square grid of the same width: check_keys reports the mismatch
    new_grid = list(vit.patch_embed.grid_size)
    logger.info("resampling pos_embed of %s from %d×%d to %d×%d", url, side, side, *new_grid)
    out = dict(state_dict)
    out["pos_embed"] = resample_abs_pos_embed(pos, new_size=new_grid, old_size=[side, side],
                                              num_prefix_tokens=prefix)
    return out


# ---- saving (tests, demo) -------------------------------------------------------------------------
def save_dino_checkpoint(model: DinoBackbone, url: str, fmt: str = "dino",
                         storage: Storage | None = None) -> None:
    """Write ``model``'s weights to ``url`` in a published checkpoint layout.

    ``fmt``:
      - ``"dino"``: the official release layout (flat backbone state dict, ``torch.save``);
      - ``"dino_full"``: a DINO training checkpoint (``teacher`` with ``backbone.`` prefix,
        ``student`` with ``module.backbone.``, both with a small projection head ``head.*``);
      - ``"timm"``: timm weights; ``.safetensors`` when ``url`` ends so (the hub's
        ``model.safetensors``), else a timm training checkpoint ``{"state_dict", "arch", "epoch"}``.
    """
    weights = {k: v.detach().cpu().contiguous() for k, v in model.vit.state_dict().items()}
    if fmt == "dino":
        obj: Any = weights
    elif fmt == "dino_full":
        dim = model.embed_dim
        head = {"head.mlp.0.weight": torch.zeros(2 * dim, dim), "head.mlp.0.bias": torch.zeros(2 * dim),
                "head.last_layer.weight_g": torch.ones(4, 1), "head.last_layer.weight_v": torch.zeros(4, 2 * dim)}
        teacher = {**{f"backbone.{k}": v for k, v in weights.items()}, **head}
        obj = {"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 0}
    elif fmt == "timm":
        if url.lower().endswith(".safetensors"):
            from safetensors.torch import save as save_safetensors

            (storage or Storage()).write_bytes(url, save_safetensors(weights))
            return
        obj = {"epoch": 0, "arch": DINO_SPECS[model.arch].timm_name.split(".")[0], "state_dict": weights}
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'dino', 'dino_full' or 'timm'")
    buf = io.BytesIO()
    torch.save(obj, buf)
    (storage or Storage()).write_bytes(url, buf.getvalue())


# ---- preprocessing --------------------------------------------------------------------------------
def to_model_input(images: Sequence[np.ndarray] | np.ndarray | torch.Tensor, size: int | tuple[int, int],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Resize and normalise RGB images for the backbone.

    Args:
        images: a list of H×W×3 uint8 RGB arrays (sizes may differ) or one B×H×W×3 uint8 array
            (numpy or torch).
        size: output side (square) or (height, width).
        device: where to resize (uint8 travels, the float result stays there); ``None`` = CPU.

    Returns:
        B×3×h×w float32, bilinear-resized with antialiasing, ImageNet mean/std normalised.
    """
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(images) == 0:
        raise ValueError("to_model_input needs at least one image")
    batch = images if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4 else None
    groups = [batch] if batch is not None else [img[None] for img in images]
    resized = []
    for group in groups:
        t = torch.as_tensor(group, device=device)
        if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"images must be H×W×3 uint8 RGB, got {tuple(t.shape[1:])} {t.dtype}")
        t = t.permute(0, 3, 1, 2).float()
        if tuple(t.shape[-2:]) != out_hw:
            t = F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
        resized.append(t)
    x = torch.cat(resized) if len(resized) > 1 else resized[0]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std
