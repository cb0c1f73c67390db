"""The pretrain stage: its recipe, its key, its sizing to a machine and its per-epoch teachers
without Ray; then Ray Train on two CPU workers (DDP): a run killed after its first epoch leaves
that epoch's teacher and resumes from it on re-run, the teacher lands in the official DINO layout
and ``features`` loads it; a collapsed teacher stops the run with a clear message."""

import json
import os

import pytest
import torch

from pdso_ray.config import load_config
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.models.dino import build_dino
from pdso_ray.models.dino_pretrain import DinoPretrainConfig, untrained_backbone
from pdso_ray.pipeline import resolve_checkpoints, run_pipeline
from pdso_ray.preflight import PreflightError, preflight
from pdso_ray.run_layout import RunLayout
from pdso_ray.run_state import plan_run
from pdso_ray.stages.base import RunContext
from pdso_ray.stages.pretrain import PretrainCollapsed, fit_to_machine, input_size, pretrain_recipe, write_teacher
from pdso_ray.storage import Storage

CLASSES = 3
HISTORY_KEYS = {"epoch", "loss", "teacher_entropy", "mean_output_entropy", "kl_div", "prototypes_used",
                "border_ring_share", "images", "seconds"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain") / "data"
    make_demo_dataset(str(root), classes=CLASSES, train_per_class=16, val_per_class=0, test_per_class=0,
                      image_size=(40, 56), seed=5, style_seed=9)
    return str(root)


def _config(data_root, run, epochs, stages="[pretrain]", **pretrain):
    extra = "".join(f", {k}: {v}" for k, v in pretrain.items())
    return load_config(text=f"""
output: {run}
stages: {stages}
data: {{root: {data_root}, classes: {CLASSES}}}
models: {{dino: {{arch: vit_tiny_reg4, image_size: 32}}}}
pretrain: {{epochs: {epochs}, batch_size: 8, num_workers: 2, cpus_per_worker: 0.5, decode_cpus: 0.5,
           use_gpu: false, out_dim: 64, head_hidden_dim: 32, head_bottleneck_dim: 16, probe_images: 8,
           max_failures: 0, teacher_every: 1{extra}}}
features: {{batch_size: 16, cpus_per_actor: 0.5}}
""")


# ---- without Ray ----------------------------------------------------------------------------------
def test_recipe_takes_what_the_config_sets_and_the_defaults_for_the_rest(data_root, tmp_path):
    cfg = _config(data_root, tmp_path / "run", epochs=7, lr=0.01, num_local=2, global_scale=[0.3, 0.9])
    recipe = pretrain_recipe(cfg, steps_per_epoch=11)
    default = DinoPretrainConfig()
    assert (recipe.arch, recipe.img_size, recipe.epochs, recipe.steps_per_epoch) == ("vit_tiny_reg4", 32, 7, 11)
    assert recipe.lr == 0.01 and recipe.out_dim == 64 and recipe.momentum == default.momentum
    assert recipe.crops.global_crop.size == 32 and recipe.crops.global_crop.scale == (0.3, 0.9)
    assert recipe.crops.num_local == 2 and recipe.crops.brightness == default.crops.brightness
    assert recipe.seed == cfg.seed
    assert input_size(cfg) == 48  # 1.5 x 32
    cfg.models.dino.image_size = 224
    assert input_size(cfg) == 336


def test_preflight_accepts_the_teacher_this_run_will_write(data_root, tmp_path):
    cfg = resolve_checkpoints(_config(data_root, tmp_path / "run", epochs=1, stages="[pretrain, features]"))
    assert cfg.models.dino.checkpoint == str(tmp_path / "run" / "pretrain" / "dino_teacher.pth")
    preflight(cfg)  # no checkpoint file yet, no allow_random_init: fine, pretrain writes it
    alone = _config(data_root, tmp_path / "other", epochs=1, stages="[features]")
    assert resolve_checkpoints(alone) is alone  # nothing pretrained in that folder: no teacher


def _pretrain_step(cfg):
    """The ``pretrain`` step of the plan of a run of ``cfg`` (no Ray)."""
    (step,) = plan_run(RunContext(cfg=cfg, storage=Storage()), ["pretrain"]).steps
    return step


def _photos(folder, count):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (24, 16), (10 * i, 50, 200 - 5 * i)).save(folder / f"p{i:02d}.png")
    return str(folder)


def _folder_config(root, run, **sets):
    return load_config(None, [f"{k}={v}" for k, v in sets.items()], text=f"""
output: {run}
stages: [pretrain]
data: {{root: {root}, layout: folder, classes: 3}}
models: {{dino: {{arch: vit_tiny_reg4, image_size: 32}}}}
pretrain: {{epochs: 2, batch_size: 4, num_workers: 1, cpus_per_worker: 1, use_gpu: false}}
""")


def test_the_key_follows_what_pretraining_reads_not_the_classes(tmp_path):
    root = _photos(tmp_path / "photos", 6)
    run = str(tmp_path / "run")
    first = _pretrain_step(_folder_config(root, run))
    assert first.run  # nothing pretrained yet
    Storage().write_manifest(os.path.join(run, "pretrain"), {"key": first.key, "stage": "pretrain",
                                                             "inputs": {}, "counts": {}})
    # Another C (and another later-stage setting): the pretraining is up to date.
    other_c = _pretrain_step(_folder_config(root, run, **{"data.classes": 5, "cluster.nredo": 3}))
    assert not other_c.run and other_c.key == first.key
    # How it runs (CPUs, GPU use, kept teachers, the collapse guard) is not what it learns.
    sized = _pretrain_step(_folder_config(root, run, **{"pretrain.cpus_per_worker": 2, "pretrain.use_gpu": True,
                                                        "pretrain.teacher_every": 1, "pretrain.min_kl_div": 0}))
    assert not sized.run
    # Another recipe: a new pretraining, its outputs cleared (another setup key).
    for change in ({"pretrain.lr": 0.01}, {"pretrain.batch_size": 3}, {"pretrain.epochs": 3}, {"seed": 1}):
        recipe = _pretrain_step(_folder_config(root, run, **change))
        assert recipe.run and recipe.key != first.key and recipe.setup_key != first.setup_key, change
    # An image added: a new pretraining from scratch (a schedule cannot take new images half-way).
    _photos(tmp_path / "photos" / "more", 1)
    added = _pretrain_step(_folder_config(root, run))
    assert added.run and added.key != first.key and added.setup_key == added.key


def test_fitted_to_a_two_core_machine_and_to_a_gpu_machine(tmp_path):
    cfg = _folder_config(str(tmp_path), tmp_path / "run", **{"pretrain.batch_size": 64, "pretrain.num_workers": 3,
                                                             "pretrain.use_gpu": True})
    lines = fit_to_machine(cfg, images=30, cpus=2, gpus=0, given=set())
    pc = cfg.pretrain
    assert (pc.num_workers, pc.cpus_per_worker, pc.use_gpu, pc.batch_size) == (1, 1.0, False, 30)
    assert "pretrain.batch_size: 64 -> 30 (30 train images on 1 worker(s))" in lines and len(lines) == 3

    cfg = _folder_config(str(tmp_path), tmp_path / "run", **{"pretrain.batch_size": 64})
    fit_to_machine(cfg, images=1000, cpus=16, gpus=4, given=set())
    pc = cfg.pretrain
    assert (pc.num_workers, pc.cpus_per_worker, pc.use_gpu, pc.batch_size) == (4, 3.0, True, 64)
    # 100 images on 4 GPUs: 25 each
    fit_to_machine(cfg, images=100, cpus=16, gpus=4, given=set())
    assert cfg.pretrain.batch_size == 25
    # What the user gave stays, for the preflight to judge.
    cfg = _folder_config(str(tmp_path), tmp_path / "run", **{"pretrain.batch_size": 64, "pretrain.cpus_per_worker": 4})
    assert fit_to_machine(cfg, images=30, cpus=2, gpus=0,
                          given={"pretrain.batch_size", "pretrain.cpus_per_worker"}) == []
    assert (cfg.pretrain.batch_size, cfg.pretrain.cpus_per_worker) == (64, 4)


def test_on_cpus_the_batch_fits_the_memory(tmp_path):
    gb = 1e9
    cfg = _folder_config(str(tmp_path), tmp_path / "run", **{"pretrain.batch_size": 64})
    # 10 GB available, 70% of it planned: a 2.5 GB process and 1.2 GB per further image -> 4 images
    lines = fit_to_machine(cfg, images=30, cpus=2, gpus=0, given=set(), memory=(10 * gb, int(2.5 * gb), int(1.2 * gb)))
    assert cfg.pretrain.batch_size == 4 and any(line.startswith("pretrain.batch_size: 64 -> 4 (1.20 GB per image")
                                                for line in lines)
    with pytest.raises(ValueError, match="takes 8.0 GB, more than 70% of the 10.0 GB available"):
        fit_to_machine(cfg, images=30, cpus=2, gpus=0, given=set(), memory=(10 * gb, 8 * gb, gb))


def test_a_batch_larger_than_the_images_is_a_preflight_error(tmp_path):
    root = _photos(tmp_path / "photos", 6)
    with pytest.raises(PreflightError, match=r"pretrain.batch_size=4 on each of pretrain.num_workers=2 worker\(s\) "
                       r".*needs 8 train images, but .*photos has 6 images: lower pretrain.batch_size"):
        preflight(_folder_config(root, tmp_path / "run", **{"pretrain.num_workers": 2, "pretrain.cpus_per_worker": 0.5,
                                                            "pretrain.decode_cpus": 0.5, "ray.num_cpus": 2}))
    preflight(_folder_config(root, tmp_path / "run"))  # 6 images, one batch of 4: fine


def test_a_teacher_after_every_epoch_and_a_copy_every_n(tmp_path):
    storage, run = Storage(), RunLayout(str(tmp_path / "run"))
    for epoch in range(1, 6):
        write_teacher(storage, run, {"cls_token": torch.full((1, 1, 4), float(epoch))}, epoch, 5, every=2)
        latest = torch.load(run.pretrain_teacher, weights_only=True)
        assert latest["cls_token"][0, 0, 0] == epoch  # usable after every epoch
    kept = sorted(os.listdir(os.path.join(str(tmp_path / "run"), "pretrain", "teachers")))
    assert kept == ["epoch_0002.pth", "epoch_0004.pth", "epoch_0005.pth"]  # every 2nd and the last
    assert torch.load(run.pretrain_epoch_teacher(4), weights_only=True)["cls_token"][0, 0, 0] == 4
    assert not [n for n in os.listdir(os.path.dirname(run.pretrain_teacher)) if n.startswith(".tmp")]


# ---- Ray Train ------------------------------------------------------------------------------------
def _reports(run):
    return [json.loads(line) for line in open(os.path.join(run, "reports.jsonl"))]


def test_killed_run_resumes_and_features_load_the_teacher(ray_local, data_root, tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    storage = Storage()
    # Rank 0's process dies once the epoch-1 checkpoint is committed; with max_failures=0 the run
    # fails. A stand-in for a killed job: the re-run must resume after epoch 1.
    monkeypatch.setattr("pdso_ray.stages.pretrain.PretrainStage.train_loop",
                        staticmethod(_probed_loop(os.path.join(run, "crashed"))))
    with pytest.raises(Exception):
        run_pipeline(_config(data_root, run, epochs=2))
    assert os.path.exists(os.path.join(run, "crashed"))
    # The killed run left epoch 1's teacher, usable as it is.
    assert build_dino("vit_tiny_reg4", os.path.join(run, "pretrain", "dino_teacher.pth"), img_size=32).pretrained
    assert os.listdir(os.path.join(run, "pretrain", "teachers")) == ["epoch_0001.pth"]

    summary = run_pipeline(_config(data_root, run, epochs=2))
    counts = summary["stages"]["pretrain"]["counts"]
    assert counts["epochs"] == 2 and counts["start_epoch"] == 2 and counts["workers"] == 2
    assert [(r["epoch"], r["start_epoch"]) for r in _reports(run)] == [(1, 1), (2, 2)]
    # 48 images, 24 per worker, 3 batches of 8 each
    assert counts["steps_per_epoch"] == 3 and counts["images_per_epoch"] == 48
    assert sorted(os.listdir(os.path.join(run, "pretrain", "teachers"))) == ["epoch_0001.pth", "epoch_0002.pth"]
    history = json.load(open(os.path.join(run, "pretrain", "history.json")))
    assert [h["epoch"] for h in history] == [1, 2] and all(set(h) == HISTORY_KEYS for h in history)
    assert summary["diagnostics"]["pretrain"]["history"] == history

    # The teacher: the official DINO layout (the backbone's own keys, registers included).
    teacher = torch.load(os.path.join(run, "pretrain", "dino_teacher.pth"), weights_only=True)
    assert set(teacher) == set(untrained_backbone("vit_tiny_reg4", 32).vit.state_dict())
    assert "reg_token" in teacher and "cls_token" in teacher
    model = build_dino("vit_tiny_reg4", os.path.join(run, "pretrain", "dino_teacher.pth"), img_size=32)
    assert model.pretrained and torch.equal(model.vit.cls_token, teacher["cls_token"])

    # The features stage after it: pretrain is up to date, features loads the teacher.
    summary = run_pipeline(_config(data_root, run, epochs=2, stages="[pretrain, features]"))
    assert summary["stages"]["pretrain"]["status"] == "skipped"
    assert summary["stages"]["features"]["status"] == "done" and summary["images_ok"] == 3 * 16
    written = load_config(os.path.join(run, "config.yaml"))
    assert written.models.dino.checkpoint == os.path.join(run, "pretrain", "dino_teacher.pth")
    assert not written.models.allow_random_init
    # A new recipe is a new pretraining: it starts afresh, and features, chained to it, re-runs.
    features_key = storage.read_manifest(os.path.join(run, "features"))["key"]
    summary = run_pipeline(_config(data_root, run, epochs=1, stages="[pretrain, features]"))
    assert summary["stages"]["pretrain"]["counts"]["start_epoch"] == 1
    assert summary["stages"]["features"]["status"] == "done"
    assert storage.read_manifest(os.path.join(run, "features"))["key"] != features_key


def test_collapse_stops_the_run_with_a_clear_message(ray_local, data_root, tmp_path):
    run = str(tmp_path / "run")
    # No run carries 100 nats: the guard must fire at its first epoch.
    with pytest.raises(PretrainCollapsed, match=r"collapsed at epoch 1: .*\(pretrain.min_kl_div=100.0\), \d+ prototypes"):
        run_pipeline(_config(data_root, run, epochs=3, collapse_after_epochs=1, min_kl_div=100))
    assert not os.path.exists(os.path.join(run, "pretrain", "dino_teacher.pth"))


def _probed_loop(marker):
    """The worker loop, with every report of rank 0 appended to ``reports.jsonl`` beside
    ``marker`` and, while ``marker`` does not exist, rank 0 killed right after its first
    checkpoint is committed."""

    def loop(config):
        import ray.train

        from pdso_ray.stages.pretrain import train_loop_per_worker

        report = ray.train.report

        def probe(metrics, checkpoint=None, **kwargs):
            report(metrics, checkpoint=checkpoint, **kwargs)
            if ray.train.get_context().get_world_rank() != 0:
                return
            with open(os.path.join(os.path.dirname(marker), "reports.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": metrics["epoch"], "start_epoch": metrics["start_epoch"]}) + "\n")
            if not os.path.exists(marker):
                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
                open(marker, "w").close()
                os._exit(1)

        ray.train.report = probe
        train_loop_per_worker(config)

    return loop
