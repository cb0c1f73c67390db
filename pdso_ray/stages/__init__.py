"""Pipeline stages (docs/architecture.md, "Data flow"), one module each.

Which stages exist, their order and which method runs which is plain data in
:mod:`pdso_ray.plan`; this package holds their implementations. :func:`stage_class` imports a
stage's module on demand, so that naming the stages costs no torch or Ray import.
"""

from __future__ import annotations

import importlib

from pdso_ray.plan import STAGES


def stage_class(name: str) -> type:
    """The stage class registered as ``name`` in :data:`pdso_ray.plan.STAGES`."""
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def stage_registry() -> dict[str, type]:
    """Every stage class by name, in pipeline order."""
    return {name: stage_class(name) for name in STAGES}
