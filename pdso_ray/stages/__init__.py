"""Pipeline stages (DESIGN §2), one module each; :func:`stage_registry` maps names to classes."""

from __future__ import annotations

import importlib

# name -> "module:Class"; imported on demand so that `pdso-ray evaluate` does not pull in torch+ray.
_STAGES = {
    "features": "pdso_ray.stages.features:FeaturesStage",
    "cluster": "pdso_ray.stages.cluster:ClusterStage",
}


def stage_registry() -> dict[str, type]:
    out = {}
    for name, target in _STAGES.items():
        module, cls = target.split(":")
        out[name] = getattr(importlib.import_module(module), cls)
    return out
