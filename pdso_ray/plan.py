"""The stage plan as plain data: which stages exist, in which order, and which method runs which.

This module is the ground floor of the package: it imports nothing from it, so every other module
(the config's checks, the run folder's layout, the report, the pipeline, the CLI) can ask it.

- :data:`STAGES`: every stage in pipeline order, each with the ``"module:Class"`` that implements
  it (:func:`pdso_ray.stages.stage_class` imports it on demand). Adding a stage is one entry here.
- :data:`METHODS` and :data:`METHOD_OF_STAGE`: two methods share the list (``method:`` in the
  config); a stage not in :data:`METHOD_OF_STAGE` serves both.
- :data:`SHARED_STAGES`: the stages whose folders sit at the top of the run folder and serve both
  methods (the rest are below the method's folder, :attr:`pdso_ray.run_layout.RunLayout.method_root`).
- :data:`OPTIONAL`: run only when ``stages`` names them.
- :func:`method_stages` (a method's default plan) and :func:`requested_stages` (what one run of a
  config executes).
"""

from __future__ import annotations

from typing import Any

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
MAIN_METHOD = "pdso"  # its folders are the run folder's top level
# Stages only one method runs; every other stage serves both.
METHOD_OF_STAGE = {"denoise": "pdso", "purify": "pdso", "pseudo_labels": "pdso", "lightcluster": "lightcluster"}
# Stages that write at the top of the run folder and are shared by both methods.
SHARED_STAGES = ("pretrain", "features", "cluster")
OPTIONAL = ("pretrain",)  # run only when `stages` names them
# The stage whose train labels `finetune` learns from.
LABEL_STAGE = {"pdso": "pseudo_labels", "lightcluster": "lightcluster"}
# The stages LightCluster runs only with lightcluster.finetune: true.
LIGHTCLUSTER_TRAINING = ("finetune", "predict")


def runs_stage(method: str, stage: str) -> bool:
    """Whether ``method`` has ``stage`` in its pipeline at all (optional or not)."""
    return METHOD_OF_STAGE.get(stage, method) == method


def method_stages(method: str, lightcluster_finetune: bool = False) -> list[str]:
    """The stages ``method`` runs by default, in pipeline order: PDSO's nine; LightCluster's
    features → cluster → lightcluster → evaluate → report, with finetune → predict when
    ``lightcluster_finetune``. Optional stages are not included."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    out = []
    for name in STAGES:
        if name in OPTIONAL or not runs_stage(method, name):
            continue
        if method == "lightcluster" and name in LIGHTCLUSTER_TRAINING and not lightcluster_finetune:
            continue
        out.append(name)
    return out


def requested_stages(cfg: Any) -> list[str]:
    """The stages one run of the config ``cfg`` executes, in pipeline order: ``cfg.stages``, or
    every default stage of ``cfg.method``. (``cfg`` is a :class:`pdso_ray.config.PipelineConfig`;
    this module imports nothing of the package.)"""
    if cfg.stages is None:
        return method_stages(cfg.method, cfg.lightcluster.finetune)
    return [s for s in STAGES if s in cfg.stages]


def method_problem(method: str, stage: str) -> str | None:
    """Why the known stage ``stage`` cannot be asked of a run of ``method`` (None when it can)."""
    owner = METHOD_OF_STAGE.get(stage, method)
    if owner != method:
        return (f"{stage!r} is a stage of method {owner}; this run has method={method} "
                f"(set method={owner} to run it)")
    return None
