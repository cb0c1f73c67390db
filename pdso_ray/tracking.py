"""Training curves where people look: TensorBoard event files in the run folder, and MLflow when
``tracking.mlflow_uri`` is set.

A training stage (``pretrain``, ``finetune``, ``denoise``'s backbone tuner) hands its Ray Train
workers a :class:`Tracker` (picklable: where to write); rank 0 alone opens it
(:meth:`Tracker.open`) and logs scalars by step. Event files are written with ``tensorboardX`` to a
local temporary folder and copied into ``OUTPUT/tensorboard/<stage>/`` on every
:meth:`ScalarLog.flush` (any fsspec URL: a bucket too), so ``tensorboard --logdir OUTPUT`` shows
every stage's curves. MLflow is imported only when configured; the report keeps its own curves.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from pdso_ray.config import ConfigError
from pdso_ray.storage import Storage

MLFLOW_MISSING = ("tracking.mlflow_uri is set, but mlflow is not installed: pip install mlflow "
                  "(or leave tracking.mlflow_uri unset)")


@dataclass(frozen=True)
class Tracker:
    """Where one stage's scalars go: ``folder`` (its TensorBoard folder in the run), ``run_name``
    (the MLflow run's name), and MLflow's ``mlflow_uri``/``experiment`` (None: no MLflow)."""

    storage: Storage
    folder: str
    run_name: str
    mlflow_uri: str | None = None
    experiment: str = "pdso-ray"

    def open(self, params: dict[str, Any] | None = None) -> ScalarLog:
        """A :class:`ScalarLog` for this stage (call on rank 0 only); ``params`` go to MLflow."""
        return ScalarLog(self, params or {})


class ScalarLog:
    """Scalars by step to TensorBoard (and MLflow); :meth:`flush` publishes the event file.

    The event file is written synchronously (tensorboardX's record writer and ``Event`` protos):
    its ``SummaryWriter`` queues events on a thread that ``flush`` does not drain."""

    def __init__(self, tracker: Tracker, params: dict[str, Any]):
        from tensorboardX.record_writer import RecordWriter

        self.tracker = tracker
        self._local = tempfile.mkdtemp(prefix="pdso-tensorboard-")
        self._name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._records = RecordWriter(os.path.join(self._local, self._name))
        self._write(file_version="brain.Event:2")
        self._mlflow = None
        if tracker.mlflow_uri:
            try:
                import mlflow
            except ImportError:
                raise ConfigError(MLFLOW_MISSING) from None
            mlflow.set_tracking_uri(tracker.mlflow_uri)
            mlflow.set_experiment(tracker.experiment)
            mlflow.start_run(run_name=tracker.run_name)
            if params:
                mlflow.log_params(params)
            self._mlflow = mlflow

    def _write(self, **fields: Any) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._records.write(Event(wall_time=time.time(), **fields).SerializeToString())

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``scalars`` (name → number; names may hold ``/`` groups) at ``step``."""
        from tensorboardX.summary import scalar

        for name, value in scalars.items():
            self._write(step=int(step), summary=scalar(name, float(value)))
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in scalars.items()}, step=int(step))

    def flush(self) -> None:
        """Write the event files through and copy them into the run folder (atomically)."""
        self._records.flush()
        with open(os.path.join(self._local, self._name), "rb") as f:
            self.tracker.storage.write_bytes(Storage.join(self.tracker.folder, self._name), f.read())

    def close(self) -> None:
        self.flush()
        self._records.close()
        if self._mlflow is not None:
            self._mlflow.end_run()
        shutil.rmtree(self._local, ignore_errors=True)
