"""Stage 9, ``report``: the run folder's artifacts → ``report/index.html`` + PNGs
(:mod:`pdso_ray.report`).

It reads whichever stages of the method have completed (every section of the report says "not
run" when its artifacts are missing, so it can follow any subset of stages), and their keys chain
into its own: a report made from outputs a later run replaced is stale and removed with them.
First it measures the run's label-free quality signals (:mod:`pdso_ray.stages.quality`,
``report/quality.json``); their warnings head the page and are the stage's ``warnings`` count,
which the CLI prints at the end of the run.
"""

from __future__ import annotations

from typing import Any

from pdso_ray.plan import STAGES, method_stages, runs_stage
from pdso_ray.report import build_report
from pdso_ray.stages.base import RunContext, Stage
from pdso_ray.stages.quality import measure_quality


class ReportStage(Stage):
    name = "report"
    always_run = True  # a cheap view of whatever the run folder holds now
    reads_what_exists = True

    @classmethod
    def upstream(cls, cfg) -> tuple[str, ...]:
        """Every stage of the method before this one (those that completed: ``reads_what_exists``)."""
        return tuple(name for name in STAGES if name != cls.name and runs_stage(cfg.method, name))

    def run(self, ctx: RunContext) -> dict[str, Any]:
        signals = measure_quality(ctx)
        ctx.storage.write_json(ctx.run.quality_file, signals)
        url = build_report(ctx.storage, ctx.cfg.output, cfg=ctx.cfg,
                           stage_order=method_stages(ctx.cfg.method, ctx.cfg.lightcluster.finetune))
        figures = ctx.storage.list_files(ctx.run.report_dir, suffixes=(".png",))
        return {"index": url, "figures": len(figures), "warnings": signals["warnings"]}
