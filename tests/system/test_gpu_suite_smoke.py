"""The GPU check (benchmarks/gpu_suite.py) in its ``--smoke`` mode: every check's code runs on the
CPU with tiny models, and the JSON table holds every row, measured or skipped with a reason, with
finite numbers; plus the interleaving helper every benchmark times with (benchmarks/timing.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(REPO, "benchmarks")
ROWS = {"decode", "features", "kmeans_torch", "kmeans_faiss_gpu", "spo", "finetune", "pretrain", "spo_compiled"}
NEED_CUDA = {"kmeans_faiss_gpu", "spo_compiled"}  # faiss-gpu; torch.compile is tried on CUDA only


def _timing():
    """benchmarks/timing.py (benchmarks/ is no package), under a name of its own."""
    if "bench_timing" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_timing", os.path.join(BENCHMARKS, "timing.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_timing"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_timing"]


def test_interleave_alternates_and_takes_the_median_of_per_round_ratios():
    timing = _timing()
    calls = []
    path = iter([1.0, 10.0, 100.0])
    base = iter([1.0, 1.0, 1000.0])
    rounds = timing.interleave({"path": lambda: calls.append("a") or next(path),
                                "base": lambda: calls.append("b") or next(base)}, rounds=3)
    assert calls == ["a", "b"] * 3
    assert rounds.ratios("path", "base") == [1.0, 10.0, 0.1]
    # the median of the per-round ratios, not the ratio of the medians (10 / 1): a slow stretch
    # that hit one round's baseline (round 3) moves one ratio only
    assert rounds.ratio("path", "base") == 1.0 and rounds.median("path") / rounds.median("base") == 10.0
    assert rounds.ratio("base", "path") == 1.0
    with pytest.raises(ValueError, match="rounds must be >= 3"):
        timing.interleave({"path": lambda: 1.0, "base": lambda: 1.0}, rounds=2)


def test_interleave_keeps_named_values_and_warms_up_untimed():
    timing = _timing()
    seen = []

    def contender(name):
        def run():
            seen.append(name)
            return {"wall": len(seen), "cpu": 1.0}
        return run

    rounds = timing.interleave({"a": contender("a"), "b": contender("b")}, rounds=3, warmup=True)
    assert seen == ["a", "b"] * 4 and rounds.count == 3
    assert rounds.values("a", "wall") == [3.0, 5.0, 7.0] and rounds.values("b", "cpu") == [1.0] * 3
    assert rounds.ratios("a", "b", "wall", "cpu") == [3.0, 5.0, 7.0]


def test_bare_loop_flag_marks_only_ratios_above_one():
    timing = _timing()
    assert timing.bare_loop_flag(1.0) is None and timing.bare_loop_flag(0.4) is None
    assert "MEASUREMENT ERROR" in timing.bare_loop_flag(1.0001)


def test_gpu_suite_smoke_reports_every_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "gpu_suite.py"), "--smoke", "--out", str(tmp_path / "out"),
         "--work-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == ROWS and len(report["rows"]) == len(ROWS)

    for name, r in rows.items():
        if name in NEED_CUDA:
            assert r["status"] == "skipped" and r["note"], r
            assert r["path_value"] is None and r["ratio"] is None
            continue
        assert r["status"] == "measured", r  # generous caps: only a hang or a bug stops one
        values = [r["path_value"], r["baseline_value"], r["ratio"], *r["ratios"], *r["extra"].values()]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), r
        assert r["path_value"] > 0 and r["baseline_value"] > 0
        assert r["rounds"] == len(r["ratios"]) == 3
        assert r["ratio"] == pytest.approx(statistics.median(r["ratios"]))
        assert (r["flag"] is not None) == (r["bare_loop"] and r["ratio"] > 1), r
    assert {n for n, r in rows.items() if r["bare_loop"]} == {"features", "finetune", "pretrain"}
    # SPO: one image embedding per image batched, one per class naive
    spo = rows["spo"]["extra"]
    assert spo["encoder_calls_batched"] == 1 and spo["encoder_calls_naive"] == 2

    projection = report["projection"]
    assert not projection["valid"] and projection["assumptions"]["train_images"] == 1_183_322
    assert projection["assumptions"]["finetune_epochs"] == 20  # jobs/configs/imagenet_s919.yaml
    stages = {s["stage"]: s for s in projection["stages"]}
    assert set(stages) == {"features", "cluster", "denoise", "purify", "pseudo_labels", "finetune", "predict"}
    for name in ("features", "cluster", "purify", "pseudo_labels", "finetune"):
        assert math.isfinite(stages[name]["gpu_hours"]) and stages[name]["gpu_hours"] >= 0
    assert stages["denoise"]["gpu_hours"] is None and "not measured" in stages["denoise"]["note"]
    for name in ROWS:
        assert name in proc.stdout
    assert os.listdir(tmp_path) == ["out"]  # the scratch folder is gone
