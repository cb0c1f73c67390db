"""A lease on the run folder: one run at a time writes into it.

The lease is a small JSON file (``OUTPUT/_LEASE.json``: host, pid, run id, start and refresh
times) created exclusively (``O_EXCL`` on local disks, a conditional PUT on S3) and refreshed by
a background thread while the run goes on. A second run finds it and stops with an error naming
the holder. A lease is *stale* when its holder is gone — its process no longer exists on this
host, or it has not been refreshed for ``ttl_s`` seconds (another host, or a killed machine) —
and is then taken over with a warning. Where the store cannot create exclusively, the lease is
written and read back after a pause, and the run proceeds only if it is still its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from pdso_ray.storage import Storage, protocol

log = logging.getLogger("pdso_ray")

DEFAULT_TTL_S = 120.0  # a lease not refreshed for this long is stale
DEFAULT_REFRESH_S = 20.0


class LeaseHeld(RuntimeError):
    """Another run holds the run folder; the message names it and what to do."""


def _now() -> float:
    return time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(holder: dict[str, Any], ttl_s: float, now: float | None = None) -> bool:
    """Whether the lease ``holder`` (the file's JSON) no longer belongs to a live run."""
    now = _now() if now is None else now
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _pid_alive(holder["pid"])
    return now - float(holder.get("refreshed", 0)) > ttl_s


def describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {started})"


class RunLease:
    """The lease of one run; use :meth:`acquire` as a context manager."""

    def __init__(self, storage: Storage, url: str, ttl_s: float = DEFAULT_TTL_S,
                 refresh_s: float = DEFAULT_REFRESH_S):
        self.storage, self.url = storage, url
        self.ttl_s, self.refresh_s = ttl_s, refresh_s
        self.run_id = uuid.uuid4().hex
        self.started = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id,
                           "started": self.started, "refreshed": _now()}).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # unreadable: a write cut short; treated as stale below

    def _take(self) -> None:
        if self.storage.create_exclusive(self.url, self._payload()):
            if protocol(self.url) in ("file", "s3", "s3a"):
                return
            time.sleep(0.2)  # no exclusive create here: read back after writers settle
            if (self._holder() or {}).get("run_id") == self.run_id:
                return
        holder = self._holder()
        if holder is None:  # released between our attempt and the read: try once more
            if self.storage.create_exclusive(self.url, self._payload()):
                return
            holder = self._holder() or {}
        if holder and not is_stale(holder, self.ttl_s):
            raise LeaseHeld(
                f"the run folder {self.url.rsplit('/', 1)[0]} is in use by {describe(holder)}; "
                f"wait for that run to finish (or stop it), or choose another output folder")
        log.warning("taking over the stale lease of %s (%s)", describe(holder) if holder else "an "
                    "unreadable lease", self.url)
        self.storage.remove(self.url)
        if not self.storage.create_exclusive(self.url, self._payload()):
            raise LeaseHeld(f"another run took the run folder lease {self.url} at the same moment")

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                holder = self._holder() or {}
                if holder.get("run_id") != self.run_id:
                    log.error("the lease %s was taken over by %s", self.url, describe(holder))
                    return
                self.storage.write_bytes(self.url, self._payload())
            except OSError as e:  # a blip: the next refresh may work; the ttl gives slack
                log.warning("could not refresh the lease %s: %s", self.url, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            if (self._holder() or {}).get("run_id") == self.run_id:
                self.storage.remove(self.url)

    @contextlib.contextmanager
    def held(self):
        """Take the lease (LeaseHeld when a live run has it), refresh it, release it at the end."""
        self._take()
        self._thread = threading.Thread(target=self._refresh_loop, name="run-lease", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self.release()
