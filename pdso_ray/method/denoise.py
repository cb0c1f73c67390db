"""Denoising-based feature fine-tuning, DFF (docs/method.md §3): small-loss selection of clean labels.

Procedure (:func:`denoise`), over N images with pooled features x, flip features x', and k-means #1
labels y (C clusters):

1. train a linear classifier ``f`` on all (x, x', y) for ``epochs_f`` epochs;
2. per-image loss = cross-entropy of the mean of the logits of x and x'; per cluster keep the
   ``keep_ratio`` lowest-loss images -> S1 (:func:`small_loss_subset`);
3. train a linear ``g`` on S1 for ``epochs_g`` epochs; relabel an image with g's prediction where
   f predicts the same class (``relabel="agreed"``, :func:`agreed_relabelling`) or everywhere
   (``"g"``); select S2 the same way from g's losses against the k-means labels
   (``s2_labels="kmeans"``, the paper's rule) or against g's own labels (``"relabel"``);
4. train ``h`` (MLP D -> D' -> C) for ``epochs_h`` epochs on S2 with the labels S2 was selected
   under (``h_rows="s2"``, the paper), or on every image with the relabelling (``"all"``); its
   hidden layer is the embedding e(x) used from stage 4 on (:func:`embed_features`,
   :meth:`Classifier.embed`). k-means #2 starts from one prototype per class
   (:mod:`pdso_ray.method.purify`): ``prototypes="weights"``, h's cosine-head class directions
   (:func:`head_prototypes`; the nearest one to e(x) is h's own prediction of x), or ``"means"``,
   the mean embedding of each class over h's training rows (:func:`class_prototypes`).

Where the later steps work (``space``): ``"embedding"``, h's hidden layer above; ``"features"``,
the normalised input itself (:attr:`Classifier.embeds_input`: the official space, the backbone's
features, which h only trains when the backbone is fine-tuned with it). Without DFF (``dff``
false, the ``plain`` profile) :func:`without_denoising` passes the k-means labels and their
feature means on unchanged.

What h trains on decides the partition its embedding carries (measured on held-out known truth,
benchmarks/denoise_purify_quality.py): trained on S2, half the images, h's prediction on the whole
set is only as pure as k-means #1 (the other half falls back to k-means-like boundaries), so
k-means #2 loses what g's relabelling gained; trained on every image with g's labels it carries
g's partition into e(x).

Heads (``head``): ``"cosine"`` (default) scores a class by ``logit_scale · cos(z, w_c)``, so that
training shapes exactly the geometry k-means #2 clusters in: L2-normalised e(x) gathered around
one direction per class. ``"linear"`` (``W z + b``) leaves the normalised embedding's geometry
unconstrained (measured on held-out known truth, benchmarks/denoise_purify_quality.py: a dominant
shared direction, mean cosine 0.8 between random images, and k-means #2/#3 on it lost the
purity DFF had gained). A cosine head has no bias, so with ``centre`` the linear f and g first
subtract the mean image feature (DINO features share a large common component that would
otherwise compress every cosine); h's hidden layer has a bias of its own and is not centred, so
per-patch tokens embed exactly as before.

Start (``head_init``): ``"kmeans"`` (default) starts f's and g's class directions at the k-means
#1 clusters' mean directions (:func:`cluster_directions`), so that training moves a boundary only
where the data ask for it; from a random start the heads on small data (a few hundred images,
D = 384) did not even reproduce their own training labels and g's relabelling lost up to 18
points of purity against k-means #1 (docs/method.md §4). h, an MLP, starts at random.

Training length: epochs, as in the paper, but at least ``min_steps`` optimiser steps per head
(:func:`step_batch_size` shrinks the minibatch on small data: there epochs of a large batch left
g unfitted and its relabelling worse than k-means #1).

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
HEADS = ("cosine", "linear")
S2_LABELS = ("kmeans", "relabel")
H_ROWS = ("s2", "all")
HEAD_INITS = ("kmeans", "random")
RELABELS = ("agreed", "g")
PROTOTYPES = ("weights", "means")
SPACES = ("embedding", "features")


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
    per-patch tokens, whose norms differ: any ...×D tensor works, as a 1×1 convolution would. With
    ``centre`` (a D vector, the mean normalised feature) the normalised input minus ``centre`` is
    normalised again. ``head``: ``"linear"`` logits ``W z + b``; ``"cosine"`` logits
    ``logit_scale · cos(z, w_c)`` (no bias), z being the input (linear) or the hidden layer (MLP).
    ``embeds_input``: :meth:`embed` returns the normalised input itself, not the hidden layer
    (``denoise.space: features``: k-means #2/#3 and the pixel labels then work on the backbone's
    features, the official space, and the classifier only trains the backbone and selects); saved
    with the weights.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int | None = None, *, head: str = "linear",
                 logit_scale: float = 16.0, centre: np.ndarray | torch.Tensor | None = None,
                 embeds_input: bool = False):
        super().__init__()
        if in_dim < 1 or num_classes < 1 or (hidden_dim is not None and hidden_dim < 1):
            raise ValueError(f"bad classifier shape: in_dim={in_dim} num_classes={num_classes} "
                             f"hidden_dim={hidden_dim}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "cosine" and not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
        self.in_dim = in_dim
        self.hidden = None if hidden_dim is None else nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.cosine = head == "cosine"
        self.out = nn.Linear(hidden_dim or in_dim, num_classes, bias=not self.cosine)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)) if self.cosine else None)
        if centre is not None:
            centre = torch.as_tensor(centre, dtype=torch.float32).clone()
            if centre.shape != (in_dim,):
                raise ValueError(f"centre must have shape ({in_dim},), got {tuple(centre.shape)}")
        self.register_buffer("centre", centre)
        self.register_buffer("embeds_input", torch.tensor(True) if embeds_input else None)

    @property
    def embed_dim(self) -> int:
        """D', the width of :meth:`embed`'s output."""
        return self.in_dim if self.embeds_input is not None else self.out.in_features

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> Classifier:
        """Rebuild a saved classifier; its shape, head and centre are read from the weights."""
        out_w = state_dict["out.weight"]
        head = "linear" if "out.bias" in state_dict else "cosine"
        scale = float(state_dict["logit_scale"]) if head == "cosine" else 16.0
        options = dict(head=head, logit_scale=scale, centre=state_dict.get("centre"),
                       embeds_input="embeds_input" in state_dict)
        if "hidden.0.weight" in state_dict:
            hidden_w = state_dict["hidden.0.weight"]
            model = cls(hidden_w.shape[1], out_w.shape[0], hidden_w.shape[0], **options)
        else:
            model = cls(out_w.shape[1], out_w.shape[0], **options)
        model.load_state_dict(state_dict)
        return model

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(x.float(), dim=-1)
        return z if self.centre is None else F.normalize(z - self.centre, dim=-1)

    def _logits(self, z: torch.Tensor, unit: bool = False) -> torch.Tensor:
        """Head on ...×D' features z; ``unit``: z is already a unit vector or a mean of unit
        vectors (the cosine head is then linear in z, which :meth:`pair_logits` relies on)."""
        if not self.cosine:
            return self.out(z)
        if not unit:
            z = F.normalize(z, dim=-1)
        return self.logit_scale * F.linear(z, F.normalize(self.out.weight, dim=-1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations e(x), ...×D' (not normalised); only for the MLP (h). With
        ``embeds_input``: the normalised (centred) input, ...×D, for any classifier."""
        if self.embeds_input is not None:
            return self._inputs(x)
        if self.hidden is None:
            raise ValueError("a linear classifier has no hidden layer to embed with (use hidden_dim)")
        return self.hidden(self._inputs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ...×C."""
        z = self._inputs(x)
        return self._logits(z, unit=True) if self.hidden is None else self._logits(self.hidden(z))

    def pair_logits(self, x: torch.Tensor, x_flip: torch.Tensor) -> torch.Tensor:
        """Mean of the logits of an image and its flip (the per-image prediction of DFF)."""
        if self.hidden is None:
            # Without a hidden layer both heads are linear in the (unit) inputs: the mean of the
            # logits is the logits of the mean input, at half the cost.
            return self._logits((self._inputs(x) + self._inputs(x_flip)) / 2, unit=True)
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


def step_batch_size(rows: int, epochs: int, batch_size: int, min_steps: int) -> int:
    """The minibatch size that gives at least ``min_steps`` optimiser steps over ``epochs`` epochs
    of ``rows`` rows: ``batch_size``, or less when ``epochs · ceil(rows / batch_size)`` falls short,
    ``max(1, floor(rows · epochs / min_steps))`` (then ``epochs · ceil(rows / b) >= min_steps``
    whenever ``rows · epochs >= min_steps``; with fewer row visits than that, 1 row per step).

    Why: training is counted in epochs, so on small data a large batch leaves a head a few dozen
    steps (the demo's g: 102 rows, batch 64, 30 epochs = 60 Adam steps), far from fitted; its
    relabelling was then worse than k-means #1. ``min_steps`` 0 disables the floor.
    """
    if rows < 0 or epochs < 0 or batch_size < 1 or min_steps < 0:
        raise ValueError(f"bad step settings: rows={rows} epochs={epochs} batch_size={batch_size} "
                         f"min_steps={min_steps}")
    if epochs == 0 or rows == 0 or epochs * math.ceil(rows / batch_size) >= min_steps:
        return batch_size
    return max(1, rows * epochs // min_steps)


def train_classifier(source: FeatureSource, labels: np.ndarray, num_classes: int, *,
                     mask: np.ndarray | None = None, hidden_dim: int | None = None, epochs: int,
                     lr: float, batch_size: int, seed: int, head: str = "linear",
                     logit_scale: float = 16.0, centre: np.ndarray | None = None, min_steps: int = 0,
                     init_directions: np.ndarray | None = None,
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
        head, logit_scale, centre: see :class:`Classifier`.
        min_steps: the minibatch shrinks below ``batch_size`` so that training takes at least
            this many steps (:func:`step_batch_size`; per block, so a few more with many blocks).
        init_directions: C×D start for a linear cosine head's class directions (e.g.
            :func:`cluster_directions`); ``None`` = random.
    """
    labels = _check_labels(labels, source.num_rows, num_classes)
    if mask is not None and (mask.shape != (source.num_rows,) or mask.dtype != bool):
        raise ValueError(f"mask must be {source.num_rows} bools, got {mask.shape} {mask.dtype}")
    if (mask.sum() if mask is not None else source.num_rows) == 0:
        raise ValueError("no rows to train on (empty source or all-False mask)")
    if epochs < 0 or lr <= 0 or batch_size < 1:
        raise ValueError(f"bad training settings: epochs={epochs} lr={lr} batch_size={batch_size}")
    rows = int(mask.sum()) if mask is not None else source.num_rows
    batch_size = step_batch_size(rows, epochs, batch_size, min_steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(source.dim, num_classes, hidden_dim, head=head, logit_scale=logit_scale, centre=centre)
    if init_directions is not None:
        if hidden_dim is not None or head != "cosine" or init_directions.shape != model.out.weight.shape:
            raise ValueError(f"init_directions must be {tuple(model.out.weight.shape)} for a linear cosine "
                             f"head, got {init_directions.shape} (hidden_dim={hidden_dim}, head={head!r})")
        with torch.no_grad():
            model.out.weight.copy_(torch.as_tensor(init_directions, dtype=torch.float32))
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
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    return np.concatenate(out)


def feature_mean(source: FeatureSource) -> np.ndarray:
    """Mean of the L2-normalised features (not their flips) of every row: a D float32 vector,
    accumulated in float64 over one fixed-order pass."""
    total = np.zeros(source.dim, dtype=np.float64)
    for block in source.blocks(None):
        for start in range(0, len(block.rows), _SCORE_BATCH):  # slices: a block can be all rows
            feat = np.asarray(block.feat[start:start + _SCORE_BATCH], dtype=np.float32)
            total += (feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)).sum(0, dtype=np.float64)
    if not source.num_rows:
        raise ValueError("cannot centre on an empty feature source")
    return (total / source.num_rows).astype(np.float32)


def cluster_directions(source: FeatureSource, labels: np.ndarray, num_classes: int,
                       centre: np.ndarray | None) -> np.ndarray:
    """C×D float32 unit rows: per cluster, the direction of the mean input a linear :class:`Classifier`
    with this ``centre`` sees (the mean of an image's and its flip's normalised, centred feature, as
    :meth:`Classifier.pair_logits` uses). A cosine head started at these rows predicts, to within
    the few images near a boundary, the k-means partition itself (exactly so when the clusters'
    centroids have equal norms); an empty cluster's row is zero (it never wins, as in k-means).
    One fixed-order pass, float64 sums."""
    labels = _check_labels(labels, source.num_rows, num_classes)
    probe = Classifier(source.dim, num_classes, head="cosine", centre=centre)
    sums = torch.zeros(num_classes, source.dim, dtype=torch.float64)
    with torch.no_grad():
        for block in source.blocks(None):
            # in scoring-sized slices: a block can be the whole in-memory matrix (S919: 2 GB)
            for start in range(0, len(block.rows), _SCORE_BATCH):
                sl = slice(start, start + _SCORE_BATCH)
                z = (probe._inputs(_to_device(block.feat[sl], "cpu"))
                     + probe._inputs(_to_device(block.feat_flip[sl], "cpu"))) / 2
                sums.index_add_(0, torch.from_numpy(labels[block.rows[sl]]), z.double())
    sums = sums.numpy()
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0).astype(np.float32)


def agreed_relabelling(labels: np.ndarray, f_predictions: np.ndarray, g_predictions: np.ndarray) -> np.ndarray:
    """The relabelling DFF passes on (``relabel="agreed"``): an image takes g's prediction only where
    f's prediction is the same, else it keeps its k-means label. All three are (N,) int64.

    Why: f (trained on every image) and g (trained on the small-loss S1 only) err differently. g,
    trained on cluster cores, moves boundaries into the space S1 left empty; alone its relabelling
    was below k-means #1 on the S919 generator and on small stand-in sets (docs/method.md §3, §4);
    where f, which saw the boundary images under their k-means labels, still prefers the same
    other class, the change held up on every held-out set measured."""
    if not labels.shape == f_predictions.shape == g_predictions.shape:
        raise ValueError(f"label arrays differ in shape: {labels.shape} {f_predictions.shape} {g_predictions.shape}")
    return np.where(f_predictions == g_predictions, g_predictions, labels)


@torch.no_grad()
def class_prototypes(model: Classifier, source: FeatureSource, labels: np.ndarray, mask: np.ndarray,
                     num_classes: int, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per class, the mean L2-normalised embedding (:func:`embed_features`) of the rows where
    ``mask`` holds: the centroids a k-means in e(x) starts from when it continues h's partition.

    Returns:
        prototypes: C×D' float32; the mean of unit vectors, not re-normalised (a k-means centroid);
            a zero row for a class without masked rows.
        counts: (C,) int64 masked rows per class.
    """
    labels = _check_labels(labels, source.num_rows, num_classes)
    if mask.shape != (source.num_rows,) or mask.dtype != bool:
        raise ValueError(f"mask must be {source.num_rows} bools, got {mask.shape} {mask.dtype}")
    sums = np.zeros((num_classes, model.embed_dim), dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.int64)
    for block in source.blocks(None):
        picked = np.flatnonzero(mask[block.rows])
        if not len(picked):
            continue
        emb = embed_features(model, block.feat[picked], device=device)
        lab = labels[block.rows[picked]]
        np.add.at(sums, lab, emb.astype(np.float64))
        counts += np.bincount(lab, minlength=num_classes)
    filled = counts > 0
    sums[filled] /= counts[filled, None]
    return sums.astype(np.float32), counts


def head_prototypes(model: Classifier) -> np.ndarray:
    """C×D' float32 unit rows: the class directions w_c / |w_c| of a cosine-head MLP. On the unit
    sphere the nearest of them (squared L2) to the normalised e(x) is the class with the largest
    cos(e(x), w_c), i.e. the model's own prediction of x (for the image alone, without its flip)."""
    if not model.cosine or model.hidden is None:
        raise ValueError("head prototypes need an MLP with a cosine head")
    return F.normalize(model.out.weight.detach().float(), dim=-1).cpu().numpy()


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


def select_clean(g: Classifier, source: FeatureSource, labels: np.ndarray, num_classes: int, keep_ratio: float,
                 against: str = "kmeans", f_predictions: np.ndarray | None = None,
                 device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The relabelling and S2, the small-loss subset of g per class of the labels it is scored against.

    The relabelling: g's prediction, or with ``f_predictions`` ((N,) int64) g's prediction where f
    agrees and the k-means label elsewhere (:func:`agreed_relabelling`). ``against="kmeans"`` (the
    paper): g's loss against the k-means #1 ``labels``, so S2 holds images whose k-means label g
    confirms with confidence; ``"relabel"``: against the relabelling (g's confidence in its own
    prediction when there is no ``f_predictions``). One scoring pass, two for ``"relabel"`` with f.

    Returns:
        clean: (N,) bool S2.
        clean_labels: (N,) int64 the labels S2 was selected under (``labels`` or the relabelling).
        relabels: (N,) int64 the relabelling of every image.
    """
    if against not in S2_LABELS:
        raise ValueError(f"against must be one of {S2_LABELS}, got {against!r}")
    labels = _check_labels(labels, source.num_rows, num_classes)
    losses, g_predictions = score(g, source, labels if against == "kmeans" else None, device=device)
    relabels = g_predictions if f_predictions is None else agreed_relabelling(labels, f_predictions, g_predictions)
    if against == "kmeans":
        clean_labels = labels
    else:
        clean_labels = relabels
        if f_predictions is not None:
            losses, _ = score(g, source, relabels, device=device)
    return small_loss_subset(losses, clean_labels, num_classes, keep_ratio), clean_labels, relabels


def h_training_set(h_rows: str, clean: np.ndarray, clean_labels: np.ndarray,
                   relabels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h's training rows and labels: ``(mask (N,) bool, labels (N,) int64)``. ``h_rows="s2"``:
    S2 (``clean``) with the labels it was selected under; ``"all"``: every image with g's
    relabelling."""
    if h_rows not in H_ROWS:
        raise ValueError(f"h_rows must be one of {H_ROWS}, got {h_rows!r}")
    if h_rows == "s2":
        return clean, clean_labels
    return np.ones_like(clean, dtype=bool), relabels


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
    head: str
    logit_scale: float
    centre: bool
    s2_labels: str
    h_rows: str
    prototypes: str
    min_steps: int
    head_init: str
    relabel: str
    space: str
    dff: bool


@dataclass
class DenoiseResult:
    """Outcome of DFF over N images (C classes, D' the embedding width).

    Attributes:
        subset1: (N,) bool S1, the small-loss subset under f and the k-means labels.
        clean_mask: (N,) bool S2, the small-loss subset under g and ``clean_labels`` (h's training set).
        labels: (N,) int64 the relabelling DFF passes on (h's labels with ``h_rows="all"``): g's
            prediction where f agrees (``relabel="agreed"``, :func:`agreed_relabelling`) or g's
            prediction everywhere (``"g"``).
        clean_labels: (N,) int64 the labels S2 was selected under (and h trained on, with
            ``h_rows="s2"``): the k-means labels (``s2_labels="kmeans"``) or g's (``"relabel"``).
        classifier: h, the MLP whose hidden layer is the embedding (``space="embedding"``) or
            whose normalised input is (``"features"``; without DFF a cosine classifier on the
            k-means #1 directions, :func:`without_denoising`).
        prototypes: C×D' float32 one per class: h's class directions (:func:`head_prototypes`)
            or its mean embedding over h's training rows (:func:`class_prototypes`).
        prototype_counts: (C,) int64 h's training images per class (0 with ``"means"``: that
            prototype row is zero).
        stats: sizes and timings, for the stage manifest.
    """

    subset1: np.ndarray
    clean_mask: np.ndarray
    labels: np.ndarray
    clean_labels: np.ndarray
    classifier: Classifier
    prototypes: np.ndarray
    prototype_counts: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)

    def embed(self, feats: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> np.ndarray:
        """h's L2-normalised embedding of N×D features: N×D' float32 (see :func:`embed_features`)."""
        return embed_features(self.classifier, feats, device=device)


def _check_settings(settings: DenoiseSettings) -> None:
    if settings.head not in HEADS:
        raise ValueError(f"denoise.head must be one of {HEADS}, got {settings.head!r}")
    if settings.s2_labels not in S2_LABELS:
        raise ValueError(f"denoise.s2_labels must be one of {S2_LABELS}, got {settings.s2_labels!r}")
    if settings.h_rows not in H_ROWS:
        raise ValueError(f"denoise.h_rows must be one of {H_ROWS}, got {settings.h_rows!r}")
    if settings.prototypes not in PROTOTYPES:
        raise ValueError(f"denoise.prototypes must be one of {PROTOTYPES}, got {settings.prototypes!r}")
    if settings.prototypes == "weights" and settings.head != "cosine":
        raise ValueError("denoise.prototypes=weights needs denoise.head=cosine (a linear head's rows "
                         "are not directions in the normalised embedding)")
    if not settings.logit_scale > 0:
        raise ValueError(f"denoise.logit_scale must be > 0, got {settings.logit_scale}")
    if settings.head_init not in HEAD_INITS:
        raise ValueError(f"denoise.head_init must be one of {HEAD_INITS}, got {settings.head_init!r}")
    if settings.head_init == "kmeans" and settings.head != "cosine":
        raise ValueError("denoise.head_init=kmeans needs denoise.head=cosine (it sets class directions)")
    if settings.relabel not in RELABELS:
        raise ValueError(f"denoise.relabel must be one of {RELABELS}, got {settings.relabel!r}")
    if settings.space not in SPACES:
        raise ValueError(f"denoise.space must be one of {SPACES}, got {settings.space!r}")
    if settings.prototypes == "weights" and settings.space != "embedding":
        raise ValueError("denoise.prototypes=weights needs denoise.space=embedding (h's class directions "
                         "live in its hidden layer)")
    if not settings.dff and settings.space != "features":
        raise ValueError("denoise.dff=false needs denoise.space=features (without h there is no "
                         "hidden layer to embed with)")


def without_denoising(source: FeatureSource, labels: np.ndarray, num_classes: int,
                      device: torch.device | str = "cpu") -> DenoiseResult:
    """No denoising (``denoise.dff: false``, the ``plain`` profile): the k-means #1 labels pass on
    unchanged (S1 = S2 = every image), e(x) is the normalised feature, and the prototypes are the
    k-means #1 clusters' means there, so that k-means #2 with 0 iterations and no purification
    hand k-means #1's centroids straight to the pixel pseudo labels. The saved classifier is a
    cosine head on the clusters' mean directions that embeds its input."""
    labels = _check_labels(labels, source.num_rows, num_classes)
    every = np.ones(source.num_rows, dtype=bool)
    model = Classifier(source.dim, num_classes, head="cosine", embeds_input=True)
    with torch.no_grad():
        model.out.weight.copy_(torch.from_numpy(cluster_directions(source, labels, num_classes, None)))
    prototypes, counts = class_prototypes(model, source, labels, every, num_classes, device=device)
    return DenoiseResult(subset1=every, clean_mask=every, labels=labels, clean_labels=labels, classifier=model,
                         prototypes=prototypes, prototype_counts=counts,
                         stats={"images": source.num_rows, "subset1": source.num_rows,
                                "subset2": source.num_rows, "relabelled": 0})


def denoise(source: FeatureSource, labels: np.ndarray, num_classes: int, settings: DenoiseSettings,
            device: torch.device | str = "cpu") -> DenoiseResult:
    """Run DFF (module docstring) on ``source`` with k-means #1 ``labels`` ((N,) in [0, C))."""
    labels = _check_labels(labels, source.num_rows, num_classes)
    _check_settings(settings)
    if not settings.dff:
        return without_denoising(source, labels, num_classes, device=device)
    common = dict(lr=settings.lr, batch_size=settings.batch_size, head=settings.head,
                  logit_scale=settings.logit_scale, min_steps=settings.min_steps, device=device)
    stats: dict[str, float] = {"images": source.num_rows}
    t0 = time.perf_counter()
    centre = feature_mean(source) if settings.centre else None

    start = cluster_directions(source, labels, num_classes, centre) if settings.head_init == "kmeans" else None

    f = train_classifier(source, labels, num_classes, epochs=settings.epochs_f, seed=settings.seed,
                         centre=centre, init_directions=start, **common)
    losses_f, f_predictions = score(f, source, labels, device=device)
    subset1 = small_loss_subset(losses_f, labels, num_classes, settings.keep_ratio)
    t1 = time.perf_counter()

    g = train_classifier(source, labels, num_classes, mask=subset1, epochs=settings.epochs_g,
                         seed=settings.seed + 1, centre=centre, init_directions=start, **common)
    clean, clean_labels, relabels = select_clean(
        g, source, labels, num_classes, settings.keep_ratio, settings.s2_labels,
        f_predictions=f_predictions if settings.relabel == "agreed" else None, device=device)
    t2 = time.perf_counter()

    h_mask, h_labels = h_training_set(settings.h_rows, clean, clean_labels, relabels)
    h = train_classifier(source, h_labels, num_classes, mask=h_mask, hidden_dim=settings.hidden_dim,
                         epochs=settings.epochs_h, seed=settings.seed + 2, **common)
    if settings.space == "features":
        h.embeds_input = torch.tensor(True)
    if settings.prototypes == "weights":
        prototypes = head_prototypes(h)
        counts = np.bincount(h_labels[h_mask], minlength=num_classes).astype(np.int64)
    else:
        prototypes, counts = class_prototypes(h, source, h_labels, h_mask, num_classes, device=device)
    t3 = time.perf_counter()
    stats.update(subset1=int(subset1.sum()), subset2=int(clean.sum()),
                 relabelled=int((relabels != labels).sum()),
                 seconds_f=t1 - t0, seconds_g=t2 - t1, seconds_h=t3 - t2)
    return DenoiseResult(subset1=subset1, clean_mask=clean, labels=relabels, clean_labels=clean_labels,
                         classifier=h.cpu(), prototypes=prototypes, prototype_counts=counts, stats=stats)
