"""The run report's page: ``report/index.html``, assembled from the sections.

:func:`build_report` reads what the run folder holds (every path from
:class:`~pdso_ray.run_layout.RunLayout`) and writes a static page that opens from any file browser
or bucket. Each section of :data:`pdso_ray.report.sections.SECTIONS` stands alone: a missing
artifact makes its section say "not run", and one that cannot be built says "not computed:
<reason>" (and one warning line), without stopping the others. The warnings of the run's
label-free quality signals head the page in a red box. Figures are drawn with
matplotlib's object API (``Figure`` on the Agg canvas), which sets no global backend.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdso_ray.config import PipelineConfig
from pdso_ray.measuring import best_effort, is_not_computed
from pdso_ray.plan import MAIN_METHOD
from pdso_ray.report.base import Report, esc
from pdso_ray.report.sections import SECTIONS
from pdso_ray.report.signals import warning_box
from pdso_ray.run_layout import load_run_config
from pdso_ray.storage import Storage

def build_report(storage: Storage, run_url: str, cfg: PipelineConfig | None = None,
                 stage_order: Sequence[str] | None = None, method: str | None = None) -> str:
    """Write ``report/index.html`` and its PNGs for one method's results under ``run_url``
    (``<run>/report/`` for PDSO, ``<run>/<method>/report/`` otherwise); return the page's URL.

    ``cfg`` locates the dataset (images and GT for the validation grid) and names the method; by
    default it is read from the method's ``config.yaml``. ``method``: when ``cfg`` is not given
    (default PDSO). ``stage_order``: the pipeline's stages, for the stage table (default: the order
    of ``summary.json``).
    """
    if cfg is None:
        cfg = load_run_config(storage, run_url, method or MAIN_METHOD)
    report = Report(storage, run_url, cfg, stage_order, method=cfg.method if cfg else method or MAIN_METHOD)
    body = []
    for title, build in SECTIONS:
        # One unreadable artifact must not hide the rest of the report: a section is best-effort.
        content = best_effort(f"report: section {title!r}", lambda build=build: build(report))
        if is_not_computed(content):
            content = f'<p class="error">{esc(content)}</p>'
        body.append(f"<section><h2>{esc(title)}</h2>\n{content}\n</section>")
    box = best_effort("report: the warnings box", lambda: warning_box(report))
    url = report.run.report_file("index.html")
    storage.write_text(url, _PAGE.format(run=esc(run_url), alarm="" if is_not_computed(box) else box,
                                         body="\n".join(body)))
    return url


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pdso-ray report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }}
h2 {{ font-size: 1.15em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }}
table {{ border-collapse: collapse; margin: .6em 0; font-size: .85em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }} td {{ word-break: break-all; }}
img {{ max-width: 100%; display: block; margin: .6em 0; }}
.notrun {{ color: #888; font-style: italic; }} .error {{ color: #b00020; }}
.note {{ color: #555; font-size: .9em; }}
.alarm {{ border: 3px solid #b00020; background: #fdecee; color: #600010; padding: .6em 1em; margin: 1em 0; }}
pre {{ background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }}
</style></head>
<body><h1>pdso-ray run report</h1><p><code>{run}</code></p>
{alarm}
{body}
</body></html>
"""
