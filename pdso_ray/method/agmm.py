"""AGMM as a fine-tuning loss (``finetune.loss: agmm``, docs/method.md §7).

Adaptive Gaussian mixture regularisation after AGMM (Luffy03/AGMM-SASS, CVPR 2023), with the
online-EM mixture of its TPAMI extension ("Modeling the Label Distributions for Weakly-Supervised
Semantic Segmentation", arXiv 2403.13225). The CVPR code recomputes everything per batch with a
fixed-bandwidth kernel and has no EM; the TPAMI paper describes an online EM and a maximisation
loss but its code is not public, so the mixture, its update and the likelihood term below are
our own reading of it, not a port.

Conventions:

* ``features``: ``B×D×h×w`` float, the backbone feature map (one cell per patch); ``logits``:
  ``B×(C+1)×H×W`` float, the prediction at the label's resolution, channel 0 background;
  ``target``: ``B×H×W`` int64 pseudo labels, 0 background, 1..C classes, 1000 ignore, 1001
  unlabelled.
* A pixel's feature is that of the cell containing it: pixel ``(y, x)`` lies in cell
  ``(y·h // H, x·w // W)`` (nearest-neighbour upsampling of the feature map).
* **Ignore (1000)** pixels take part in nothing: not in prototypes, not in the mixture's
  statistics, not in any loss term (they may be crop padding or pixels a refiner found too
  uncertain). A cell counts each of its labelled pixels once, so a cell half ignored weighs half.
* **Unlabelled (1001)** pixels belong to the image but the pseudo labels are unsure of them
  (``finetune.unlabelled``: where SPO and the raw label disagree, or a band on the label's
  borders). They are what the mixture supervises, as the CVPR code's extra class id: the E-step
  shares each among the classes present in its image by posterior responsibility, and the
  prediction is trained towards the Gaussian responses there (``soft_target``) and away from the
  image's absent classes (``absent``). They have no one-hot target, so no cross-entropy, no
  prototype, no ``response`` and no ``likelihood`` term.
* **Labelled pixels count for their own class** in the E-step (a hard responsibility): the
  mixture models each class's labelled features, and only unlabelled pixels are shared.
* **Background (0)** is a mixture component and a class like any other: it has prototypes, a
  Gaussian, a response and an absent-class penalty (CVPR AGMM treats VOC's background, class 0,
  the same way). Its features are diverse, so its Gaussian is broad; that is the model's job.
* A class is *present* in an image when one of its pixels is labelled there; the batch's
  classes are those present in any image, sorted (``K`` of them).

The mixture (:class:`GaussianMixture`) holds one diagonal Gaussian per label id ``0..C``.
Each training step: :func:`em_statistics` (E-step on the batch; its sums are additive, so
data-parallel callers all-reduce them), :meth:`GaussianMixture.update` (M-step blended into the
running parameters with a momentum), then :func:`agmm_loss` with the updated mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from scipy import ndimage
from torch import nn

IGNORE = 1000
UNLABELLED = 1001

# Logs inside the binary cross-entropies are clamped at -100, as torch's BCE does.
_LOG_FLOOR = -100.0
_PROB_CEIL = 1.0 - 1e-6  # keeps log(1 - p) finite for a saturated softmax


UNLABELLED_RULES = ("none", "disagreement", "border")


def mark_unlabelled(refined: np.ndarray, raw: np.ndarray | None, rule: str, width: int = 2) -> np.ndarray:
    """The training target of one pseudo label: ``refined`` (H×W integer ids, 0..C and 1000) with
    the pixels ``rule`` finds unsure set to :data:`UNLABELLED` (a new int64 array; 1000 stays).

    Rules (``finetune.unlabelled``): ``"none"`` (unchanged); ``"disagreement"``: where the refined
    label differs from ``raw`` (H×W, the raw label at the same size): the pixels SPO changed, whose
    class only one of the two sources vouches for; ``"border"``: pixels within ``width`` pixels
    (chessboard distance) of a pixel of another id, on either side of every boundary between ids:
    where the patch-level raw label and SAM's mask edge are least sure.
    """
    if rule not in UNLABELLED_RULES:
        raise ValueError(f"finetune.unlabelled must be one of {UNLABELLED_RULES}, got {rule!r}")
    target = np.asarray(refined).astype(np.int64)
    if rule == "none":
        return target
    if rule == "disagreement":
        if raw is None or np.shape(raw) != target.shape:
            raise ValueError(f"disagreement needs the raw label at the refined label's size {target.shape}, "
                             f"got {None if raw is None else np.shape(raw)}")
        unsure = np.asarray(raw) != target
    else:
        if width < 1:
            raise ValueError(f"finetune.unlabelled_width must be >= 1, got {width}")
        size = 2 * width + 1
        unsure = ndimage.maximum_filter(target, size, mode="nearest") != ndimage.minimum_filter(
            target, size, mode="nearest")
    return np.where(unsure & (target != IGNORE), UNLABELLED, target)


@dataclass(frozen=True)
class AgmmWeights:
    """Weights of the AGMM terms (``finetune.agmm_*``); CVPR AGMM weighs each of its terms 1.

    Attributes:
        soft_target: BCE between the prediction and the GMM response as a soft target.
        response: BCE between the response and the one-hot pseudo label.
        repulsion: mean Gaussian kernel between the batch's class prototypes.
        absent: ``-log(1 - p_k)`` for classes absent from the image.
        likelihood: negative log-likelihood of each pixel's feature under its class's Gaussian.
    """

    soft_target: float = 1.0
    response: float = 1.0
    repulsion: float = 1.0
    absent: float = 1.0
    likelihood: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AGMM weight {f.name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class CellLabels:
    """The pseudo labels of a batch seen from the feature cells (:func:`cell_labels`).

    Attributes:
        classes: ``K`` int64, the label ids present in the batch, sorted.
        counts: ``B×K×n`` float32, labelled pixels of each class in each cell (``n = h·w``,
            cells in row-major order).
        present: ``B×K`` bool, class ``classes[k]`` has a labelled pixel in image b.
        pixel_cell: ``H×W`` int64, the cell (row-major index) each pixel lies in.
        valid: ``B×H×W`` bool, the pixel is labelled (neither 1000 nor 1001).
        num_components: C + 1.
        unlabelled: ``B×H×W`` bool, the pixel is unlabelled (1001).
        unlabelled_counts: ``B×n`` float32, unlabelled pixels in each cell.
    """

    classes: torch.Tensor
    counts: torch.Tensor
    present: torch.Tensor
    pixel_cell: torch.Tensor
    valid: torch.Tensor
    num_components: int
    unlabelled: torch.Tensor
    unlabelled_counts: torch.Tensor


@dataclass(frozen=True)
class AgmmLoss:
    """``total``: the weighted sum (a differentiable scalar, to add to the cross-entropy);
    ``terms``: each unweighted term, detached, by the names of :class:`AgmmWeights`."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def cell_labels(target: torch.Tensor, feature_size: tuple[int, int], num_components: int) -> CellLabels:
    """Count the labelled pixels of every present class, and the unlabelled pixels, in every
    feature cell.

    Args:
        target: ``B×H×W`` integer labels, values in ``0..num_components-1``, 1000 or 1001.
        feature_size: ``(h, w)`` of the feature map, at most ``(H, W)``.
        num_components: C + 1 (the number of logit channels).
    """
    if target.ndim != 3 or target.dtype.is_floating_point:
        raise ValueError(f"target must be a B×H×W integer tensor, got shape {tuple(target.shape)} "
                         f"dtype {target.dtype}")
    b, height, width = target.shape
    h, w = int(feature_size[0]), int(feature_size[1])
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"feature size {h}×{w} must lie in 1×1..{height}×{width} (the label size)")
    unlabelled = target == UNLABELLED
    valid = (target != IGNORE) & ~unlabelled
    bad = valid & ((target < 0) | (target >= num_components))
    if bool(bad.any()):
        raise ValueError(f"target holds {int(target[bad][0])}: labels must be 0..{num_components - 1}, "
                         f"{IGNORE} (ignore) or {UNLABELLED} (unlabelled)")
    device = target.device
    classes = torch.unique(target[valid])
    k = len(classes)
    lut = torch.full((num_components,), -1, dtype=torch.int64, device=device)
    lut[classes] = torch.arange(k, device=device)
    rows = torch.arange(height, device=device) * h // height
    cols = torch.arange(width, device=device) * w // width
    pixel_cell = rows[:, None] * w + cols[None, :]
    n = h * w
    index = (torch.arange(b, device=device)[:, None, None] * k + lut[target.where(valid, 0)]) * n + pixel_cell
    counts = torch.bincount(index[valid], minlength=b * k * n).reshape(b, k, n).float()
    image_cell = torch.arange(b, device=device)[:, None, None] * n + pixel_cell
    unlabelled_counts = torch.bincount(image_cell[unlabelled], minlength=b * n).reshape(b, n).float()
    return CellLabels(classes, counts, counts.sum(dim=2) > 0, pixel_cell, valid, num_components,
                      unlabelled, unlabelled_counts)


class GaussianMixture(nn.Module):
    """One diagonal Gaussian per label id ``0..C`` over D-dimensional pixel features, learned
    online. Buffers, saved in ``state_dict()``:

    * ``means``, ``variances``: ``(C+1)×D`` float64;
    * ``updates``: ``C+1`` int64, the number of steps that updated each component; a component
      with 0 has never been seen and its parameters are undefined (it joins no E-step).

    There are no global mixing weights: with C = 919 classes and a handful per image, a global
    prior would mostly say "background"; the E-step uses each image's label shares instead.
    """

    def __init__(self, num_components: int, dim: int):
        super().__init__()
        if num_components < 1 or dim < 1:
            raise ValueError(f"num_components and dim must be >= 1, got {num_components}, {dim}")
        self.register_buffer("means", torch.zeros(num_components, dim, dtype=torch.float64))
        self.register_buffer("variances", torch.ones(num_components, dim, dtype=torch.float64))
        self.register_buffer("updates", torch.zeros(num_components, dtype=torch.int64))

    @property
    def seen(self) -> torch.Tensor:
        """``C+1`` bool: the component has parameters."""
        return self.updates > 0

    @torch.no_grad()
    def update(self, stats: torch.Tensor, momentum: float, variance_floor: float = 1e-3) -> None:
        """Blend one batch's M-step into the running parameters.

        ``stats``: ``(C+1)×(1+2D)`` from :func:`em_statistics` (summed over data-parallel ranks):
        per component the weight ``n``, ``Σ γ f`` and ``Σ γ f²``. For every component with
        ``n > 0`` the batch estimate is ``m̂ = Σγf / n``, ``v̂ = Σγf² / n − m̂²``. A component seen
        for the first time takes it as is; otherwise, with ``a = momentum``,
        ``m ← a·m + (1−a)·m̂`` and ``v ← a·v + (1−a)·v̂ + a(1−a)(m − m̂)²``, the exact variance of
        the two-part mixture (old weight ``a``, batch ``1−a``). Variances are floored at
        ``variance_floor`` times the batch's pooled mean variance (a class seen on a single pixel
        would otherwise get a zero variance). ``momentum = 0`` is a full EM step on the batch.
        """
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        c, d = self.means.shape
        if stats.shape != (c, 1 + 2 * d):
            raise ValueError(f"stats must be {c}×{1 + 2 * d}, got {tuple(stats.shape)}")
        stats = stats.to(self.means)
        n, s1, s2 = stats[:, 0], stats[:, 1:1 + d], stats[:, 1 + d:]
        hit = n > 0
        if not bool(hit.any()):
            return
        total = n.sum()
        pooled = (s2.sum(0) / total - (s1.sum(0) / total) ** 2).clamp_min(0).mean()
        floor = variance_floor * pooled + 1e-12
        nh = n[hit, None]
        mean_hat = s1[hit] / nh
        var_hat = (s2[hit] / nh - mean_hat**2).clamp_min(0)
        old_mean, old_var = self.means[hit], self.variances[hit]
        a = torch.where(self.seen[hit], momentum, 0.0).to(self.means)[:, None]
        mean = a * old_mean + (1 - a) * mean_hat
        var = a * old_var + (1 - a) * var_hat + a * (1 - a) * (old_mean - mean_hat) ** 2
        self.means[hit] = mean
        self.variances[hit] = var.clamp_min(floor)
        self.updates[hit] += 1


def _log_gauss(f: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """``log N(f_i; m_k, diag v_k)`` for ``f`` ``N×D`` and ``K×D`` parameters: ``N×K``, written with
    ``N×K`` products (no ``N×K×D`` tensor)."""
    inv = 1.0 / variances
    quad = (f * f) @ inv.T - 2.0 * f @ (means * inv).T + (means * means * inv).sum(1)
    log_det = torch.log(variances).sum(1)
    return -0.5 * (quad.clamp_min(0) + log_det + f.shape[1] * math.log(2 * math.pi))


def _e_step(features: torch.Tensor, labels: CellLabels, mixture: GaussianMixture):
    """Float64 cell features ``B·n×D``, per-cell class weights ``B·n×K`` (the batch's classes),
    the log mixture densities ``B·n`` (−inf where an image has no seen class) and the log density
    of each cell under each class's own Gaussian ``B·n×K``.

    Weights: a cell's labelled pixels count for their own class (hard); its unlabelled pixels are
    shared among the seen classes present in its image by posterior responsibility, the prior of
    class k in image b being its share of the image's labelled pixels among those classes (the
    label distribution).
    """
    b, d = features.shape[:2]
    f = features.detach().to(torch.float64).reshape(b, d, -1).transpose(1, 2).reshape(-1, d)
    counts = labels.counts.to(torch.float64)  # B×K×n
    seen = mixture.seen[labels.classes]  # K
    support = labels.present & seen  # B×K
    pixels = counts.sum(2)  # B×K
    prior = torch.where(support, pixels, 0.0)
    log_prior = torch.log(prior / prior.sum(1, keepdim=True).clamp_min(1))  # -inf off the support
    log_like = _log_gauss(f, mixture.means[labels.classes], mixture.variances[labels.classes])
    joint = log_like.reshape(b, counts.shape[2], -1) + log_prior[:, None, :]  # B×n×K
    log_density = torch.logsumexp(joint, dim=2)  # -inf when the support is empty
    has_support = support.any(1)[:, None, None]
    gamma = torch.where(has_support, torch.softmax(joint, dim=2), 0.0)
    unlabelled = labels.unlabelled_counts.to(torch.float64)  # B×n
    weight = counts.transpose(1, 2) + gamma * unlabelled[:, :, None]
    return f, weight.reshape(f.shape[0], -1), log_density.reshape(-1), log_like


@torch.no_grad()
def em_statistics(features: torch.Tensor, labels: CellLabels, mixture: GaussianMixture) -> torch.Tensor:
    """E-step sufficient statistics of one batch: ``(C+1)×(1+2D)`` float64, per component
    ``[Σ γ, Σ γ f, Σ γ f²]`` over labelled (γ = 1 for the own class) and unlabelled pixels (γ
    restricted to the classes present in the pixel's image, see :func:`_e_step`); zero for classes
    absent from the batch. Sums, so ranks can all-reduce them before :meth:`GaussianMixture.update`.

    Args:
        features: ``B×D×h×w`` (detached here; cast to float64).
        labels: :func:`cell_labels` of the batch's target at ``(h, w)``.
        mixture: the running mixture, before this batch's update.
    """
    _check(features, labels, mixture)
    f, weight, _, _ = _e_step(features, labels, mixture)
    d = f.shape[1]
    stats = torch.zeros(labels.num_components, 1 + 2 * d, dtype=torch.float64, device=f.device)
    stats[labels.classes] = torch.cat([weight.sum(0)[:, None], weight.T @ f, weight.T @ (f * f)], dim=1)
    return stats


@torch.no_grad()
def log_likelihood(features: torch.Tensor, labels: CellLabels, mixture: GaussianMixture) -> torch.Tensor:
    """Mean log-density per pixel of the semi-supervised mixture: a labelled pixel (of a seen
    class) under its own class's Gaussian, an unlabelled one under the mixture of its image's
    seen present classes with label-share priors — the quantity an EM step with ``momentum = 0``
    does not decrease. A float64 scalar; NaN when no pixel qualifies."""
    _check(features, labels, mixture)
    _, _, log_density, log_like = _e_step(features, labels, mixture)
    b, k, n = labels.counts.shape
    counts = (labels.counts.to(torch.float64) * mixture.seen[labels.classes][None, :, None]).transpose(1, 2)
    labelled = (counts.reshape(-1, k) * log_like).sum()
    unlabelled = labels.unlabelled_counts.to(torch.float64).reshape(-1)
    finite = torch.isfinite(log_density) & (unlabelled > 0)
    total = labelled + (log_density[finite] * unlabelled[finite]).sum()
    return total / (counts.sum() + unlabelled[finite].sum())


def _check(features: torch.Tensor, labels: CellLabels, mixture: GaussianMixture) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must be B×D×h×w, got shape {tuple(features.shape)}")
    b, d, h, w = features.shape
    if labels.counts.shape != (b, len(labels.classes), h * w):
        raise ValueError(f"labels are for {labels.counts.shape[0]} images of {labels.counts.shape[2]} "
                         f"cells, features {b} of {h}×{w}")
    if tuple(mixture.means.shape) != (labels.num_components, d):
        raise ValueError(f"mixture is {tuple(mixture.means.shape)}, features need "
                         f"{(labels.num_components, d)} (C+1 components × D)")


def _neg_log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """``-log(1 - exp(-x))`` for ``x >= 0``. ``x`` is floored at 1e-6 (value at most 13.8,
    gradient at most 1e6): a cell whose feature is another class's prototype would otherwise
    send an unbounded gradient."""
    return -torch.log(-torch.expm1(-x.clamp_min(1e-6)))


def agmm_loss(
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: CellLabels,
    mixture: GaussianMixture,
    weights: AgmmWeights = AgmmWeights(),
) -> AgmmLoss:
    """The AGMM terms of one batch (the cross-entropy is the caller's).

    Per image b and present class k the prototype ``μ_bk`` is the mean feature of the class's
    labelled pixels (differentiable, as CVPR AGMM's). The response of a cell with feature f is
    ``r_bk = exp(-½ · mean_d (f_d − μ_bkd)² / v_kd)`` with the mixture's variances ``v_k``
    (detached): CVPR AGMM's per-image kernel, with the per-class variance its code leaves out.
    Only classes present in the image have a response. Averaged over labelled pixels ("pixels"),
    over (present class, labelled pixel) pairs ("pairs"), or over both with the unlabelled pixels
    of images that have a labelled one ("+unlabelled"), with ``p = softmax(logits)``:

    * ``soft_target``: ½ · BCE(p_k, r_k), r_k a soft target (not detached, as in CVPR AGMM), pairs
      +unlabelled: on unlabelled pixels the responses are the only supervision;
    * ``response``: ½ · BCE(r_k, [label = k]), pairs;
    * ``repulsion``: mean over pairs of batch classes of
      ``exp(-½ · mean_d (ν_i − ν_j)² / ((v_i + v_j)/2))``, ν the batch prototype (pixel-weighted
      mean over the batch; CVPR AGMM sums over images instead, and uses a fixed bandwidth);
    * ``absent``: Σ over classes absent from the image of ``-log(1 − p_k)``, pixels +unlabelled;
    * ``likelihood``: ``½ · mean_d [(f_d − m_kd)² / v_kd + log v_kd + log 2π]`` of each labelled
      pixel's feature under its class's running Gaussian ``N(m_k, v_k)`` (detached: the term
      pulls features to their class), pixels — our reading of the TPAMI maximisation loss.

    Args:
        features: ``B×D×h×w`` float (the loss is computed in float32).
        logits: ``B×(C+1)×H×W`` float, at the label resolution.
        labels: :func:`cell_labels` of the target at ``(h, w)``.
        mixture: the running mixture, already updated with this batch (every present class seen).
        weights: the term weights.

    Returns:
        :class:`AgmmLoss`; every term is 0 when the batch has no labelled pixel.
    """
    _check(features, labels, mixture)
    b, d, h, w = features.shape
    if logits.ndim != 4 or logits.shape[0] != b or logits.shape[1] != labels.num_components \
            or logits.shape[2:] != labels.valid.shape[1:]:
        raise ValueError(f"logits must be {b}×{labels.num_components}×{tuple(labels.valid.shape[1:])}, "
                         f"got {tuple(logits.shape)}")
    if not bool(mixture.seen[labels.classes].all()):
        raise ValueError("agmm_loss needs a mixture updated with this batch: some present classes "
                         "have never been seen")
    f = features.float().reshape(b, d, h * w)  # B×D×n
    counts, present, classes = labels.counts, labels.present, labels.classes
    pres = present.float()
    valid = labels.valid.float()
    n_valid = valid.sum()
    # labelled pixels and the unlabelled ones of images with a labelled pixel (their responses)
    covered = (labels.valid | (labels.unlabelled & present.any(1)[:, None, None])).float()
    n_covered = covered.sum()
    n_pairs = (pres.sum(1) * covered.flatten(1).sum(1)).sum()
    var = mixture.variances[classes].float()  # K×D
    inv = 1.0 / var

    pixels = counts.sum(2)  # B×K
    proto = torch.einsum("bkn,bdn->bkd", counts, f) / pixels.clamp_min(1)[:, :, None]
    # mean_d (f - μ)² / v with B×K×n products only
    dist = (torch.einsum("bdn,kd->bkn", f * f, inv) - 2 * torch.einsum("bdn,bkd->bkn", f, proto * inv)
            + torch.einsum("bkd,kd->bk", proto * proto, inv)[:, :, None]).clamp_min(0) / d
    half = 0.5 * dist
    r = torch.exp(-half)  # B×K×n; only present classes enter the terms

    # soft_target: the prediction against the response, per pixel (nearest-upsampled response)
    logits = logits.float()
    prob = torch.softmax(logits, dim=1)
    p = prob.index_select(1, classes)  # B×K×H×W
    log_z = torch.logsumexp(logits, dim=1, keepdim=True)
    log_p = (logits.index_select(1, classes) - log_z).clamp_min(_LOG_FLOOR)
    log_q = torch.log1p(-p.clamp_max(_PROB_CEIL))
    r_pix = r[:, :, labels.pixel_cell]  # B×K×H×W
    bce = -(r_pix * log_p + (1 - r_pix) * log_q)
    soft_target = 0.5 * (bce * pres[:, :, None, None] * covered[:, None]).sum() / n_pairs.clamp_min(1)

    # response: BCE(r, one-hot) summed on cells, each labelled pixel counted once
    cell_valid = counts.sum(1, keepdim=True)  # B×1×n
    neg_log_r = half.clamp_max(-_LOG_FLOOR)
    response_sum = counts * neg_log_r + (cell_valid - counts) * _neg_log1m_exp(half)
    n_labelled_pairs = (pres.sum(1) * valid.flatten(1).sum(1)).sum()
    response = 0.5 * (response_sum * pres[:, :, None]).sum() / n_labelled_pairs.clamp_min(1)

    # repulsion between batch prototypes
    k = len(classes)
    if k >= 2:
        nu = torch.einsum("bkn,bdn->kd", counts, f) / pixels.sum(0).clamp_min(1)[:, None]
        pair_var = 0.5 * (var[:, None] + var[None, :])
        kernel = torch.exp(-0.5 * ((nu[:, None] - nu[None, :]) ** 2 / pair_var).mean(2))
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=kernel.device), diagonal=1)
        repulsion = kernel[upper].mean()
    else:
        repulsion = f.new_zeros(())

    # absent: classes of no labelled pixel of the image, on every labelled pixel. This is the one
    # term over all C+1 channels; p is scaled by _PROB_CEIL instead of clamped (one multiply, no
    # mask kept for the backward) and the sign goes on the small B×(C+1) mask.
    absent_mask = torch.ones(b, labels.num_components, device=logits.device)
    absent_mask[:, classes] = 1.0 - pres
    penalty = torch.einsum("bchw,bc->bhw", torch.log1p(prob * -_PROB_CEIL), -absent_mask)
    absent = (penalty * covered).sum() / n_covered.clamp_min(1)

    # likelihood under the running Gaussians
    mean = mixture.means[classes].float()
    quad = (torch.einsum("bdn,kd->bkn", f * f, inv) - 2 * torch.einsum("bdn,kd->bkn", f, mean * inv)
            + (mean * mean * inv).sum(1)[None, :, None]).clamp_min(0)
    nll = 0.5 * (quad + torch.log(var).sum(1)[None, :, None] + d * math.log(2 * math.pi)) / d
    likelihood = (counts * nll).sum() / n_valid.clamp_min(1)

    terms = {"soft_target": soft_target, "response": response, "repulsion": repulsion,
             "absent": absent, "likelihood": likelihood}
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return AgmmLoss(total, {name: value.detach() for name, value in terms.items()})
