"""Measurements are best-effort: a diagnostic, a score or a report figure that cannot be computed
is recorded as ``"not computed: <reason>"`` (in the stage's counts, ``summary.json`` and the
report) with one warning line, and the run goes on. :func:`best_effort` is the one place that
rule is written."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("pdso_ray")

NOT_COMPUTED = "not computed: "
T = TypeVar("T")


def not_computed(reason: str) -> str:
    """The value a measurement records in place of its result."""
    return NOT_COMPUTED + reason


def is_not_computed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(NOT_COMPUTED)


def best_effort(what: str, compute: Callable[[], T]) -> T | str:
    """``compute()``, or, when it raises, ``"not computed: <reason>"`` and one warning line naming
    ``what`` (the traceback at debug level): a measurement never ends a run. ``KeyboardInterrupt``
    still does."""
    try:
        return compute()
    except Exception as e:  # noqa: BLE001 - whatever breaks a measurement, the run goes on
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
        log.warning("%s: not computed: %s", what, reason)
        log.debug("%s: not computed", what, exc_info=True)
        return not_computed(reason)
