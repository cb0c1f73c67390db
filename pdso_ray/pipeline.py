"""Stage order, skip and resume, the run folder, and ``summary.json``.

A stage is skipped when its ``_SUCCESS.json`` carries the same key: the hash of its config sections
chained with the keys of the stages it reads. Change a setting and that stage and everything
downstream re-runs; kill the driver and the re-run starts at the first stage without a manifest
(stages that stream per image, like ``features``, also skip the images they already wrote).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from pdso_ray.config import STAGES, PipelineConfig, dump_yaml
from pdso_ray.stages import stage_registry
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.storage import Storage

STARTED_NAME = "_STARTED.json"

log = logging.getLogger("pdso_ray")


class PipelineError(RuntimeError):
    """The run cannot go on (a missing upstream stage, counts that do not reconcile)."""


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to (or start) Ray. AWS settings must be in the environment before workers start."""
    import ray

    s3 = cfg.storage.s3
    # Workers inherit the driver's environment at start (ENV-NOTES): export S3 settings first.
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


def stage_key(stage: type[Stage], ctx: RunContext, upstream_keys: dict[str, str]) -> str:
    parts = [stage.name, ctx.cfg.section_hash(*stage.config_sections)]
    parts += [f"{dep}={upstream_keys.get(dep, '')}" for dep in stage.depends_on]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def run_pipeline(cfg: PipelineConfig, storage: Storage | None = None) -> dict[str, Any]:
    """Run the stages named in ``cfg.stages`` (in pipeline order); return the summary."""
    storage = storage or Storage(cfg.storage_options())
    registry = stage_registry()
    missing = [s for s in cfg.stages if s not in registry]
    if missing:
        raise PipelineError(f"stages not available in this build: {', '.join(missing)}")

    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "config.yaml"), dump_yaml(cfg))
    init_ray(cfg)
    ctx = RunContext(cfg=cfg, storage=storage, cluster_has_gpu=cluster_has_gpu(cfg))
    summary_url = storage.join(cfg.output, "summary.json")
    summary: dict[str, Any] = storage.read_json(summary_url) if storage.exists(summary_url) else {}
    summary.setdefault("stages", {})

    keys: dict[str, str] = {}
    for name in STAGES:
        if name not in registry:
            continue
        stage_cls = registry[name]
        if name == "features" and cfg.data.features:
            keys[name] = _precomputed_features(ctx, summary)
            continue
        stage_dir = ctx.stage_dir(name)
        manifest = storage.read_manifest(stage_dir)
        key = stage_key(stage_cls, ctx, keys)
        if name not in cfg.stages:
            # Not asked for: downstream stages may still read its outputs if they exist.
            if manifest is not None:
                keys[name] = manifest["key"]
            continue
        for dep in stage_cls.depends_on:
            if dep not in keys:
                raise PipelineError(
                    f"stage {name!r} reads the outputs of {dep!r}, which has not completed in "
                    f"{cfg.output}; add it to `stages` or run it first")
        if manifest is not None and manifest.get("key") == key and not stage_cls.always_run:
            log.info("stage %s: up to date, skipped", name)
            keys[name] = key
            summary["stages"].setdefault(name, {}).update(status="skipped")
            continue
        _prepare_stage_folders(ctx, stage_cls, key)
        log.info("stage %s: running", name)
        started = time.time()
        counts = stage_cls().run(ctx)
        seconds = round(time.time() - started, 3)
        storage.write_manifest(stage_dir, {"key": key, "stage": name, "seconds": seconds,
                                           "counts": counts})
        keys[name] = key
        summary["stages"][name] = {"status": "done", "seconds": seconds, "counts": counts}
        _update_totals(summary, name, counts)
        storage.write_json(summary_url, summary)
        log.info("stage %s: done in %.1f s %s", name, seconds, counts)
    _update_totals(summary, None, {})
    storage.write_json(summary_url, summary)
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


def _prepare_stage_folders(ctx: RunContext, stage_cls: type[Stage], key: str) -> None:
    """Keep partial outputs only when they were started with the same key (a resumed run);
    otherwise clear them, so nothing from another configuration mixes in."""
    storage = ctx.storage
    stage_dir = ctx.stage_dir(stage_cls.name)
    started_url = storage.join(stage_dir, STARTED_NAME)
    started = storage.read_json(started_url) if storage.exists(started_url) else None
    if started is None or started.get("key") != key:
        for folder in (stage_cls.name, *stage_cls.extra_outputs):
            storage.remove(ctx.path(folder), recursive=True)
        storage.write_json(started_url, {"key": key})
    else:
        log.info("stage %s: resuming an interrupted run", stage_cls.name)


def _update_totals(summary: dict[str, Any], stage: str | None, counts: dict[str, Any]) -> None:
    """Lift image accounting and metrics from stage counts to the top of the summary."""
    if stage == "features":
        for k in ("images_total", "images_ok", "images_rejected", "files_ignored"):
            summary[k] = counts[k]
        if summary["images_total"] != summary["images_ok"] + summary["images_rejected"]:
            raise PipelineError(
                f"image accounting does not reconcile: total {summary['images_total']} != "
                f"ok {summary['images_ok']} + rejected {summary['images_rejected']}")
    if stage == "evaluate" and "mIoU" in counts:
        summary["mIoU"] = counts["mIoU"]
