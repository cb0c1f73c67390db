"""Stage 9, ``report``: the run folder's artifacts → ``report/index.html`` + PNGs
(:mod:`pdso_ray.report`).

It reads no stage in particular (``depends_on`` is empty): every section of the report says
"not run" when its artifacts are missing, so it can follow any subset of stages.
"""

from __future__ import annotations

from typing import Any

from pdso_ray.plan import method_stages
from pdso_ray.report import build_report
from pdso_ray.stages.base import RunContext, Stage


class ReportStage(Stage):
    name = "report"
    depends_on = ()
    always_run = True  # a cheap view of whatever the run folder holds now

    def run(self, ctx: RunContext) -> dict[str, Any]:
        url = build_report(ctx.storage, ctx.cfg.output, cfg=ctx.cfg,
                           stage_order=method_stages(ctx.cfg.method, ctx.cfg.lightcluster.finetune))
        figures = ctx.storage.list_files(ctx.run.report_dir, suffixes=(".png",))
        return {"index": url, "figures": len(figures)}
