"""SAM: builders by name, official checkpoint loading at any input size, and a batched predictor.

``SAM_REGISTRY`` maps an architecture name to its :class:`SamSpec`; :func:`build_sam` builds it
with segment-anything's modules, at the spec's input size or another one, and loads an official
checkpoint (``sam_vit_b_01ec64.pth`` & co.: a flat state dict with ``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*`` keys) from any storage URL, weights only.
segment-anything's own builders hard-code 1024 px; ours take ``img_size`` so that tests and demos
run a tiny model (``vit_tiny_test``) and a 1024-px checkpoint can run at a smaller size, with its
absolute and relative position embeddings interpolated.

:class:`SamMaskPredictor` implements :class:`pdso_ray.method.refiners.MaskPredictor`: embed an
image once, then answer N prompts in one decoder call.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from pdso_ray.models.conv_stem import conv_stem
from pdso_ray.models.checkpoints import check_keys, load_state_dict_from_url
from pdso_ray.storage import Storage

_DOWNLOAD_HINT = "official SAM checkpoints: https://github.com/facebookresearch/segment-anything#model-checkpoints"


@dataclass(frozen=True)
class SamSpec:
    """Shape of a SAM model. Defaults are those of the official models (segment-anything's
    ``_build_sam``); ``img_size`` is the native input side of the architecture.

    ``stem_width`` > 0 replaces the encoder's linear patchify (``image_encoder.patch_embed.proj``,
    a P×P stride-P convolution) with :func:`~pdso_ray.models.conv_stem.conv_stem` of that first
    width: same token grid, extra ``image_encoder.patch_embed.proj.N.*`` keys (BatchNorm
    statistics included). 0 (the official models) keeps the linear patchify."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    stem_width: int = 0


SAM_REGISTRY: dict[str, SamSpec] = {
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11)),
    # Tests and demos: ~0.2 M parameters, 256 px, 16×16 embedding, 64×64 low-res masks.
    "vit_tiny_test": SamSpec(
        64, 2, 2, (1,), img_size=256, window_size=8, prompt_embed_dim=32,
        decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
    ),
    # The SAM stand-in (pdso_ray.standins): the tiny encoder on a convolutional stem, a 64-wide
    # prompt/decoder; ~0.43 M parameters. On the shapes world's photographs the linear patchify
    # learns far less from the same training (README, "Stand-in models").
    "vit_tiny_convstem": SamSpec(
        64, 2, 2, (1,), img_size=256, window_size=8, prompt_embed_dim=64,
        decoder_mlp_dim=128, decoder_num_heads=2, iou_head_hidden_dim=64, stem_width=16,
    ),
}


def _spec(arch: str) -> SamSpec:
    if arch not in SAM_REGISTRY:
        raise ValueError(f"unknown SAM arch {arch!r}; choose one of {sorted(SAM_REGISTRY)}")
    return SAM_REGISTRY[arch]


def build_sam_from_spec(spec: SamSpec) -> Sam:
    """A randomly initialised SAM of the given shape, in eval mode."""
    if spec.img_size <= 0 or spec.img_size % spec.patch_size:
        raise ValueError(
            f"img_size must be a positive multiple of patch_size {spec.patch_size}, got {spec.img_size}"
        )
    embed_side = spec.img_size // spec.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(embed_side, embed_side),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    if spec.stem_width:
        sam.image_encoder.patch_embed.proj = conv_stem(3, spec.encoder_embed_dim, spec.patch_size, spec.stem_width)
    return sam.eval()


def resize_position_embeddings(state_dict: dict[str, torch.Tensor], model: Sam) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint's size-dependent encoder parameters to ``model``'s input size.

    ``image_encoder.pos_embed`` (``1×h×w×C``) is resized bicubically over the patch grid; the
    ``rel_pos_h``/``rel_pos_w`` tables (``(2s-1)×C``) of the global-attention blocks are resized
    linearly, the same interpolation segment-anything's ``get_rel_pos`` applies at run time.
    Windowed blocks' tables do not depend on the input size and pass unchanged. Keys whose
    shapes differ in any other way are left for :func:`check_keys` to report.

    Returns:
        A new dict; the input is not modified.
    """
    expected = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key not in expected or tuple(value.shape) == tuple(expected[key].shape):
            continue
        target = expected[key].shape
        if key == "image_encoder.pos_embed" and value.ndim == 4 and value.shape[3] == target[3]:
            grid = value.permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=tuple(target[1:3]), mode="bicubic", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(value.dtype).contiguous()
        elif key.endswith((".rel_pos_h", ".rel_pos_w")) and value.ndim == 2 and value.shape[1] == target[1]:
            table = value.T[None].float()  # 1×C×L
            table = F.interpolate(table, size=target[0], mode="linear", align_corners=False)
            out[key] = table[0].T.to(value.dtype).contiguous()
    return out


def build_sam(
    arch: str,
    checkpoint: str | None,
    storage: Storage | None = None,
    img_size: int | None = None,
) -> Sam:
    """Build SAM ``arch`` at ``img_size`` (default: the arch's native size) and load a checkpoint.

    Args:
        arch: a key of :data:`SAM_REGISTRY` (``vit_b``, ``vit_l``, ``vit_h``, ``vit_tiny_test``).
        checkpoint: URL of an official-format state dict, read with ``weights_only=True``; None
            keeps the random initialisation (tests, benchmarks, ``allow_random_init`` demos).
        storage: storage for the URL (None = local defaults).
        img_size: input side in pixels, a multiple of 16; position embeddings are interpolated
            when it differs from the checkpoint's.

    Returns:
        The model on CPU in eval mode.

    Raises:
        FileNotFoundError / ValueError: missing or unreadable checkpoint, or one whose keys or
            shapes do not fit ``arch`` (the message names the URL and the keys).
    """
    spec = _spec(arch)
    if img_size is not None:
        spec = replace(spec, img_size=img_size)
    model = build_sam_from_spec(spec)
    if checkpoint is not None:
        state = load_state_dict_from_url(checkpoint, storage, hint=_DOWNLOAD_HINT)
        state = resize_position_embeddings(state, model)
        check_keys(model, state, checkpoint)
        model.load_state_dict(state)
    return model


def save_sam_checkpoint(model: Sam, url: str, storage: Storage | None = None) -> None:
    """Write ``model``'s state dict to ``url`` in the official flat layout (atomic write)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    (storage or Storage()).write_bytes(url, buf.getvalue())


class SamMaskPredictor:
    """SAM behind the :class:`~pdso_ray.method.refiners.MaskPredictor` protocol.

    :meth:`set_image` resizes the image's long side to the model's input size (SAM's
    ``ResizeLongestSide``), normalises, pads and embeds it once; :meth:`predict` answers all N
    prompts of a call in one prompt-encoder + mask-decoder pass over that embedding.

    On CUDA :meth:`set_image` and :meth:`predict` run under bf16 autocast (``bf16=True``); on
    CPU in fp32. Returned scores and logits are float32 either way.
    ``compile=True`` wraps the image encoder in ``torch.compile`` (worth it on GPU for many
    images; the first call pays the compilation).

    Args:
        model: a SAM from :func:`build_sam`; moved to ``device``.
        device: torch device (default: CUDA if available, else CPU).
        bf16: use bf16 autocast on CUDA.
        compile: compile the image encoder.
        points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh: settings of
            segment-anything's ``SamAutomaticMaskGenerator`` used by :meth:`generate_automatic`.
    """

    def __init__(
        self,
        model: Sam,
        *,
        device: str | torch.device | None = None,
        bf16: bool = True,
        compile: bool = False,
        points_per_side: int = 16,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self._encoder = torch.compile(model.image_encoder) if compile else model.image_encoder
        self._bf16 = bf16 and self.device.type == "cuda"
        self._generator = SamAutomaticMaskGenerator(
            model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
        )
        self._features: torch.Tensor | None = None
        self._original_size: tuple[int, int] | None = None
        self._input_size: tuple[int, int] | None = None

    @property
    def low_res_size(self) -> int:
        """Side ``L`` of the low-res logits and of ``mask_input`` (4 × the embedding side)."""
        return self.model.prompt_encoder.mask_input_size[0]

    def _autocast(self):
        if self._bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _check_image(image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) == 0:
            raise ValueError(
                f"image must be a non-empty H×W×3 uint8 RGB array, got shape {image.shape} dtype {image.dtype}"
            )

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """Embed an ``H×W×3`` uint8 RGB image; it stays set until the next call."""
        self._check_image(image)
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        with self._autocast():
            self._features = self._encoder(self.model.preprocess(x))
        self._original_size = (int(image.shape[0]), int(image.shape[1]))
        self._input_size = (int(resized.shape[0]), int(resized.shape[1]))

    def _check_prompts(self, boxes, points, point_labels, mask_input) -> int:
        sizes = set()
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes must be N×4 XYXY, got shape {boxes.shape}")
            sizes.add(boxes.shape[0])
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels must be given together")
        if points is not None:
            if points.ndim != 3 or points.shape[2] != 2 or point_labels.shape != points.shape[:2]:
                raise ValueError(
                    f"points must be N×P×2 with point_labels N×P, got {points.shape} and {point_labels.shape}"
                )
            sizes.add(points.shape[0])
        if mask_input is not None:
            side = self.low_res_size
            if mask_input.ndim != 4 or mask_input.shape[1:] != (1, side, side):
                raise ValueError(f"mask_input must be N×1×{side}×{side}, got shape {mask_input.shape}")
            sizes.add(mask_input.shape[0])
        if not sizes:
            raise ValueError("predict needs boxes, points or mask_input")
        if len(sizes) > 1:
            raise ValueError(f"prompt arrays disagree on N: {sorted(sizes)}")
        return sizes.pop()

    @torch.no_grad()
    def predict(
        self,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = True,
        return_masks: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Masks for N prompts in one decoder call; see ``MaskPredictor.predict`` for shapes.

        Boxes and points are in pixels of the image given to :meth:`set_image`. With
        ``return_masks=False`` the full-resolution masks (two bilinear resizes of N×M maps, the
        largest cost of a decoder call on CPU) are skipped and None is returned in their place.
        """
        if self._features is None:
            raise RuntimeError("call set_image(image) before predict")
        boxes, points, point_labels, mask_input = (
            None if a is None else np.asarray(a) for a in (boxes, points, point_labels, mask_input)
        )
        n = self._check_prompts(boxes, points, point_labels, mask_input)
        m = 3 if multimask else 1
        h, w = self._original_size
        side = self.low_res_size
        if n == 0:
            return (np.zeros((0, m, h, w), bool) if return_masks else None, np.zeros((0, m), np.float32),
                    np.zeros((0, m, side, side), np.float32))
        torch_points = torch_boxes = torch_masks = None
        if points is not None:
            coords = self.transform.apply_coords(np.asarray(points, dtype=np.float64), self._original_size)
            torch_points = (
                torch.as_tensor(coords, dtype=torch.float, device=self.device),
                torch.as_tensor(point_labels, dtype=torch.int, device=self.device),
            )
        if boxes is not None:
            coords = self.transform.apply_boxes(np.asarray(boxes, dtype=np.float64), self._original_size)
            torch_boxes = torch.as_tensor(coords, dtype=torch.float, device=self.device)
        if mask_input is not None:
            torch_masks = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)
        with self._autocast():
            sparse, dense = self.model.prompt_encoder(points=torch_points, boxes=torch_boxes, masks=torch_masks)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=self._features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        low_res = low_res.float()
        masks = None
        if return_masks:
            masks = self.model.postprocess_masks(low_res, self._input_size, self._original_size)
            masks = (masks > self.model.mask_threshold).cpu().numpy()
        return masks, iou.float().cpu().numpy(), low_res.cpu().numpy()

    def generate_automatic(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """SAM's automatic masks (a ``points_per_side``² grid of point prompts, filtered by
        predicted IoU and stability, then box NMS): ``(H×W bool mask, predicted IoU)`` pairs.

        The generator embeds ``image`` itself with the eager encoder, in fp32 (it converts its
        intermediate tensors to numpy, which has no bf16); it does not use or change the image
        set by :meth:`set_image`.
        """
        self._check_image(image)
        records = self._generator.generate(image)
        return [(np.asarray(r["segmentation"], dtype=bool), float(r["predicted_iou"])) for r in records]
