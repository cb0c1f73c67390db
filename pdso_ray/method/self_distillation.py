"""DINO self-distillation: the loss, its schedules, the EMA teacher and collapse diagnostics.

Caron et al. 2021 (DINO), with the masked-patch term of Zhou et al. 2022 (iBOT). Pure torch (no
timm, no distributed code): the trainer in :mod:`pdso_ray.models.dino_pretrain` composes these.

The loss (DINO eq. 1-3). For teacher logits ``t`` of the 2 global views and student logits ``s``
of all V views (globals first), with centre ``c``, temperatures ``τ_t`` and ``τ_s``:

    q_i = softmax((t_i - c) / τ_t),   log p_v = log_softmax(s_v / τ_s)
    L = mean over pairs (i, v), v ≠ i, of  mean over images of  -Σ_k q_i[k] log p_v[k]

after which ``c ← m·c + (1-m)·mean(t)`` over the step's teacher outputs (all workers). Centring
stops one prototype from dominating, the low teacher temperature (sharpening) stops the uniform
collapse; either alone collapses (within ~100 steps in our probes).

The masked-patch term (iBOT eq. 2) distils the teacher's per-patch distribution of each
unmasked global view into the student's prediction for the masked patches of the same view,
with its own centre and temperature: it gives patch tokens, which PDSO pools and clusters, a
target of their own, where DINO's CLS loss only shapes them indirectly. On the synthetic demo
data it did not help (600 steps, same seed: saliency-pooled k-means purity 0.505 vs 0.58 without
it, saliency IoU 0.32 vs 0.39): there the patch tokens already separate the classes at random
init (pooled over the true object mask, purity 1.0); what training must fix is the saliency.

Written here rather than taken from the ``lightly`` package (1.6.0): lightly requires
``pytorch_lightning`` and ``hydra-core`` (plus their own dependencies) for what is ~40 lines, and
its DINO loss keeps its centre update and distributed all-reduce inside the module; here the
caller passes ``reduce_mean`` (identity on one process, an all-reduce mean under DDP). The unit
tests check the vectorised loss against the paper's double loop.

Schedules are functions of the global step, like DINO's per-iteration arrays: linear warm-up, then
a half cosine from the base to the final value at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

ReduceMean = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ---- schedules ------------------------------------------------------------------------------------
def cosine_schedule(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Value at ``step`` (0-based) of: linear ``warmup_start → base`` over ``warmup_steps``, then
    ``final + (base - final)·(1 + cos(π·u))/2`` with ``u`` from 0 (end of warm-up) to 1
    (``total_steps - 1``); ``final`` from then on."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                         f"got {total_steps}, {warmup_steps}")
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    span = total_steps - 1 - warmup_steps
    u = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * u))


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """DINO's teacher temperature: linear ``start → end`` over ``warmup_steps``, then ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


# ---- the loss -------------------------------------------------------------------------------------
class Centering(nn.Module):
    """The running centre of teacher outputs (a 1×K buffer, saved in ``state_dict``)."""

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"center momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, reduce_mean: ReduceMean = _identity) -> None:
        """EMA of the mean of N×K (or …×K) teacher logits; ``reduce_mean`` averages the
        per-worker means across workers (equal batch sizes, as DINO assumes)."""
        batch_mean = reduce_mean(teacher_logits.detach().float().reshape(-1, self.center.shape[1]).mean(dim=0,
                                                                                                  keepdim=True))
        self.center.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)


class DinoLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher views and every other student view.

    Args:
        out_dim: number of prototypes K.
        student_temp: τ_s (0.1 in the paper).
        center_momentum: m of the centre's EMA (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp
        self.centering = Centering(out_dim, center_momentum)

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - c) / τ_t), float32, detached."""
        return F.softmax((teacher_logits.detach().float() - self.centering.center) / teacher_temp, dim=-1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float,
                reduce_mean: ReduceMean = _identity) -> torch.Tensor:
        """The loss, then the centre update.

        Args:
            student_logits: (V·B)×K, crop-major, the 2 global views first.
            teacher_logits: (2·B)×K, crop-major, the global views (no gradient flows into them).
            teacher_temp: τ_t for this step (see :func:`teacher_temperature`).
            reduce_mean: cross-worker mean for the centre update.

        Returns:
            0-d float32 tensor.
        """
        n_teacher = teacher_logits.shape[0]
        if n_teacher % 2 or student_logits.shape[0] % (n_teacher // 2) or student_logits.shape[0] < n_teacher:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must hold 2 views of the batch "
                             f"and student logits {tuple(student_logits.shape)} V >= 2 views of it")
        b = n_teacher // 2
        q = self.teacher_probs(teacher_logits, teacher_temp).view(2, b, -1)
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1).view(-1, b, q.shape[-1])
        cross = -torch.einsum("ibk,vbk->iv", q, log_p) / b  # 2×V: mean over images per pair
        keep = torch.ones_like(cross, dtype=torch.bool)
        keep[0, 0] = keep[1, 1] = False  # a teacher view never teaches its own student view
        loss = cross[keep].mean()
        self.centering.update(teacher_logits, reduce_mean)
        return loss


class MaskedPatchLoss(nn.Module):
    """iBOT's masked image modelling term: per global view, the teacher's centred, sharpened
    patch distribution (unmasked input) against the student's at the patches it saw masked.

    Args:
        out_dim: prototypes of the patch head, K.
        student_temp: τ_s (0.1).
        center_momentum: EMA momentum of the patch centre (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centering = Centering(out_dim, center_momentum)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, masks: torch.Tensor,
                teacher_temp: float, reduce_mean: ReduceMean = _identity) -> torch.Tensor:
        """The loss, then the centre update (from the masked positions' teacher logits: a sample
        of all patches, which spares the head a pass over the unmasked ones).

        Args:
            student_logits: M×K, the student's patch logits at the masked patches, in the order of
                ``masks.nonzero()`` (view-major).
            teacher_logits: M×K, the teacher's logits of the same patches, unmasked input.
            masks: V×N bool (V = 2B global views), True where the student saw the mask token;
                M = ``masks.sum()``.
            teacher_temp: τ_t of the patch term.

        Returns:
            0-d float32: per view, the mean over its masked patches (a view with none counts 0),
            averaged over the V views, as iBOT does.
        """
        m = int(masks.sum())
        if masks.ndim != 2 or student_logits.shape != teacher_logits.shape or student_logits.shape[0] != m:
            raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                             f"must be M×K with M = masks.sum() = {m} (masks {tuple(masks.shape)})")
        if m == 0:
            return student_logits.sum() * 0.0  # keeps the graph (DDP expects every step to have one)
        q = F.softmax((teacher_logits.detach().float() - self.centering.center) / teacher_temp, dim=-1)
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        per_patch = -(q * log_p).sum(dim=-1)  # M
        view = masks.nonzero()[:, 0]
        per_view = torch.zeros(masks.shape[0], device=per_patch.device).index_add_(0, view, per_patch)
        loss = (per_view / masks.sum(dim=1).clamp_min(1)).mean()
        self.centering.update(teacher_logits, reduce_mean)
        return loss


def random_patch_masks(n: int, grid: int, ratio: tuple[float, float], prob: float,
                       gen: torch.Generator) -> torch.Tensor:
    """n×grid² bool masks for the masked-patch term: with probability ``prob`` a view masks a
    random share (uniform in ``ratio``) of its patches, else none. Uniformly scattered patches
    rather than iBOT's blocks: on an 8×8 grid a block is most of the object. Drawn on the CPU."""
    if not 0 <= ratio[0] <= ratio[1] < 1:
        raise ValueError(f"mask ratio must satisfy 0 <= min <= max < 1, got {ratio}")
    cells = grid * grid
    share = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(n, generator=gen)
    share = torch.where(torch.rand(n, generator=gen) < prob, share, torch.zeros_like(share))
    count = (share * cells).round().long()
    rank = torch.rand(n, cells, generator=gen).argsort(dim=1).argsort(dim=1)
    return rank < count[:, None]


# ---- teacher, gradients, optimiser groups ---------------------------------------------------------
@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m·θ_t + (1-m)·θ_s`` for every parameter and floating-point buffer (same names and
    order in both); other buffers (BatchNorm's batch counter) are copied. The buffers are a
    BatchNorm's running statistics: the teacher runs in eval mode and never gathers its own."""
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for t_buffer, s_buffer in zip(teacher.buffers(), student.buffers(), strict=True):
        if t_buffer.is_floating_point():
            t_buffer.lerp_(s_buffer, 1.0 - momentum)
        else:
            t_buffer.copy_(s_buffer)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """DINO's clipping: each parameter's gradient is scaled to L2 norm ≤ ``max_norm`` on its own
    (not one global norm). Returns the norms before clipping (1-d float32, one per gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads)).float()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scale.to(grads[0].dtype).unbind()))
    return norms


def last_layer_frozen(epoch: float, freeze_epochs: float) -> bool:
    """DINO discards the prototype layer's gradients during the first ``freeze_epochs`` epochs
    (``epoch`` may be fractional): an untrained backbone would otherwise push the prototypes
    around before they carry meaning, which destabilises the start."""
    return epoch < freeze_epochs


def weight_decay_groups(module: nn.Module) -> list[dict]:
    """Two AdamW groups: weights (decayed), and biases plus 1-d parameters such as norms
    (``weight_decay`` fixed at 0), DINO's rule. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- diagnostics ----------------------------------------------------------------------------------
class CollapseMeter:
    """Per-epoch collapse diagnostics of the teacher's output distributions.

    ``update`` with each step's N×K teacher probabilities; ``summary`` gives
      - ``teacher_entropy``: mean per-image entropy H(q) in nats (→ 0: sharp; → log K: uniform
        collapse when the mean entropy is also log K),
      - ``mean_output_entropy``: H(mean q) (→ 0: every image on one prototype),
      - ``kl_div``: their difference, the mutual information between images and prototypes
        (→ 0 for either collapse),
      - ``prototypes_used``: prototypes that are the argmax of at least one image.
    """

    def __init__(self, out_dim: int):
        self.out_dim = out_dim
        self.reset()

    def reset(self) -> None:
        self._entropy_sum = 0.0
        self._count = 0
        self._prob_sum = torch.zeros(self.out_dim, dtype=torch.float64)
        self._argmax_counts = torch.zeros(self.out_dim, dtype=torch.int64)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> dict[str, float]:
        """Accumulate N×K probabilities; returns this batch's own three entropies."""
        p = probs.detach().float().reshape(-1, self.out_dim)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
        mean = p.mean(dim=0)
        self._entropy_sum += float(entropy.sum())
        self._count += p.shape[0]
        self._prob_sum += p.sum(dim=0).double().cpu()
        self._argmax_counts += torch.bincount(p.argmax(dim=1).cpu(), minlength=self.out_dim)
        h_mean = float(-(mean * mean.clamp_min(1e-12).log()).sum())
        return {"teacher_entropy": float(entropy.mean()), "mean_output_entropy": h_mean,
                "kl_div": h_mean - float(entropy.mean())}

    def summary(self) -> dict[str, float]:
        if self._count == 0:
            raise ValueError("CollapseMeter.summary() before any update()")
        mean = self._prob_sum / self._count
        h_mean = float(-(mean * mean.clamp_min(1e-12).log()).sum())
        h = self._entropy_sum / self._count
        return {"teacher_entropy": h, "mean_output_entropy": h_mean, "kl_div": h_mean - h,
                "prototypes_used": int((self._argmax_counts > 0).sum())}


def border_ring_excess(saliency: torch.Tensor) -> torch.Tensor:
    """Per image, mean saliency on the outermost ring of patches minus the mean inside it.

    Args:
        saliency: B×h×w (h, w >= 3), e.g. :func:`pdso_ray.method.features.saliency_from_attention`.

    Returns:
        B float32. Objects rarely touch the image border, so a model whose CLS attention picks out
        objects scores < 0 on most images; one whose attention sits on the background (a known
        failure of small ViTs without registers) scores > 0.
    """
    if saliency.ndim != 3 or min(saliency.shape[1:]) < 3:
        raise ValueError(f"saliency must be B×h×w with h, w >= 3, got {tuple(saliency.shape)}")
    s = saliency.float()
    ring = torch.ones(s.shape[1:], dtype=torch.bool, device=s.device)
    ring[1:-1, 1:-1] = False
    return s[:, ring].mean(dim=1) - s[:, ~ring].mean(dim=1)


def border_ring_share(saliency: torch.Tensor) -> float:
    """Share of images whose saliency is higher on the border ring than inside (see
    :func:`border_ring_excess`). A label-free collapse guard: ~0.2-0.4 for runs whose saliency
    finds the objects, > 0.6 for runs where it inverts or stays flat."""
    return float((border_ring_excess(saliency) > 0).float().mean())
