"""Pipeline stages (DESIGN §2), one module each; :func:`stage_registry` maps names to classes."""

from __future__ import annotations

import importlib

# name -> "module:Class"; imported on demand so that `pdso-ray evaluate` does not pull in torch+ray.
_STAGES = {
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


def stage_registry() -> dict[str, type]:
    out = {}
    for name, target in _STAGES.items():
        module, cls = target.split(":")
        out[name] = getattr(importlib.import_module(module), cls)
    return out
