"""A run: the preflight, the run folder's lease, Ray, and the stages in order, skipped or resumed.

A stage is skipped when its ``_SUCCESS.json`` carries the same key: the hash of its config
sections, of the keys of the stages it reads and of its own inputs (:mod:`pdso_ray.run_state`).
Change a setting, or the images under ``data.root``, and that stage and everything downstream
re-runs; kill the driver and the re-run starts at the first stage without a manifest (stages that
stream per image, like ``features``, also skip the images they already wrote). A stage's counts
are reconciled before its manifest is written, so a stage whose accounting fails is never marked
done. ``summary.json`` is rebuilt from the valid manifests after every stage.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

from pdso_ray.config import PipelineConfig, dump_yaml
from pdso_ray.console import Console
from pdso_ray.plan import method_stages, requested_stages
from pdso_ray.preflight import check_cluster, in_ray_job, preflight
from pdso_ray.report.base import readable_counts
from pdso_ray.run_lease import RunLease
from pdso_ray.run_layout import RunLayout
from pdso_ray.run_state import Step, build_summary, plan_run, remove_stale, update_totals
from pdso_ray.stages.base import RunContext
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to (or start) Ray. AWS settings must be in the environment before workers start.

    Inside ``ray job submit`` the job runs on the cluster it was submitted to, whatever
    ``ray.num_cpus`` says (that setting sizes a local instance only)."""
    import ray

    s3 = cfg.storage.s3
    # Workers inherit the driver's environment at start (docs/architecture.md): export S3 first.
    env = {
        "AWS_ACCESS_KEY_ID": s3.key,
        "AWS_SECRET_ACCESS_KEY": s3.secret,
        "AWS_SESSION_TOKEN": s3.token,
        "AWS_ENDPOINT_URL": s3.endpoint_url,
    }
    for name, value in env.items():
        if value:
            os.environ[name] = value
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if cfg.ray.address:
        kwargs["address"] = cfg.ray.address
    elif in_ray_job():
        if cfg.ray.num_cpus is not None:
            log.info("running inside a Ray job: using its cluster (ray.num_cpus=%s is for local runs)",
                     cfg.ray.num_cpus)
        kwargs["address"] = "auto"
    elif cfg.ray.num_cpus is not None:
        # an explicit size means a fresh local instance, even if a cluster runs on this machine
        kwargs.update(address="local", num_cpus=cfg.ray.num_cpus)
    ray.init(**kwargs)


def cluster_has_gpu(cfg: PipelineConfig) -> bool:
    """Whether GPU steps ask for GPUs: ``ray.use_gpu``, or what the cluster has right now."""
    import ray

    if cfg.ray.use_gpu is not None:
        return cfg.ray.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_checkpoints(cfg: PipelineConfig, storage: Storage | None = None) -> PipelineConfig:
    """The config the stages run with, as to model checkpoints:

    - a local checkpoint path given relative (``pdso_ray/standins/assets/dino_tiny.pth``) is made
      absolute against the working directory, so that Ray workers, whose working directory is
      their own, read the same file;
    - when ``models.dino.checkpoint`` is unset and this run pretrains (``pretrain`` is requested,
      or has completed in the run folder), the checkpoint is the pretrained teacher
      (``pretrain/dino_teacher.pth``). Its URL then enters the config hash of every stage that
      loads DINO, and ``features`` chains the ``pretrain`` key
      (:meth:`pdso_ray.stages.features.FeaturesStage.upstream`), so a new pretraining recomputes
      everything after it.

    Returns ``cfg`` itself when nothing changes, else a changed copy."""
    resolved = copy.deepcopy(cfg)
    for model in (resolved.models.dino, resolved.models.sam):
        if model.checkpoint and "://" not in model.checkpoint and not os.path.isabs(model.checkpoint):
            model.checkpoint = os.path.abspath(model.checkpoint)
    if not resolved.models.dino.checkpoint:
        run = RunLayout.from_config(cfg)
        storage = storage or Storage(cfg.storage_options())
        if "pretrain" in requested_stages(cfg) or storage.read_manifest(run.stage_dir("pretrain")) is not None:
            resolved.models.dino.checkpoint = run.pretrain_teacher
    return cfg if resolved == cfg else resolved


def run_pipeline(cfg: PipelineConfig, storage: Storage | None = None,
                 console: Console | None = None) -> dict[str, Any]:
    """Run the stages named in ``cfg.stages`` (all by default, in pipeline order) under the run
    folder's lease; return the summary. ``console``: where progress bars go (default stderr). First the checkpoints are resolved
    (:func:`resolve_checkpoints`) and the preflight runs (:func:`pdso_ray.preflight.preflight`:
    a :class:`~pdso_ray.preflight.PreflightError` before anything is written or Ray starts).
    Raises :class:`~pdso_ray.run_lease.LeaseHeld` when another run holds the folder."""
    storage = storage or Storage(cfg.storage_options())
    cfg = resolve_checkpoints(cfg, storage)
    for note in preflight(cfg):
        log.info("preflight: %s", note)
    run = RunLayout.from_config(cfg)
    storage.makedirs(cfg.output)
    with RunLease(storage, run.lease_file).held():
        storage.write_text(run.config_file, dump_yaml(cfg))
        init_ray(cfg)
        uses_gpu = cluster_has_gpu(cfg)
        if cfg.ray.address or in_ray_job():  # a local Ray was sized by the preflight already
            check_cluster(cfg, uses_gpu)
        ctx = RunContext(cfg=cfg, storage=storage, cluster_has_gpu=uses_gpu, console=console or Console())
        return _run_stages(ctx)


def _run_stages(ctx: RunContext) -> dict[str, Any]:
    """Plan the run (keys, what is up to date, what is stale), say in one line what it replaces,
    remove stale outputs, run the stages, and keep ``summary.json`` to what the folder holds."""
    cfg, storage, run = ctx.cfg, ctx.storage, ctx.run
    plan = plan_run(ctx, requested_stages(cfg))
    if plan.replaced or plan.stale:
        removed = ", ".join(name if method == cfg.method else f"{method}'s {name}"
                            for method, name in plan.stale)
        log.warning("%s holds an earlier run's outputs: this run replaces %s (their settings or inputs "
                    "changed)%s", cfg.output, ", ".join(plan.replaced) or "nothing",
                    f" and removes {removed}, made from what it replaces" if removed else "")
    remove_stale(storage, run, plan.stale)
    order = method_stages(cfg.method, cfg.lightcluster.finetune)
    precomputed = (cfg.data.features, plan.precomputed) if plan.precomputed else None
    # Valid outputs this run keeps are "skipped"; a stage this run completes becomes "done" (the
    # summary counts a manifest only once it carries the plan's key).
    statuses = dict.fromkeys(plan.keys, "skipped")

    def summary() -> dict[str, Any]:
        result = build_summary(storage, run, cfg.method, order, statuses, precomputed, plan.keys)
        storage.write_json(run.summary_file, result)
        return result

    summary()  # what the folder holds now that is valid for this run
    for step in plan.steps:
        if not step.run:
            log.info("stage %s: up to date, skipped", step.name)
            continue
        _prepare_stage_folders(ctx, step)
        log.info("stage %s: running", step.name)
        started = time.time()
        counts = step.stage.run(ctx)
        seconds = round(time.time() - started, 3)
        update_totals({}, step.name, counts)  # raises when the accounting does not reconcile
        storage.write_manifest(run.stage_dir(step.name), {"key": step.key, "stage": step.name,
                                                          "inputs": step.inputs, "seconds": seconds,
                                                          "counts": counts})
        statuses[step.name] = "done"
        summary()
        log.info("stage %s: done in %.1f s (%s)", step.name, seconds, readable_counts(counts))
    return summary()


def _prepare_stage_folders(ctx: RunContext, step: Step) -> None:
    """Keep partial outputs only when they were made under the same setup key (an interrupted
    run resumes; a stage whose own inputs changed updates its outputs); otherwise clear them,
    so nothing from another configuration mixes in."""
    storage, run, stage = ctx.storage, ctx.run, step.stage
    started_url = run.started_file(step.name)
    started = storage.read_json(started_url) if storage.exists(started_url) else None
    if started is None or started.get("key") != step.setup_key:
        for url in (run.stage_dir(step.name), *stage.extra_outputs(run)):
            storage.remove(url, recursive=True)
        storage.write_json(started_url, {"key": step.setup_key})
    elif step.manifest is not None and not stage.always_run:
        log.info("stage %s: its inputs changed: updating its outputs", step.name)
    elif not stage.always_run:
        log.info("stage %s: resuming an interrupted run", step.name)
