"""The run report's page: ``report/index.html``, its plumbing and the HTML helpers sections share.

:func:`build_report` reads what the run folder holds (every path from
:class:`~pdso_ray.run_layout.RunLayout`) and writes a static page that opens from any file browser
or bucket. Each section of :data:`pdso_ray.report.sections.SECTIONS` stands alone: a missing
artifact makes its section say "not run", and an unreadable one says why, without stopping the
others. Figures are drawn with matplotlib's object API (``Figure`` on the Agg canvas), which sets
no global backend.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pdso_ray.config import PipelineConfig
from pdso_ray.data.imagenet_s import decode_label
from pdso_ray.data.layouts import build_layout
from pdso_ray.report.figures import PANEL_SIDE
from pdso_ray.run_layout import MAIN_METHOD, RunLayout, load_run_config
from pdso_ray.storage import Storage, UnreadableFile

log = logging.getLogger("pdso_ray")


def build_report(storage: Storage, run_url: str, cfg: PipelineConfig | None = None,
                 stage_order: Sequence[str] | None = None, method: str | None = None) -> str:
    """Write ``report/index.html`` and its PNGs for one method's results under ``run_url``
    (``<run>/report/`` for PDSO, ``<run>/<method>/report/`` otherwise); return the page's URL.

    ``cfg`` locates the dataset (images and GT for the validation grid) and names the method; by
    default it is read from the method's ``config.yaml``. ``method``: when ``cfg`` is not given
    (default PDSO). ``stage_order``: the pipeline's stages, for the stage table (default: the order
    of ``summary.json``).
    """
    from pdso_ray.report.sections import SECTIONS

    if cfg is None:
        cfg = load_run_config(storage, run_url, method or MAIN_METHOD)
    report = Report(storage, run_url, cfg, stage_order, method=cfg.method if cfg else method or MAIN_METHOD)
    body = []
    for title, build in SECTIONS:
        try:
            content = build(report)
        except Exception as e:  # one unreadable artifact must not hide the rest of the report
            log.warning("report: section %r failed", title, exc_info=True)
            why = f"{type(e).__name__}: {e}"
            content = f'<p class="error">could not be built: {esc(why)}</p>'
        body.append(f"<section><h2>{esc(title)}</h2>\n{content}\n</section>")
    url = report.run.report_file("index.html")
    storage.write_text(url, _PAGE.format(run=esc(run_url), body="\n".join(body)))
    return url


class Report:
    """What a section gets: storage, the run folder's layout for the reported method (:attr:`run`;
    ``run.for_method`` reaches the other method's results), the run's config (None when it has none), its image source (:attr:`data`, None without a config) and the pipeline's
    stage order (:attr:`stage_order`, None when unknown)."""

    def __init__(self, storage: Storage, run_url: str, cfg: PipelineConfig | None,
                 stage_order: Sequence[str] | None = None, method: str = MAIN_METHOD):
        self.storage, self.cfg = storage, cfg
        self.stage_order = list(stage_order) if stage_order else None
        self.run = RunLayout(run_url, cfg.data.features if cfg else None, method)
        self.data = build_layout(cfg.data) if cfg is not None else None

    def json(self, url: str) -> Any:
        """The JSON at ``url``, or None when there is none."""
        return self.storage.read_json(url) if self.storage.exists(url) else None

    def figure(self, fig: Figure, name: str, alt: str) -> str:
        """Save ``fig`` as ``report/<name>`` and return the ``<img>`` tag that shows it."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        self.storage.write_bytes(self.run.report_file(name), buf.getvalue())
        return f'<img src="{esc(name)}" alt="{esc(alt)}">'

    def image(self, url: str, exif_transpose: bool) -> np.ndarray | None:
        """HxWx3 uint8, decoded at reduced size where the format allows; None if unreadable."""
        from pdso_ray.data.decode import decode_image

        max_bytes = self.cfg.data.max_file_bytes if self.cfg else 256 * 1024 * 1024
        try:
            data = self.storage.read_image_bytes(url, max_bytes)
        except (FileNotFoundError, UnreadableFile):
            return None
        max_pixels = self.cfg.data.max_pixels if self.cfg else 89_478_485
        result = decode_image(data, max_pixels=max_pixels, target_short_side=PANEL_SIDE,
                              exif_transpose=exif_transpose)
        return result.image if result.ok else None

    def label(self, url: str) -> np.ndarray | None:
        """The label PNG at ``url`` as HxW ids; None when it does not exist."""
        if not self.storage.exists(url):
            return None
        return decode_label(self.storage.read_bytes(url))


# ---- HTML helpers ----------------------------------------------------------------------------


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def not_run(why: str) -> str:
    return f'<p class="notrun">not run ({esc(why)})</p>'


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} values]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def sample(keys: list[str], n: int) -> list[str]:
    """Up to ``n`` keys, spread over the list by a hash of each key: deterministic, and not all
    from the first class folder as the first ``n`` in sorted order would be."""
    return sorted(sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())[:n])


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
pre {{ background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em; }}
</style></head>
<body><h1>pdso-ray run report</h1><p><code>{run}</code></p>
{body}
</body></html>
"""
