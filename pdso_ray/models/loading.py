"""Models from the config: the one place that decides "checkpoint, a model this run trained, or an
explicit random init".

Real runs name checkpoints (nothing is downloaded at run time); demos and tests set
``models.allow_random_init: true``. A random-init model is built from the run's ``seed`` (a torch
generator forked for the build), so every stage and every worker of a run builds the *same*
weights. A missing setting is an error that says which file to put where.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pdso_ray.config import ConfigError, DinoConfig, PipelineConfig, SamConfig
from pdso_ray.storage import Storage

_WHERE = {
    "dino": ("models.dino.checkpoint", "the official DINO release file for {arch} (e.g. "
             "dino_deitsmall8_pretrain.pth for vit_small_patch8) or a timm state dict of it"),
    "sam": ("models.sam.checkpoint", "the official segment-anything release file for {arch} "
            "(e.g. sam_vit_b_01ec64.pth for vit_b)"),
}


def require_checkpoint(kind: str, arch: str, checkpoint: str | None, allow_random_init: bool) -> None:
    """ConfigError unless ``checkpoint`` is set or random weights are allowed."""
    if checkpoint or allow_random_init:
        return
    key, what = _WHERE[kind]
    raise ConfigError(
        f"{key} is not set: put {what.format(arch=arch)} in a folder or bucket the workers can "
        f"read and set {key}=URL (weights are never downloaded at run time); "
        "or set models.allow_random_init=true for a smoke test with random weights")


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """A context in which torch's global RNG starts from ``seed`` and is restored afterwards: model
    builders draw their random initial weights from it, reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class DinoSource:
    """How to build the run's DINO backbone (picklable; stages hand it to their actors).

    ``checkpoint``: the URL to load, or None for random weights drawn from ``seed``.
    """

    arch: str
    image_size: int
    checkpoint: str | None
    seed: int

    @classmethod
    def from_config(cls, cfg: PipelineConfig, image_size: int | None = None,
                    checkpoint: str | None = None) -> DinoSource:
        """The backbone of ``models.dino``: its checkpoint, or random weights when
        ``models.allow_random_init`` (ConfigError otherwise). ``image_size`` overrides the
        native input size (``models.dino.image_size``); ``checkpoint`` the weights (a backbone
        this run trained: ``pretrain``'s teacher, ``denoise``'s fine-tuned backbone)."""
        dc: DinoConfig = cfg.models.dino
        if checkpoint:
            return cls(dc.arch, image_size or dc.image_size, checkpoint, cfg.seed)
        require_checkpoint("dino", dc.arch, dc.checkpoint, cfg.models.allow_random_init)
        return cls(dc.arch, image_size or dc.image_size, dc.checkpoint or None, cfg.seed)

    @classmethod
    def for_embedding(cls, cfg: PipelineConfig, run) -> DinoSource:
        """The backbone the denoised embedding e(x) sits on: ``denoise``'s fine-tuned one with
        ``denoise.finetune_blocks``, else ``models.dino``'s (``run``: the :class:`~pdso_ray.run_layout.RunLayout`)."""
        return cls.from_config(cfg, checkpoint=run.denoise_backbone if cfg.denoise.finetune_blocks else None)

    def build(self, storage: Storage | None = None):
        """The :class:`pdso_ray.models.dino.DinoBackbone`, on CPU, eval mode."""
        from pdso_ray.models.dino import build_dino

        with seeded_init(self.seed):
            return build_dino(self.arch, self.checkpoint, storage, img_size=self.image_size)


@dataclass(frozen=True)
class SamSource:
    """How to build the run's SAM (picklable): ``checkpoint`` URL, or random weights from ``seed``."""

    arch: str
    image_size: int | None
    checkpoint: str | None
    seed: int
    compile: bool = False

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> SamSource:
        sc: SamConfig = cfg.models.sam
        require_checkpoint("sam", sc.arch, sc.checkpoint, cfg.models.allow_random_init)
        return cls(sc.arch, sc.image_size, sc.checkpoint or None, cfg.seed, sc.compile)

    def predictor(self, storage: Storage | None = None, device=None, points_per_side: int = 16):
        """A :class:`pdso_ray.models.sam.SamMaskPredictor` for this SAM."""
        from pdso_ray.models.sam import SamMaskPredictor, build_sam

        with seeded_init(self.seed):
            model = build_sam(self.arch, self.checkpoint, storage, img_size=self.image_size)
        return SamMaskPredictor(model, device=device, compile=self.compile,
                                points_per_side=points_per_side)


def verify_checkpoint(kind: str, arch: str, url: str, storage: Storage, image_size: int | None = None) -> None:
    """Build ``kind``'s ``arch`` from the checkpoint at ``url`` (on the CPU, then dropped): raises
    ValueError when the file is not a weights-only checkpoint of that architecture (the message
    names the file and the keys), FileNotFoundError when it is gone. The preflight calls this, so
    that a bad file fails before any Ray work."""
    if kind == "dino":
        DinoSource(arch, image_size or 224, url, 0).build(storage)
    else:
        from pdso_ray.models.sam import build_sam

        build_sam(arch, url, storage, img_size=image_size)


def save_weights(storage: Storage, url: str, state: dict) -> None:
    """``torch.save`` of ``state`` (a state dict) to ``url``, atomically through ``storage``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(url, buffer.getvalue())


def load_classifier(storage: Storage, url: str):
    """The DFF classifier (a :class:`pdso_ray.method.denoise.Classifier`, eval mode) saved at
    ``url``; its shape, head and centre are read from the weights."""
    from pdso_ray.method.denoise import Classifier

    state = torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)
    return Classifier.from_state_dict(state).eval()


def load_embedding(storage: Storage, url: str) -> torch.nn.Module:
    """The denoising classifier h saved at ``url``, as a module mapping ...×D features to e(x)
    ...×D' (L2-normalised, like the embeddings k-means #2/#3 saw)."""
    import torch.nn.functional as F

    classifier = load_classifier(storage, url)

    class Embedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, x):
            return F.normalize(self.classifier.embed(x), dim=-1)

    return Embedding()
