"""A user's first run: their own folder of photographs, an ImageNet-S tree with parts missing, two
runs on one folder, a repeated run, Ctrl-C (issue #10)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from pdso_ray.config import load_config
from pdso_ray.data.imagenet_s import decode_label
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.pipeline import run_pipeline
from pdso_ray.stages.base import PipelineError
from pdso_ray.storage import Storage
from pdso_ray.tables import read_folder

REPO = Path(__file__).resolve().parents[2]
# Fast settings on top of jobs/configs/demo.yaml (the models stay tiny and random).
FAST = ["features.batch_size=4", "purify.topk=2", "finetune.epochs=1", "denoise.epochs_f=3",
        "denoise.epochs_g=3", "denoise.epochs_h=3"]
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png",
          "motorcycle_left.png", "hubble_deep_field.jpg", "no_time_for_that_tiny.gif")


def _photo_folder(root: Path) -> dict[str, tuple[int, int]]:
    """scikit-image's real photographs in a tree with the names people use (spaces, accents,
    CJK), plus things a listing must refuse or skip. Returns {relative path: (height, width)}."""
    import skimage

    source = Path(skimage.__file__).parent / "data"
    layout = {"astronaut.png": "portraits/astronaut.png", "chelsea.png": "pets/Chelsea the cat.png",
              "coffee.png": "caf\u00e9/coffee.png", "rocket.jpg": "rocket.jpg",
              "camera.png": "\u5199\u771f/camera.png", "motorcycle_left.png": "2024 trip/moto left.png",
              "hubble_deep_field.jpg": "space/hubble.jpg", "no_time_for_that_tiny.gif": "fun/clip.gif"}
    sizes = {}
    for name, rel in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, root / rel)
        with Image.open(root / rel) as im:
            sizes[rel] = (im.height, im.width)
    (root / "README.txt").write_text("my photos")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "pipe.jpg")
    return sizes


def test_a_folder_of_photographs_runs_end_to_end(tmp_path):
    """The README's own-images command on real photographs with the demo's stand-in models, run as
    a user runs it: it runs to the end, the terminal shows the run's own lines and ends with the
    warning that the stand-ins know only synthetic shapes, and the report opens with it in a red
    box (issue #23)."""
    root = tmp_path / "My Photos"
    sizes = _photo_folder(root)
    out = tmp_path / "run"
    proc = subprocess.run(_cli("data.layout=folder", f"data.root={root}", "data.classes=2", f"output={out}", *FAST),
                          cwd=REPO, env=_env(_ray_dir()), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())

    assert (summary["images_total"], summary["images_ok"], summary["images_rejected"]) == (10, 8, 2)
    assert summary["files_ignored"] == 1
    assert summary["splits"]["all"] == {"images": 10, "predicted": 8, "rejected": 2}
    assert "mIoU" not in summary and summary["stages"]["evaluate"]["counts"]["skipped"] is True
    assert any("no ground truth" in n for n in summary["notes"]["evaluate"])
    for rel, (h, w) in sizes.items():
        png = out / "predictions" / "all" / (rel[: rel.rfind(".")] + ".png")
        label = decode_label(png.read_bytes())
        assert label.shape == (h, w) and 0 <= label.min() and label.max() <= 2, rel
    rejected = {Path(r["path"]).name: r["reason"]
                for r in read_folder(Storage(), str(out / "rejected")).to_pylist()}
    assert set(rejected) == {"zero.jpg", "pipe.jpg"}
    assert (out / "report" / "index.html").exists()
    html = (out / "report" / "index.html").read_text()
    assert "no ground truth" in html

    # label-free quality signals of every image, and the warning
    signals = json.loads((out / "report" / "quality.json").read_text())
    assert signals["standins"] is True and signals["ground_truth"] is False
    assert signals["predictions"]["images"] == 8 and signals["pseudo_labels"]["images"] == 8
    assert signals["agreement"]["images"] == 8 and len(signals["clusters"]["sizes"]) == 2
    assert sum(signals["clusters"]["sizes"]) == 8 and 0 <= signals["stability"]["nmi"] <= 1
    assert signals["saliency"]["images"] == 8
    standin_warning = next(w for w in signals["warnings"] if "stand-in models" in w)
    assert "synthetic shapes" in standin_warning and "dino_deitsmall8_pretrain.pth" in standin_warning
    assert summary["warnings"] == signals["warnings"]
    box = html.index('<div class="alarm">')
    assert box < html.index("<section>") and "synthetic shapes" in html[box:html.index("</div>", box)]

    # the terminal: the run's own lines and one bar per pass; the warnings last; Ray's output in logs/
    err = proc.stderr.strip().splitlines()
    assert err[-len(signals["warnings"]):] == [f"warning: {w}" for w in signals["warnings"]]
    assert not any("logging_progress" in line or "Running Dataset" in line for line in err), err
    assert len(err) < 80, "\n".join(err)
    (log,) = (out / "logs").glob("run-*.log")
    assert "Running Dataset" in log.read_text() and str(log) in proc.stdout


def test_an_imagenet_s_tree_without_test_split_runs_to_the_end(ray_local, tmp_path):
    root = tmp_path / "data"
    make_demo_dataset(str(root), classes=2, train_per_class=6, val_per_class=2, test_per_class=0)
    # a validation image whose name cannot become an id: rejected at listing, never blocking evaluate
    val = root / "ImageNetS2" / "validation" / "n00000001"
    shutil.copy(val / "n00000001_0.JPEG", val / "bad\x07name.JPEG")
    gt = root / "ImageNetS2" / "validation-segmentation" / "n00000001"
    shutil.copy(gt / "n00000001_0.png", gt / "bad\x07name.png")
    out = tmp_path / "run"
    summary = run_pipeline(load_config("jobs/configs/demo.yaml", [
        f"data.root={root}", "data.classes=2", f"output={out}", *FAST]))

    assert "mIoU" in summary and "mIoU_test" not in summary
    assert summary["splits"]["validation"] == {"images": 5, "predicted": 4, "rejected": 1}
    assert any("no test split" in n for n in summary["notes"]["predict"])
    validation = json.loads((out / "eval" / "validation.json").read_text())
    assert validation["num_images"] == 5 and validation["unpredicted"] == ["n00000001/bad\x07name.png"]
    assert not (out / "predictions" / "test").exists()


def test_counts_are_reconciled_before_a_stage_is_marked_done(ray_local, tmp_path, monkeypatch):
    from pdso_ray.stages.features import FeaturesStage

    root = tmp_path / "data"
    make_demo_dataset(str(root), classes=2, train_per_class=2, val_per_class=0, test_per_class=0)
    monkeypatch.setattr(FeaturesStage, "run", lambda self, ctx: {
        "images_total": 4, "images_ok": 2, "images_rejected": 1, "files_ignored": 0})
    with pytest.raises(PipelineError, match="does not reconcile"):
        run_pipeline(load_config("jobs/configs/demo.yaml", [
            f"data.root={root}", "data.classes=2", f"output={tmp_path / 'run'}", "stages=features"]))
    assert not (tmp_path / "run" / "features" / "_SUCCESS.json").exists()


# ---- as separate processes, the way users run it ---------------------------------------------------
def _cli(*overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "pdso_ray.cli", "run", "jobs/configs/demo.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _ray_dir() -> str:
    # Short on purpose: Ray's socket paths must fit in 107 bytes (pytest's tmp_path does not).
    return tempfile.mkdtemp(prefix="pdso-ray-", dir="/tmp")


def _env(ray_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_dir, RAY_USAGE_STATS_ENABLED="0")
    return env


@pytest.mark.slow  # two processes, each with its own Ray
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_finishes(tmp_path):
    root = tmp_path / "data"
    make_demo_dataset(str(root), classes=2, train_per_class=6, val_per_class=1, test_per_class=0)
    out = tmp_path / "run"
    args = (f"data.root={root}", "data.classes=2", f"output={out}", "stages=features,cluster", *FAST)
    ray_dir = _ray_dir()
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(_cli(*args), cwd=REPO, env=_env(ray_dir), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (out / "_LEASE.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        second = subprocess.run(_cli(*args), cwd=REPO, env=_env(ray_dir), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        holder = json.loads((out / "_LEASE.json").read_text())
        assert second.stderr.strip().splitlines()[-1].startswith("error: the run folder")
        assert f"in use by pid {holder['pid']}" in second.stderr
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["cluster"]["status"] == "done" and summary["images_ok"] == 12
    assert not (out / "_LEASE.json").exists()


@pytest.mark.slow  # two whole demo pipelines
def test_two_runs_with_the_same_seed_give_the_same_numbers(ray_local, tmp_path):
    root = tmp_path / "data"
    make_demo_dataset(str(root), classes=3, train_per_class=8, val_per_class=2, test_per_class=1)
    summaries, assignments, predictions = [], [], []
    for name in ("a", "b"):
        out = tmp_path / name
        summaries.append(run_pipeline(load_config("jobs/configs/demo.yaml", [
            f"data.root={root}", "data.classes=3", f"output={out}", "seed=3", *FAST])))
        table = read_folder(Storage(), str(out / "purify"), columns=["id", "cluster"]).sort_by("id")
        assignments.append(table.to_pylist())
        predictions.append({p.relative_to(out).as_posix(): p.read_bytes()
                            for p in sorted((out / "predictions" / "validation").rglob("*.png"))})
    assert assignments[0] == assignments[1]
    assert summaries[0]["mIoU"] == summaries[1]["mIoU"] and summaries[0]["mIoU_test"] == summaries[1]["mIoU_test"]
    assert predictions[0] == predictions[1] and predictions[0]


# Ctrl-C between stages, and in a Ray Train stage (whose own SIGINT handler would take it).
CTRL_C_POINTS = {"after features": ((), "features/_SUCCESS.json"),
                 "in training": (("stages=pretrain", "pretrain.epochs=500", "pretrain.batch_size=4",
                                  "pretrain.cpus_per_worker=0.5", "pretrain.probe_images=2"), "pretrain/train")}


@pytest.mark.slow
@pytest.mark.parametrize("point", CTRL_C_POINTS)
def test_ctrl_c_says_how_to_resume_and_stops_ray(tmp_path, point):
    root = tmp_path / "data"
    make_demo_dataset(str(root), classes=2, train_per_class=6, val_per_class=1, test_per_class=0)
    out = tmp_path / "run"
    ray_dir = _ray_dir()
    extra, started = CTRL_C_POINTS[point]
    proc = subprocess.Popen(_cli(f"data.root={root}", "data.classes=2", f"output={out}", *FAST, *extra),
                            cwd=REPO, env=_env(ray_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / started).exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted: re-run the same command to resume"
    assert not (out / "_LEASE.json").exists()
