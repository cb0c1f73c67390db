"""One typed configuration for the whole pipeline, and the one owner of every value's check.

Nested dataclasses, one per stage, with the defaults of docs/method.md. Loaded from YAML,
overridden with dotted ``--set a.b=c`` assignments (values parsed as YAML scalars), and saved
resolved (secrets redacted) beside the outputs.

The schema states what each key accepts, and :func:`load_config` checks every value against it
before anything else runs; an error is one line naming the key, what it accepts and, for a
misspelt name, the nearest one:

- the type (``int``, ``float``, ``bool``, ``str``, lists, ``| None``);
- ``Literal[...]`` for a closed set of words (``denoise.head: cosine | linear``);
- :class:`Registry` for a value naming an entry of one of the package's registries (a data
  layout, a DINO or SAM architecture, a refiner, a segmentation backbone): the registry is given
  by location and looked up when a config is checked, so adding an entry there is all it takes;
- :class:`Range` for numbers (``Count``: >= 1, ``Share``: in (0, 1], ...).

:func:`validate` adds the few rules that tie two keys together (``min_actors <= max_actors``).
What depends on the plan and the machine (checkpoints, data, CPU and GPU requests) is checked by
:mod:`pdso_ray.preflight`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml

from pdso_ray.plan import STAGES, method_problem

# Published per-benchmark saliency thresholds for pixel pseudo labels (docs/method.md §5).
DEFAULT_SALIENCY_THRESHOLDS = {50: 0.41, 300: 0.40, 919: 0.37}

# Class ids 1..C must stay below the ignore id 1000 of the ImageNet-S label codec.
MAX_CLASSES = 999

SECRET_KEYS = ("key", "secret", "token", "password", "session_token", "aws_secret_access_key")
REDACTED = "***"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


# ---- what a key accepts ------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``lo <= value <= hi`` (``<`` with ``lo_open`` / ``hi_open``), and
    optionally a multiple of ``multiple_of``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    multiple_of: int | None = None

    def describe(self) -> str:
        lo, hi = _number(self.lo), _number(self.hi)
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {lo}"
        else:
            text = f"{'<' if self.hi_open else '<='} {hi}"
        return text + (f" and a multiple of {self.multiple_of}" if self.multiple_of else "")

    def holds(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return not self.multiple_of or value % self.multiple_of == 0


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x:g}" if x is not None else ""


@dataclass(frozen=True)
class Registry:
    """The value names an entry of a registry (a dict) of the package, at ``"module:NAME"``. The
    module is imported when a config is checked, not when this one is: the schema names the
    registry, the registry lists its entries."""

    location: str

    def choices(self) -> list[str]:
        module, name = self.location.split(":")
        return list(getattr(importlib.import_module(module), name))


@dataclass(frozen=True)
class Choices:
    """The value is one of ``values`` (a closed list kept elsewhere as data, e.g. the stage names)."""

    values: tuple[str, ...]

    def choices(self) -> list[str]:
        return list(self.values)


@dataclass(frozen=True)
class FolderName:
    """The value is one folder name: not empty, no ``/``."""


Count = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
Seed = Annotated[int, Range(0, 2**32 - 1)]
Positive = Annotated[float, Range(0, lo_open=True)]
NonNegative = Annotated[float, Range(0)]
Share = Annotated[float, Range(0, 1, lo_open=True)]  # a fraction that cannot be 0
Unit = Annotated[float, Range(0, 1)]
Name = Annotated[str, FolderName()]
StageName = Annotated[str, Choices(tuple(STAGES))]


# ---- schema ---------------------------------------------------------------------------------------
@dataclass
class S3Config:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO; None = AWS
    key: str | None = None  # None = environment / instance profile
    secret: str | None = None
    token: str | None = None
    anon: bool = False


@dataclass
class StorageConfig:
    s3: S3Config = field(default_factory=S3Config)
    # The retry budget of each object-store request: transient errors (throttling, 5xx, dropped
    # connections) are retried with backoff up to `retries` attempts of at most `timeout_s` seconds
    # each (to connect, and to read); a permanent error then fails the run, naming the URL.
    retries: Count = 5
    timeout_s: Positive = 30.0


@dataclass
class DataConfig:
    # imagenet_s: folder or URL holding ImageNetS{classes}/; folder: the images; webdataset: the tar
    # shards; parquet: the tables (shards and tables in split folders, named by split, or neither)
    root: str = "demo/data"
    classes: Annotated[int, Range(1, MAX_CLASSES)] | None = None  # C, the number of categories (required)
    # imagenet_s | folder (any tree of images, no splits, no ground truth) | webdataset (tar shards)
    # | parquet (tables of image bytes or paths): pdso_ray/data/layouts.py
    layout: Annotated[str, Registry("pdso_ray.data.layouts:LAYOUTS")] = "imagenet_s"
    # Whether the first folder below a split is the image's class (ImageNet-S wnids): per-run
    # diagnostics then score every clustering against it. None = the layout's default.
    folder_is_class: bool | None = None
    class_list: str | None = None  # optional file with one wnid per line (benchmark order)
    features: str | None = None  # precomputed features folder: stage 1 is skipped
    max_pixels: Count = 89_478_485  # decompression-bomb limit per image
    max_file_bytes: Count = 256 * 1024 * 1024  # larger input files are rejected unread
    train_split: Name = "train"
    eval_splits: list[Name] = field(default_factory=lambda: ["validation", "test"])
    limit: Count | None = None  # use only the first N train images (debugging)
    # Where a stage's actors hold a GPU (features, predict), decode JPEGs there in batches (nvJPEG),
    # other images and JPEGs it cannot take on the CPU; false: always on the CPU.
    gpu_decode: bool = True


@dataclass
class DinoConfig:
    arch: Annotated[str, Registry("pdso_ray.models.dino:DINO_SPECS")] = "vit_small_patch8"
    checkpoint: str | None = None  # URL of an official DINO .pth or a timm state dict
    image_size: Annotated[int, Range(8)] = 224


@dataclass
class SamConfig:
    arch: Annotated[str, Registry("pdso_ray.models.sam:SAM_REGISTRY")] = "vit_b"
    checkpoint: str | None = None  # URL of an official SAM .pth (sam_vit_b_01ec64.pth)
    image_size: Annotated[int, Range(16, multiple_of=16)] | None = None  # None = the architecture's native 1024
    compile: bool = False  # torch.compile the image encoder (GPU only; off-switch for old GPUs)


@dataclass
class ModelsConfig:
    dino: DinoConfig = field(default_factory=DinoConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    allow_random_init: bool = False  # only for demos/tests: run with random weights when no checkpoint


@dataclass
class PretrainConfig:
    """Stage ``pretrain`` (DINO self-distillation of ``models.dino.arch`` on the train images).

    The recipe fields left at None take :class:`pdso_ray.models.dino_pretrain.DinoPretrainConfig`'s
    defaults, the recipe of the demo's tiny stand-in; ``jobs/configs/imagenet_s_pretrain.yaml``
    sets DINO's published ViT-S values.
    """

    epochs: Count = 60
    batch_size: Count = 64  # per worker
    # Side of the square each image is decoded and resized to before cropping; None = 1.5x the
    # backbone's input (models.dino.image_size), rounded to a multiple of 8.
    input_size: Annotated[int, Range(8)] | None = None
    num_workers: Count = 1
    cpus_per_worker: Positive = 1.0
    use_gpu: bool = True  # when the cluster has GPUs
    decode_cpus: NonNegative = 1.0
    max_failures: NonNegativeInt = 2  # worker restarts (from the last epoch's checkpoint) before giving up
    keep_checkpoints: Count = 2
    # The teacher is written to pretrain/dino_teacher.pth after every epoch; every this many
    # epochs (and after the last) a copy stays as pretrain/teachers/epoch_NNNN.pth. 0: no copies.
    teacher_every: NonNegativeInt = 10
    probe_images: Count = 64  # fixed train images the per-epoch saliency probe runs on
    # Collapse guard: from this epoch on, a teacher whose outputs carry less than min_kl_div nats
    # of information about the image (H(mean q) - mean H(q)) has collapsed; the run stops.
    collapse_after_epochs: NonNegativeInt = 5
    min_kl_div: NonNegative = 0.5
    seed: Seed | None = None  # None = the top-level seed
    # recipe (None = DinoPretrainConfig's default)
    lr: Positive | None = None  # peak, as used: scale it with the total batch yourself
    min_lr: NonNegative | None = None
    warmup_epochs: NonNegative | None = None
    weight_decay: NonNegative | None = None
    weight_decay_end: NonNegative | None = None
    momentum: Unit | None = None  # teacher EMA momentum at the start (cosine to momentum_end)
    momentum_end: Unit | None = None
    teacher_temp: Positive | None = None
    warmup_teacher_temp: Positive | None = None
    warmup_teacher_temp_epochs: NonNegative | None = None
    clip_grad: NonNegative | None = None
    freeze_last_layer_epochs: NonNegative | None = None
    out_dim: Count | None = None  # prototypes K of the projection head
    head_hidden_dim: Count | None = None
    head_bottleneck_dim: Count | None = None
    global_scale: list[Share] | None = None  # [min, max] area share of the 2 global views
    num_local: NonNegativeInt | None = None
    local_size: Annotated[int, Range(8)] | None = None
    local_scale: list[Share] | None = None
    brightness: NonNegative | None = None
    contrast: NonNegative | None = None
    saturation: NonNegative | None = None
    hue: Annotated[float, Range(0, 0.5)] | None = None
    patch_loss_weight: NonNegative | None = None  # iBOT masked-patch term (0 = off)


@dataclass
class FeaturesConfig:
    batch_size: Count = 64
    min_actors: Count = 1
    max_actors: Count = 4
    gpus_per_actor: NonNegative = 1.0  # ignored (0) when the cluster has no GPU
    cpus_per_actor: Positive = 1.0
    decode_cpus: NonNegative = 1.0
    rows_per_file: Count = 4096  # rows per features Parquet file (the resume and shard granularity)


@dataclass
class ClusterConfig:
    niter: Count = 20
    nredo: Count = 30  # best of n random starts by objective (the paper's faiss setting)
    seed: Seed | None = None  # None = the top-level seed
    num_shards: Count | None = None  # None = one per CPU (or GPU) in the cluster


@dataclass
class DenoiseConfig:
    # The set of denoising and purification rules (DENOISE_PROFILES; docs/method.md §3–§4):
    # anchored (ours: every step anchored to k-means #1, the rules below as written) | paper (the
    # official code's rules) | plain (no denoising or purification: k-means #1's centroids go
    # straight to the pixel pseudo labels). A profile sets the keys it lists unless the config or
    # --set gives them.
    profile: Literal["anchored", "paper", "plain"] = "anchored"
    # Where k-means #2/#3 cluster and the pixel pseudo labels compare patches with the final
    # centroids: embedding (h's hidden layer e(x), L2-normalised) | features (the backbone's own
    # L2-normalised features, fine-tuned with h when finetune_blocks > 0: the official space).
    space: Literal["embedding", "features"] = "embedding"
    # false: no f, g, h (the k-means #1 labels pass on unchanged; needs space=features)
    dff: bool = True
    keep_ratio: Share = 0.5
    epochs_f: NonNegativeInt = 15
    epochs_g: NonNegativeInt = 50
    epochs_h: NonNegativeInt = 50
    hidden_dim: Count = 256  # D' of the MLP h: D -> D' -> C
    lr: Positive = 1e-3
    batch_size: Count = 1024
    seed: Seed | None = None  # None = the top-level seed
    # Output layer of f, g, h: cosine (logit_scale * cos(z, w_c): trains the normalised embedding
    # k-means #2 clusters in) | linear (W z + b).
    head: Literal["cosine", "linear"] = "cosine"
    logit_scale: Positive = 16.0
    centre: bool = True  # f and g subtract the mean feature first (a cosine head has no bias)
    # f and g start at: kmeans (their class directions at the k-means #1 clusters' mean directions,
    # needs head=cosine) | random.
    head_init: Literal["kmeans", "random"] = "kmeans"
    # The relabelling h trains on (h_rows=all): agreed (g's prediction where f predicts the same,
    # else the k-means label) | g (g's prediction everywhere). docs/method.md §3.
    relabel: Literal["agreed", "g"] = "agreed"
    # S2 = g's small-loss subset against: kmeans (the k-means #1 labels, as the paper) | relabel
    # (g's own prediction); h trains on S2 with those labels.
    s2_labels: Literal["kmeans", "relabel"] = "kmeans"
    # h trains on: s2 (S2 with the labels above, the paper) | all (every image with g's
    # relabelling, so that e(x) carries g's partition; docs/method.md §3).
    h_rows: Literal["s2", "all"] = "all"
    # Where k-means #2 starts: weights (h's cosine-head class directions: the nearest is h's own
    # prediction) | means (the mean embedding of each class over h's training rows).
    prototypes: Literal["weights", "means"] = "weights"
    # Optimiser steps each of f, g and h takes at least: on small data epochs × ceil(rows /
    # batch_size) is a few dozen steps (the demo's g: 60) and the minibatch shrinks to reach this
    # many; on ImageNet-S sizes (>= 600 steps at 15 epochs) it never binds. 0: batch_size always.
    min_steps: NonNegativeInt = 500
    # Features (feat + feat_flip, float32) up to this size are loaded once into the denoise task's
    # memory; larger ones stream from Parquet on every pass. S919 at D=384 is 3.9 GB and fits.
    max_in_memory_gb: NonNegative = 4.0
    # Backbone fine-tuning with h (docs/method.md §3): after h trains on the frozen features, it
    # trains on, jointly with the backbone's last finetune_blocks blocks (>= depth: all of it, the
    # paper; 0: the frozen-feature variant), for finetune_epochs over h's training images; the
    # tuned backbone then embeds every image for k-means #2/#3 and gives the pixel features.
    finetune_blocks: NonNegativeInt = 0
    finetune_epochs: Count = 5
    finetune_lr: Positive = 1e-5  # the backbone's peak learning rate (cosine decay, AdamW)
    finetune_head_lr: Positive = 1e-4  # h's, continuing from its frozen-feature training
    finetune_batch_size: Count = 64  # images per worker and step (each with its flip)
    finetune_workers: Count = 1  # Ray Train (DDP) workers, one GPU each when the cluster has GPUs
    finetune_cpus_per_worker: Positive = 1.0
    finetune_max_failures: NonNegativeInt = 2  # worker restarts from the last epoch's checkpoint


@dataclass
class PurifyConfig:
    # CSD's rules (the distance filter and the cluster cap); false keeps every image, so k-means
    # #3 runs on all of them.
    filter: bool = True
    dist_quantile: Share = 0.8
    alpha: Annotated[float, Range(1)] = 2.0
    topk: Count = 50
    niter: Count = 20
    seed: Seed | None = None  # None = the top-level seed
    # Where k-means #2 and #3 start: prototypes (#2 from the mean embedding of each class over
    # h's training set S2, #3 from #2's centroids) | random (random rows, best of nredo: the paper).
    init: Literal["prototypes", "random"] = "prototypes"
    nredo: Count = 30  # restarts of k-means #2 and #3 with init=random
    # Lloyd iterations with init=prototypes (niter is for random starts): k-means #2 from the
    # prototypes (0: every image to its nearest prototype, h's partition) and #3 from #2's
    # centroids on the kept images (0: #2's centroids are final; 1: the kept images' means).
    # 0: Lloyd on all images drifts towards ambiguous ones and a step on the kept set moved the
    # final assignment below #2 (known-truth benchmark); an h too weak to be final came from
    # too few optimiser steps on small data, which denoise.min_steps now prevents.
    prototype_niter2: NonNegativeInt = 0
    prototype_niter3: NonNegativeInt = 0
    # The rules rank each k-means #2 cluster's images by squared distance to: mean (the mean e(x)
    # of its members) | centroid (the #2 centroid: h's class direction with 0 iterations).
    kept_distance: Literal["mean", "centroid"] = "mean"


@dataclass
class RefineConfig:
    method: Annotated[str, Registry("pdso_ray.method.refiners:REFINERS")] = "spo"  # spo | sam_select | gmm | none
    # Secondary classes: other candidates whose squared distance to the image embedding is
    # <= sigma (the official --yz). None = chosen on validation from sigma_grid.
    sigma: NonNegative | None = None
    # The σ values swept: a list of distances, or None = the sigma_quantiles of every train image's
    # squared distance to its second-nearest final centroid (σ at quantile q gives a secondary
    # class to about a share q of the images, in whatever space the distances live: the official
    # σ = 0.8 gave 91% of images one in the official space and 0.6% in ours; docs/method.md §6).
    sigma_grid: list[NonNegative] | None = None
    sigma_quantiles: list[Unit] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 0.9])
    # Without validation ground truth: σ at this quantile (0.9: about the share the official
    # σ = 0.8 gives in the official distance space).
    sigma_fallback_quantile: Unit = 0.9
    # spo: components smaller than this (pixels) get no box. The official spo.py has no filter
    # (0 reproduces it); 100 is ours, against single-patch speckle of the patch-level argmax.
    min_area: NonNegativeInt = 100
    # spo: all (a box per component: the intended rule) | first (only each class's first
    # component in raster order: what the official Jittor predictor effectively prompts)
    spo_components: Literal["all", "first"] = "all"
    # sam_select: raw pixels under an automatic mask that failed the class test: drop (-> 0, as
    # SAM_WSSS max_iou_imp2.py) | keep (the raw label). Masks are scanned by predicted IoU, then area.
    select_fail: Literal["drop", "keep"] = "drop"
    gmm_confidence: Unit = 0.5
    sam_select_points_per_side: Count = 16


@dataclass
class PseudoLabelsConfig:
    # Saliency threshold t. None = chosen on a sweep of the validation pseudo labels over
    # threshold_grid (the official pipeline's --curve); without validation ground truth the
    # fallback is PASS's published value for data.classes (0.41 / 0.40 / 0.37).
    threshold: Unit | None = None
    # Down to 0.02: DINO's CLS attention, normalised per image, can need a much lower t than
    # PASS's sigmoid head (0.37-0.41) to cover whole objects.
    threshold_grid: list[Unit] = field(default_factory=lambda: [0.02, 0.05, *(round(0.1 + 0.05 * i, 2)
                                                                          for i in range(15))])
    # Pixel classes come from all C final centroids (the official rule) | the image's topk nearest.
    candidates: Literal["all", "topk"] = "all"
    image_size: Annotated[int, Range(8)] = 448  # DINO input size for patch features
    batch_size: Count = 8
    min_actors: Count = 1
    max_actors: Count = 4
    gpus_per_actor: NonNegative = 1.0
    refine: RefineConfig = field(default_factory=RefineConfig)


@dataclass
class FinetuneConfig:
    backbone: Annotated[str, Registry("pdso_ray.models.heads:BACKBONES")] = "dino"  # dino (stage 1's ViT) | resnet50
    epochs: Count = 20
    lr: Positive = 1e-4
    weight_decay: NonNegative = 0.05
    batch_size: Count = 32  # per worker
    crop_size: Annotated[int, Range(8)] = 224
    num_workers: Count = 2
    use_gpu: bool = True  # ignored when the cluster has no GPU
    cpus_per_worker: Positive = 1.0
    max_failures: NonNegativeInt = 2
    keep_checkpoints: NonNegativeInt = 2  # newest epoch checkpoints kept (resume needs one); 0 keeps all
    seed: Seed | None = None  # None = the top-level seed
    # ce (cross-entropy ignoring 1000) | agmm (ce + the AGMM terms, pdso_ray/method/agmm.py)
    loss: Literal["ce", "agmm"] = "ce"
    # Pseudo-label pixels the method is unsure of, which get the unlabelled id (1001): none |
    # disagreement (where the refined label differs from the raw one) | border (unlabelled_width
    # px on each side of every boundary of the refined label). The cross-entropy skips them;
    # loss: agmm supervises them with its Gaussian responses (docs/method.md §7).
    unlabelled: Literal["none", "disagreement", "border"] = "none"
    unlabelled_width: Count = 2
    # online EM: running Gaussians = momentum·old + (1-momentum)·batch
    agmm_momentum: Annotated[float, Range(0, 1, hi_open=True)] = 0.9
    # weights of the AGMM terms (CVPR AGMM weighs its terms 1)
    agmm_soft_target: NonNegative = 1.0  # BCE(prediction, GMM response)
    agmm_response: NonNegative = 1.0  # BCE(response, one-hot pseudo label)
    agmm_repulsion: NonNegative = 1.0  # between class prototypes
    agmm_absent: NonNegative = 1.0  # -log(1 - p) of classes absent from the image
    agmm_likelihood: NonNegative = 1.0  # NLL of features under their class's Gaussian


@dataclass
class PredictConfig:
    # argmax: the official decision rule, argmax over the C+1 outputs (background included) |
    # threshold: also PASS's foreground-threshold rule, its threshold tuned on validation ground
    # truth and reported beside the official number.
    background: Literal["argmax", "threshold"] = "argmax"
    short_side: Annotated[int, Range(8)] = 256
    batch_size: Count = 8
    min_actors: Count = 1
    max_actors: Count = 4
    gpus_per_actor: NonNegative = 1.0


@dataclass
class LightClusterConfig:
    """LightCluster (``method: lightcluster``; docs/method.md, "LightCluster"): training-free
    multi-level clustering of the last block's attention features."""

    feature: Literal["key", "query", "value"] = "key"  # which projection of the last block is clustered
    dataset_k: Annotated[int, Range(2)] = 2  # clusters of the dataset-level k-means over a patch sample
    category_k: Annotated[int, Range(2)] = 2  # clusters of each category's k-means over its sampled patches
    image_k: Annotated[int, Range(2)] = 2  # clusters of each image's own k-means
    # The levels whose masks vote. The image level alone is what won on data (docs/method.md §9:
    # with the stand-ins the dataset and category levels find objects far worse and drag any vote
    # down); [dataset, category, image] with a majority is the paper's consistency.
    voters: list[Literal["dataset", "category", "image"]] = field(default_factory=lambda: ["image"])
    # voters that must call a patch foreground: 1 union, len(voters) all; None = a majority of them
    min_votes: Annotated[int, Range(1, 3)] | None = None
    patches_per_image: Count = 4  # patches sampled per train image for the dataset and category levels
    niter: Count = 20
    nredo: Count = 30  # restarts of the distributed k-means (dataset level, labelling), as PDSO's
    # Labelling vector: object_cls (the CLS token of a forward pass restricted to the mask) |
    # image_cls (the image's CLS token, one forward pass fewer).
    labelling: Literal["object_cls", "image_cls"] = "object_cls"
    refine_iterations: NonNegativeInt = 10  # pixel-adaptive refinement steps of the upsampled mask (0 = none)
    refine_short_side: Count = 320  # resolution the mask is refined at, then resized to the image
    finetune: bool = False  # also train the segmentation model on LightCluster's labels (as PDSO)
    seed: Seed | None = None  # None = the top-level seed
    batch_size: Count = 16
    min_actors: Count = 1
    max_actors: Count = 4
    gpus_per_actor: NonNegative = 1.0


@dataclass
class RayConfig:
    address: str | None = None  # None = connect to a running cluster if any, else start locally
    num_cpus: Count | None = None  # local start only
    # None = use GPUs if the cluster has some when the run starts; true = ask for them anyway
    # (an autoscaling cluster whose GPU group is at 0 nodes scales up for the pending actors)
    use_gpu: bool | None = None


@dataclass
class TrackingConfig:
    """Training curves beyond the run folder's TensorBoard files (``OUTPUT/tensorboard/``)."""

    # An MLflow tracking URI (http://host:5000, file:///path, databricks, ...); None = no MLflow.
    # The training stages' rank 0 logs there too; needs `pip install mlflow`.
    mlflow_uri: str | None = None
    mlflow_experiment: str = "pdso-ray"


@dataclass
class PipelineConfig:
    output: str = "runs/demo"
    # How per-image PNG outputs are written (train pseudo labels, predictions): files (one PNG per
    # image, the ImageNet-S layout the official tools read) | webdataset (tar shards of PNGs, one
    # per batch, each with a Parquet index and per-image statistics). `output.format` is an alias.
    output_format: Literal["files", "webdataset"] = "files"
    # A colour preview (<split>_colour/<rel>.png) and an overlay on the image
    # (<split>_overlay/<rel>.jpg) beside every train pseudo label (raw, refined) and prediction:
    # auto (files with output_format: files, none with webdataset, where millions of small files
    # are what the shards avoid; the report draws its pictures from the shards either way) |
    # files | none. Written with the labels; changing it re-runs no stage.
    previews: Literal["auto", "files", "none"] = "auto"
    # pdso (the main method) | lightcluster (training-free; its outputs go below lightcluster/,
    # sharing the run folder's features and k-means with PDSO)
    method: Literal["pdso", "lightcluster"] = "pdso"
    stages: list[StageName] | None = None  # None = every stage of the method, in pipeline order
    # Seeds everything: random-init weights, k-means, denoising, augmentations, sampling.
    # A section's own `seed` overrides it for that section.
    seed: Seed = 0
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    purify: PurifyConfig = field(default_factory=PurifyConfig)
    pseudo_labels: PseudoLabelsConfig = field(default_factory=PseudoLabelsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    lightcluster: LightClusterConfig = field(default_factory=LightClusterConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # -- derived values --
    def seed_for(self, section: str) -> int:
        """The seed of one config section: its own ``seed`` when set, else the top-level one."""
        own = getattr(getattr(self, section), "seed", None)
        return self.seed if own is None else own

    def saliency_threshold(self) -> float:
        """The configured threshold t, else PASS's published value for the nearest of 50/300/919
        classes (the fallback when no validation sweep is possible)."""
        if self.pseudo_labels.threshold is not None:
            return self.pseudo_labels.threshold
        nearest = min(DEFAULT_SALIENCY_THRESHOLDS, key=lambda c: abs(c - self.data.classes))
        return DEFAULT_SALIENCY_THRESHOLDS[nearest]

    def storage_options(self) -> dict[str, dict[str, Any]]:
        """fsspec options per protocol, for :class:`pdso_ray.storage.Storage`."""
        s3 = self.storage.s3
        opts: dict[str, Any] = {}
        if s3.endpoint_url:
            opts["endpoint_url"] = s3.endpoint_url
        if s3.key:
            opts["key"] = s3.key
        if s3.secret:
            opts["secret"] = s3.secret
        if s3.token:
            opts["token"] = s3.token
        if s3.anon:
            opts["anon"] = True
        budget = self.storage
        opts["retries"] = budget.retries  # s3fs's own loop, around botocore's
        opts["config_kwargs"] = {"connect_timeout": budget.timeout_s, "read_timeout": budget.timeout_s,
                                 "retries": {"max_attempts": budget.retries, "mode": "adaptive"}}
        return {"s3": opts, "s3a": opts}

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some config sections (secrets excluded): a stage's identity in manifests."""
        full = to_dict(self, redact=True)
        picked = {name: _get_dotted(full, name) for name in sorted(sections)}
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- denoising profiles ---------------------------------------------------------------------------
# What each denoise.profile sets (docs/method.md, "Profiles"). Every profile lists the same keys, so
# that switching profiles changes no key another profile left alone; a key the config file or
# --set gives wins over its profile.
DENOISE_PROFILES: dict[str, dict[str, Any]] = {
    "anchored": {
        "denoise.dff": True, "denoise.space": "embedding", "denoise.head": "cosine",
        "denoise.head_init": "kmeans", "denoise.centre": True, "denoise.relabel": "agreed",
        "denoise.h_rows": "all", "denoise.prototypes": "weights", "denoise.finetune_blocks": 0,
        "purify.filter": True, "purify.init": "prototypes", "purify.kept_distance": "mean",
    },
    # The official code where the paper is silent: linear heads from random starts, g relabels
    # every image, h and every backbone block (99 >= any depth) fine-tuned on S2, k-means #2 and
    # #3 from random starts in the tuned backbone's feature space, pixels by cosine to those.
    "paper": {
        "denoise.dff": True, "denoise.space": "features", "denoise.head": "linear",
        "denoise.head_init": "random", "denoise.centre": False, "denoise.relabel": "g",
        "denoise.h_rows": "s2", "denoise.prototypes": "means", "denoise.finetune_blocks": 99,
        "purify.filter": True, "purify.init": "random", "purify.kept_distance": "centroid",
    },
    "plain": {
        "denoise.dff": False, "denoise.space": "features", "denoise.head": "cosine",
        "denoise.head_init": "kmeans", "denoise.centre": True, "denoise.relabel": "agreed",
        "denoise.h_rows": "all", "denoise.prototypes": "means", "denoise.finetune_blocks": 0,
        "purify.filter": False, "purify.init": "prototypes", "purify.kept_distance": "mean",
    },
}


def apply_profile(cfg: PipelineConfig, given: set[str]) -> None:
    """Set the keys of ``cfg.denoise.profile`` that are not in ``given`` (the dotted keys the
    config file and the overrides set). On precomputed features (``data.features``: no images, so
    no backbone) a profile's backbone fine-tuning is dropped (``finetune_blocks`` 0), not refused:
    the other rules apply as they are (docs/method.md, "Profiles")."""
    for key, value in DENOISE_PROFILES[cfg.denoise.profile].items():
        if key in given:
            continue
        if key == "denoise.finetune_blocks" and cfg.data.features:
            value = 0
        section, leaf = key.split(".")
        setattr(getattr(cfg, section), leaf, value)


def _dotted_keys(raw: dict[str, Any], prefix: str = "") -> set[str]:
    """Every dotted key a YAML mapping sets, sections included."""
    keys = set()
    for name, value in raw.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{name}.")
    return keys


# ---- validation -----------------------------------------------------------------------------------
def validate(cfg: PipelineConfig) -> PipelineConfig:
    """The rules that tie keys together (each value alone was checked against the schema when it
    was read); raises :class:`ConfigError` naming the key."""
    def need(cond: bool, key: str, value: Any, why: str) -> None:
        if not cond:
            raise ConfigError(f"{key}={value!r}: {why}")

    need(cfg.data.classes is not None, "data.classes", None,
         "is required: the number of categories C to discover (ImageNet-S: 50, 300 or 919; your "
         "own images: see the README, 'Your own images')")
    need(bool(cfg.output), "output", cfg.output, "must name a run folder or URL")
    need(bool(cfg.data.root), "data.root", cfg.data.root, "must name the folder or URL of the images")
    need(cfg.stages is None or len(cfg.stages) > 0, "stages", cfg.stages,
         "must name at least one stage (or be left out: every stage)")
    for name in cfg.stages or []:
        problem = method_problem(cfg.method, name)
        need(problem is None, "stages", cfg.stages, problem or "")
    need(cfg.denoise.prototypes == "means" or cfg.denoise.head == "cosine", "denoise.prototypes",
         cfg.denoise.prototypes, "weights needs denoise.head=cosine")
    need(cfg.denoise.head_init == "random" or cfg.denoise.head == "cosine", "denoise.head_init",
         cfg.denoise.head_init, "kmeans needs denoise.head=cosine (it sets class directions)")
    need(cfg.denoise.prototypes == "means" or cfg.denoise.space == "embedding", "denoise.prototypes",
         cfg.denoise.prototypes, "weights needs denoise.space=embedding (h's class directions live in its "
         "hidden layer): use means")
    need(cfg.denoise.dff or cfg.denoise.space == "features", "denoise.dff", cfg.denoise.dff,
         "false needs denoise.space=features (without h there is no hidden layer to embed with)")
    need(cfg.denoise.dff or not cfg.denoise.finetune_blocks, "denoise.finetune_blocks",
         cfg.denoise.finetune_blocks, "needs denoise.dff=true (the backbone is fine-tuned with h)")
    pt = cfg.pretrain
    need(pt.input_size is None or pt.input_size >= cfg.models.dino.image_size, "pretrain.input_size",
         pt.input_size, f"must be >= models.dino.image_size ({cfg.models.dino.image_size}), the global crop")
    for key in ("global_scale", "local_scale"):
        value = getattr(pt, key)
        need(value is None or (len(value) == 2 and value[0] <= value[1]), f"pretrain.{key}",
             value, "must be [min, max] with 0 < min <= max <= 1")
    need(len(cfg.pseudo_labels.threshold_grid) > 0, "pseudo_labels.threshold_grid",
         cfg.pseudo_labels.threshold_grid, "must be a non-empty list of values in [0, 1]")
    refine = cfg.pseudo_labels.refine
    need(refine.sigma_grid is None or len(refine.sigma_grid) > 0, "pseudo_labels.refine.sigma_grid",
         refine.sigma_grid, "must be null (quantiles) or a non-empty list of values >= 0")
    need(len(refine.sigma_quantiles) > 0, "pseudo_labels.refine.sigma_quantiles",
         refine.sigma_quantiles, "must be a non-empty list of values in [0, 1]")
    need(bool(cfg.tracking.mlflow_experiment), "tracking.mlflow_experiment", cfg.tracking.mlflow_experiment,
         "must name an MLflow experiment")
    lc = cfg.lightcluster
    need(len(lc.voters) > 0 and len(set(lc.voters)) == len(lc.voters), "lightcluster.voters", lc.voters,
         "must list distinct levels among dataset, category, image")
    need(lc.min_votes is None or lc.min_votes <= len(lc.voters), "lightcluster.min_votes", lc.min_votes,
         f"must be <= the number of lightcluster.voters ({len(lc.voters)})")
    for section in ("features", "pseudo_labels", "predict", "lightcluster"):
        lo, hi = _get_attr(cfg, f"{section}.min_actors"), _get_attr(cfg, f"{section}.max_actors")
        need(lo <= hi, f"{section}.min_actors", lo, f"must be <= {section}.max_actors ({hi})")
    return cfg


# ---- loading and overrides ------------------------------------------------------------------------
def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                text: str | None = None) -> PipelineConfig:
    """Load a YAML config (file path or ``text``), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if text is None and path is not None:
        source = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
    if text is not None:
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    cfg = _build(PipelineConfig, raw, prefix="")
    given = _dotted_keys(raw)
    for item in overrides:
        given.add(apply_override(cfg, item))
    apply_profile(cfg, given)
    return check_registries(validate(cfg))


def schema_leaves(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, type hint)`` of every value of the schema (``PipelineConfig`` by default),
    sections walked in declaration order."""
    out = []
    hints = _field_types(cls or PipelineConfig)
    for f in dataclasses.fields(cls or PipelineConfig):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += schema_leaves(hint, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hint))
    return out


def check_registries(cfg: PipelineConfig) -> PipelineConfig:
    """Every value that names a registry entry (:class:`Registry`) names one that exists. Last of
    the checks, because it imports the registries' modules (torch, timm: seconds), so that every
    other mistake is reported at once."""
    for key, hint in schema_leaves():
        value = _get_attr(cfg, key)
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is Annotated:  # Annotated[...] | None
                hint = arg
        rules = typing.get_args(hint)[1:] if typing.get_origin(hint) is Annotated else ()
        for rule in rules:
            if isinstance(rule, Registry) and value is not None and value not in (choices := rule.choices()):
                raise ConfigError(_choice_error(key, value, choices))
    return cfg


# Spellings accepted by --set for a key stored elsewhere (`output` itself is the run folder's URL).
OVERRIDE_ALIASES = {"output.format": "output_format"}


def apply_override(cfg: PipelineConfig, assignment: str) -> str:
    """Apply one ``a.b.c=value`` assignment; the value is parsed as YAML, then type-checked.
    Returns the dotted key it set."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    key = OVERRIDE_ALIASES.get(key.strip(), key.strip())
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            _unknown_key(".".join(parts[: i + 1]), fields)
        if i == len(parts) - 1:
            hint = _field_types(type(obj))[part]
            if key == "stages" and isinstance(value, str):
                value = [s.strip() for s in value.split(",") if s.strip()]
            setattr(obj, part, _coerce(value, hint, key))
            return key
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is a value, not a section")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in fields:
            _unknown_key(key, fields)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, prefix=f"{key}.")
        else:
            if name == "stages" and not prefix and isinstance(value, str):
                value = [s.strip() for s in value.split(",") if s.strip()]
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _unknown_key(key: str, fields: dict[str, Any]) -> None:
    leaf = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(leaf, list(fields), n=1)
    suggestion = f" (did you mean {key[: -len(leaf)]}{hint[0]!r}?)" if hint else ""
    raise ConfigError(f"unknown config key {key!r}{suggestion}; known here: {', '.join(fields)}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the schema's ``hint`` (a type, possibly ``Annotated`` with a
    :class:`Range`, :class:`Registry`, :class:`Choices` or :class:`FolderName`, or a ``Literal``);
    convert where lossless (int -> float, a comma string -> list). Raises :class:`ConfigError`,
    one line naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}={value!r}: invalid")
    if origin is Annotated:
        value = _coerce(value, args[0], key)
        for rule in args[1:]:
            _check_rule(rule, value, key)
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(_choice_error(key, value, [str(a) for a in args]))
    if origin is list:
        (item_type,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponent notation without a dot (1e-4) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _check_rule(rule: Any, value: Any, key: str) -> None:
    if isinstance(rule, Range):
        if value != value or not rule.holds(value):  # NaN fails every bound
            raise ConfigError(f"{key}={value!r}: must be {rule.describe()}")
    elif isinstance(rule, Choices):
        if value not in rule.values:
            raise ConfigError(_choice_error(key, value, list(rule.values)))
    elif isinstance(rule, FolderName):
        if not value or "/" in value:
            raise ConfigError(f"{key}={value!r}: must be one folder name (not empty, no '/')")


def _choice_error(key: str, value: Any, choices: list[str]) -> str:
    hint = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"{key}={value!r}: unknown{suggestion}; choose one of {', '.join(choices)}"


# ---- saving ---------------------------------------------------------------------------------------
def to_dict(cfg: Any, redact: bool = True) -> dict[str, Any]:
    """The config as plain data; with ``redact`` every secret-named value becomes ``***``."""
    out = dataclasses.asdict(cfg)
    return _redact(out) if redact else out


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: (REDACTED if _is_secret(k) and v not in (None, "") else _redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def _is_secret(name: str) -> bool:
    name = name.lower()
    return any(name == s or name.endswith("_" + s) for s in SECRET_KEYS)


def dump_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML, secrets redacted."""
    return yaml.safe_dump(to_dict(cfg, redact=True), sort_keys=False)


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _get_attr(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
