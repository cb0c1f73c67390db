"""DINO ViT backbones (DINO, DINOv2, DINOv3): builders, a name registry, checkpoint loading, and the
patch-token forward.

``build_dino(arch, checkpoint, storage, img_size)`` returns a :class:`DinoBackbone`, a timm
``VisionTransformer`` (DINO, DINOv2) or ``Eva`` (DINOv3, rotary position embeddings), built with
``pretrained=False`` (nothing is ever fetched from a model hub), whose forward gives what PDSO
needs: the last layer's patch tokens and the CLS->patch attention of the last block, averaged over
heads (docs/method.md §1). ``attention_features`` also returns the last block's per-patch keys (or
queries, values) and the CLS token, optionally with attention restricted to a region: what
LightCluster clusters and labels by.

Checkpoints that load (see :func:`load_dino_weights`), each as distributed:
- DINO (``family="dino"``): the official release files, e.g. ``dino_deitsmall8_pretrain.pth``: a
  flat state dict ``cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1,attn.qkv,attn.proj,
  norm2,mlp.fc1,mlp.fc2}.*, norm.*``; DINO full training checkpoints (``teacher``/``student``
  dicts with ``module.``/``backbone.`` prefixes and the projection head ``head.*``, which is
  dropped; the teacher is used, as DINO does for evaluation);
- DINOv2 (``family="dinov2"``): facebookresearch/dinov2's ``dinov2_vits14[_reg4]_pretrain.pth``:
  the same layout plus LayerScale (``blocks.N.ls1.gamma``, ``ls2.gamma``), ``mask_token`` (dropped:
  pretraining only), ``pos_embed`` for 518 px (37×37 patches + CLS) and, with registers,
  ``register_tokens``, which come after the position embedding (timm's ``no_embed_class``
  layout: the CLS position is folded into ``cls_token``);
- DINOv3 (``family="dinov3"``): facebookresearch/dinov3's ``dinov3_vits16_pretrain_lvd1689m-*.pth``:
  ``storage_tokens`` (= timm's ``reg_token``), ``blocks.N.ls{1,2}.gamma`` (= ``gamma_{1,2}``),
  ``attn.qkv.bias`` with its ``bias_mask`` (the released S and B models' biases are zero; timm's
  models have none: a zero bias is dropped, a non-zero one is an error), and
  ``rope_embed.periods`` and ``mask_token`` (dropped: recomputed, pretraining only);
- timm weights of every architecture here (``model.safetensors`` from the hub, a plain state
  dict or a timm training checkpoint with a ``state_dict``/``model`` key).
A checkpoint's absolute position embedding keeps its own grid (the model is built at the
checkpoint's resolution), and inputs of any size that is a multiple of the patch size resample it
once, on the fly, as the official code does; DINOv3's rotary embedding has no grid.
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
from timm.layers import apply_rot_embed_cat
from torch import nn

from pdso_ray.models.checkpoints import check_keys, load_state_dict_from_url
from pdso_ray.models.conv_stem import ConvStemPatchEmbed
from pdso_ray.storage import Storage

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DINO_DOWNLOADS = "https://dl.fbaipublicfiles.com/dino"
_DINOV2_DOWNLOADS = "https://dl.fbaipublicfiles.com/dinov2"
_DINOV3_DOWNLOADS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"

APACHE_2 = "Apache-2.0"
DINOV3_LICENSE = "DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/)"
# Checkpoint layout families (see the module docstring).
FAMILIES = ("dino", "dinov2", "dinov3")


@dataclass(frozen=True)
class DinoSpec:
    """One backbone variant: the timm architecture it is built as, its patch size, which official
    checkpoint layout it reads (``family``), where its weights come from and under which licence."""

    timm_name: str
    patch_size: int
    family: str = "dino"
    overrides: dict[str, Any] = field(default_factory=dict)  # timm kwargs that change the architecture
    download: str | None = None  # the official weights (for messages and the docs only)
    license: str = APACHE_2  # of the weights the download gives


def _dinov2(name: str, file: str) -> DinoSpec:
    return DinoSpec(f"{name}.lvd142m", 14, "dinov2",
                    download=f"{_DINOV2_DOWNLOADS}/{file.split('_pretrain')[0].replace('_reg4', '')}/{file}")


def _dinov3(name: str, file: str) -> DinoSpec:
    return DinoSpec(f"{name}.lvd1689m", 16, "dinov3", license=DINOV3_LICENSE,
                    download=f"{file} (request access at {_DINOV3_DOWNLOADS})")


DINO_SPECS: dict[str, DinoSpec] = {
    "vit_small_patch8": DinoSpec(
        "vit_small_patch8_224.dino", 8,
        download=f"{_DINO_DOWNLOADS}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "vit_small_patch16": DinoSpec(
        "vit_small_patch16_224.dino", 16,
        download=f"{_DINO_DOWNLOADS}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "vit_base_patch8": DinoSpec(
        "vit_base_patch8_224.dino", 8,
        download=f"{_DINO_DOWNLOADS}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "vit_base_patch16": DinoSpec(
        "vit_base_patch16_224.dino", 16,
        download=f"{_DINO_DOWNLOADS}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "vit_small_patch14_dinov2": _dinov2("vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth"),
    "vit_base_patch14_dinov2": _dinov2("vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth"),
    "vit_small_patch14_reg4_dinov2": _dinov2("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4_pretrain.pth"),
    "vit_base_patch14_reg4_dinov2": _dinov2("vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg4_pretrain.pth"),
    "vit_small_patch16_dinov3": _dinov3("vit_small_patch16_dinov3", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "vit_base_patch16_dinov3": _dinov3("vit_base_patch16_dinov3", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    # Tests and the demo: the ViT-S/8 layout shrunk to 2 blocks of width 48 (random init or tiny files).
    "vit_tiny_test": DinoSpec("vit_small_patch8_224", 8, overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
    # The demo's learned stand-in (pdso_ray.models.dino_pretrain): the tiny layout plus 4 register
    # tokens (Darcet et al. 2023; checkpoint key ``reg_token``). Without them the last block's CLS
    # attention settles on the background and saliency pooling averages it.
    "vit_tiny_reg4": DinoSpec("vit_small_patch8_224", 8,
                              overrides={"embed_dim": 48, "depth": 2, "num_heads": 2, "reg_tokens": 4}),
    # The same with a convolutional patchify (pdso_ray.models.conv_stem): three stride-2 3×3
    # convolutions instead of one linear map per 8×8 patch. Same token grid, blocks and attention;
    # the stem's weights are extra ``patch_embed.proj.N.*`` keys. Trained from scratch it learns
    # shapes the linear patchify does not (benchmarks/learnability.py).
    "vit_tiny_convstem_reg4": DinoSpec("vit_small_patch8_224", 8, overrides={
        "embed_dim": 48, "depth": 2, "num_heads": 2, "reg_tokens": 4,
        "embed_layer": functools.partial(ConvStemPatchEmbed, stem_width=32)}),
    # Tests: DINOv2 with registers and DINOv3 shrunk the same way, read from files in their
    # official layouts.
    "vit_tiny_patch14_reg4_dinov2_test": DinoSpec(
        "vit_small_patch14_reg4_dinov2", 14, "dinov2", overrides={"embed_dim": 48, "depth": 2, "num_heads": 2}),
    "vit_tiny_patch16_dinov3_test": DinoSpec(
        "vit_small_patch16_dinov3", 16, "dinov3", overrides={"embed_dim": 48, "depth": 2, "num_heads": 2},
        license=DINOV3_LICENSE),
}


class DinoBackbone(nn.Module):
    """A DINO ViT returning last-layer patch tokens and the last block's CLS->patch attention.

    Attributes:
        vit: the timm ``VisionTransformer`` or ``Eva`` (no head; ``dynamic_img_size`` on).
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
        """The side of the position embedding's native grid, in pixels (any input size runs)."""
        return int(self.vit.patch_embed.img_size[0])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens and CLS attention of a batch.

        Args:
            images: B×3×H×W float, ImageNet-normalised (see :func:`to_model_input`); H and W
                multiples of the patch size. bf16 autocast is supported.

        Returns:
            patch_tokens: B×h×w×D float32 (h = H/patch, w = W/patch), after the final norm.
            cls_attention: B×h×w float32, the last block's softmax attention of the CLS query to
                each patch, averaged over heads (rows sum to 1 minus the CLS->prefix share:
                the CLS token and any register tokens).
        """
        out = self.attention_features(images, kind=None)
        return out.patch_tokens, out.cls_attention

    def tokens(self, images: torch.Tensor, masks: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The token sequence the blocks read, B×(prefix + h·w)×D (CLS, registers, patches with
        their position embedding), and DINOv3's rotary embedding table for this grid (None for
        absolute position embeddings); pass both to :meth:`block`. ``masks`` (B×h·w bool) replaces
        those patch embeddings by ``mask_token`` (…×D) before the position embedding, as iBOT
        pretraining does."""
        vit = self.vit
        x = vit.patch_embed(images)  # B×h×w×D (dynamic_img_size: NHWC)
        if masks is not None:
            x = torch.where(masks.view(x.shape[:3])[..., None], mask_token.reshape(-1).to(x.dtype), x)
        if _uses_rope(vit):
            x, rope = vit._pos_embed(x)  # Eva: patch dropout is applied inside
        else:
            x, rope = vit.patch_drop(vit._pos_embed(x)), None
        return vit.norm_pre(x), rope

    @staticmethod
    def block(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One transformer block of this backbone on ``x`` (see :meth:`tokens`)."""
        if rope is None:
            return block(x, attn_mask=attn_mask)
        return block(x, rope=rope, attn_mask=attn_mask)

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
                to the prefix tokens (CLS, registers) and the patches where the mask is True, so
                the CLS token summarises that region alone, each kept patch at its own position
                (as if the rest of the image were cut away): the CLS token of an object region.
                An all-False row gives the CLS token of the prefix alone.

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
        x, rope = self.tokens(images)
        for block in vit.blocks[:-1]:
            x = self.block(block, x, rope, key_mask)
        last = vit.blocks[-1]
        attention, features = _last_block_features(last, x, prefix, kind, key_mask, rope)
        x = vit.norm(self.block(last, x, rope, key_mask))
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


def _uses_rope(vit: nn.Module) -> bool:
    """Whether ``vit`` is a timm ``Eva`` with rotary position embeddings (DINOv3)."""
    return getattr(vit, "rope", None) is not None


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
            before DINOv3's rotary embedding (which encodes the position, not the content), not
            L2-normalised.
        cls_token: B×D the CLS token after the final norm.
    """

    patch_tokens: torch.Tensor
    cls_attention: torch.Tensor
    features: torch.Tensor | None
    cls_token: torch.Tensor


def _qkv_projection(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused qkv weight (3·A×D) and bias (3·A or None) of a timm ViT or Eva attention."""
    if getattr(attn, "qkv", None) is None:
        raise ValueError(f"{type(attn).__name__} has no fused qkv projection")
    bias = attn.qkv.bias
    if getattr(attn, "q_bias", None) is not None:  # Eva keeps q and v biases apart (k has none)
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
    return attn.qkv.weight, bias


def _last_block_features(block: nn.Module, x: torch.Tensor, num_prefix: int, kind: str | None,
                         key_mask: torch.Tensor | None = None, rope: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CLS query's attention to the patches in ``block`` (B×N_patches float32, averaged over
    heads) and the block's B×N×D queries, keys or values (``kind``; None for ``kind=None``) for
    its input ``x``, heads concatenated.

    timm runs attention fused (SDPA), which never materialises the weights. Only the CLS row is
    needed, so it is recomputed from the block's own q/k projections: one query against all keys,
    about a third of one qkv projection, instead of the full N×N attention of an unfused block.
    ``key_mask`` (B×1×1×N bool, True = may be attended to) removes keys from that softmax, as the
    block itself does when it gets the same mask. ``rope`` (DINOv3): the rotary table the block
    applies to the patch keys (the prefix tokens, the CLS query among them, are not rotated).
    """
    attn = block.attn
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    dim = heads * head_dim
    xn = block.norm1(x)
    weight, bias = _qkv_projection(attn)

    def project(part: int, rows: torch.Tensor) -> torch.Tensor:  # part 0 = q, 1 = k, 2 = v; B×heads×n×hd
        cut = slice(part * dim, (part + 1) * dim)
        out = F.linear(rows, weight[cut], None if bias is None else bias[cut])
        return out.reshape(b, rows.shape[1], heads, head_dim).transpose(1, 2)

    q = attn.q_norm(project(0, xn[:, :1]))
    k = attn.k_norm(project(1, xn))
    k_rotated = k
    if rope is not None:
        k_rotated = torch.cat([k[:, :, :num_prefix], apply_rot_embed_cat(
            k[:, :, num_prefix:], rope, half=getattr(attn, "rotate_half", False)).type_as(k)], dim=2)
    # float32 logits, autocast off: a bf16 softmax over ~800 keys loses visible precision.
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = (q.float() * attn.scale) @ k_rotated.float().transpose(-2, -1)  # B×heads×1×N
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
        checkpoint: URL of a DINO/DINOv2/DINOv3/timm checkpoint; ``None`` = random weights
            (tests and demos only; logged as a warning).
        storage: the run's storage for reading ``checkpoint``; ``None`` = local defaults.
        img_size: the position embedding's native grid of a random-init model (a checkpoint
            brings its own grid).

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
    if arch not in DINO_SPECS:
        raise ValueError(f"unknown DINO architecture {arch!r}; known: {', '.join(DINO_SPECS)}")
    spec = DINO_SPECS[arch]
    if img_size % spec.patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of {arch}'s patch size {spec.patch_size}")
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=img_size,
                             dynamic_img_size=True, **spec.overrides)


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
    """Load a DINO, DINOv2, DINOv3 or timm checkpoint into ``model`` (strict, after normalising
    the layout); the model takes the checkpoint's position-embedding grid."""
    spec = DINO_SPECS.get(model.arch)
    hint = f"set models.dino.checkpoint to an official or timm checkpoint of {model.arch}"
    if spec is not None and spec.download:
        hint = (f"the official weights for {model.arch} are {spec.download} "
                "(download once, then point models.dino.checkpoint at your copy)")
    raw = load_state_dict_from_url(url, storage, hint=hint)
    state_dict = to_timm_layout(normalize_dino_state_dict(raw), model.vit, url)
    _take_checkpoint_grid(model.vit, state_dict)
    check_keys(model.vit, state_dict, url)
    model.vit.load_state_dict(state_dict, strict=True)
    logger.info("loaded DINO %s weights from %s", model.arch, url)


def normalize_dino_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone state dict inside any supported checkpoint, with flat keys.

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


def to_timm_layout(state_dict: dict[str, torch.Tensor], vit: nn.Module, url: str) -> dict[str, torch.Tensor]:
    """``state_dict`` in the key layout of ``vit`` (timm's): facebookresearch/dinov2 and dinov3
    files are recognised by their own keys and renamed (module docstring); timm and DINO files
    pass unchanged. ValueError (naming ``url``) for a non-zero bias the model has no place for."""
    if "storage_tokens" in state_dict:
        return _from_dinov3(state_dict, vit, url)
    if "mask_token" in state_dict or "register_tokens" in state_dict:
        return _from_dinov2(state_dict, vit)
    return _drop_zero_biases(dict(state_dict), vit, url)


def _from_dinov2(state_dict: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state_dict.items() if k not in ("mask_token", "register_tokens")}
    if "register_tokens" in state_dict:
        out["reg_token"] = state_dict["register_tokens"]
        if getattr(vit, "no_embed_class", False) and "pos_embed" in out and "cls_token" in out:
            # DINOv2 adds the CLS position to the CLS token and inserts the registers after the
            # position embedding: timm's no_embed_class model keeps patch positions only.
            out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
            out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _from_dinov3(state_dict: dict[str, torch.Tensor], vit: nn.Module, url: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "mask_token" or key.startswith("rope_embed.") or key.endswith(".bias_mask"):
            continue  # pretraining only, or recomputed (the rotary periods), or folded in below
        if key.endswith(".attn.qkv.bias") and key.replace(".bias", ".bias_mask") in state_dict:
            value = value * state_dict[key.replace(".bias", ".bias_mask")].to(value.dtype)
        key = key.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1")
        out[key.replace(".ls2.gamma", ".gamma_2")] = value
    return _drop_zero_biases(out, vit, url)


def _drop_zero_biases(state_dict: dict[str, torch.Tensor], vit: nn.Module, url: str) -> dict[str, torch.Tensor]:
    """Fit the attention biases of ``state_dict`` to ``vit``: a fused ``qkv.bias`` becomes Eva's
    ``q_bias``/``v_bias`` where the model has them (the k part must be zero); biases the model has
    no parameter for are dropped when they are zero and an error otherwise."""
    expected = vit.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in expected or not (key.endswith(".attn.qkv.bias") or key.endswith("_bias")):
            out[key] = value
            continue
        stem = key.removesuffix("qkv.bias")
        if key.endswith("qkv.bias") and f"{stem}q_bias" in expected:
            q, k, v = value.chunk(3)
            if torch.any(k != 0):
                raise ValueError(f"checkpoint {url}: {key} has a non-zero key bias, which "
                                 f"{type(vit).__name__} cannot hold")
            out[f"{stem}q_bias"], out[f"{stem}v_bias"] = q, v
        elif torch.any(value != 0):
            raise ValueError(f"checkpoint {url}: {key} is a non-zero attention bias, but this "
                             "architecture has none: is the checkpoint of another variant?")
    return out


def _take_checkpoint_grid(vit: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Give ``vit`` the square position-embedding grid of ``state_dict`` (DINOv2: 37×37 for 518 px)
    when it differs; a non-square or mismatched one is left for :func:`check_keys` to report."""
    pos = state_dict.get("pos_embed")
    target = getattr(vit, "pos_embed", None)
    if not isinstance(pos, torch.Tensor) or target is None or pos.ndim != 3 or pos.shape == target.shape:
        return
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix or pos.shape[2] != target.shape[2]:
        return
    vit.set_input_size(img_size=side * int(vit.patch_embed.patch_size[0]))


# ---- saving (tests, demo) -------------------------------------------------------------------------
def save_dino_checkpoint(model: DinoBackbone, url: str, fmt: str = "dino",
                         storage: Storage | None = None) -> None:
    """Write ``model``'s weights to ``url`` in a published checkpoint layout.

    ``fmt``:
      - ``"dino"``: the official DINO release layout (flat backbone state dict, ``torch.save``);
      - ``"dino_full"``: a DINO training checkpoint (``teacher`` with ``backbone.`` prefix,
        ``student`` with ``module.backbone.``, both with a small projection head ``head.*``);
      - ``"dinov2"`` / ``"dinov3"``: the facebookresearch/dinov2 / dinov3 release layouts (module
        docstring; :func:`official_state_dict`);
      - ``"timm"``: timm weights; ``.safetensors`` when ``url`` ends so (the hub's
        ``model.safetensors``), else a timm training checkpoint ``{"state_dict", "arch", "epoch"}``.
    """
    weights = {k: v.detach().cpu().contiguous() for k, v in model.vit.state_dict().items()}
    if fmt == "dino":
        obj: Any = weights
    elif fmt in ("dinov2", "dinov3"):
        obj = official_state_dict(model, fmt)
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
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'dino', 'dino_full', 'dinov2', "
                         "'dinov3' or 'timm'")
    buf = io.BytesIO()
    torch.save(obj, buf)
    (storage or Storage()).write_bytes(url, buf.getvalue())


def official_state_dict(model: DinoBackbone, family: str) -> dict[str, torch.Tensor]:
    """``model``'s weights keyed as the official ``family`` release files are (``dinov2``:
    ``mask_token``, ``register_tokens``, the CLS position in ``pos_embed``; ``dinov3``:
    ``storage_tokens``, ``ls1.gamma``, ``qkv.bias`` with its ``bias_mask``, ``rope_embed.periods``,
    ``mask_token``): the inverse of :func:`to_timm_layout`, for tests and tools that need those
    files."""
    vit = model.vit
    weights = {k: v.detach().cpu().clone() for k, v in vit.state_dict().items()}
    dim = model.embed_dim
    if family == "dinov2":
        out = dict(weights, mask_token=torch.zeros(1, dim))
        if "reg_token" in out:
            out["register_tokens"] = out.pop("reg_token")
            if getattr(vit, "no_embed_class", False):
                # any split of the folded CLS token works; a non-zero CLS position exercises the fold
                cls_position = 0.01 * torch.ones(1, 1, dim)
                out["cls_token"] = out["cls_token"] - cls_position
                out["pos_embed"] = torch.cat([cls_position, out["pos_embed"]], dim=1)
        return out
    if family != "dinov3":
        raise ValueError(f"family must be 'dinov2' or 'dinov3', got {family!r}")
    out = {"mask_token": torch.zeros(1, dim), "rope_embed.periods": vit.rope.periods.detach().cpu().clone()}
    for key, value in weights.items():
        key = key.replace("reg_token", "storage_tokens").replace(".gamma_1", ".ls1.gamma")
        out[key.replace(".gamma_2", ".ls2.gamma")] = value
    for i in range(len(vit.blocks)):
        q_bias = weights.get(f"blocks.{i}.attn.q_bias")
        zeros = torch.zeros(dim)
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([zeros if q_bias is None else q_bias, zeros,
                                                      zeros if q_bias is None else weights[f"blocks.{i}.attn.v_bias"]])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        out.pop(f"blocks.{i}.attn.q_bias", None)
        out.pop(f"blocks.{i}.attn.v_bias", None)
    return out


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
