"""Training curves: TensorBoard event files published into the run folder, MLflow when configured
(a stand-in module records the calls), and the clear error when mlflow is missing."""

import struct
import sys
import types

import pytest

from pdso_ray.config import ConfigError, load_config
from pdso_ray.storage import Storage
from pdso_ray.tracking import MLFLOW_MISSING, Tracker


def read_scalars(storage: Storage, folder: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``folder``: TFRecord framing (length, CRC,
    payload, CRC) around ``Event`` protos, read without TensorBoard."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for url in storage.list_files(folder):
        data = storage.read_bytes(url)
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_scalars_reach_tensorboard_files_in_the_run_folder(tmp_path):
    storage = Storage()
    folder = str(tmp_path / "run" / "tensorboard" / "finetune")
    curves = Tracker(storage, folder, "run/pdso/finetune").open()
    for step in range(3):
        curves.log(step, {"train/loss": 1.0 / (step + 1), "train/lr": 0.1})
    curves.flush()
    assert read_scalars(storage, folder)["train/loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    curves.log(3, {"train/loss": 0.25})
    curves.close()
    scalars = read_scalars(storage, folder)
    assert [s for s, _ in scalars["train/loss"]] == [0, 1, 2, 3] and len(scalars["train/lr"]) == 3


def test_mlflow_gets_the_same_scalars_when_configured(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(fake, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    tracker = Tracker(Storage(), str(tmp_path / "tb"), "run/pdso/pretrain", "file:///tmp/mlruns", "exp")
    curves = tracker.open({"lr": 0.1})
    curves.log(5, {"pretrain/loss": 2.0})
    curves.close()
    names = [c[0] for c in calls]
    assert names == ["set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "end_run"]
    assert calls[0][1] == ("file:///tmp/mlruns",) and calls[1][1] == ("exp",)
    assert calls[2][2] == {"run_name": "run/pdso/pretrain"}
    assert calls[4][1] == ({"pretrain_loss": 2.0},) and calls[4][2] == {"step": 5}


def test_missing_mlflow_is_one_clear_error(tmp_path, monkeypatch):
    from pdso_ray.preflight import PreflightError, preflight

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails
    with pytest.raises(ConfigError, match="mlflow is not installed"):
        Tracker(Storage(), str(tmp_path / "tb"), "r", "http://127.0.0.1:5000").open()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = load_config("jobs/configs/demo.yaml", [f"data.root={tmp_path}", f"output={tmp_path}/run",
                                                 "stages=finetune", "tracking.mlflow_uri=http://127.0.0.1:5000"])
    with pytest.raises(PreflightError) as raised:
        preflight(cfg)
    assert str(raised.value) == MLFLOW_MISSING
