"""What every report section gets: :class:`Report` (the run folder, its config and data, and
readers of its artifacts) and the HTML helpers sections share.

Sections (:mod:`~pdso_ray.report.sections`, :mod:`~pdso_ray.report.quality`) build on this module;
the page (:mod:`~pdso_ray.report.page`) assembles them.
"""

from __future__ import annotations

import functools
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
from pdso_ray.data.layouts import Layout, build_layout
from pdso_ray.data.members import DEFAULT_MAX_BYTES, read_many
from pdso_ray.data.png_sets import png_files
from pdso_ray.plan import MAIN_METHOD
from pdso_ray.report.figures import PANEL_SIDE
from pdso_ray.run_layout import RunLayout
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")


class Report:
    """What a section gets: storage, the run folder's layout for the reported method (:attr:`run`;
    ``run.for_method`` reaches the other method's results), the run's config (None when it has
    none), its image source (:attr:`data`, None without a config) and the pipeline's stage order
    (:attr:`stage_order`, None when unknown)."""

    def __init__(self, storage: Storage, run_url: str, cfg: PipelineConfig | None,
                 stage_order: Sequence[str] | None = None, method: str = MAIN_METHOD):
        self.storage, self.cfg = storage, cfg
        self.stage_order = list(stage_order) if stage_order else None
        self.run = RunLayout(run_url, cfg.data.features if cfg else None, method)
        self._listings: dict[str, dict[str, str] | None] = {}  # split -> split_images(split)

    @functools.cached_property
    def data(self) -> Layout | None:
        """The run's image layout; None without a config, or when its data cannot be found."""
        if self.cfg is None:
            return None
        try:
            return build_layout(self.cfg.data, self.storage)
        except FileNotFoundError as e:
            log.warning("report: the dataset is not reachable (%s)", e)
            return None

    def split_images(self, split: str) -> dict[str, str] | None:
        """``{image id: image URL}`` of the accepted images of ``split``, listed once per report
        (several sections show images of one split); None when the split cannot be listed."""
        if split not in self._listings:
            listed = None
            if self.data is not None:
                try:
                    listed = {rec.id: rec.path for rec in self.data.list_split(self.storage, split).images}
                except (FileNotFoundError, ValueError):
                    pass
            self._listings[split] = listed
        return self._listings[split]

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

        max_bytes = self.cfg.data.max_file_bytes if self.cfg else DEFAULT_MAX_BYTES
        data = read_many(self.storage, [url], max_bytes)[0]
        if isinstance(data, Exception):
            return None
        max_pixels = self.cfg.data.max_pixels if self.cfg else 89_478_485
        result = decode_image(data, max_pixels=max_pixels, target_short_side=PANEL_SIDE,
                              exif_transpose=exif_transpose)
        return result.image if result.ok else None

    def label(self, url: str | None) -> np.ndarray | None:
        """The label PNG at ``url`` (a file, a shard's member, a table's cell) as HxW ids; None
        when ``url`` is None or names nothing."""
        if url is None:
            return None
        data = read_many(self.storage, [url])[0]
        if isinstance(data, FileNotFoundError):
            return None
        if isinstance(data, Exception):
            raise data
        return decode_label(data)

    def pngs(self, source) -> dict[str, str]:
        """``{<rel>.png: URL}`` of a PNG source (a folder of PNGs or PNG shards, or a mapping);
        {} for None."""
        return {} if source is None else png_files(self.storage, source)


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


# Counts the report shows in sections of their own (diagnostics, notes, the quality warnings) or
# that say nothing to a reader (the report's own URL).
_SHOWN_ELSEWHERE = ("diagnostics", "notes", "warnings", "index")


def readable_counts(counts: dict) -> str:
    """A stage's counts as one readable line: ``images 20; failed 0; splits: all (images 20,
    predicted 20)``: nested counts in parentheses, a list as its length, and what other sections
    show (:data:`_SHOWN_ELSEWHERE`) left out."""

    def one(key: str, value: Any) -> str:
        name = key.replace("_", " ")
        if isinstance(value, dict):
            return f"{name} ({', '.join(one(k, v) for k, v in value.items())})"
        if isinstance(value, list):
            return f"{name}: {len(value)}"
        return f"{name} {fmt(value)}"

    return "; ".join(one(k, v) for k, v in counts.items() if k not in _SHOWN_ELSEWHERE)


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def sample(keys: list[str], n: int) -> list[str]:
    """Up to ``n`` keys, spread over the list by a hash of each key: deterministic, and not all
    from the first class folder as the first ``n`` in sorted order would be."""
    return sorted(sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())[:n])
