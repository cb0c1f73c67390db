"""Every error a user can cause ends in one ``error:`` line (exit code 2), also when it was raised
inside a Ray task or a training worker; an internal error is one line too (exit code 1), with
the traceback only under ``--debug``; Ctrl-C during training is ``interrupted:``; a closed pipe
is not an error. The project's exception types are collected from the package, so a new one is
checked without editing this file."""

import errno
import importlib
import inspect
import json
import os
import pkgutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import pdso_ray
from pdso_ray import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_exceptions() -> list[type]:
    found = []
    for info in pkgutil.walk_packages(pdso_ray.__path__, "pdso_ray."):
        module = importlib.import_module(info.name)
        found += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, BaseException) and obj.__module__ == info.name]
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__name__}")


def ray_task_error(cause: BaseException) -> BaseException:
    """What ``ray.get`` raises when a task raised ``cause``."""
    from ray.exceptions import RayTaskError

    return RayTaskError("stage_task", "Traceback (most recent call last):\n  ...\n", cause).as_instanceof_cause()


def training_error(cause: BaseException) -> BaseException:
    """What Ray Train's ``fit`` raises when a worker raised ``cause``."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("Worker 0 failed:\nTraceback ...", {0: ray_task_error(cause)})


def render(monkeypatch, capsys, error: BaseException, *flags: str) -> tuple[int, list[str]]:
    def command(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_inspect", command)
    code = cli.main([*flags, "inspect", "somewhere"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_project_exceptions_are_found():
    names = {c.__name__ for c in project_exceptions()}
    assert {"ConfigError", "PreflightError", "StorageError", "UnreadableFile", "LeaseHeld", "PipelineError",
            "PretrainCollapsed", "CheckpointError"} <= names


@pytest.mark.parametrize("kind", project_exceptions(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("wrap", ["raised", "in a Ray task", "in a training worker"])
def test_each_project_error_is_one_line(monkeypatch, capsys, kind, wrap):
    message = f"{kind.__name__}: what went wrong with s3://bucket/key, and the fix"
    error = kind(message)
    error = {"raised": error, "in a Ray task": ray_task_error(error),
             "in a training worker": training_error(error)}[wrap]
    code, err = render(monkeypatch, capsys, error)
    assert (code, err) == (2, [f"error: {message}"])


def test_a_full_disk_and_a_missing_file_are_bad_input(monkeypatch, capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/features/part.parquet")
    code, err = render(monkeypatch, capsys, ray_task_error(full))
    assert code == 2 and len(err) == 1 and err[0].startswith("error: disk full: ")
    assert "/runs/x/features/part.parquet" in err[0]
    code, err = render(monkeypatch, capsys, FileNotFoundError("no such file: /data/x.jpg"))
    assert (code, err) == (2, ["error: no such file: /data/x.jpg"])


def test_an_internal_error_is_one_line_and_its_traceback_needs_debug(monkeypatch, capsys):
    code, err = render(monkeypatch, capsys, ray_task_error(KeyError("feat")))
    assert code == 1 and len(err) == 1
    assert err[0] == "error: internal error: KeyError: 'feat' (pdso-ray --debug ... prints the traceback)"
    code, err = render(monkeypatch, capsys, KeyError("feat"), "--debug")
    assert code == 1 and err[0] == "Traceback (most recent call last):" and err[-1] == "error: internal error: KeyError: 'feat'"


class FakeTrainer:
    """Blocks in ``fit`` like a trainer; on the main thread it installs its own SIGINT handler,
    as Ray Train's does (which turns Ctrl-C into a graceful return)."""

    def __init__(self):
        self.release = threading.Event()

    def fit(self):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: self.release.set())
        self.release.wait(20)
        return "finished"


def test_ctrl_c_during_training_is_a_keyboard_interrupt():
    from pdso_ray.stages.base import fit

    trainer = FakeTrainer()
    # Python's own handler, as the CLI's process has it in a terminal: pytest itself may run with
    # SIGINT ignored (a background job of a non-interactive shell starts that way)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            fit(trainer)
        assert time.monotonic() - started < 10
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        trainer.release.set()
        assert fit(trainer) == "finished"
    finally:
        signal.signal(signal.SIGINT, outer)


def test_inspect_into_a_closed_pipe_prints_no_traceback(tmp_path):
    summary = {"method": "pdso", "stages": {f"stage{i}": {"status": "done", "seconds": i} for i in range(20000)}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    pdso = os.path.join(os.path.dirname(sys.executable), "pdso-ray")
    proc = subprocess.run(f"'{pdso}' inspect '{tmp_path}' --json | head -n 2", shell=True, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["{", '  "method": "pdso",']
    assert proc.stderr == ""
