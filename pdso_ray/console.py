"""What the terminal shows during a run: pdso-ray's own lines, one progress bar per pass over the
images (images/s and ETA), warnings and errors. Everything else written to the process's stdout
and stderr — Ray's per-operator progress, its start-up lines, the workers' output forwarded to the
driver, k-means's and Ray Train's chatter — goes to a log file (:func:`quiet_run`); the CLI puts
it in ``OUTPUT/logs/`` and ``--verbose`` keeps it all on the terminal instead.

It works on file descriptors, not on Python's ``sys.stderr``: Ray's processes and its C++ core
write to descriptor 2 directly. Nothing here imports the rest of the package.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from tqdm.auto import tqdm

PACKAGE_LOGGER = "pdso_ray"


@dataclass
class Console:
    """Where a run's progress bars go: ``terminal`` (None: ``sys.stderr`` at the time of writing,
    as in tests and library use)."""

    terminal: TextIO | None = None

    def progress(self, total: int, what: str) -> tqdm:
        """A bar over ``total`` images, counting images/s (always: tqdm's default turns a rate
        below 1 into s/img) and the time left."""
        return tqdm(total=total, desc=what, unit="img", file=self.terminal or sys.stderr,
                    dynamic_ncols=True, mininterval=1.0, smoothing=0.1,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")


class _TerminalFormatter(logging.Formatter):
    """``HH:MM:SS message``; a warning or an error as ``warning: message`` / ``error: message``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.ERROR:
            return "error: " + record.getMessage()
        if record.levelno >= logging.WARNING:
            return "warning: " + record.getMessage()
        return super().format(record)


@contextmanager
def quiet_run(log_path: str) -> Iterator[Console]:
    """Within the block, descriptors 1 and 2 write to ``log_path`` (appended; its folder is
    made), and the package's log records at INFO and above and the returned :class:`Console`'s
    bars go to the terminal (the stderr the process had). The log file also gets the package's
    records through the root logger. Descriptors, ``sys.stdout``/``sys.stderr`` and the logger's
    handlers are restored on the way out, whatever happens inside."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    handler = logging.StreamHandler(terminal)
    handler.setLevel(logging.INFO)
    handler.setFormatter(_TerminalFormatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    package_log = logging.getLogger(PACKAGE_LOGGER)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        package_log.addHandler(handler)
        yield Console(terminal)
    finally:
        package_log.removeHandler(handler)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        terminal.close()
