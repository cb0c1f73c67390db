"""The run folder's layout: the only place that turns the config and an image id into a path.

A run folder (``output:``, any fsspec URL) holds every artifact of a run (docs/architecture.md,
"The run folder")::

    _LEASE.json  pretrain/     features/    rejected/    inputs/    cluster/   (shared by both methods)
    config.yaml  summary.json  denoise/     purify/                   (PDSO, at the top)
    labels/{raw,refined}/<id>.png            labels/stats/*.parquet
    finetune/    predictions/<id>.png        eval/        report/
    lightcluster/   config.yaml summary.json levels/ labels/ [finetune/ predictions/] eval/ report/

**Methods.** PDSO's folders sit at the top of the run folder; another method's (``method:
lightcluster``) sit below a folder of its name (:attr:`RunLayout.method_root`), with the same
names inside, so both methods can run on one folder and share its ``features`` and k-means
(:data:`pdso_ray.plan.SHARED_STAGES`), and the report can set them side by side.

**Image ids** (:mod:`pdso_ray.data.ids`): every per-image output is ``<folder>/<id>.png``, the id
checked by :func:`~pdso_ray.data.ids.check_id` before it becomes a path.

**Previews** (``previews``, docs/architecture.md): beside the split folder of every label PNG
(``labels/{raw,refined}/<split>/``, ``predictions/<split>/``) sit ``<split>_colour/<rel>.png``
(the label in the project's palette) and ``<split>_overlay/<rel>.jpg`` (the image with it blended
in): siblings, so no reader of the labels ever lists them as labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pdso_ray.config import ConfigError, PipelineConfig, load_config
from pdso_ray.data.ids import LABEL_SUFFIX, check_id, png_rel, rel_of, split_of
from pdso_ray.plan import MAIN_METHOD, METHODS, SHARED_STAGES
from pdso_ray.storage import Storage

OVERLAY_SUFFIX = ".jpg"
# Label PNGs that get a colour preview and an overlay (RunLayout.colour_png, RunLayout.overlay_jpg).
PREVIEW_KINDS = ("raw", "refined", "predictions")

# The steps that assign images to clusters, in chain order: the keys of summary.json's
# diagnostics.image (each {purity, nmi, accuracy, images}).
IMAGE_DIAGNOSTIC_STEPS = ("cluster", "denoise_s1", "denoise_relabel", "denoise_s2", "purify_kmeans2",
                          "purify_kept", "purify_final")
# Folders of labels/ (see RunLayout.label_dir).
LABEL_KINDS = ("raw", "refined", "classmap", "saliency")
# Top-level files of the run folder.
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
SEGMENT_FILE = "segment.json"
LEASE_FILE = "_LEASE.json"
STARTED_FILE = "_STARTED.json"  # inside a stage folder: the key of a run in progress
# A stage whose folder is not named after it (inside lightcluster/, "lightcluster" would repeat).
STAGE_FOLDERS = {"lightcluster": "levels"}


# ---- the run folder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run folder, for one method.

    ``root``: the run folder URL (``cfg.output``); ``features_source``: a folder of precomputed
    features that replaces this run's ``features/`` (``cfg.data.features``), or None;
    ``method``: whose outputs the method-specific paths point at (module docstring).
    Picklable: stages hand it to Ray actors, which build their output paths with it.
    """

    root: str
    features_source: str | None = None
    method: str = MAIN_METHOD

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> RunLayout:
        return cls(root=cfg.output, features_source=cfg.data.features or None, method=cfg.method)

    def for_method(self, method: str) -> RunLayout:
        """The same run folder seen by ``method`` (the report reads the other method's results)."""
        return RunLayout(self.root, self.features_source, method)

    def path(self, *parts: str) -> str:
        """A path at the top of the run folder (shared by every method)."""
        return Storage.join(self.root, *parts)

    @property
    def method_root(self) -> str:
        """Where this method's outputs live: the run folder for PDSO, ``<method>/`` otherwise."""
        return self.root if self.method == MAIN_METHOD else self.path(self.method)

    def method_path(self, *parts: str) -> str:
        """A path below :attr:`method_root`."""
        return Storage.join(self.method_root, *parts)

    # -- top level --
    @property
    def config_file(self) -> str:
        """The config this method's last run used (secrets redacted)."""
        return self.method_path(CONFIG_FILE)

    @property
    def summary_file(self) -> str:
        return self.method_path(SUMMARY_FILE)

    @property
    def lease_file(self) -> str:
        """One lease for the whole folder: two runs never write it at once, whatever their method."""
        return self.path(LEASE_FILE)

    def stage_dir(self, stage: str) -> str:
        """The folder a stage owns (its ``_SUCCESS.json`` manifest lives here): at the top for the
        shared stages, below :attr:`method_root` for the rest."""
        folder = STAGE_FOLDERS.get(stage, stage)
        return self.path(folder) if stage in SHARED_STAGES else self.method_path(folder)

    def started_file(self, stage: str) -> str:
        return Storage.join(self.stage_dir(stage), STARTED_FILE)

    # -- stage 0 (optional): pretrain --
    @property
    def pretrain_dir(self) -> str:
        """Ray Train's run (``train/epoch_NNNN/`` checkpoints), ``history.json``, the teacher."""
        return self.path("pretrain")

    @property
    def pretrain_history(self) -> str:
        """Per-epoch loss and collapse diagnostics of the pretraining run (a JSON list)."""
        return self.path("pretrain", "history.json")

    @property
    def pretrain_teacher(self) -> str:
        """The teacher backbone in the official DINO release layout, rewritten after every epoch
        (the latest): what ``features``, ``pseudo_labels`` and ``finetune`` load when
        ``models.dino.checkpoint`` is unset."""
        return self.path("pretrain", "dino_teacher.pth")

    def pretrain_epoch_teacher(self, epoch: int) -> str:
        """The teacher after ``epoch`` (1-based), kept every ``pretrain.teacher_every`` epochs:
        a fixed file to point ``models.dino.checkpoint`` at while pretraining goes on."""
        return self.path("pretrain", "teachers", f"epoch_{epoch:04d}.pth")

    # -- stage 1: features --
    @property
    def features_dir(self) -> str:
        """Where the pooled features are read from: ``data.features`` or this run's ``features/``."""
        return self.features_source or self.path("features")

    def input_index(self, stage: str) -> str:
        """``inputs/<stage>.parquet``: the files a stage read from outside the run folder when it
        last completed (``id``, ``path``, ``version``: size and modification stamp), so that a
        re-run recomputes exactly the images added or replaced since."""
        return self.path("inputs", f"{stage}.parquet")

    @property
    def rejected_dir(self) -> str:
        """Images that could not be used, with their reasons (``id``, ``path``, ``reason``)."""
        return self.path("rejected")

    # -- stages 2-4 --
    def centroids_file(self, stage: str) -> str:
        """``cluster/centroids.npy`` (k-means #1) or ``purify/centroids.npy`` (final, embedding
        space)."""
        return Storage.join(self.stage_dir(stage), "centroids.npy")

    def aligned_file(self, stage: str, feature_file: str) -> str:
        """The file of ``stage`` (cluster, denoise, purify) aligned row by row with one feature
        file: same name, in the stage's folder."""
        return Storage.join(self.stage_dir(stage), feature_file.rsplit("/", 1)[-1])

    @property
    def denoise_classifier(self) -> str:
        """The classifier h whose hidden layer is the embedding e(x)."""
        return Storage.join(self.stage_dir("denoise"), "classifier.pt")

    @property
    def denoise_backbone(self) -> str:
        """With ``denoise.finetune_blocks``: the DINO backbone fine-tuned with h (official DINO
        release layout), what k-means #2/#3's embeddings and the pixel pseudo labels come from."""
        return Storage.join(self.stage_dir("denoise"), "backbone.pth")

    @property
    def denoise_tuning_dir(self) -> str:
        """Ray Train's run of the backbone fine-tuning (``epoch_NNNN/`` checkpoints)."""
        return Storage.join(self.stage_dir("denoise"), "tuning")

    # -- stage 5: pixel pseudo labels --
    def label_dir(self, kind: str, split: str | None = None) -> str:
        """``labels/<kind>`` (or its ``split`` folder): ``raw`` and ``refined`` labels,
        ``classmap`` (validation: the class of every pixel before the saliency threshold) and
        ``saliency`` (validation: 8-bit saliency maps)."""
        if kind not in LABEL_KINDS:
            raise ValueError(f"label kind must be one of {LABEL_KINDS}, got {kind!r}")
        return self.method_path("labels", kind, *([split] if split else []))

    def label_png(self, kind: str, image_id_: str) -> str:
        return Storage.join(self.label_dir(kind), check_id(image_id_) + LABEL_SUFFIX)

    def sweep_dir(self, sigma: float, split: str | None = None) -> str:
        """Refined validation labels made with SPO's secondary-class distance ``sigma``."""
        return self.method_path("labels", "sweep", f"sigma_{sigma:g}", *([split] if split else []))

    def sweep_png(self, sigma: float, image_id_: str) -> str:
        return Storage.join(self.sweep_dir(sigma), check_id(image_id_) + LABEL_SUFFIX)

    @property
    def label_stats_dir(self) -> str:
        return self.method_path("labels", "stats")

    # -- LightCluster (method: lightcluster): its stage folder lightcluster/levels/ --
    def lightcluster_path(self, *parts: str) -> str:
        """``lightcluster/levels/<parts>``: the patch sample (``samples/``), the fitted levels
        (``*.npy``), the labelling vectors (``vectors/{train,eval}/``), the per-image mask bits
        (``masks/<id>.png``), what the label pass finished (``labelled/``) and the images it could
        not read (``rejected_{sample,segment}/``)."""
        return Storage.join(self.stage_dir("lightcluster"), *parts)

    def lightcluster_mask_png(self, image_id_: str) -> str:
        return self.lightcluster_path("masks", check_id(image_id_) + LABEL_SUFFIX)

    def level_dir(self, level: str, split: str | None = None) -> str:
        """Validation labels from one LightCluster mask (a level, the consistent mask before
        refinement, or the refined one), for the ablation: ``labels/levels/<level>/<split>``."""
        return self.method_path("labels", "levels", level, *([split] if split else []))

    def level_png(self, level: str, image_id_: str) -> str:
        return Storage.join(self.level_dir(level), check_id(image_id_) + LABEL_SUFFIX)

    # -- stage 6: fine-tuning --
    @property
    def finetune_dir(self) -> str:
        return self.method_path("finetune")

    @property
    def finetune_history(self) -> str:
        """``finetune/history.json``: ``[{"epoch", "loss"}]``, the mean training loss of every epoch."""
        return self.method_path("finetune", "history.json")

    @property
    def finetune_model(self) -> str:
        return self.method_path("finetune", "model.pt")

    # -- stage 7: predictions --
    @property
    def predictions_root(self) -> str:
        return self.method_path("predictions")

    def predictions_dir(self, split: str) -> str:
        """Prediction PNGs of ``split``, at the relative names of its ground truth."""
        return self.method_path("predictions", split)

    def foreground_dir(self, split: str) -> str:
        """Foreground-probability PNGs of ``split`` (8-bit, ``255 · (1 - p_background)``)."""
        return self.method_path("predictions", split + "_fg")

    def foreground_label_dir(self, split: str) -> str:
        """Best-foreground-class PNGs of ``split`` (``predict.background: threshold`` only)."""
        return self.method_path("predictions", split + "_fgclass")

    def foreground_label_png(self, image_id_: str) -> str:
        return Storage.join(self.foreground_label_dir(split_of(check_id(image_id_))), png_rel(image_id_))

    @property
    def segment_summary(self) -> str:
        """What ``pdso-ray segment`` did in this folder: model, input, counts, images/s."""
        return self.method_path(SEGMENT_FILE)

    def prediction_png(self, image_id_: str) -> str:
        return Storage.join(self.predictions_root, check_id(image_id_) + LABEL_SUFFIX)

    # -- previews of the label PNGs (module docstring) --
    def label_split_dir(self, kind: str, split: str) -> str:
        """The folder of ``split``'s label PNGs of a :data:`PREVIEW_KINDS` kind: ``labels/<kind>/<split>``
        or ``predictions/<split>``."""
        if kind not in PREVIEW_KINDS:
            raise ValueError(f"preview kind must be one of {PREVIEW_KINDS}, got {kind!r}")
        return self.predictions_dir(split) if kind == "predictions" else self.label_dir(kind, split)

    def colour_dir(self, kind: str, split: str) -> str:
        """Colour previews of ``split``'s ``kind`` labels: ``<label folder>_colour/``."""
        return self.label_split_dir(kind, split) + "_colour"

    def overlay_dir(self, kind: str, split: str) -> str:
        """Overlays of ``split``'s ``kind`` labels on their images: ``<label folder>_overlay/``
        (for predictions, also what ``pdso-ray segment --overlay`` writes)."""
        return self.label_split_dir(kind, split) + "_overlay"

    def colour_png(self, kind: str, image_id_: str) -> str:
        return Storage.join(self.colour_dir(kind, split_of(check_id(image_id_))), png_rel(image_id_))

    def overlay_jpg(self, kind: str, image_id_: str) -> str:
        return Storage.join(self.overlay_dir(kind, split_of(check_id(image_id_))),
                            rel_of(image_id_) + OVERLAY_SUFFIX)

    def foreground_png(self, image_id_: str) -> str:
        return Storage.join(self.foreground_dir(split_of(check_id(image_id_))), png_rel(image_id_))

    def predict_rejected(self, split: str) -> str:
        """``split``'s images that got no prediction (``id``, ``path``, ``reason``)."""
        return self.method_path("predictions", f"rejected_{split}.parquet")

    # -- stage 8: evaluation --
    @property
    def eval_dir(self) -> str:
        return self.method_path("eval")

    def eval_file(self, name: str) -> str:
        """``eval/<name>``: validation.json, test.json, match.json, threshold_curve.json."""
        return self.method_path("eval", name)

    @property
    def validation_image_scores(self) -> str:
        """``eval/validation_images.json``: ``{<rel>.png: mIoU %}`` of each validation image alone,
        under the validation matching (the report's best and worst)."""
        return self.eval_file("validation_images.json")

    @property
    def confusion_file(self) -> str:
        """``eval/confusion.npy``: validation pixel counts, (C + 1)×(C + 1) int64, matched
        predicted id (row) × GT id (column)."""
        return self.eval_file("confusion.npy")

    # -- training curves (pretrain, finetune, denoise's backbone tuner) --
    def tensorboard_dir(self, stage: str) -> str:
        """TensorBoard event files of a training stage: ``tensorboard/<stage>/`` below the method's
        folder (``tensorboard --logdir OUTPUT`` finds every method's)."""
        return self.path("tensorboard", stage) if stage in SHARED_STAGES else self.method_path("tensorboard", stage)

    # -- stage 9: report --
    @property
    def report_dir(self) -> str:
        return self.method_path("report")

    def report_file(self, name: str) -> str:
        return self.method_path("report", name)

    @property
    def logs_dir(self) -> str:
        """``logs/`` of the run folder (shared by both methods): one file per run of the CLI, with
        what Ray and the workers wrote (``pdso-ray run`` without ``--verbose``)."""
        return self.path("logs")

    def log_file(self, started: str) -> str:
        """``logs/run-<started>.log``; ``started`` names the run (a UTC time stamp)."""
        return Storage.join(self.logs_dir, f"run-{started}.log")

    @property
    def quality_file(self) -> str:
        """``report/quality.json``: the label-free quality signals and their warnings."""
        return self.report_file("quality.json")


def load_run_config(storage: Storage, run_url: str, method: str = MAIN_METHOD) -> PipelineConfig | None:
    """The config ``method``'s last run in ``run_url`` was made with (its ``config.yaml``, secrets
    redacted); None when the file is missing or no longer valid (logged)."""
    url = RunLayout(run_url, method=method).config_file
    if not storage.exists(url):
        return None
    try:
        return load_config(text=storage.read_text(url))
    except ConfigError as e:
        logging.getLogger("pdso_ray").warning(
            "%s is not a valid config (%s): the dataset is not located from it", url, e)
        return None
