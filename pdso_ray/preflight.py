"""Preflight: every misconfiguration a run can know about, found in seconds, before Ray starts.

:func:`preflight` is called by ``pdso-ray run`` (and so by ``jobs/pdso.py``) after the config is
loaded and before the run folder's lease is taken or Ray is started. It checks:

- the data root is reachable and has the layout the config says (for the stages that read
  images), with one listing call under a short connect timeout and few retries — which also
  proves the storage credentials;
- every checkpoint a requested stage needs is set and readable, unless random init is allowed;
- a GPU request can be met: ``ray.use_gpu: true`` on a local start needs a GPU here
  (:func:`check_gpu_request` repeats the check against a cluster once connected: a GPU now, or an
  autoscaler that can add one).

Each failure raises :class:`PreflightError` (a :class:`~pdso_ray.config.ConfigError`), whose one-line
message names the key or URL and the fix; the CLI prints it as ``error: ...`` and exits 2.
Each value alone (types, choices, registries, ranges) is checked when the config is loaded
(:func:`pdso_ray.config.load_config`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pdso_ray.config import ConfigError, PipelineConfig
from pdso_ray.plan import requested_stages
from pdso_ray.run_layout import RunLayout
from pdso_ray.storage import Storage, StorageError, protocol

log = logging.getLogger("pdso_ray")

# Storage options of the preflight probes: fail in seconds, not after minutes of retries.
_PROBE_S3 = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 15,
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


def _local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_train_workers(section: str, train_cfg: Any, cpus: int) -> None:
    """A Ray Train stage's workers must fit the local Ray, or they wait forever."""
    need = train_cfg.num_workers * train_cfg.cpus_per_worker
    if need > cpus:
        raise PreflightError(
            f"{section}.num_workers={train_cfg.num_workers} x {section}.cpus_per_worker="
            f"{train_cfg.cpus_per_worker:g} needs {need:g} CPUs, but the local Ray has {cpus}: "
            f"on one machine set {section}.num_workers=1 and {section}.cpus_per_worker to at most "
            f"{max(1, cpus - 1)} (training workers would wait forever)")


def preflight(cfg: PipelineConfig, storage: Storage | None = None) -> list[str]:
    """Check ``cfg`` against the data, the checkpoints and the machine (module
    docstring); raise :class:`PreflightError` on the first problem. Returns notes (things that
    are fine but worth saying, e.g. "no test split")."""
    from pdso_ray.data.layouts import build_layout
    from pdso_ray.method.refiners import NEEDS_SAM
    from pdso_ray.models.loading import require_checkpoint

    probe = probe_storage(cfg)
    stages = set(requested_stages(cfg))
    notes: list[str] = []
    layout = build_layout(cfg.data)
    if cfg.data.features and "features" in stages:
        _reachable(probe, "data.features", cfg.data.features, "precomputed features folder")
    extract = "features" in stages and not cfg.data.features  # data.features replaces stage 1
    if extract or stages & {"pretrain", "pseudo_labels", "finetune", "predict"}:
        _reachable(probe, "data.root", cfg.data.root, "data root")
        if extract:
            split_url = layout.split_url(layout.train_split())
            what = (f"the {cfg.data.layout} layout's {layout.train_split()} split "
                    f"(data.layout={cfg.data.layout}, data.classes={cfg.data.classes})")
            _reachable(probe, "data.root", split_url, what)
        if stages & {"predict", "evaluate"}:
            notes += [info.note for info in layout.eval_splits(probe) if info.note]
    if protocol(cfg.output) not in ("file", "memory"):
        try:
            probe.exists(cfg.output)
        except OSError as e:
            raise PreflightError(f"output: cannot reach {cfg.output} ({e}); check the URL and "
                                 "the storage credentials") from None
    needs = []
    # The teacher a pretrain stage of this run will write is not there yet: nothing to check.
    pretrained_here = "pretrain" in stages and cfg.models.dino.checkpoint == RunLayout.from_config(cfg).pretrain_teacher
    loads_dino = extract or "pseudo_labels" in stages or ("finetune" in stages and cfg.finetune.backbone == "dino")
    if loads_dino and not pretrained_here:
        needs.append(("dino", cfg.models.dino.arch, cfg.models.dino.checkpoint))
    if "pseudo_labels" in stages and cfg.pseudo_labels.refine.method in NEEDS_SAM:
        needs.append(("sam", cfg.models.sam.arch, cfg.models.sam.checkpoint))
    for kind, arch, checkpoint in needs:
        try:
            require_checkpoint(kind, arch, checkpoint, cfg.models.allow_random_init)
        except ConfigError as e:
            raise PreflightError(str(e)) from None
        if checkpoint:
            _checkpoint(probe, f"models.{kind}.checkpoint", checkpoint)
    local = not cfg.ray.address and not in_ray_job()
    if local:
        cpus = cfg.ray.num_cpus or os.cpu_count() or 1
        for section in ("pretrain", "finetune"):  # the Ray Train stages
            if section in stages:
                _check_train_workers(section, getattr(cfg, section), cpus)
    if cfg.ray.use_gpu is True and local and not _local_gpu():
        raise PreflightError(
            "ray.use_gpu=true, but this machine has no GPU and the run starts a local Ray: set "
            "ray.use_gpu=null (use GPUs when there are some) or ray.address=the cluster's address")
    return notes


def check_gpu_request(cfg: PipelineConfig) -> None:
    """Once connected: ``ray.use_gpu: true`` needs GPUs in the cluster now, or an autoscaler
    that can add them; otherwise GPU actors would wait forever."""
    import ray

    if cfg.ray.use_gpu is not True or ray.cluster_resources().get("GPU", 0) > 0:
        return
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - an older or unusual cluster: no autoscaler information
        most = {}
    if most.get("GPU", 0) > 0:
        log.info("no GPU in the cluster yet: the autoscaler can add up to %s", most["GPU"])
        return
    raise PreflightError(
        "ray.use_gpu=true, but the cluster has no GPU and its autoscaler cannot add one: set "
        "ray.use_gpu=null (use GPUs when present) or add a GPU node group to the cluster")
