"""What a run folder holds, and whether it is one run: stage keys, the plan of a run, stale
outputs, and ``summary.json``.

**Keys.** A stage's outputs are identified by its key: the hash of its config sections, of the
keys of the stages it read (recorded as ``inputs`` in its ``_SUCCESS.json``), and of its own
inputs outside the run folder (``Stage.input_fingerprint``: for ``features``, the listing of
``data.root`` with every file's size and modification stamp; for ``pretrain``, the same listing
of the train images; for ``data.features``, its files).
So a change anywhere upstream — a setting, an added, removed or replaced image — changes the key
of every stage after it. The *setup key* leaves the stage's own inputs out: partial outputs made
under the same setup key are kept (an interrupted run resumes; ``features`` updates itself for
the images that changed), others are cleared. A stage with ``restarts_on_new_inputs``
(``pretrain``: a training schedule cannot take new images half-way) keeps its inputs in the setup
key too, so new images start it afresh.

**One run per folder.** A stage's manifest is valid when every stage it read still holds the key
it read (:func:`plan_run`). A stage whose inputs were replaced by a later run, of either method,
is stale: its manifest and outputs are removed (:func:`remove_stale`), and the run says so in one
line. ``summary.json`` is rebuilt from the valid manifests alone (:func:`build_summary`), so
neither it nor ``pdso-ray inspect`` can mix the numbers of two runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

from pdso_ray.config import PipelineConfig
from pdso_ray.plan import METHODS, SHARED_STAGES, STAGES, method_stages, runs_stage
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages import stage_class
from pdso_ray.stages.base import PipelineError, RunContext, Stage
from pdso_ray.storage import Storage


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def stage_key(name: str, config_sections: tuple[str, ...], cfg: PipelineConfig, inputs: dict[str, str],
              fingerprint: str | None = None, restarts_on_new_inputs: bool = False) -> tuple[str, str]:
    """``(key, setup key)`` of a stage (module docstring): its config sections and the keys of
    the stages it reads (``inputs``), and for the key also its own inputs' ``fingerprint`` (for
    the setup key too when ``restarts_on_new_inputs``: then new inputs clear its outputs)."""
    setup = _hash(name, cfg.section_hash(*config_sections), *(f"{d}={k}" for d, k in sorted(inputs.items())))
    if fingerprint is None:
        return setup, setup
    key = _hash(setup, fingerprint)
    return key, (key if restarts_on_new_inputs else setup)


@dataclass
class Step:
    """One stage of a run's plan: ``run`` False when its outputs are up to date."""

    name: str
    stage: Stage
    key: str
    setup_key: str
    inputs: dict[str, str]
    manifest: dict[str, Any] | None
    run: bool


@dataclass
class Plan:
    """What one run will do: ``steps`` (the requested stages, in order), ``keys`` (the key of
    every stage whose outputs are valid after the run, this method's and the shared ones),
    ``stale`` (``(method, stage)`` whose outputs were made from outputs this run replaces or
    from outputs that are gone) and ``precomputed`` (the counts of ``data.features``)."""

    steps: list[Step] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    stale: list[tuple[str, str]] = field(default_factory=list)
    precomputed: dict[str, Any] | None = None

    @property
    def replaced(self) -> list[str]:
        """Requested stages that will overwrite outputs a run with other settings or inputs made."""
        return [s.name for s in self.steps if s.run and s.manifest is not None and s.manifest.get("key") != s.key]


def _consistent(manifest: dict[str, Any] | None, keys: dict[str, str], upstream: tuple[str, ...]) -> bool:
    """Whether a stage's manifest was made from the outputs the folder holds now (``keys``)."""
    if manifest is None:
        return False
    inputs = manifest.get("inputs")
    if not isinstance(inputs, dict):
        return not upstream  # a manifest of an older version: valid only if it read nothing
    return all(keys.get(dep) == key for dep, key in inputs.items())


def plan_run(ctx: RunContext, wanted: list[str]) -> Plan:
    """The plan of a run of ``ctx.cfg`` that executes the stages ``wanted``: keys, what is up
    to date, what is stale (module docstring). Lists ``data.root`` for stages that fingerprint
    their inputs; starts no Ray work."""
    cfg, storage, run = ctx.cfg, ctx.storage, ctx.run
    plan = Plan()
    for name in STAGES:
        if not runs_stage(cfg.method, name):
            continue
        stage_cls = stage_class(name)
        if name == "features" and cfg.data.features:
            plan.keys[name], plan.precomputed = precomputed_features(storage, cfg.data.features)
            continue
        manifest = storage.read_manifest(run.stage_dir(name))
        upstream = stage_cls.upstream(cfg)
        if stage_cls.reads_what_exists:
            upstream = tuple(dep for dep in upstream if dep in plan.keys)
        if name not in wanted:
            if _consistent(manifest, plan.keys, upstream):
                plan.keys[name] = manifest["key"]
            elif manifest is not None:
                plan.stale.append((cfg.method, name))
            continue
        missing = [dep for dep in upstream if dep not in plan.keys]
        if missing:
            raise PipelineError(f"stage {name!r} reads the outputs of {missing[0]!r}, which has not completed "
                                f"in {cfg.output}; add it to `stages` or run it first")
        stage = stage_cls()
        inputs = {dep: plan.keys[dep] for dep in upstream}
        key, setup = stage_key(name, stage_cls.config_sections, cfg, inputs, stage.input_fingerprint(ctx),
                               stage_cls.restarts_on_new_inputs)
        fresh = manifest is not None and manifest.get("key") == key and not stage_cls.always_run
        plan.steps.append(Step(name, stage, key, setup, inputs, manifest, run=not fresh))
        plan.keys[name] = key
    shared = {k: v for k, v in plan.keys.items() if k in SHARED_STAGES}
    for method in METHODS:
        if method != cfg.method:
            plan.stale += [(method, name) for name in _stale_of(storage, run.for_method(method),
                                                                dataclasses.replace(cfg, method=method), shared)]
    return plan


def _stale_of(storage: Storage, run: RunLayout, cfg: PipelineConfig, shared: dict[str, str]) -> list[str]:
    """The stages of ``cfg.method`` (not the shared ones) whose manifests no longer match what
    they read, given the shared stages' keys after this run."""
    keys, stale = dict(shared), []
    for name in STAGES:
        if name in SHARED_STAGES or not runs_stage(cfg.method, name):
            continue
        manifest = storage.read_manifest(run.stage_dir(name))
        if manifest is None:
            continue
        if _consistent(manifest, keys, stage_class(name).upstream(cfg)):
            keys[name] = manifest["key"]
        else:
            stale.append(name)
    return stale


def remove_stale(storage: Storage, run: RunLayout, stale: list[tuple[str, str]]) -> None:
    """Remove the manifests and outputs of stale stages (``(method, stage)``), and rebuild the
    other methods' summaries without them."""
    methods = set()
    for method, name in stale:
        layout = run.for_method(method)
        for url in (layout.stage_dir(name), *stage_class(name)().extra_outputs(layout)):
            storage.remove(url, recursive=True)
        methods.add(method)
    for method in methods:
        layout = run.for_method(method)
        if storage.exists(layout.summary_file) and method != run.method:
            old = storage.read_json(layout.summary_file)
            order = old.get("stage_order") or method_stages(method)
            statuses = {n: info.get("status") for n, info in old.get("stages", {}).items()}
            storage.write_json(layout.summary_file, build_summary(storage, layout, method, order, statuses))


def precomputed_features(storage: Storage, url: str) -> tuple[str, dict[str, Any]]:
    """``data.features`` replaces stage 1: its key (the URL and every file's name, size and
    stamp, so that new or rewritten files count as new inputs) and its counts."""
    from pdso_ray.tables import count_rows, parquet_files

    files = parquet_files(storage, url)
    rows = count_rows(storage, url)
    if rows == 0:
        raise PipelineError(f"data.features={url!r} holds no Parquet rows")
    stamps = [f"{e.url}:{e.size}:{e.version}" for e in storage.list_entries(url) if e.url in set(files)]
    return _hash("precomputed", url, *stamps), {"images": rows}


def build_summary(storage: Storage, run: RunLayout, method: str, order: list[str], statuses: dict[str, str],
                  precomputed: tuple[str, dict[str, Any]] | None = None,
                  keys: dict[str, str] | None = None) -> dict[str, Any]:
    """``summary.json`` of ``method`` from the manifests its folder holds: the stages of
    ``order`` that completed (status from ``statuses``, else "done"), the image accounting,
    per-split counts, notes, diagnostics and metrics lifted from their counts.
    ``precomputed``: ``(url, counts)`` of ``data.features``, standing in for ``features``;
    ``keys``: a run's plan, whose manifests alone count (one it has yet to replace does not)."""
    summary: dict[str, Any] = {"method": method, "stage_order": list(order), "stages": {}}
    for name in [s for s in STAGES if s in order or s in SHARED_STAGES]:
        if name == "features" and precomputed is not None:
            url, counts = precomputed
            n = counts["images"]
            summary["stages"][name] = {"status": "precomputed", "source": url, "counts": counts}
            summary.update(images_total=n, images_ok=n, images_rejected=0, files_ignored=0)
            continue
        manifest = storage.read_manifest(run.stage_dir(name))
        if manifest is None or (keys is not None and manifest.get("key") != keys.get(name)):
            continue
        counts = manifest.get("counts", {})
        summary["stages"][name] = {"status": statuses.get(name) or "done", "seconds": manifest.get("seconds"),
                                   "counts": counts}
        update_totals(summary, name, counts)
    return summary


def update_totals(summary: dict[str, Any], stage: str, counts: dict[str, Any]) -> None:
    """Lift image accounting, per-split counts, notes, warnings, diagnostics and metrics from stage
    counts to the top of the summary; raise when the image accounting does not reconcile."""
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
    if counts.get("warnings"):  # report: the label-free quality signals' warnings
        summary["warnings"] = list(counts["warnings"])
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
