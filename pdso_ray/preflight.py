"""Preflight: every misconfiguration a run can know about, found in seconds, before Ray starts.

:func:`preflight` runs at the start of :func:`pdso_ray.pipeline.run_pipeline` (``pdso-ray run``,
``jobs/pdso.py``), after the config is loaded (each value was checked then) and before the run
folder's lease is taken or Ray is started. It asks every stage the run executes what it needs
(:meth:`pdso_ray.stages.base.Stage.needs`: images, models, worker groups, settings that conflict)
and checks:

- settings that cannot work together in this plan (e.g. backbone fine-tuning on precomputed
  features, which come without images); every square input of the DINO backbone a multiple of
  its patch size (8, 14 or 16); ``mlflow`` importable when ``tracking.mlflow_uri`` is set and a
  training stage runs;
- the data root is reachable and has the layout the config says, and the train split holds
  images, at least ``data.classes`` of them and one batch per pretraining worker (a short walk,
  not a full listing; the listing under a short connect timeout also proves the storage
  credentials); ``data.features`` holds at least ``data.classes`` rows;
- every checkpoint a stage loads is set (unless random init is allowed), readable, and loads as
  a weights-only file of its architecture (a refused or mismatched checkpoint fails here, not in
  a worker);
- every worker group fits the machine: a trainer's workers, an actor pool's ``min_actors``,
  k-means's shards, with their CPUs and GPUs (:func:`check_cluster` repeats this against a
  cluster once connected: what it has now, or what its autoscaler can add).

Each failure raises :class:`PreflightError` (a :class:`~pdso_ray.config.ConfigError`), whose one-line
message names the key or URL and the fix; the CLI prints it as ``error: ...`` and exits 2.
"""

from __future__ import annotations

import logging
import os

from pdso_ray.config import ConfigError, PipelineConfig
from pdso_ray.data.listing import IMAGE_SUFFIXES
from pdso_ray.plan import requested_stages
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages import stage_class
from pdso_ray.stages.base import MinImages, ModelNeed, Needs, WorkerGroup
from pdso_ray.storage import Storage, StorageError, protocol

log = logging.getLogger("pdso_ray")

# Storage options of the preflight probes: fail in seconds, not after minutes of retries.
_PROBE_S3 = {"retries": 1, "config_kwargs": {"connect_timeout": 5, "read_timeout": 15,
                                             "retries": {"max_attempts": 2, "mode": "standard"}}}


class PreflightError(ConfigError):
    """The run cannot start; the message names the key or URL and the fix."""


def probe_storage(cfg: PipelineConfig) -> Storage:
    """A Storage with the run's credentials whose object-store calls fail fast."""
    options = cfg.storage_options()
    for scheme in ("s3", "s3a"):
        options[scheme] = {**options.get(scheme, {}), **_PROBE_S3}
    return Storage(options)


def _reachable(storage: Storage, key: str, url: str, what: str) -> None:
    try:
        found = storage.exists(url)
    except (StorageError, OSError) as e:
        cause = str(e).split(" failed: ", 1)[-1]
        raise PreflightError(f"{key}: cannot read {url} ({cause}); check the URL and the storage "
                             "credentials (AWS_* environment, instance profile, storage.s3.*)") from None
    if not found:
        raise PreflightError(f"{key}: {what} not found at {url}")


def _checkpoint(storage: Storage, key: str, url: str) -> None:
    _reachable(storage, key, url, "checkpoint file")
    try:
        size = storage.size(url)
    except OSError as e:
        raise PreflightError(f"{key}: cannot read {url}: {e}") from None
    if size == 0:
        raise PreflightError(f"{key}: {url} is empty (0 bytes): not a checkpoint")


def in_ray_job() -> bool:
    """Whether this process is the driver of a ``ray job submit`` job (Ray sets its address)."""
    return bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_machine(cfg: PipelineConfig) -> dict[str, float] | None:
    """``{"CPU": n, "GPU": m, "memory": bytes}`` of the local Ray this run would start
    (``ray.num_cpus`` or this machine's cores, its GPUs, the memory available now), or None when
    the run joins a cluster (``ray.address``, ``ray job submit``), whose resources are known only
    once connected."""
    if cfg.ray.address or in_ray_job():
        return None
    return {"CPU": float(cfg.ray.num_cpus or os.cpu_count() or 1), "GPU": float(_local_gpus()),
            "memory": float(_available_memory())}


def _available_memory() -> int:
    """Bytes of memory available to new processes: ``MemAvailable`` of /proc/meminfo (Linux), else
    the machine's total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def count_train_images(cfg: PipelineConfig, enough: int) -> int:
    """Images of the train split as far as ``enough`` (a short walk, within ``data.limit``);
    raises :class:`PreflightError` when ``data.root`` cannot be read."""
    from pdso_ray.data.layouts import build_layout

    probe = probe_storage(cfg)
    _reachable(probe, "data.root", cfg.data.root, "data root")
    try:
        layout = build_layout(cfg.data, probe)
        found = layout.count_images(probe, layout.train_split(), enough=enough)
    except (FileNotFoundError, OSError) as e:
        raise PreflightError(f"data.root: {e} (data.layout={cfg.data.layout})") from None
    return min(found, cfg.data.limit or found)


def plan_needs(cfg: PipelineConfig) -> dict[str, Needs]:
    """What every stage this run executes needs (:meth:`pdso_ray.stages.base.Stage.needs`)."""
    return {name: stage_class(name).needs(cfg) for name in requested_stages(cfg)}


def preflight(cfg: PipelineConfig, storage: Storage | None = None) -> list[str]:
    """Check what the run's stages need (:func:`plan_needs`) against the data, the checkpoints
    and the machine (module docstring); raise :class:`PreflightError` on the first problem.
    Returns notes (things that are fine but worth saying, e.g. "no test split")."""
    probe = probe_storage(cfg)
    stages = requested_stages(cfg)
    needs = plan_needs(cfg)
    for need in needs.values():
        if need.conflicts:
            raise PreflightError(need.conflicts[0])
    check_patch_multiples(cfg, stages)
    if cfg.tracking.mlflow_uri and {"pretrain", "finetune", "denoise"} & set(stages):
        import importlib.util

        from pdso_ray.tracking import MLFLOW_MISSING

        if importlib.util.find_spec("mlflow") is None:
            raise PreflightError(MLFLOW_MISSING)
    if protocol(cfg.output) not in ("file", "memory"):
        try:
            probe.exists(cfg.output)
        except OSError as e:
            raise PreflightError(f"output: cannot reach {cfg.output} ({e}); check the URL and "
                                 "the storage credentials") from None
    if cfg.data.features and "features" in stages:
        _check_precomputed(probe, cfg)
    quotas = [need.min_images for need in needs.values() if need.min_images is not None]
    notes = _check_data(probe, cfg, {s for need in needs.values() for s in need.images}, "evaluate" in stages,
                        max(quotas, key=lambda q: q.count, default=None))
    _check_models(probe, cfg, [m for need in needs.values() for m in need.models], "pretrain" in stages)
    have = local_machine(cfg)
    if have is not None:
        gpus = have["GPU"]
        if cfg.ray.use_gpu is True and not gpus:
            raise PreflightError(
                "ray.use_gpu=true, but this machine has no GPU and the run starts a local Ray: set "
                "ray.use_gpu=null (use GPUs when there are some) or ray.address=the cluster's address")
        uses_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else gpus > 0
        for group in _groups(needs):
            problem = unmet(group, have, uses_gpu)
            if problem:
                raise PreflightError(f"{problem}, but the local Ray has {_amounts(have)}: {_fix(group)}")
    return notes


def check_patch_multiples(cfg: PipelineConfig, stages: list[str]) -> None:
    """Every square input the DINO backbone is fed (features, pseudo labels, fine-tuning crops,
    pretraining crops of the run's ``stages``) is a multiple of its patch size (8, 14 or 16)."""
    from pdso_ray.models.dino import DINO_SPECS

    arch = cfg.models.dino.arch
    patch = DINO_SPECS[arch].patch_size
    sizes = {"models.dino.image_size": cfg.models.dino.image_size,
             "pseudo_labels.image_size": cfg.pseudo_labels.image_size}
    if cfg.finetune.backbone == "dino":
        sizes["finetune.crop_size"] = cfg.finetune.crop_size
    if "pretrain" in stages:
        from pdso_ray.stages.pretrain import pretrain_recipe

        sizes["pretrain.local_size"] = pretrain_recipe(cfg, 1).crops.local_crop.size
    for key, size in sizes.items():
        if size % patch:
            below = max(patch, size // patch * patch)
            raise PreflightError(f"{key}={size} is not a multiple of the patch size {patch} of "
                                 f"models.dino.arch={arch}: use {below} or {below + patch}")


def _groups(needs: dict[str, Needs]) -> list[WorkerGroup]:
    return [g for need in needs.values() for g in need.groups]


def _check_precomputed(probe: Storage, cfg: PipelineConfig) -> None:
    """``data.features`` replaces stage 1: it must hold at least one row per class."""
    from pdso_ray.tables import count_rows

    _reachable(probe, "data.features", cfg.data.features, "precomputed features folder")
    rows = count_rows(probe, cfg.data.features)
    if rows == 0:
        raise PreflightError(f"data.features: no Parquet rows in {cfg.data.features}")
    if rows < cfg.data.classes:
        raise PreflightError(f"data.classes={cfg.data.classes}: more categories than the {rows} images of "
                             f"data.features ({cfg.data.features}): set data.classes to at most {rows}")


def _check_data(probe: Storage, cfg: PipelineConfig, splits: set[str], evaluates: bool,
                quota: MinImages | None = None) -> list[str]:
    """The data root, the train split (when a stage reads it) with at least ``data.classes``
    images and the ``quota`` of the stage that needs most, and notes on the evaluation splits."""
    from pdso_ray.data.layouts import build_layout

    if not splits and not evaluates:
        return []
    notes: list[str] = []
    if splits:
        _reachable(probe, "data.root", cfg.data.root, "data root")
    try:  # the container layouts find their shards or tables now
        layout = build_layout(cfg.data, probe)
    except (FileNotFoundError, OSError) as e:
        if splits:
            raise PreflightError(f"data.root: {e} (data.layout={cfg.data.layout})") from None
        return [f"no ground truth to evaluate against: {e}"]
    if "train" in splits:
        split, classes = layout.train_split(), cfg.data.classes
        split_url = layout.split_url(split)
        _reachable(probe, "data.root", split_url, f"the {cfg.data.layout} layout's {split} split "
                   f"(data.layout={cfg.data.layout}, data.classes={classes})")
        found = layout.count_images(probe, split, enough=max(classes, quota.count if quota else 0))
        if found == 0:
            looked = (f"looked for {' '.join(IMAGE_SUFFIXES)} files, recursively"
                      if cfg.data.layout in ("imagenet_s", "folder") else f"none in its {cfg.data.layout} files")
            raise PreflightError(f"data.root: no images under {split_url} ({looked})")
        usable = min(found, cfg.data.limit or found)
        if usable < classes:
            what = (f"data.limit={cfg.data.limit} images" if usable < found
                    else f"the {found} image{'s' if found != 1 else ''} under {split_url}")
            raise PreflightError(f"data.classes={classes}: more categories than {what}: set data.classes "
                                 f"to at most {usable} (or add images)")
        if quota is not None and usable < quota.count:
            what = (f"data.limit={cfg.data.limit}" if usable < found
                    else f"{split_url} has {found} image{'s' if found != 1 else ''}")
            raise PreflightError(f"{quota.what} needs {quota.count} train images, but {what}: {quota.fix}")
    if "eval" in splits or evaluates:
        notes += [info.note for info in layout.eval_splits(probe) if info.note]
    return notes


def _check_models(probe: Storage, cfg: PipelineConfig, models: list[ModelNeed], pretrains: bool) -> None:
    """Every checkpoint the run loads is set (or random weights are allowed), readable, and a
    weights-only file that fits its architecture: loaded once here, before any Ray work."""
    from pdso_ray.models.loading import require_checkpoint, verify_checkpoint

    teacher = RunLayout.from_config(cfg).pretrain_teacher
    checked = set()
    for model in models:
        if (model.kind, model.checkpoint) in checked:
            continue  # loaded once, at the first stage's input size
        checked.add((model.kind, model.checkpoint))
        if pretrains and model.checkpoint == teacher:
            continue  # the teacher this run's pretrain stage writes is not there yet
        try:
            require_checkpoint(model.kind, model.arch, model.checkpoint, cfg.models.allow_random_init)
        except ConfigError as e:
            raise PreflightError(str(e)) from None
        if not model.checkpoint:
            continue
        _checkpoint(probe, model.key, model.checkpoint)
        try:
            verify_checkpoint(model.kind, model.arch, model.checkpoint, probe, model.image_size)
        except (ValueError, OSError) as e:
            raise PreflightError(f"{model.key}: {' '.join(str(e).split())}") from None


def unmet(group: WorkerGroup, have: dict[str, float], uses_gpu: bool) -> str | None:
    """What ``group`` needs beyond ``have`` (``{"CPU": n, "GPU": m}``), as the start of an error
    message, or None when it fits."""
    cpus = group.workers * group.cpus + group.feed_cpus
    if cpus > have.get("CPU", 0):
        sized = f"{group.workers_key}={group.workers}" if group.workers_key else f"{group.workers} worker(s)"
        per = f"{group.cpus_key}={group.cpus:g}" if group.cpus_key else f"{group.cpus:g} CPU each"
        feed = f" + {group.feed_cpus:g} for the tasks that feed it" if group.feed_cpus else ""
        return f"{group.what} needs {cpus:g} CPUs ({sized} x {per}{feed})"
    gpus = group.workers * group.gpus if uses_gpu else 0.0
    if gpus > have.get("GPU", 0):
        sized = f"{group.workers_key}={group.workers}" if group.workers_key else f"{group.workers} worker(s)"
        return f"{group.what} needs {gpus:g} GPUs ({sized} x {group.gpus:g})"
    return None


def _amounts(have: dict[str, float]) -> str:
    return f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs"


def _fix(group: WorkerGroup) -> str:
    keys = [k for k in (group.workers_key, group.cpus_key) if k]
    change = f"lower {' or '.join(keys)}" if keys else "give the cluster more CPUs (ray.num_cpus)"
    return f"{change} (its workers would wait for ever)"


def check_cluster(cfg: PipelineConfig, uses_gpu: bool) -> None:
    """Once connected to a cluster (``ray.address``, or inside ``ray job submit``), before any
    stage: every worker group the run starts fits the cluster now, or the most its autoscaler can
    grow it to; otherwise the run would wait for ever. ``uses_gpu``: whether GPU steps ask for
    GPUs (:func:`pdso_ray.pipeline.cluster_has_gpu`)."""
    import ray

    now = ray.cluster_resources()
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - an older or unusual cluster: no autoscaler information
        most = {}
    ceiling = {k: max(now.get(k, 0), most.get(k, 0)) for k in ("CPU", "GPU")}
    if cfg.ray.use_gpu is True and not ceiling["GPU"]:
        raise PreflightError(
            "ray.use_gpu=true, but the cluster has no GPU and its autoscaler cannot add one: set "
            "ray.use_gpu=null (use GPUs when present) or add a GPU node group to the cluster")
    for group in _groups(plan_needs(cfg)):
        if unmet(group, now, uses_gpu) is None:
            continue
        problem = unmet(group, ceiling, uses_gpu)
        if problem:
            raise PreflightError(f"{problem}, but the cluster has {_amounts(now)} and its autoscaler "
                                 f"can grow it to {_amounts(ceiling)}: {_fix(group)}")
        log.info("%s waits for the autoscaler (the cluster has %s now)", group.what, _amounts(now))
