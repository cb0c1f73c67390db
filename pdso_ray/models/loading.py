"""Models from the config: the one place that decides "checkpoint, or an explicit random init".

Real runs must name checkpoints (nothing is downloaded at run time); demos and tests set
``models.allow_random_init: true``. A missing setting is an error that says which file to put where.
"""

from __future__ import annotations

from pdso_ray.config import ConfigError, DinoConfig, SamConfig
from pdso_ray.storage import Storage

_WHERE = {
    "dino": ("models.dino.checkpoint", "the official DINO release file for {arch} (e.g. "
             "dino_deitsmall8_pretrain.pth for vit_small_patch8) or a timm state dict of it"),
    "sam": ("models.sam.checkpoint", "the official segment-anything release file for {arch} "
            "(e.g. sam_vit_b_01ec64.pth for vit_b)"),
}


def _require(kind: str, arch: str, checkpoint: str | None, allow_random_init: bool) -> None:
    if checkpoint or allow_random_init:
        return
    key, what = _WHERE[kind]
    raise ConfigError(
        f"{key} is not set: put {what.format(arch=arch)} in a folder or bucket the workers can "
        f"read and set {key}=URL (weights are never downloaded at run time); "
        "or set models.allow_random_init=true for a smoke test with random weights")


def build_dino_from_config(cfg: DinoConfig, storage: Storage, allow_random_init: bool):
    """The stage-1 DINO backbone (:class:`pdso_ray.models.dino.DinoBackbone`), on CPU, eval mode."""
    from pdso_ray.models.dino import build_dino

    _require("dino", cfg.arch, cfg.checkpoint, allow_random_init)
    return build_dino(cfg.arch, cfg.checkpoint or None, storage, img_size=cfg.image_size)


def build_sam_predictor_from_config(cfg: SamConfig, storage: Storage, allow_random_init: bool,
                                    device=None, points_per_side: int = 16):
    """A :class:`pdso_ray.models.sam.SamMaskPredictor` for the configured SAM."""
    from pdso_ray.models.sam import SamMaskPredictor, build_sam

    _require("sam", cfg.arch, cfg.checkpoint, allow_random_init)
    model = build_sam(cfg.arch, cfg.checkpoint or None, storage, img_size=cfg.image_size)
    return SamMaskPredictor(model, device=device, compile=cfg.compile,
                            points_per_side=points_per_side)
