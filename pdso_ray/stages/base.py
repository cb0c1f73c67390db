"""The one stage shape.

Two kinds of thing live here:

* :class:`BatchStep` — a per-batch transform (decode, DINO, SAM, write): ``setup()`` loads models once
  per worker, ``__call__(batch)`` maps a ``dict[str, np.ndarray]`` batch to another, and its
  :attr:`~BatchStep.resources` declare what a worker needs. Tests call a step directly on a tiny
  batch; :func:`map_step` is the single adapter that runs any step through Ray Data ``map_batches``.
* :class:`Stage` — one pipeline stage (``features``, ``cluster``, ...): ``run(ctx)`` reads earlier
  stages' artifacts from the run folder and writes its own, returning counts for the manifest.
  :mod:`pdso_ray.pipeline` orders, skips and resumes stages; per-image stages share the skeleton of
  :mod:`pdso_ray.stages.streaming`.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pdso_ray.config import PipelineConfig
from pdso_ray.console import Console
from pdso_ray.data.layouts import Layout, build_layout
from pdso_ray.data.listing import SplitListing
from pdso_ray.run_layout import RunLayout
from pdso_ray.storage import Storage

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("pdso_ray")

Batch = dict[str, np.ndarray]


class PipelineError(RuntimeError):
    """The run cannot go on: a missing upstream stage, counts that do not reconcile, a stage
    that left no result. The message says what and, where there is one, what to do."""


@dataclass(frozen=True)
class Resources:
    """What one worker of a step needs; GPUs are dropped when the cluster has none."""

    batch_size: int = 32
    num_cpus: float = 1.0  # 0 for I/O-bound steps (writers): they never wait for a CPU slot
    num_gpus: float = 0.0
    min_actors: int = 1  # ignored for stateless (task) steps
    max_actors: int = 1
    stateful: bool = True  # actor pool (models loaded once) vs. plain tasks


class BatchStep:
    """A per-batch transform. Subclasses set attributes in ``__init__`` (cheap, picklable) — among
    them :attr:`resources` — and load heavy state in :meth:`setup`, which runs once per worker
    before the first batch."""

    resources: Resources = Resources(stateful=False)

    def setup(self) -> None:  # pragma: no cover - default is a no-op
        return None

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError


class _ActorAdapter:
    """Ray Data instantiates this once per actor: build the step, run its setup, then map."""

    def __init__(self, step: BatchStep):
        self.step = step
        self.step.setup()

    def __call__(self, batch: Batch) -> Batch:
        return self.step(batch)


def _run_stateless(batch: Batch, step: BatchStep) -> Batch:
    return step(batch)


def map_step(ds: "ray.data.Dataset", step: BatchStep, cluster_has_gpu: bool) -> "ray.data.Dataset":
    """Apply ``step`` to ``ds`` with ``map_batches`` under its declared resources: an autoscaling
    actor pool for stateful steps (models), plain tasks otherwise. The step is set up once per
    actor."""
    import ray.data

    res = step.resources
    num_gpus = res.num_gpus if cluster_has_gpu else 0.0
    if res.stateful:
        return ds.map_batches(
            _ActorAdapter,
            fn_constructor_args=(step,),
            batch_size=res.batch_size,
            batch_format="numpy",
            num_cpus=res.num_cpus,
            num_gpus=num_gpus,
            compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        )
    step.setup()  # stateless steps have nothing heavy to set up; keep the contract anyway
    return ds.map_batches(
        _run_stateless,
        fn_args=(step,),
        batch_size=res.batch_size,
        batch_format="numpy",
        num_cpus=res.num_cpus,
        num_gpus=num_gpus,
    )


@dataclass
class RunContext:
    """What a stage gets: the resolved config, storage, the run folder's layout (:attr:`run`),
    where the images come from (:attr:`data`), whether the cluster runs GPU work, and where its
    progress bars go (:attr:`console`)."""

    cfg: PipelineConfig
    storage: Storage
    cluster_has_gpu: bool = False
    console: Console = field(default_factory=Console)
    notes: dict[str, Any] = field(default_factory=dict)
    run: RunLayout = field(init=False)

    def __post_init__(self):
        self.run = RunLayout.from_config(self.cfg)

    @functools.cached_property
    def data(self) -> Layout:
        """The image layout (:mod:`pdso_ray.data.layouts`), built when a stage first asks: a
        container layout lists ``data.root`` then, and keeps its listings for the whole run."""
        return build_layout(self.cfg.data, self.storage)

    @functools.cached_property
    def train_listing(self) -> SplitListing:
        """The train split's listing, up to ``data.limit`` images, listed once per run: the
        stages that fingerprint it when the run is planned (``features``, ``pretrain``) then read
        the same files."""
        listing = self.data.list_split(self.storage, self.data.train_split())
        if self.cfg.data.limit:
            listing.images = listing.images[: self.cfg.data.limit]
        return listing


@dataclass(frozen=True)
class WorkerGroup:
    """Workers a stage needs at the same time, or it waits for ever: a Ray Train trainer's workers
    (all start together), an actor pool's ``min_actors``, k-means's shards (one placement group).

    ``workers`` × ``cpus`` (and × ``gpus`` when the run uses GPUs) must fit the cluster, plus
    ``feed_cpus`` for the Ray Data tasks that feed a trainer meanwhile. ``workers_key`` and
    ``cpus_key`` name the settings that size it (None when fixed), ``what`` says what it is."""

    what: str
    workers_key: str | None
    workers: int
    cpus_key: str | None
    cpus: float
    gpus: float = 0.0
    feed_cpus: float = 0.0


@dataclass(frozen=True)
class ModelNeed:
    """A model a stage loads: ``kind`` ``"dino"`` or ``"sam"``, its ``arch``, the ``checkpoint``
    URL (None: random weights, allowed only with ``models.allow_random_init``) and ``image_size``
    (None: the architecture's own)."""

    kind: str
    arch: str
    checkpoint: str | None
    image_size: int | None = None

    @property
    def key(self) -> str:
        return f"models.{self.kind}.checkpoint"


@dataclass(frozen=True)
class MinImages:
    """A stage needs at least ``count`` train images: ``what`` says for what, naming the keys
    (e.g. ``"pretrain.batch_size=64 on pretrain.num_workers=1 worker(s)"``), ``fix`` what to change."""

    count: int
    what: str
    fix: str


@dataclass(frozen=True)
class Needs:
    """What a stage needs from the data, the models and the cluster in a run of a config, asked by
    the preflight before Ray starts (:meth:`Stage.needs`).

    ``images``: the splits whose images it reads from ``data.root`` (``"train"`` for the train
    split, ``"eval"`` for the evaluation splits); ``min_images``: how many train images it needs
    at least (beyond ``data.classes``); ``models``; ``groups``; ``conflicts``: settings that
    cannot work in this config, each a complete error message naming the keys."""

    images: tuple[str, ...] = ()
    min_images: MinImages | None = None
    models: tuple[ModelNeed, ...] = ()
    groups: tuple[WorkerGroup, ...] = ()
    conflicts: tuple[str, ...] = ()


def dino_need(cfg: PipelineConfig, image_size: int | None = None) -> ModelNeed:
    """The ``models.dino`` backbone, as a stage that loads it needs it."""
    dc = cfg.models.dino
    return ModelNeed("dino", dc.arch, dc.checkpoint, image_size or dc.image_size)


def pool_group(what: str, section: str, settings: Any, cpus: float = 1.0,
               cpus_key: str | None = None) -> WorkerGroup:
    """The ``min_actors`` of an actor pool sized by ``section.min_actors`` and
    ``section.gpus_per_actor`` (``cpus`` per actor, fixed or from ``cpus_key``)."""
    return WorkerGroup(what, f"{section}.min_actors", settings.min_actors, cpus_key, cpus,
                       gpus=settings.gpus_per_actor)


class Stage:
    """One pipeline stage. ``name`` is its folder in the run; ``config_sections`` are the config
    keys whose values define its output (their hash goes into the manifest); ``depends_on`` the
    stages whose outputs it reads (their manifests' hashes chain into its own); ``extra_outputs``
    the other run-folder paths it writes (cleared with its folder when its key changes)."""

    name: ClassVar[str]
    config_sections: ClassVar[tuple[str, ...]] = ()
    depends_on: ClassVar[tuple[str, ...]] = ()
    always_run: ClassVar[bool] = False  # cheap views of everything else (the report)
    # Reads whichever of its upstream stages have completed (the report), not all of them.
    reads_what_exists: ClassVar[bool] = False
    # Whether a change of its own inputs (input_fingerprint) starts it afresh instead of updating
    # its outputs: a training schedule (pretrain) cannot take new images half-way through.
    restarts_on_new_inputs: ClassVar[bool] = False

    @classmethod
    def upstream(cls, cfg: PipelineConfig) -> tuple[str, ...]:
        """The stages whose outputs this one reads in a run of ``cfg`` (by default
        ``depends_on``; a stage both methods run may read different ones per method)."""
        return cls.depends_on

    @classmethod
    def needs(cls, cfg: PipelineConfig) -> Needs:
        """What a run of ``cfg`` needs for this stage (:class:`Needs`): checked by the preflight
        before Ray starts, so a stage that cannot run fails in seconds, not after the ones before it."""
        return Needs()

    def extra_outputs(self, run: RunLayout) -> tuple[str, ...]:
        return ()

    def input_fingerprint(self, ctx: RunContext) -> str | None:
        """A digest of what the stage reads from outside the run folder, or None when it reads
        only earlier stages' outputs (their keys chain into its own). ``features``: the listing
        of ``data.root``. A changed fingerprint makes the stage run again on the same setup:
        its outputs are updated, not cleared (:mod:`pdso_ray.run_state`), unless
        ``restarts_on_new_inputs``."""
        return None

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Do the work; return JSON-able counts for the manifest and summary."""
        raise NotImplementedError


# ---- Ray Train stages (finetune, pretrain) ---------------------------------------------------------
def fit(trainer: Any, poll: Callable[[], None] | None = None, poll_every_s: float = 5.0) -> Any:
    """``trainer.fit()`` (a Ray Train trainer) such that Ctrl-C stops the run as in every other
    stage: a ``KeyboardInterrupt`` here, the CLI's ``interrupted:`` line and exit code 130.
    ``poll`` (e.g. report new epochs on the driver's terminal) is called every ``poll_every_s``
    seconds while training runs, and once when it has ended.

    On the main thread, ``fit`` installs Ray Train's own SIGINT handler, which turns Ctrl-C into a
    graceful abort that returns (and later ones into ``sys.exit``): the run would go on, or end
    with exit code 1 and no message. So ``fit`` runs on a helper thread, where Ray Train leaves
    the handler alone, while the main thread waits, interruptibly."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = e

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    polled = time.monotonic()
    while thread.is_alive():
        thread.join(0.5)  # a join with a timeout lets the main thread take Ctrl-C
        if poll is not None and time.monotonic() - polled >= poll_every_s:
            poll()
            polled = time.monotonic()
    if poll is not None:
        poll()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def stage_tracker(ctx: RunContext, stage: str):
    """The :class:`~pdso_ray.tracking.Tracker` of a training stage's curves in this run: its
    TensorBoard folder (:meth:`RunLayout.tensorboard_dir`) and ``tracking.mlflow_uri``."""
    from pdso_ray.tracking import Tracker

    name = f"{ctx.run.root.rstrip('/').rsplit('/', 1)[-1]}/{ctx.run.method}/{stage}"
    return Tracker(ctx.storage, ctx.run.tensorboard_dir(stage), name, ctx.cfg.tracking.mlflow_uri or None,
                   ctx.cfg.tracking.mlflow_experiment)


def train_storage(storage: Storage, url: str):
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig`` from a run-folder URL:
    a local absolute path and no filesystem, or a scheme-less path and a pyarrow filesystem."""
    from pyarrow.fs import LocalFileSystem

    if url.startswith("memory://"):
        raise ValueError(f"Ray Train cannot checkpoint to {url}: in-memory storage is private to "
                         "one process; use a local folder or an object store")
    fs, path = storage.arrow_fs(url)
    return (path, None) if isinstance(fs, LocalFileSystem) else (path, fs)


def ordered_ingest():
    """Ray Train's ``DataConfig`` with Ray Data's default ingest options plus ``preserve_order``:
    Train replaces a dataset's own execution options with these when it splits it, so an order
    set on the dataset alone is lost (and under load batches then arrive in another order, run to
    run: a seeded run no longer reproduces)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


TRAIN_STATE = "state.pt"  # the file inside each Ray Train checkpoint directory of these stages

SHUFFLE_WINDOW_BATCHES = 4  # rows shuffled together in training: this many minibatches


def shuffled_batches(shard, batch_size: int, seed: Sequence[int], *, drop_last: bool = False,
                     **iter_options: Any) -> Iterator[dict[str, Any]]:
    """Inside a Ray Train worker: minibatches of ``batch_size`` rows from a dataset shard, locally
    shuffled. The shard is read in windows of :data:`SHUFFLE_WINDOW_BATCHES` · ``batch_size`` rows
    (``iter_torch_batches`` with ``iter_options``: dtypes, device), each window's rows permuted
    by a generator seeded with ``seed`` (e.g. (run seed, epoch, rank)).

    Why not Ray Data's ``local_shuffle_buffer_size``: its buffer reshuffles whenever a block
    arrives, so its batches depend on block sizes, which vary run to run (a sort's boundaries are
    sampled, map tasks finish in any order); fixed windows over a fixed row order
    (:func:`ordered_ingest`) do not. ``drop_last``: no partial final batch (DDP ranks must take the
    same steps). Columns that are not tensors (ids) are indexed as numpy arrays."""
    import torch

    from pdso_ray.method.augment import seeded_generator

    generator = seeded_generator(*seed)
    window = SHUFFLE_WINDOW_BATCHES * batch_size
    for rows in shard.iter_torch_batches(batch_size=window, **iter_options):
        n = len(next(iter(rows.values())))
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            picked = order[start:start + batch_size]
            if drop_last and len(picked) < batch_size:
                break
            yield {k: v[picked.to(v.device)] if isinstance(v, torch.Tensor) else np.asarray(v)[picked.numpy()]
                   for k, v in rows.items()}


def ddp_wrap(device) -> Callable[[Any], Any]:
    """Inside a Ray Train worker: a function that wraps a module in ``DistributedDataParallel``
    on ``device`` (a torch device; CUDA devices by index)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return lambda module: DistributedDataParallel(module, device_ids=ids)


def checkpoint_state(checkpoint) -> dict[str, Any]:
    """The state :func:`report_epoch` saved in a Ray Train ``Checkpoint`` (tensors on the CPU)."""
    import torch

    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, TRAIN_STATE), map_location="cpu", weights_only=True)


def resume_state() -> dict[str, Any] | None:
    """Inside a Ray Train worker: the state rank 0 saved in the checkpoint the run resumes from
    (:func:`report_epoch`), or None on a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else checkpoint_state(checkpoint)


def resume_training(trainer: Any, key: str) -> tuple[list[dict[str, Any]], int]:
    """Inside a Ray Train worker: load the checkpointed ``state[key]`` into ``trainer`` (anything
    with ``load_state_dict``) when the run resumes. Returns ``(history, start_epoch)``: the epoch
    records saved with it and the first epoch still to train, or ``([], 1)`` on a fresh start."""
    state = resume_state()
    if state is None:
        return [], 1
    trainer.load_state_dict(state[key])
    return list(state["history"]), int(state["epoch"]) + 1


def report_epoch(metrics: dict[str, Any], epoch: int, state: Callable[[], dict[str, Any]] | None) -> None:
    """Inside a Ray Train worker, on every rank: report one epoch's ``metrics``; the rank that
    passes ``state`` (rank 0) attaches a checkpoint ``epoch_NNNN/`` holding ``state()``, what
    :func:`resume_state` returns on a re-run."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if state is not None:
            torch.save(state(), os.path.join(folder, TRAIN_STATE))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:04d}")
