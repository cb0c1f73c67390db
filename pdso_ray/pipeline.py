"""Stage order, skip and resume, the run folder's lease, and ``summary.json``.

A stage is skipped when its ``_SUCCESS.json`` carries the same key: the hash of its config sections
chained with the keys of the stages it reads. Change a setting and that stage and everything
downstream re-runs; kill the driver and the re-run starts at the first stage without a manifest
(stages that stream per image, like ``features``, also skip the images they already wrote). A
stage's counts are reconciled before its manifest is written, so a stage whose accounting fails
is never marked done.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from typing import Any

from pdso_ray.config import PipelineConfig, dump_yaml
from pdso_ray.plan import STAGES, method_stages, requested_stages, runs_stage
from pdso_ray.preflight import check_cluster, in_ray_job, preflight
from pdso_ray.run_lease import RunLease
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages import stage_class
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")


class PipelineError(RuntimeError):
    """The run cannot go on (a missing upstream stage, counts that do not reconcile)."""


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


def stage_key(name: str, config_sections: tuple[str, ...], upstream: tuple[str, ...], cfg: PipelineConfig,
              upstream_keys: dict[str, str]) -> str:
    """A stage's identity: the hash of its config sections chained with its upstream stages' keys."""
    parts = [name, cfg.section_hash(*config_sections)]
    parts += [f"{dep}={upstream_keys.get(dep, '')}" for dep in upstream]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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


def run_pipeline(cfg: PipelineConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Run the stages named in ``cfg.stages`` (all by default, in pipeline order) under the run
    folder's lease; return the summary. First the checkpoints are resolved
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
        ctx = RunContext(cfg=cfg, storage=storage, cluster_has_gpu=uses_gpu)
        return _run_stages(ctx)


def _run_stages(ctx: RunContext) -> dict[str, Any]:
    cfg, storage, run = ctx.cfg, ctx.storage, ctx.run
    summary: dict[str, Any] = storage.read_json(run.summary_file) if storage.exists(run.summary_file) else {}
    summary.setdefault("stages", {})
    summary["method"] = cfg.method
    summary["stage_order"] = method_stages(cfg.method, cfg.lightcluster.finetune)
    wanted = set(requested_stages(cfg))
    keys: dict[str, str] = {}
    for name in STAGES:
        if not runs_stage(cfg.method, name):
            continue  # the other method's stage: its folder is not this run's
        stage_cls = stage_class(name)
        if name == "features" and cfg.data.features:
            keys[name] = _precomputed_features(ctx, summary)
            continue
        manifest = storage.read_manifest(run.stage_dir(name))
        upstream = stage_cls.upstream(cfg)
        key = stage_key(name, stage_cls.config_sections, upstream, cfg, keys)
        if name not in wanted:
            # Not asked for: downstream stages may still read its outputs if they exist.
            if manifest is not None:
                keys[name] = manifest["key"]
            continue
        for dep in upstream:
            if dep not in keys:
                raise PipelineError(
                    f"stage {name!r} reads the outputs of {dep!r}, which has not completed in "
                    f"{cfg.output}; add it to `stages` or run it first")
        if manifest is not None and manifest.get("key") == key and not stage_cls.always_run:
            log.info("stage %s: up to date, skipped", name)
            keys[name] = key
            summary["stages"].setdefault(name, {}).update(status="skipped")
            # the summary reflects every completed stage, also one another run (or method) did
            _update_totals(summary, name, manifest.get("counts", {}))
            continue
        stage = stage_cls()
        _prepare_stage_folders(ctx, stage, key)
        log.info("stage %s: running", name)
        started = time.time()
        counts = stage.run(ctx)
        seconds = round(time.time() - started, 3)
        _update_totals(summary, name, counts)  # raises when the accounting does not reconcile
        storage.write_manifest(run.stage_dir(name), {"key": key, "stage": name, "seconds": seconds,
                                                     "counts": counts})
        keys[name] = key
        summary["stages"][name] = {"status": "done", "seconds": seconds, "counts": counts}
        storage.write_json(run.summary_file, summary)
        log.info("stage %s: done in %.1f s %s", name, seconds, counts)
    storage.write_json(run.summary_file, summary)
    return summary


def _precomputed_features(ctx: RunContext, summary: dict[str, Any]) -> str:
    """``data.features`` replaces stage 1: account for its rows and key downstream stages to it."""
    from pdso_ray.tables import count_rows

    url = ctx.cfg.data.features
    n = count_rows(ctx.storage, url)
    if n == 0:
        raise PipelineError(f"data.features={url!r} holds no Parquet rows")
    summary["stages"]["features"] = {"status": "precomputed", "source": url, "counts": {"images": n}}
    summary.update(images_total=n, images_ok=n, images_rejected=0, files_ignored=0)
    return hashlib.sha256(f"precomputed|{url}".encode()).hexdigest()[:16]


def _prepare_stage_folders(ctx: RunContext, stage: Stage, key: str) -> None:
    """Keep partial outputs only when they were started with the same key (a resumed run);
    otherwise clear them, so nothing from another configuration mixes in."""
    storage, run = ctx.storage, ctx.run
    started_url = run.started_file(stage.name)
    started = storage.read_json(started_url) if storage.exists(started_url) else None
    if started is None or started.get("key") != key:
        for url in (run.stage_dir(stage.name), *stage.extra_outputs(run)):
            storage.remove(url, recursive=True)
        storage.write_json(started_url, {"key": key})
    elif not stage.always_run:
        log.info("stage %s: resuming an interrupted run", stage.name)


def _update_totals(summary: dict[str, Any], stage: str, counts: dict[str, Any]) -> None:
    """Lift image accounting, per-split counts, notes, diagnostics and metrics from stage counts
    to the top of the summary; raise when the image accounting does not reconcile."""
    if stage == "features":
        for k in ("images_total", "images_ok", "images_rejected", "files_ignored"):
            summary[k] = counts[k]
        if summary["images_total"] != summary["images_ok"] + summary["images_rejected"]:
            raise PipelineError(
                f"image accounting does not reconcile: total {summary['images_total']} != "
                f"ok {summary['images_ok']} + rejected {summary['images_rejected']}")
    if counts.get("splits"):  # features (train), predict or lightcluster (evaluation splits)
        splits = summary.setdefault("splits", {})
        for split, info in counts.get("splits", {}).items():
            splits[split] = info
    if counts.get("notes"):
        notes = summary.setdefault("notes", {})
        notes[stage] = list(counts["notes"])
    for group, values in counts.get("diagnostics", {}).items():
        target = summary.setdefault("diagnostics", {}).setdefault(group, {})
        if isinstance(values, dict):
            target.update(values)
        else:
            summary["diagnostics"][group] = values
    if stage == "evaluate":
        for k in ("mIoU", "mIoU_test", "mIoU_threshold", "mIoU_test_threshold"):
            if k in counts:
                summary[k] = counts[k]
            else:
                summary.pop(k, None)
