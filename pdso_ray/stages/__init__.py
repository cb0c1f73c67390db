"""Pipeline stages (docs/architecture.md, "Data flow"), one module each.

:data:`STAGES` is the one list of stages: its order is the pipeline's order, and the config's
``stages`` names are checked against it. Each entry is ``"module:Class"``, imported on demand
(:func:`stage_registry`), so that naming the stages costs no torch or Ray import.
"""

from __future__ import annotations

import importlib

STAGES = {
    "features": "pdso_ray.stages.features:FeaturesStage",
    "cluster": "pdso_ray.stages.cluster:ClusterStage",
    "denoise": "pdso_ray.stages.denoise:DenoiseStage",
    "purify": "pdso_ray.stages.purify:PurifyStage",
    "pseudo_labels": "pdso_ray.stages.pseudo_labels:PseudoLabelsStage",
    "finetune": "pdso_ray.stages.finetune:FinetuneStage",
    "predict": "pdso_ray.stages.predict:PredictStage",
    "evaluate": "pdso_ray.stages.evaluate:EvaluateStage",
    "report": "pdso_ray.stages.report:ReportStage",
}


def stage_class(name: str) -> type:
    """The stage class registered as ``name``."""
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def stage_registry() -> dict[str, type]:
    """Every stage class by name, in pipeline order."""
    return {name: stage_class(name) for name in STAGES}
