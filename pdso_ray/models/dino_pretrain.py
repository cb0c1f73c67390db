"""DINO self-supervised pretraining of a :class:`DinoBackbone`: student, EMA teacher, one step.

:class:`DinoPretrainer` holds everything a training loop needs and nothing distributed: the student
(backbone + projection head, one ``nn.Module`` so DDP can wrap it), the EMA teacher, the DINO loss
(and optionally iBOT's masked-patch loss), AdamW and the schedules.
A loop calls :meth:`~DinoPretrainer.step` with raw uint8 batches; augmentation runs inside, on the
trainer's device. :meth:`~DinoPretrainer.state_dict` /
:meth:`~DinoPretrainer.load_state_dict` checkpoint and resume exactly (same next step);
:meth:`~DinoPretrainer.teacher_backbone_state_dict` exports the teacher backbone in the official
DINO release layout, which :func:`pdso_ray.models.dino.build_dino` loads.

Under DDP: ``trainer.wrap_student(lambda m: DistributedDataParallel(m, ...))`` after building the
trainer on the worker's device, and ``reduce_mean=`` an all-reduce mean, so the loss centres see
every worker's batch; pass each worker's ``rank`` so its augmentations differ. Each worker reads
its own slice of the data, the same number of batches per epoch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from pdso_ray.method.augment import seeded_generator
from pdso_ray.method.features import saliency_from_attention
from pdso_ray.method.multicrop import CropSpec, MultiCropConfig, multicrop
from pdso_ray.method.self_distillation import (
    CollapseMeter,
    DinoLoss,
    MaskedPatchLoss,
    ReduceMean,
    border_ring_share,
    clip_gradients,
    cosine_schedule,
    ema_update,
    last_layer_frozen,
    random_patch_masks,
    teacher_temperature,
    weight_decay_groups,
)
from pdso_ray.models.dino import DINO_SPECS, DinoBackbone, create_vit, to_model_input
from pdso_ray.models.dino_head import DinoHead


def _standin_crops() -> MultiCropConfig:
    """The views of the recipe below: 2 global views, no local ones, strong brightness/contrast."""
    return MultiCropConfig(global_crop=CropSpec(64, (0.5, 1.0)), num_local=0,
                           brightness=0.8, contrast=0.8, saturation=0.4)


@dataclass(frozen=True)
class DinoPretrainConfig:
    """Every hyperparameter of a pretraining run. Epoch-valued fields may be fractional; the
    schedules run per step over ``epochs × steps_per_epoch`` steps.

    The defaults are the recipe of the demo's stand-in backbone (``vit_tiny_reg4`` trained on
    synthetic data; batch 64 of 96×96 images), found by a search on held-out synthetic classes.
    Where it departs from DINO's published ViT-S recipe, on purpose:

    - no local views, and brightness/contrast jitter ±0.8: local views are mostly background, and
      the background's colours are shared by every view of an image, so with locals (or mild
      jitter) the teacher learns to encode the background and the last block's CLS attention
      settles on it (saliency inverted, pooled features averaging background);
    - lr 2e-3 (DINO: 5e-4·batch/256) and teacher momentum 0.99 → 1 (DINO: 0.996 → 1): a
      2-block model on ~2,500 images needs to move fast; 0.996 stayed near-uniform;
    - K = 1024 prototypes and a 256/64 head (DINO: 65,536 and 2048/256).

    For ImageNet-scale runs of ViT-S/8 use DINO's values: lr 5e-4·batch/256, min_lr 1e-6, warm-up
    10 epochs, weight decay 0.04 → 0.4, momentum 0.996 → 1, teacher temperature 0.04 → 0.07 over
    30 epochs, out_dim 65,536, hidden 2048, bottleneck 256, clip 3.0, last layer frozen 1 epoch,
    2 global views (0.4-1) at 224 and 10 local views (0.05-0.4) at 96.

    ``lr`` is the peak learning rate as used (scale it with the total batch outside).
    ``patch_loss_weight`` 0 turns the masked-patch term (and the mask token) off.
    """

    arch: str = "vit_tiny_reg4"
    img_size: int = 64  # the backbone's native grid; normally the global crop size
    epochs: int = 60
    steps_per_epoch: int = 40
    # projection head
    out_dim: int = 1024
    head_hidden_dim: int = 256
    head_bottleneck_dim: int = 64
    head_layers: int = 3
    norm_last_layer: bool = True
    # views
    crops: MultiCropConfig = field(default_factory=_standin_crops)
    # optimiser
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 2.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient norm; 0 = no clipping
    freeze_last_layer_epochs: float = 1.0
    # teacher
    momentum: float = 0.99
    momentum_end: float = 1.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    center_momentum: float = 0.9
    # masked patches (iBOT)
    patch_loss_weight: float = 0.0
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_prob: float = 0.5
    patch_teacher_temp: float = 0.04
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DinoPretrainConfig:
        """Inverse of ``dataclasses.asdict`` (nested crop specs, tuples from lists)."""
        d = dict(d)
        crops = dict(d.pop("crops", {}))
        for key in ("global_crop", "local_crop"):
            if key in crops:
                spec = dict(crops[key])
                spec["scale"] = tuple(spec["scale"])
                crops[key] = CropSpec(**spec)
        for key in ("ratio", "blur_sigma"):
            if key in crops:
                crops[key] = tuple(crops[key])
        if "mask_ratio" in d:
            d["mask_ratio"] = tuple(d["mask_ratio"])
        return cls(crops=MultiCropConfig(**crops), **d)


class DinoStudent(nn.Module):
    """Backbone + projection head as one module (what DDP wraps), and the teacher's twin.

    ``forward`` runs the backbone once per crop size and the head once on all CLS tokens and once
    on the selected patch tokens of the global views (iBOT's masked patches).
    """

    def __init__(self, backbone: DinoBackbone, head: DinoHead, mask_token: bool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim)) if mask_token else None

    def encode(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS (B×D) and patch tokens (B×N×D) after the final norm; ``masks`` (B×N bool) swaps
        masked patch embeddings for the mask token before the position embedding, as iBOT does."""
        vit = self.backbone.vit
        if masks is not None and self.mask_token is None:
            raise ValueError("masks given but this model has no mask token (patch_loss_weight is 0)")
        t, rope = self.backbone.tokens(x, masks, self.mask_token)
        for block in vit.blocks:
            t = self.backbone.block(block, t, rope)
        t = vit.norm(t)
        return t[:, 0], t[:, vit.num_prefix_tokens:]

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, patches: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the views.

        Args:
            global_crops: (2B)×3×G×G; local_crops: (NB)×3×L×L or None.
            masks: (2B)×N bool, patches of the global views replaced by the mask token, or None.
            patches: (2B)×N bool, the global views' patches whose logits to return, or None.

        Returns:
            CLS logits ((2B + NB)×K, crop-major, globals first) and the logits of the selected
            patches (M×K in the order of ``patches.nonzero()``), or None without ``patches``.
        """
        cls_g, tokens = self.encode(global_crops, masks)
        cls = [cls_g]
        if local_crops is not None and local_crops.shape[0]:
            cls.append(self.encode(local_crops)[0])
        cls_logits = self.head(torch.cat(cls))
        patch_logits = self.head(tokens[patches]) if patches is not None else None
        return cls_logits, patch_logits


def untrained_backbone(arch: str, img_size: int) -> DinoBackbone:
    """A freshly initialised backbone ``arch`` (a ``DINO_SPECS`` name), built as
    :func:`pdso_ray.models.dino.build_dino` builds it, without its random-weights warning: here
    random weights are the starting point of training, not a mistake."""
    if arch not in DINO_SPECS:
        raise ValueError(f"unknown DINO architecture {arch!r}; known: {', '.join(DINO_SPECS)}")
    return DinoBackbone(create_vit(arch, img_size), arch, pretrained=False)


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP (or similar ``.module``) wrapper."""
    return getattr(module, "module", module)


class DinoPretrainer:
    """Student, EMA teacher, losses and optimiser of one pretraining run (no distributed code).

    Args:
        cfg: the run's hyperparameters.
        device: where the models, the augmentation and the step run.
        reduce_mean: cross-worker mean of a tensor, for the loss centres (DDP: all-reduce / world
            size); identity on one process.
        rank: this worker's index. The augmentations of step ``s`` are drawn from a generator
            seeded with ``(cfg.seed, rank, s)``: workers see different views, and a resumed run
            draws exactly what the uninterrupted one would have, on every worker, with no
            generator state to checkpoint. The weights are initialised from ``cfg.seed`` alone,
            so every worker starts from the same model.
    """

    def __init__(self, cfg: DinoPretrainConfig, device: torch.device | str = "cpu",
                 reduce_mean: ReduceMean | None = None, rank: int = 0):
        if cfg.epochs < 1 or cfg.steps_per_epoch < 1:
            raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {cfg.epochs}, {cfg.steps_per_epoch}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.reduce_mean = reduce_mean or (lambda x: x)
        # Weights are initialised from the seed, so every worker starts from the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            backbone = untrained_backbone(cfg.arch, cfg.img_size)
            head = DinoHead(backbone.embed_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                            cfg.head_layers, cfg.norm_last_layer)
            student = DinoStudent(backbone.train(), head, mask_token=cfg.patch_loss_weight > 0)
        self.student: nn.Module = student.to(self.device)
        self.teacher = copy.deepcopy(student).to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dino_loss = DinoLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(self.device)
        self.patch_loss = (MaskedPatchLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum).to(self.device)
                           if cfg.patch_loss_weight > 0 else None)
        self.optimizer = torch.optim.AdamW(weight_decay_groups(student), lr=0.0)
        self.rank = rank
        self.global_step = 0
        self.collapse = CollapseMeter(cfg.out_dim)

    # -- wiring --
    def wrap_student(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the student by ``wrap(student)`` (e.g. DDP); the optimiser keeps its
        parameters, the teacher follows the wrapped module's ``.module``."""
        self.student = wrap(self.student)

    @property
    def epoch(self) -> float:
        """Fractional epoch of the next step."""
        return self.global_step / self.cfg.steps_per_epoch

    def schedule(self, step: int | None = None) -> dict[str, float]:
        """Learning rate, weight decay, teacher momentum and temperatures at ``step`` (default:
        the next one)."""
        c = self.cfg
        s = self.global_step if step is None else step
        per = c.steps_per_epoch
        total = c.total_steps
        return {
            "lr": cosine_schedule(s, total, c.lr, c.min_lr, warmup_steps=round(c.warmup_epochs * per)),
            "weight_decay": cosine_schedule(s, total, c.weight_decay, c.weight_decay_end),
            "momentum": cosine_schedule(s, total, c.momentum, c.momentum_end),
            "teacher_temp": teacher_temperature(s, round(c.warmup_teacher_temp_epochs * per),
                                                c.warmup_teacher_temp, c.teacher_temp),
        }

    # -- training --
    def step(self, images: np.ndarray | torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch.

        Args:
            images: B×H×W×3 uint8 RGB (numpy or torch, any device), one size for the batch.

        Returns:
            Scalars: ``loss`` (and ``dino_loss``/``patch_loss`` when the patch term is on), the
            schedule values used, the batch's teacher entropies (see :class:`CollapseMeter`),
            ``augment_s`` and ``step_s`` (wall seconds), ``step`` (index of this step).

        Raises:
            FloatingPointError: the loss is not finite (the run has diverged).
        """
        c = self.cfg
        t0 = time.perf_counter()
        sched = self.schedule()
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = sched["lr"]
            if i == 0:
                group["weight_decay"] = sched["weight_decay"]
        x = torch.as_tensor(images).to(self.device, non_blocking=True)
        gen = seeded_generator(c.seed, self.rank, self.global_step)
        crops = multicrop(x, c.crops, gen)
        b = x.shape[0]
        masks = None
        if self.patch_loss is not None:
            grid = c.crops.global_crop.size // self.backbone.patch_size
            masks = random_patch_masks(2 * b, grid, c.mask_ratio, c.mask_prob, gen).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_aug = time.perf_counter() - t0

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.amp and self.device.type == "cuda"):
            with torch.no_grad():
                t_cls, t_patch = self.teacher(crops.global_crops, patches=masks)
            s_cls, s_patch = self.student(crops.global_crops, crops.local_crops, masks, patches=masks)
        dino = self.dino_loss(s_cls, t_cls, sched["teacher_temp"], self.reduce_mean)
        loss = dino
        metrics: dict[str, float] = {}
        if self.patch_loss is not None:
            patch = self.patch_loss(s_patch, t_patch, masks, c.patch_teacher_temp, self.reduce_mean)
            loss = dino + c.patch_loss_weight * patch
            metrics.update(dino_loss=dino.item(), patch_loss=patch.item())
        loss_value = loss.item()
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"DINO loss is {loss_value} at step {self.global_step}")

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        student = _unwrap(self.student)
        if c.clip_grad > 0:
            clip_gradients(student.parameters(), c.clip_grad)
        if last_layer_frozen(self.epoch, c.freeze_last_layer_epochs):
            for p in student.head.last_layer_parameters():
                p.grad = None
        self.optimizer.step()
        ema_update(self.teacher, student, sched["momentum"])

        probs = self.dino_loss.teacher_probs(t_cls, sched["teacher_temp"])
        metrics.update(self.collapse.update(probs))
        metrics.update(loss=loss_value, step=self.global_step, augment_s=t_aug,
                       step_s=time.perf_counter() - t0, **sched)
        self.global_step += 1
        return metrics

    def end_epoch(self) -> dict[str, float]:
        """This worker's collapse diagnostics since the last call (see :class:`CollapseMeter`);
        resets them."""
        summary = self.collapse.summary()
        self.collapse.reset()
        return summary

    # -- the teacher as a feature extractor --
    @property
    def backbone(self) -> DinoBackbone:
        """The student's backbone (what is trained)."""
        return _unwrap(self.student).backbone

    def teacher_backbone(self) -> DinoBackbone:
        """The teacher's backbone (what is exported), in eval mode; do not modify it."""
        return self.teacher.backbone

    @torch.no_grad()
    def saliency_probe(self, images: np.ndarray | torch.Tensor) -> dict[str, float]:
        """Label-free health check of the teacher on fixed images (B×H×W×3 uint8): the share of
        images whose CLS-attention saliency is higher on the border ring of patches than inside
        (good runs ~0.2-0.4, failed ones > 0.6; see
        :func:`pdso_ray.method.self_distillation.border_ring_share`)."""
        x = to_model_input(torch.as_tensor(images), self.cfg.img_size, device=self.device)
        _, attention = self.teacher_backbone()(x)
        return {"border_ring_share": border_ring_share(saliency_from_attention(attention))}

    # -- checkpoints --
    def teacher_backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher backbone's weights on the CPU, keyed as the official DINO release files
        (``cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*``, plus ``reg_token``
        for a backbone with registers): ``torch.save`` it and point ``models.dino.checkpoint``
        at the file."""
        return {k: v.detach().cpu().clone() for k, v in self.teacher.backbone.vit.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit on the same device: models, optimiser, loss
        centres, step and config (plain types; loads with ``weights_only=True``). Under DDP
        rank 0's copy serves every worker: the models are in sync and the augmentation draws
        depend on the step only."""
        state = {
            "student": _unwrap(self.student).state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "global_step": self.global_step,
            "config": asdict(self.cfg),
        }
        if self.patch_loss is not None:
            state["patch_loss"] = self.patch_loss.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output. The architecture must match (strict loading);
        a different config is allowed (e.g. more epochs) and takes effect from the next step."""
        _unwrap(self.student).load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        if self.patch_loss is not None:
            if "patch_loss" not in state:
                raise ValueError("checkpoint has no patch_loss state but this run uses the masked-patch term")
            self.patch_loss.load_state_dict(state["patch_loss"])
        self.global_step = int(state["global_step"])
        self.collapse.reset()


# -- how much memory a step takes --
def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _step_memory_here(cfg: DinoPretrainConfig, input_size: int) -> tuple[int, int]:
    torch.set_num_threads(1)
    trainer = DinoPretrainer(replace(cfg, steps_per_epoch=2), "cpu")
    images = np.zeros((3, input_size, input_size, 3), np.uint8)
    trainer.step(images[:1])
    one = _peak_rss_bytes()
    trainer.step(images)
    return one, (_peak_rss_bytes() - one) // 2


def step_memory(cfg: DinoPretrainConfig, input_size: int) -> tuple[int, int]:
    """``(bytes, bytes per image)``: the peak memory of a CPU training process of this recipe
    after a step of one ``input_size``² image, and what each further image of a batch adds.
    Measured, not modelled: one step of 1 and one of 3 images in a fresh process (so that the
    peak is this recipe's alone), on one thread; seconds for a small ViT, ~30 s for ViT-S/8."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_step_memory_here, (cfg, input_size))
