"""One typed configuration for the whole pipeline.

Nested dataclasses, one per stage, with the defaults of docs/method.md. Loaded from YAML,
overridden with dotted ``--set a.b=c`` assignments (values parsed as YAML scalars, then checked
against the field's type), validated (types and ranges), and saved resolved (secrets redacted)
beside the outputs. Every error names the offending key and value.

Choices that name a registry entry (stages, refiners, backbones, layouts) are checked against the
registries themselves by :func:`pdso_ray.preflight.check_choices`: this module lists none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

# Published per-benchmark saliency thresholds for pixel pseudo labels (docs/method.md §5).
DEFAULT_SALIENCY_THRESHOLDS = {50: 0.41, 300: 0.40, 919: 0.37}

# Class ids 1..C must stay below the ignore id 1000 of the ImageNet-S label codec.
MAX_CLASSES = 999

SECRET_KEYS = ("key", "secret", "token", "password", "session_token", "aws_secret_access_key")
REDACTED = "***"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


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


@dataclass
class DataConfig:
    root: str = "demo/data"  # imagenet_s: folder or URL holding ImageNetS{classes}/; folder: the images
    classes: int | None = None  # C, the number of categories (required)
    layout: str = "imagenet_s"  # imagenet_s | folder (any tree of images, no splits, no ground truth)
    # Whether the first folder below a split is the image's class (ImageNet-S wnids): per-run
    # diagnostics then score every clustering against it. None = the layout's default.
    folder_is_class: bool | None = None
    class_list: str | None = None  # optional file with one wnid per line (benchmark order)
    features: str | None = None  # precomputed features folder: stage 1 is skipped
    max_pixels: int = 89_478_485  # decompression-bomb limit per image
    max_file_bytes: int = 256 * 1024 * 1024  # larger input files are rejected unread
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["validation", "test"])
    limit: int | None = None  # use only the first N train images (debugging)


@dataclass
class DinoConfig:
    arch: str = "vit_small_patch8"
    checkpoint: str | None = None  # URL of an official DINO .pth or a timm state dict
    image_size: int = 224


@dataclass
class SamConfig:
    arch: str = "vit_b"
    checkpoint: str | None = None  # URL of an official SAM .pth (sam_vit_b_01ec64.pth)
    image_size: int | None = None  # None = the architecture's native 1024
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

    epochs: int = 60
    batch_size: int = 64  # per worker
    # Side of the square each image is decoded and resized to before cropping; None = 1.5x the
    # backbone's input (models.dino.image_size), rounded to a multiple of 8.
    input_size: int | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = True  # when the cluster has GPUs
    decode_cpus: float = 1.0
    max_failures: int = 2  # worker restarts (from the last epoch's checkpoint) before giving up
    keep_checkpoints: int = 2
    probe_images: int = 64  # fixed train images the per-epoch saliency probe runs on
    # Collapse guard: from this epoch on, a teacher whose outputs carry less than min_kl_div nats
    # of information about the image (H(mean q) - mean H(q)) has collapsed; the run stops.
    collapse_after_epochs: int = 5
    min_kl_div: float = 0.5
    seed: int | None = None  # None = the top-level seed
    # recipe (None = DinoPretrainConfig's default)
    lr: float | None = None  # peak, as used: scale it with the total batch yourself
    min_lr: float | None = None
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    weight_decay_end: float | None = None
    momentum: float | None = None  # teacher EMA momentum at the start (cosine to momentum_end)
    momentum_end: float | None = None
    teacher_temp: float | None = None
    warmup_teacher_temp: float | None = None
    warmup_teacher_temp_epochs: float | None = None
    clip_grad: float | None = None
    freeze_last_layer_epochs: float | None = None
    out_dim: int | None = None  # prototypes K of the projection head
    head_hidden_dim: int | None = None
    head_bottleneck_dim: int | None = None
    global_scale: list[float] | None = None  # [min, max] area share of the 2 global views
    num_local: int | None = None
    local_size: int | None = None
    local_scale: list[float] | None = None
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    patch_loss_weight: float | None = None  # iBOT masked-patch term (0 = off)


@dataclass
class FeaturesConfig:
    batch_size: int = 64
    min_actors: int = 1
    max_actors: int = 4
    gpus_per_actor: float = 1.0  # ignored (0) when the cluster has no GPU
    cpus_per_actor: float = 1.0
    decode_cpus: float = 1.0
    rows_per_file: int = 4096  # rows per features Parquet file (the resume and shard granularity)


@dataclass
class ClusterConfig:
    niter: int = 20
    nredo: int = 30  # best of n random starts by objective (the paper's faiss setting)
    seed: int | None = None  # None = the top-level seed
    num_shards: int | None = None  # None = one per CPU (or GPU) in the cluster


@dataclass
class DenoiseConfig:
    keep_ratio: float = 0.5
    epochs_f: int = 15
    epochs_g: int = 50
    epochs_h: int = 50
    hidden_dim: int = 256  # D' of the MLP h: D -> D' -> C
    lr: float = 1e-3
    batch_size: int = 1024
    seed: int | None = None  # None = the top-level seed
    # Output layer of f, g, h: cosine (logit_scale * cos(z, w_c): trains the normalised embedding
    # k-means #2 clusters in) | linear (W z + b).
    head: str = "cosine"
    logit_scale: float = 16.0
    centre: bool = True  # f and g subtract the mean feature first (a cosine head has no bias)
    # f and g start at: kmeans (their class directions at the k-means #1 clusters' mean directions,
    # needs head=cosine) | random.
    head_init: str = "kmeans"
    # The relabelling h trains on (h_rows=all): agreed (g's prediction where f predicts the same,
    # else the k-means label) | g (g's prediction everywhere). docs/method.md §3.
    relabel: str = "agreed"
    # S2 = g's small-loss subset against: kmeans (the k-means #1 labels, as the paper) | relabel
    # (g's own prediction); h trains on S2 with those labels.
    s2_labels: str = "kmeans"
    # h trains on: s2 (S2 with the labels above, the paper) | all (every image with g's
    # relabelling, so that e(x) carries g's partition; docs/method.md §3).
    h_rows: str = "all"
    # Where k-means #2 starts: weights (h's cosine-head class directions: the nearest is h's own
    # prediction) | means (the mean embedding of each class over h's training rows).
    prototypes: str = "weights"
    # Optimiser steps each of f, g and h takes at least: on small data epochs × ceil(rows /
    # batch_size) is a few dozen steps (the demo's g: 60) and the minibatch shrinks to reach this
    # many; on ImageNet-S sizes (>= 600 steps at 15 epochs) it never binds. 0: batch_size always.
    min_steps: int = 500
    # Features (feat + feat_flip, float32) up to this size are loaded once into the denoise task's
    # memory; larger ones stream from Parquet on every pass. S919 at D=384 is 3.9 GB and fits.
    max_in_memory_gb: float = 4.0
    # Backbone fine-tuning with h (docs/method.md §3): after h trains on the frozen features, it
    # trains on, jointly with the backbone's last finetune_blocks blocks (>= depth: all of it, the
    # paper; 0: the frozen-feature variant), for finetune_epochs over h's training images; the
    # tuned backbone then embeds every image for k-means #2/#3 and gives the pixel features.
    finetune_blocks: int = 0
    finetune_epochs: int = 5
    finetune_lr: float = 1e-5  # the backbone's peak learning rate (cosine decay, AdamW)
    finetune_head_lr: float = 1e-4  # h's, continuing from its frozen-feature training
    finetune_batch_size: int = 64  # images per worker and step (each with its flip)
    finetune_workers: int = 1  # Ray Train (DDP) workers, one GPU each when the cluster has GPUs
    finetune_cpus_per_worker: float = 1.0
    finetune_max_failures: int = 2  # worker restarts from the last epoch's checkpoint


@dataclass
class PurifyConfig:
    dist_quantile: float = 0.8
    alpha: float = 2.0
    topk: int = 50
    niter: int = 20
    seed: int | None = None  # None = the top-level seed
    # Where k-means #2 and #3 start: prototypes (#2 from the mean embedding of each class over
    # h's training set S2, #3 from #2's centroids) | random (random rows, best of nredo: the paper).
    init: str = "prototypes"
    nredo: int = 30  # restarts of k-means #2 and #3 with init=random
    # Lloyd iterations with init=prototypes (niter is for random starts): k-means #2 from the
    # prototypes (0: every image to its nearest prototype, h's partition) and #3 from #2's
    # centroids on the kept images (0: #2's centroids are final; 1: the kept images' means).
    # 0: Lloyd on all images drifts towards ambiguous ones and a step on the kept set moved the
    # final assignment below #2 (known-truth benchmark); an h too weak to be final came from
    # too few optimiser steps on small data, which denoise.min_steps now prevents.
    prototype_niter2: int = 0
    prototype_niter3: int = 0
    # The rules rank each k-means #2 cluster's images by squared distance to: mean (the mean e(x)
    # of its members) | centroid (the #2 centroid: h's class direction with 0 iterations).
    kept_distance: str = "mean"


@dataclass
class RefineConfig:
    method: str = "spo"  # spo | sam_select | gmm | none
    # Secondary classes: other candidates whose squared distance to the image embedding is
    # <= sigma (the official --yz). None = chosen on validation from sigma_grid (the authors tried
    # 0.5, 0.65 and 0.8); without validation ground truth the fallback is 0.8.
    sigma: float | None = None
    sigma_grid: list[float] = field(default_factory=lambda: [0.5, 0.65, 0.8, 1.0])
    # spo: components smaller than this (pixels) get no box. The official spo.py has no filter
    # (0 reproduces it); 100 is ours, against single-patch speckle of the patch-level argmax.
    min_area: int = 100
    # spo: all (a box per component: the intended rule) | first (only each class's first
    # component in raster order: what the official Jittor predictor effectively prompts)
    spo_components: str = "all"
    # sam_select: raw pixels under an automatic mask that failed the class test: drop (-> 0, as
    # SAM_WSSS max_iou_imp2.py) | keep (the raw label). Masks are scanned by predicted IoU, then area.
    select_fail: str = "drop"
    gmm_confidence: float = 0.5
    sam_select_points_per_side: int = 16


@dataclass
class PseudoLabelsConfig:
    # Saliency threshold t. None = chosen on a sweep of the validation pseudo labels over
    # threshold_grid (the official pipeline's --curve); without validation ground truth the
    # fallback is PASS's published value for data.classes (0.41 / 0.40 / 0.37).
    threshold: float | None = None
    threshold_grid: list[float] = field(default_factory=lambda: [round(0.2 + 0.05 * i, 2) for i in range(13)])
    # Pixel classes come from all C final centroids (the official rule) | the image's topk nearest.
    candidates: str = "all"
    image_size: int = 448  # DINO input size for patch features
    batch_size: int = 8
    min_actors: int = 1
    max_actors: int = 4
    gpus_per_actor: float = 1.0
    refine: RefineConfig = field(default_factory=RefineConfig)


@dataclass
class FinetuneConfig:
    backbone: str = "dino"  # dino (the stage-1 ViT) | resnet50
    epochs: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.05
    batch_size: int = 32  # per worker
    crop_size: int = 224
    num_workers: int = 2
    use_gpu: bool = True  # ignored when the cluster has no GPU
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    keep_checkpoints: int = 2  # newest epoch checkpoints kept (resume needs one); 0 keeps all
    seed: int | None = None  # None = the top-level seed
    # ce (cross-entropy ignoring 1000) | agmm (ce + the AGMM terms, pdso_ray/method/agmm.py)
    loss: str = "ce"
    agmm_momentum: float = 0.9  # online EM: running Gaussians = momentum·old + (1-momentum)·batch
    # weights of the AGMM terms (CVPR AGMM weighs its terms 1)
    agmm_soft_target: float = 1.0  # BCE(prediction, GMM response)
    agmm_response: float = 1.0  # BCE(response, one-hot pseudo label)
    agmm_repulsion: float = 1.0  # between class prototypes
    agmm_absent: float = 1.0  # -log(1 - p) of classes absent from the image
    agmm_likelihood: float = 1.0  # NLL of features under their class's Gaussian


@dataclass
class PredictConfig:
    # argmax: the official decision rule, argmax over the C+1 outputs (background included) |
    # threshold: also PASS's foreground-threshold rule, its threshold tuned on validation ground
    # truth and reported beside the official number.
    background: str = "argmax"
    short_side: int = 256
    batch_size: int = 8
    min_actors: int = 1
    max_actors: int = 4
    gpus_per_actor: float = 1.0


@dataclass
class LightClusterConfig:
    """LightCluster (``method: lightcluster``; docs/method.md, "LightCluster"): training-free
    multi-level clustering of the last block's attention features."""

    feature: str = "key"  # which projection of the last block is clustered: key | query | value
    dataset_k: int = 2  # clusters of the dataset-level k-means over a patch sample
    category_k: int = 2  # clusters of each category's k-means over its images' sampled patches
    image_k: int = 2  # clusters of each image's own k-means
    min_votes: int = 2  # levels (of 3) that must call a patch foreground: 1 union, 2 majority, 3 all
    patches_per_image: int = 4  # patches sampled per train image for the dataset and category levels
    niter: int = 20
    nredo: int = 30  # restarts of the distributed k-means (dataset level, labelling), as PDSO's
    # Labelling vector: object_cls (the CLS token of a forward pass restricted to the mask) |
    # image_cls (the image's CLS token, one forward pass fewer).
    labelling: str = "object_cls"
    refine_iterations: int = 10  # pixel-adaptive refinement steps of the upsampled mask (0 = none)
    refine_short_side: int = 320  # resolution the mask is refined at, then resized to the image
    finetune: bool = False  # also train the segmentation model on LightCluster's labels (as PDSO)
    seed: int | None = None  # None = the top-level seed
    batch_size: int = 16
    min_actors: int = 1
    max_actors: int = 4
    gpus_per_actor: float = 1.0


@dataclass
class RayConfig:
    address: str | None = None  # None = connect to a running cluster if any, else start locally
    num_cpus: int | None = None  # local start only
    # None = use GPUs if the cluster has some when the run starts; true = ask for them anyway
    # (an autoscaling cluster whose GPU group is at 0 nodes scales up for the pending actors)
    use_gpu: bool | None = None


@dataclass
class PipelineConfig:
    output: str = "runs/demo"
    # pdso (the main method) | lightcluster (training-free; its outputs go below lightcluster/,
    # sharing the run folder's features and k-means with PDSO)
    method: str = "pdso"
    stages: list[str] | None = None  # None = every stage of the method, in pipeline order
    # Seeds everything: random-init weights, k-means, denoising, augmentations, sampling.
    # A section's own `seed` overrides it for that section.
    seed: int = 0
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
        return {"s3": opts, "s3a": opts}

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some config sections (secrets excluded): a stage's identity in manifests."""
        full = to_dict(self, redact=True)
        picked = {name: _get_dotted(full, name) for name in sorted(sections)}
        blob = json.dumps(picked, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- validation -----------------------------------------------------------------------------------
def validate(cfg: PipelineConfig) -> PipelineConfig:
    def need(cond: bool, key: str, value: Any, why: str) -> None:
        if not cond:
            raise ConfigError(f"{key}={value!r}: {why}")

    need(cfg.data.classes is not None, "data.classes", None,
         "is required: the number of categories C to discover (ImageNet-S: 50, 300 or 919; your "
         "own images: see the README, 'Your own images')")
    need(1 <= cfg.data.classes <= MAX_CLASSES, "data.classes", cfg.data.classes,
         f"must be in 1..{MAX_CLASSES} (class ids must stay below the ignore id 1000)")
    need(bool(cfg.output), "output", cfg.output, "must name a run folder or URL")
    need(cfg.stages is None or len(cfg.stages) > 0, "stages", cfg.stages,
         "must name at least one stage (or be left out: every stage)")
    need(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    if cfg.data.limit is not None:
        need(cfg.data.limit >= 1, "data.limit", cfg.data.limit, "must be >= 1 (or null: all images)")
    for key in ("data.max_pixels", "data.max_file_bytes"):
        need(_get_attr(cfg, key) >= 1, key, _get_attr(cfg, key), "must be >= 1")
    need(cfg.denoise.max_in_memory_gb >= 0, "denoise.max_in_memory_gb", cfg.denoise.max_in_memory_gb,
         "must be >= 0 (0 streams always)")
    need(cfg.denoise.min_steps >= 0, "denoise.min_steps", cfg.denoise.min_steps, "must be >= 0 (0: no floor)")
    need(0 < cfg.denoise.keep_ratio <= 1, "denoise.keep_ratio", cfg.denoise.keep_ratio, "must be in (0, 1]")
    need(0 < cfg.purify.dist_quantile <= 1, "purify.dist_quantile", cfg.purify.dist_quantile,
         "must be in (0, 1]")
    need(cfg.purify.alpha >= 1, "purify.alpha", cfg.purify.alpha, "must be >= 1")
    need(cfg.purify.topk >= 1, "purify.topk", cfg.purify.topk, "must be >= 1")
    need(cfg.purify.init in ("prototypes", "random"), "purify.init", cfg.purify.init,
         "must be prototypes or random")
    need(cfg.purify.nredo >= 1, "purify.nredo", cfg.purify.nredo, "must be >= 1")
    need(cfg.purify.kept_distance in ("mean", "centroid"), "purify.kept_distance", cfg.purify.kept_distance,
         "must be mean or centroid")
    for key in ("purify.prototype_niter2", "purify.prototype_niter3"):
        need(_get_attr(cfg, key) >= 0, key, _get_attr(cfg, key), "must be >= 0")
    need(cfg.denoise.head in ("cosine", "linear"), "denoise.head", cfg.denoise.head, "must be cosine or linear")
    need(cfg.denoise.logit_scale > 0, "denoise.logit_scale", cfg.denoise.logit_scale, "must be > 0")
    need(cfg.denoise.s2_labels in ("kmeans", "relabel"), "denoise.s2_labels", cfg.denoise.s2_labels,
         "must be kmeans or relabel")
    need(cfg.denoise.h_rows in ("s2", "all"), "denoise.h_rows", cfg.denoise.h_rows, "must be s2 or all")
    need(cfg.denoise.prototypes in ("weights", "means"), "denoise.prototypes", cfg.denoise.prototypes,
         "must be weights or means")
    need(cfg.denoise.prototypes == "means" or cfg.denoise.head == "cosine", "denoise.prototypes",
         cfg.denoise.prototypes, "weights needs denoise.head=cosine")
    need(cfg.cluster.niter >= 1, "cluster.niter", cfg.cluster.niter, "must be >= 1")
    need(cfg.cluster.nredo >= 1, "cluster.nredo", cfg.cluster.nredo, "must be >= 1")
    pt = cfg.pretrain
    for key in ("epochs", "batch_size", "num_workers", "probe_images"):
        need(getattr(pt, key) >= 1, f"pretrain.{key}", getattr(pt, key), "must be >= 1")
    need(pt.input_size is None or pt.input_size >= cfg.models.dino.image_size, "pretrain.input_size",
         pt.input_size, f"must be >= models.dino.image_size ({cfg.models.dino.image_size}), the global crop")
    for key in ("global_scale", "local_scale"):
        value = getattr(pt, key)
        need(value is None or (len(value) == 2 and 0 < value[0] <= value[1] <= 1), f"pretrain.{key}",
             value, "must be [min, max] with 0 < min <= max <= 1")
    if cfg.pseudo_labels.threshold is not None:
        need(0 <= cfg.pseudo_labels.threshold <= 1, "pseudo_labels.threshold",
             cfg.pseudo_labels.threshold, "must be in [0, 1]")
    grid = cfg.pseudo_labels.threshold_grid
    need(bool(grid) and all(0 <= t <= 1 for t in grid), "pseudo_labels.threshold_grid", grid,
         "must be a non-empty list of values in [0, 1]")
    sigmas = cfg.pseudo_labels.refine.sigma_grid
    need(bool(sigmas) and all(v >= 0 for v in sigmas), "pseudo_labels.refine.sigma_grid", sigmas,
         "must be a non-empty list of values >= 0")
    need(cfg.pseudo_labels.candidates in ("all", "topk"), "pseudo_labels.candidates",
         cfg.pseudo_labels.candidates, "must be all or topk")
    need(cfg.predict.background in ("argmax", "threshold"), "predict.background",
         cfg.predict.background, "must be argmax or threshold")
    need(cfg.finetune.keep_checkpoints >= 0, "finetune.keep_checkpoints", cfg.finetune.keep_checkpoints,
         "must be >= 0 (0 keeps every epoch's checkpoint)")
    for key in ("features.batch_size", "pseudo_labels.batch_size", "finetune.batch_size",
                "predict.batch_size", "features.min_actors", "features.max_actors",
                "features.rows_per_file", "pseudo_labels.min_actors", "pseudo_labels.max_actors",
                "pseudo_labels.image_size", "predict.min_actors", "predict.max_actors",
                "predict.short_side", "finetune.num_workers", "finetune.epochs",
                "finetune.crop_size", "models.dino.image_size", "purify.niter",
                "denoise.batch_size", "denoise.hidden_dim", "denoise.finetune_epochs",
                "denoise.finetune_batch_size", "denoise.finetune_workers"):
        value = _get_attr(cfg, key)
        need(value >= 1, key, value, "must be >= 1")
    for key in ("denoise.epochs_f", "denoise.epochs_g", "denoise.epochs_h",
                "pseudo_labels.refine.min_area", "finetune.max_failures", "denoise.finetune_blocks",
                "denoise.finetune_max_failures"):
        value = _get_attr(cfg, key)
        need(value >= 0, key, value, "must be >= 0")
    for key in ("denoise.lr", "finetune.lr", "features.cpus_per_actor", "finetune.cpus_per_worker",
                "denoise.finetune_lr", "denoise.finetune_head_lr", "denoise.finetune_cpus_per_worker"):
        value = _get_attr(cfg, key)
        need(value > 0, key, value, "must be > 0")
    for key in ("features.gpus_per_actor", "pseudo_labels.gpus_per_actor", "predict.gpus_per_actor",
                "features.decode_cpus", "finetune.weight_decay"):
        value = _get_attr(cfg, key)
        need(value >= 0, key, value, "must be >= 0")
    if cfg.pseudo_labels.refine.sigma is not None:
        need(cfg.pseudo_labels.refine.sigma >= 0, "pseudo_labels.refine.sigma",
             cfg.pseudo_labels.refine.sigma, "must be >= 0")
    if cfg.models.sam.image_size is not None:
        need(cfg.models.sam.image_size >= 16 and cfg.models.sam.image_size % 16 == 0,
             "models.sam.image_size", cfg.models.sam.image_size, "must be a positive multiple of 16")
    if cfg.ray.num_cpus is not None:
        need(cfg.ray.num_cpus >= 1, "ray.num_cpus", cfg.ray.num_cpus, "must be >= 1 (or null)")
    need(cfg.method in ("pdso", "lightcluster"), "method", cfg.method, "must be pdso or lightcluster")
    lc = cfg.lightcluster
    need(lc.feature in ("key", "query", "value"), "lightcluster.feature", lc.feature, "must be key, query or value")
    need(lc.labelling in ("object_cls", "image_cls"), "lightcluster.labelling", lc.labelling,
         "must be object_cls or image_cls")
    for key in ("lightcluster.dataset_k", "lightcluster.category_k", "lightcluster.image_k"):
        value = _get_attr(cfg, key)
        need(value >= 2, key, value, "must be >= 2 (foreground and background)")
    need(1 <= lc.min_votes <= 3, "lightcluster.min_votes", lc.min_votes, "must be 1, 2 or 3 (of the three levels)")
    for key in ("lightcluster.patches_per_image", "lightcluster.niter", "lightcluster.nredo",
                "lightcluster.refine_short_side", "lightcluster.batch_size", "lightcluster.min_actors",
                "lightcluster.max_actors"):
        value = _get_attr(cfg, key)
        need(value >= 1, key, value, "must be >= 1")
    for key in ("lightcluster.refine_iterations", "lightcluster.gpus_per_actor"):
        value = _get_attr(cfg, key)
        need(value >= 0, key, value, "must be >= 0")
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
    for item in overrides:
        apply_override(cfg, item)
    return validate(cfg)


def apply_override(cfg: PipelineConfig, assignment: str) -> None:
    """Apply one ``a.b.c=value`` assignment; the value is parsed as YAML, then type-checked."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    key = key.strip()
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
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint``; convert where lossless (int -> float, str -> list)."""
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
