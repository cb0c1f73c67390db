"""The pretrain stage: its recipe from the config without Ray; then Ray Train on two CPU workers
(DDP): a run killed after its first epoch resumes from it on re-run, the teacher lands in the official DINO layout and ``features`` loads it; a collapsed teacher stops
the run with a clear message."""

import json
import os

import pytest
import torch

from pdso_ray.config import load_config
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.models.dino import build_dino
from pdso_ray.models.dino_pretrain import DinoPretrainConfig, untrained_backbone
from pdso_ray.pipeline import resolve_checkpoints, run_pipeline
from pdso_ray.preflight import preflight
from pdso_ray.stages.pretrain import PretrainCollapsed, input_size, pretrain_recipe
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
           max_failures: 0{extra}}}
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
    assert not os.path.exists(os.path.join(run, "pretrain", "dino_teacher.pth"))

    summary = run_pipeline(_config(data_root, run, epochs=2))
    counts = summary["stages"]["pretrain"]["counts"]
    assert counts["epochs"] == 2 and counts["start_epoch"] == 2 and counts["workers"] == 2
    assert [(r["epoch"], r["start_epoch"]) for r in _reports(run)] == [(1, 1), (2, 2)]
    # 48 images, 24 per worker, 3 batches of 8 each
    assert counts["steps_per_epoch"] == 3 and counts["images_per_epoch"] == 48
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
