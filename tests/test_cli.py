"""``pdso-ray``: version, help for every option, the inspect table, error exit codes."""

import argparse
import json

import pytest

from pdso_ray import __version__
from pdso_ray.cli import build_parser, format_summary, main
from pdso_ray.plan import method_stages

STAGES = method_stages("pdso")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pdso-ray {__version__}"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        assert command.description, name
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{name} {action.dest}")
    assert missing == []


SUMMARY = {
    "images_total": 12, "images_ok": 11, "images_rejected": 1, "files_ignored": 0, "mIoU": 61.234,
    "splits": {"train": {"images": 12, "ok": 11, "rejected": 1},
               "validation": {"images": 4, "predicted": 4, "rejected": 0}},
    "notes": {"predict": ["no test split (/d/ImageNetS2/test not found): skipped"]},
    # deliberately out of pipeline order, with one stage missing
    "stages": {"report": {"status": "done", "seconds": 1.0}, "features": {"status": "done", "seconds": 12.5},
               "cluster": {"status": "skipped"}},
}


def test_inspect_prints_a_table_in_pipeline_order(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:2 + len(STAGES)]]
    assert rows == list(STAGES)
    assert "not run" in out.splitlines()[2 + list(STAGES).index("denoise")]
    assert "validation mIoU: 61.23" in out and "note (predict): no test split" in out
    assert "train: images 12, ok 11, rejected 1" in out
    assert out == format_summary(str(tmp_path), SUMMARY, str(tmp_path / "report" / "index.html")) + "\n"
    assert f"report: {tmp_path / 'report' / 'index.html'}" in out
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == SUMMARY


def test_inspect_names_the_other_method_of_the_folder(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "lightcluster").mkdir()
    (tmp_path / "lightcluster" / "summary.json").write_text(json.dumps(
        {"method": "lightcluster", "mIoU": 33.5, "stage_order": method_stages("lightcluster"),
         "stages": {"lightcluster": {"status": "done", "seconds": 3.0}}}))
    assert main(["inspect", str(tmp_path)]) == 0
    assert "also in this folder: lightcluster, validation mIoU 33.50" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--method", "lightcluster"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run folder: {tmp_path} (method: lightcluster)"
    assert [line.split()[0] for line in out[2:7]] == method_stages("lightcluster")


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: no summary.json in ")
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"
    assert main(["run", "jobs/configs/demo.yaml", "--set", "cluster.niter=zero"]) == 2
    assert "cluster.niter='zero'" in capsys.readouterr().err


def test_make_demo_data_writes_the_chosen_world(tmp_path, capsys):
    from pdso_ray.cli import WORLD_CHOICES
    from pdso_ray.data.synthetic import MARKER_NAME, WORLDS

    assert set(WORLD_CHOICES) == set(WORLDS)
    for world in WORLD_CHOICES:
        out = tmp_path / world
        assert main(["make-demo-data", str(out), "--classes", "2", "--train-per-class", "1",
                     "--val-per-class", "1", "--world", world, "--style-seed", "3"]) == 0
        marker = json.loads((out / "ImageNetS2" / MARKER_NAME).read_text())
        assert (marker["world"], marker["style_seed"], marker["complete"]) == (world, 3, True)
        assert f"({world} world)" in capsys.readouterr().out


def test_make_shards_writes_shards_and_names_a_bad_source(tmp_path, capsys):
    from pdso_ray.data.synthetic import make_demo_dataset

    assert main(["make-shards", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: source not found: {tmp_path / 'missing'}")
    make_demo_dataset(str(tmp_path / "tree"), classes=2, train_per_class=2, val_per_class=1, test_per_class=1)
    assert main(["make-shards", str(tmp_path / "tree"), str(tmp_path / "out"), "--images-per-shard", "3",
                 "--quiet"]) == 0
    assert "4 shards written, 0 already there; 8 images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == [
        ".000000.tar.idx.parquet", ".000001.tar.idx.parquet", "000000.tar", "000001.tar"]


def test_pretrain_runs_stage_pretrain_alone_sized_to_the_machine(tmp_path, capsys, monkeypatch):
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (20, 14), (40 * i, 90, 30)).save(tmp_path / f"photo{i}.jpg")
    ran = []
    monkeypatch.setattr("pdso_ray.cli._run", lambda cfg, verbose=False: ran.append(cfg) or 0)
    monkeypatch.setattr("pdso_ray.preflight._local_gpus", lambda: 0)
    # a training step measured at 1 GB plus 1 GB per further image, 8 GB free: room for 5 (70%)
    monkeypatch.setattr("pdso_ray.preflight._available_memory", lambda: 8e9)
    monkeypatch.setattr("pdso_ray.models.dino_pretrain.step_memory", lambda recipe, size: (int(1e9), int(1e9)))
    assert main(["pretrain", str(tmp_path), str(tmp_path / "run"), "--epochs", "3", "--set", "ray.num_cpus=2",
                 "--set", "pretrain.decode_cpus=0.5"]) == 0
    (cfg,) = ran
    pc = cfg.pretrain
    assert cfg.stages == ["pretrain"] and cfg.data.layout == "folder" and cfg.output == str(tmp_path / "run")
    assert (pc.epochs, pc.num_workers, pc.use_gpu, pc.batch_size, pc.cpus_per_worker) == (3, 1, False, 5, 1.0)
    assert "fitted pretrain.batch_size: 64 -> 5 (1.00 GB per image on top of 1.0 GB; 8.0 GB available)" \
        in capsys.readouterr().out
    # A value given with --set stays (the preflight then judges it); a missing folder is an error line.
    ran.clear()
    assert main(["pretrain", str(tmp_path), str(tmp_path / "run"), "--set", "pretrain.batch_size=64"]) == 0
    assert ran[0].pretrain.batch_size == 64
    assert main(["pretrain", str(tmp_path / "nothing"), str(tmp_path / "run")]) == 2
    assert "error: data.root: data root not found at" in capsys.readouterr().err
