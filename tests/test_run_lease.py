"""The run folder's lease: one run at a time, a live holder is named, a stale lease is taken over."""

import json
import logging
import socket
import subprocess
import sys
import time

import pytest

from pdso_ray.run_lease import LeaseHeld, RunLease, is_stale
from pdso_ray.storage import Storage


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_is_refused_with_the_holder_named(tmp_path, s3_bucket, where):
    options, bucket = s3_bucket
    storage = Storage(options) if where == "s3" else Storage()
    url = f"{bucket}/run/_LEASE.json" if where == "s3" else str(tmp_path / "run" / "_LEASE.json")
    with RunLease(storage, url).held():
        holder = json.loads(storage.read_bytes(url))
        assert holder["host"] == socket.gethostname() and isinstance(holder["pid"], int)
        with pytest.raises(LeaseHeld, match=rf"in use by pid {holder['pid']} on host {socket.gethostname()}"):
            with RunLease(storage, url).held():
                pass
        assert json.loads(storage.read_bytes(url))["run_id"] == holder["run_id"]  # untouched
    assert not storage.exists(url)  # released
    with RunLease(storage, url).held():  # and free again
        pass


def test_a_stale_lease_is_taken_over_with_a_warning(tmp_path, caplog):
    storage = Storage()
    url = str(tmp_path / "_LEASE.json")
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "run_id": "old", "started": 0,
             "refreshed": time.time()}
    storage.write_json(url, stale)
    with caplog.at_level(logging.WARNING, logger="pdso_ray"), RunLease(storage, url).held() as lease:
        assert json.loads(storage.read_bytes(url))["run_id"] == lease.run_id
    assert "taking over the stale lease" in caplog.text
    # another host's lease is stale once it has not been refreshed for the ttl
    other = {"host": "elsewhere", "pid": 1, "refreshed": time.time() - 1000}
    assert is_stale(other, ttl_s=120) and not is_stale({**other, "refreshed": time.time()}, ttl_s=120)


def test_the_lease_is_refreshed_while_the_run_goes_on(tmp_path):
    storage = Storage()
    url = str(tmp_path / "_LEASE.json")
    with RunLease(storage, url, refresh_s=0.05).held():
        first = json.loads(storage.read_bytes(url))["refreshed"]
        time.sleep(0.3)
        assert json.loads(storage.read_bytes(url))["refreshed"] > first
