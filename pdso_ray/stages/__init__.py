"""Pipeline stages (docs/architecture.md, "Data flow"), one module each.

:data:`STAGES` is the one list of stages: its order is the pipeline's order, and the config's
``stages`` names are checked against it. Each entry is ``"module:Class"``, imported on demand
(:func:`stage_registry`), so that naming the stages costs no torch or Ray import.

Two methods share the list (``method:`` in the config): :func:`method_stages` says which stages
each runs. ``pretrain`` is :data:`OPTIONAL`: it runs only when ``stages`` names it.
"""

from __future__ import annotations

import importlib

STAGES = {
    "pretrain": "pdso_ray.stages.pretrain:PretrainStage",
    "features": "pdso_ray.stages.features:FeaturesStage",
    "cluster": "pdso_ray.stages.cluster:ClusterStage",
    "denoise": "pdso_ray.stages.denoise:DenoiseStage",
    "purify": "pdso_ray.stages.purify:PurifyStage",
    "pseudo_labels": "pdso_ray.stages.pseudo_labels:PseudoLabelsStage",
    "lightcluster": "pdso_ray.stages.lightcluster:LightClusterStage",
    "finetune": "pdso_ray.stages.finetune:FinetuneStage",
    "predict": "pdso_ray.stages.predict:PredictStage",
    "evaluate": "pdso_ray.stages.evaluate:EvaluateStage",
    "report": "pdso_ray.stages.report:ReportStage",
}

METHODS = ("pdso", "lightcluster")
# Stages only one method runs; every other stage serves both.
METHOD_OF_STAGE = {"denoise": "pdso", "purify": "pdso", "pseudo_labels": "pdso", "lightcluster": "lightcluster"}
# Stages that write at the top of the run folder and are shared by both methods (the rest write
# below the method's folder: see RunLayout.method_root).
SHARED_STAGES = ("pretrain", "features", "cluster")
OPTIONAL = ("pretrain",)  # run only when `stages` names them
# The stage whose train labels `finetune` learns from.
LABEL_STAGE = {"pdso": "pseudo_labels", "lightcluster": "lightcluster"}


def method_stages(method: str, lightcluster_finetune: bool = False) -> list[str]:
    """The stages ``method`` runs by default, in pipeline order: PDSO's nine; LightCluster's
    features → cluster → lightcluster → evaluate → report, with finetune → predict when
    ``lightcluster_finetune``. Optional stages are not included."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = []
    for name in STAGES:
        if name in OPTIONAL or METHOD_OF_STAGE.get(name, method) != method:
            continue
        if method == "lightcluster" and name in ("finetune", "predict") and not lightcluster_finetune:
            continue
        out.append(name)
    return out


def stage_class(name: str) -> type:
    """The stage class registered as ``name``."""
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def stage_registry() -> dict[str, type]:
    """Every stage class by name, in pipeline order."""
    return {name: stage_class(name) for name in STAGES}
