"""Denoising-based feature fine-tuning, DFF (DESIGN §3.3): small-loss selection of clean labels.

Procedure (:func:`denoise`), over N images with pooled features x, flip features x', and k-means #1
labels y (C clusters):

1. train a linear classifier ``f`` on all (x, x', y) for ``epochs_f`` epochs;
2. per-image loss = cross-entropy of the mean of the logits of x and x'; per cluster keep the
   ``keep_ratio`` lowest-loss images -> S1 (:func:`small_loss_subset`);
3. train a linear ``g`` on S1 for ``epochs_g`` epochs; relabel every image with g's prediction and
   select S2 from g's losses against those labels, the same way;
4. train ``h`` (MLP D -> D' -> C) on S2 with g's labels for ``epochs_h`` epochs; its hidden layer is
   the embedding e(x) used from stage 4 on (:func:`embed_features`, :meth:`Classifier.embed`).

Scale: 1.28 M × 384 features and 919 classes on a CPU. Nothing is N×N; the data are read through a
:class:`FeatureSource`, block by block, so a caller holding Parquet row groups streams them and never
needs the whole matrix in memory; the only O(N) state is labels, masks and losses. Training is
minibatch Adam on the same pair loss that selects; loss and relabelling passes stream in fixed order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdso_ray.method.selection import keep_lowest_per_group

_SCORE_BATCH = 16384


# ---- data ------------------------------------------------------------------------------------------
class FeatureBlock(NamedTuple):
    """A block of rows: global row ids (b,) int64 and their features, b×D float32 each."""

    rows: np.ndarray
    feat: np.ndarray
    feat_flip: np.ndarray


class FeatureSource(Protocol):
    """N rows of (feature, flip feature), readable block by block.

    ``blocks(rng)`` yields :class:`FeatureBlock` s covering every row id in [0, num_rows) exactly
    once: in a fixed order when ``rng`` is None, else in an order drawn from ``rng`` (the trainer
    additionally permutes rows inside each block).
    """

    num_rows: int
    dim: int

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[FeatureBlock]: ...


class ChunkedFeatures:
    """A :class:`FeatureSource` over chunks loaded on demand (e.g. one Parquet row group each).

    Chunk ``i`` holds rows ``offsets[i] .. offsets[i+1]``, where offsets are the running sum of
    ``chunk_sizes``; ``load_chunk(i)`` returns its (feat, feat_flip), each size_i×D. With an ``rng``,
    chunks come in a random order and are merged into blocks of at least ``shuffle_rows`` rows, so a
    minibatch mixes several chunks even when files were written class by class (memory: one block).
    """

    def __init__(self, chunk_sizes: Sequence[int], load_chunk: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 dim: int, shuffle_rows: int = 131072):
        sizes = np.asarray(chunk_sizes, dtype=np.int64)
        if sizes.ndim != 1 or (sizes < 0).any():
            raise ValueError(f"chunk_sizes must be non-negative integers, got {list(chunk_sizes)[:10]}")
        if dim < 1 or shuffle_rows < 1:
            raise ValueError(f"dim and shuffle_rows must be >= 1, got dim={dim} shuffle_rows={shuffle_rows}")
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_rows = int(self.offsets[-1])
        self.dim = int(dim)
        self.shuffle_rows = int(shuffle_rows)
        self._load = load_chunk

    @classmethod
    def from_arrays(cls, feats: np.ndarray, feats_flip: np.ndarray) -> ChunkedFeatures:
        """In-memory N×D arrays as one chunk: exact global shuffling, no copies."""
        if feats.ndim != 2 or feats.shape != feats_flip.shape:
            raise ValueError(f"feats {feats.shape} and feats_flip {feats_flip.shape} must both be N×D")
        return cls([feats.shape[0]], lambda _: (feats, feats_flip), feats.shape[1])

    def _chunk(self, i: int) -> FeatureBlock:
        feat, flip = self._load(i)
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        if feat.shape != (stop - start, self.dim) or flip.shape != feat.shape:
            raise ValueError(f"chunk {i} has shapes {feat.shape}/{flip.shape}, expected {(stop - start, self.dim)}")
        return FeatureBlock(np.arange(start, stop, dtype=np.int64), feat, flip)

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[FeatureBlock]:
        n_chunks = len(self.offsets) - 1
        if rng is None:
            for i in range(n_chunks):
                yield self._chunk(i)
            return
        pending: list[FeatureBlock] = []
        for i in rng.permutation(n_chunks):
            pending.append(self._chunk(int(i)))
            if sum(len(b.rows) for b in pending) >= self.shuffle_rows:
                yield _merge(pending)
                pending = []
        if pending:
            yield _merge(pending)


def _merge(blocks: list[FeatureBlock]) -> FeatureBlock:
    if len(blocks) == 1:
        return blocks[0]
    return FeatureBlock(*(np.concatenate(parts) for parts in zip(*blocks)))


# ---- model -----------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """Linear (``hidden_dim=None``: f, g) or MLP D -> D' -> C (h) classifier on image features.

    Inputs are L2-normalised first (pooled features already are), so the same module applies to
    per-patch tokens, whose norms differ: any ...×D tensor works, as a 1×1 convolution would.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int | None = None):
        super().__init__()
        if in_dim < 1 or num_classes < 1 or (hidden_dim is not None and hidden_dim < 1):
            raise ValueError(f"bad classifier shape: in_dim={in_dim} num_classes={num_classes} "
                             f"hidden_dim={hidden_dim}")
        self.hidden = None if hidden_dim is None else nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.out = nn.Linear(hidden_dim or in_dim, num_classes)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> Classifier:
        """Rebuild a saved classifier; its shape is read from the weights."""
        out_w = state_dict["out.weight"]
        if "hidden.0.weight" in state_dict:
            hidden_w = state_dict["hidden.0.weight"]
            model = cls(hidden_w.shape[1], out_w.shape[0], hidden_w.shape[0])
        else:
            model = cls(out_w.shape[1], out_w.shape[0])
        model.load_state_dict(state_dict)
        return model

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations e(x), ...×D' (not normalised); only for the MLP (h)."""
        if self.hidden is None:
            raise ValueError("a linear classifier has no hidden layer to embed with (use hidden_dim)")
        return self.hidden(F.normalize(x.float(), dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ...×C."""
        x = F.normalize(x.float(), dim=-1)
        return self.out(x if self.hidden is None else self.hidden(x))

    def pair_logits(self, x: torch.Tensor, x_flip: torch.Tensor) -> torch.Tensor:
        """Mean of the logits of an image and its flip (the per-image prediction of DFF)."""
        if self.hidden is None:
            # Linear: the mean of the logits is the logits of the mean input, at half the cost.
            mean_input = (F.normalize(x.float(), dim=-1) + F.normalize(x_flip.float(), dim=-1)) / 2
            return self.out(mean_input)
        return (self(x) + self(x_flip)) / 2


# ---- training and scoring --------------------------------------------------------------------------
def _check_labels(labels: np.ndarray, num_rows: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_rows,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be {num_rows} integers, got shape {labels.shape} {labels.dtype}")
    if num_rows and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64, copy=False)


def _to_device(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A minibatch as a float32 tensor. Copied: slices of Arrow-backed features are read-only,
    which torch.from_numpy warns about, and a minibatch copy costs next to nothing."""
    return torch.tensor(np.asarray(a, dtype=np.float32), device=device)


def train_classifier(source: FeatureSource, labels: np.ndarray, num_classes: int, *,
                     mask: np.ndarray | None = None, hidden_dim: int | None = None, epochs: int,
                     lr: float, batch_size: int, seed: int,
                     device: torch.device | str = "cpu") -> Classifier:
    """Train a :class:`Classifier` with minibatch Adam on the rows of ``source`` where ``mask`` holds.

    Loss: cross-entropy of :meth:`Classifier.pair_logits` (image and flip) against ``labels``.
    The learning rate follows a cosine decay per epoch. Deterministic for a given ``seed``
    (initialisation, block order and row order); the global torch RNG is left untouched.

    Args:
        source: the features (see :class:`FeatureSource`).
        labels: (N,) integer labels in [0, num_classes).
        mask: (N,) bool rows to train on; ``None`` = all.
        hidden_dim: ``None`` = linear, else the MLP's hidden width D'.
    """
    labels = _check_labels(labels, source.num_rows, num_classes)
    if mask is not None and (mask.shape != (source.num_rows,) or mask.dtype != bool):
        raise ValueError(f"mask must be {source.num_rows} bools, got {mask.shape} {mask.dtype}")
    if (mask.sum() if mask is not None else source.num_rows) == 0:
        raise ValueError("no rows to train on (empty source or all-False mask)")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ValueError(f"bad training settings: epochs={epochs} lr={lr} batch_size={batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(source.dim, num_classes, hidden_dim)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        rng = np.random.default_rng([seed, epoch])
        for block in source.blocks(rng):
            picked = np.arange(len(block.rows)) if mask is None else np.flatnonzero(mask[block.rows])
            picked = rng.permutation(picked)
            for start in range(0, len(picked), batch_size):
                idx = picked[start:start + batch_size]
                x, xf = _to_device(block.feat[idx], device), _to_device(block.feat_flip[idx], device)
                y = torch.from_numpy(labels[block.rows[idx]]).to(device)
                loss = F.cross_entropy(model.pair_logits(x, xf), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def score(model: Classifier, source: FeatureSource, labels: np.ndarray | None = None,
          device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per-image losses and predictions, streamed over ``source`` in fixed order.

    Returns:
        losses: (N,) float32 cross-entropy of the pair logits against ``labels``, or against the
            model's own prediction when ``labels`` is None (i.e. -log of its top probability).
        predictions: (N,) int64 argmax of the pair logits.
    """
    num_classes = model.out.out_features
    if labels is not None:
        labels = _check_labels(labels, source.num_rows, num_classes)
    losses = np.full(source.num_rows, np.nan, dtype=np.float32)
    predictions = np.full(source.num_rows, -1, dtype=np.int64)
    model.to(device).eval()
    for block in source.blocks(None):
        for start in range(0, len(block.rows), _SCORE_BATCH):
            sl = slice(start, start + _SCORE_BATCH)
            rows = block.rows[sl]
            logits = model.pair_logits(_to_device(block.feat[sl], device), _to_device(block.feat_flip[sl], device))
            pred = logits.argmax(dim=1)
            target = pred if labels is None else torch.from_numpy(labels[rows]).to(device)
            losses[rows] = F.cross_entropy(logits, target, reduction="none").cpu().numpy()
            predictions[rows] = pred.cpu().numpy()
    uncovered = int(np.isnan(losses).sum())
    if uncovered:
        raise ValueError(f"the feature source skipped {uncovered} of its {source.num_rows} rows")
    return losses, predictions


@torch.no_grad()
def embed_features(model: Classifier, feats: np.ndarray | torch.Tensor, batch_size: int = _SCORE_BATCH,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """e(x) of N×D features as an N×D' float32 array, L2-normalised (k-means #2/#3 and pixel labels
    compare embeddings by cosine / Euclidean distance on the unit sphere)."""
    model.to(device).eval()
    out = []
    for start in range(0, len(feats), batch_size):
        x = _to_device(feats[start:start + batch_size], device)
        out.append(F.normalize(model.embed(x), dim=-1).cpu().numpy())
    if not out:
        return np.zeros((0, model.out.in_features), dtype=np.float32)
    return np.concatenate(out)


# ---- selection -------------------------------------------------------------------------------------
def small_loss_subset(losses: np.ndarray, labels: np.ndarray, num_classes: int, keep_ratio: float) -> np.ndarray:
    """The small-loss criterion: per cluster keep the ``ceil(keep_ratio · n_c)`` lowest-loss images.

    Ceil, so every non-empty cluster keeps at least one image (a cluster of 1 keeps it); ties are
    broken by row order. Returns an (N,) bool mask.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    labels = _check_labels(labels, len(losses), num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    # round before ceil: 0.7 * 10 is 7.000000000000001 in floating point
    keep = np.ceil(np.round(keep_ratio * counts, 9)).astype(np.int64)
    return keep_lowest_per_group(losses, labels, keep)


# ---- the whole procedure ---------------------------------------------------------------------------
class DenoiseSettings(Protocol):
    """What :func:`denoise` reads from its settings (``pdso_ray.config.DenoiseConfig`` has these)."""

    keep_ratio: float
    epochs_f: int
    epochs_g: int
    epochs_h: int
    hidden_dim: int
    lr: float
    batch_size: int
    seed: int


@dataclass
class DenoiseResult:
    """Outcome of DFF over N images.

    Attributes:
        subset1: (N,) bool S1, the small-loss subset under f and the k-means labels.
        clean_mask: (N,) bool S2, the small-loss subset under g and g's labels (h's training set).
        labels: (N,) int64 g's relabelling of every image.
        classifier: h, the MLP whose hidden layer is the embedding.
        stats: sizes and timings, for the stage manifest.
    """

    subset1: np.ndarray
    clean_mask: np.ndarray
    labels: np.ndarray
    classifier: Classifier
    stats: dict[str, float] = field(default_factory=dict)

    def embed(self, feats: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> np.ndarray:
        """h's L2-normalised embedding of N×D features: N×D' float32 (see :func:`embed_features`)."""
        return embed_features(self.classifier, feats, device=device)


def denoise(source: FeatureSource, labels: np.ndarray, num_classes: int, settings: DenoiseSettings,
            device: torch.device | str = "cpu") -> DenoiseResult:
    """Run DFF (module docstring) on ``source`` with k-means #1 ``labels`` ((N,) in [0, C))."""
    labels = _check_labels(labels, source.num_rows, num_classes)
    common = dict(lr=settings.lr, batch_size=settings.batch_size, device=device)
    stats: dict[str, float] = {"images": source.num_rows}
    t0 = time.perf_counter()

    f = train_classifier(source, labels, num_classes, epochs=settings.epochs_f, seed=settings.seed, **common)
    losses_f, _ = score(f, source, labels, device=device)
    subset1 = small_loss_subset(losses_f, labels, num_classes, settings.keep_ratio)
    t1 = time.perf_counter()

    g = train_classifier(source, labels, num_classes, mask=subset1, epochs=settings.epochs_g,
                         seed=settings.seed + 1, **common)
    losses_g, relabels = score(g, source, None, device=device)
    clean = small_loss_subset(losses_g, relabels, num_classes, settings.keep_ratio)
    t2 = time.perf_counter()

    h = train_classifier(source, relabels, num_classes, mask=clean, hidden_dim=settings.hidden_dim,
                         epochs=settings.epochs_h, seed=settings.seed + 2, **common)
    t3 = time.perf_counter()
    stats.update(subset1=int(subset1.sum()), subset2=int(clean.sum()),
                 relabelled=int((relabels != labels).sum()),
                 seconds_f=t1 - t0, seconds_g=t2 - t1, seconds_h=t3 - t2)
    return DenoiseResult(subset1=subset1, clean_mask=clean, labels=relabels, classifier=h.cpu(), stats=stats)
