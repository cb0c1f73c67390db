"""The run report: ``report/index.html`` with PNG plots and label grids beside it.

:func:`build_report` (:mod:`~pdso_ray.report.page`) writes the page; its sections are in
:mod:`~pdso_ray.report.sections`, :mod:`~pdso_ray.report.quality`,
:mod:`~pdso_ray.report.predictions` and :mod:`~pdso_ray.report.signals`, built on
:mod:`~pdso_ray.report.base` (what a section gets, HTML helpers); label colours and image mosaics
are in :mod:`~pdso_ray.report.figures`.
"""

from pdso_ray.report.page import build_report

__all__ = ["build_report"]
