"""Preflight: misconfiguration fails in seconds, before Ray starts, with one ``error:`` line that
names the key or URL and the fix (exit code 2)."""

import os
import sys
import time

import pytest

from pdso_ray.cli import main
from pdso_ray.config import load_config
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.preflight import PreflightError, preflight

DEMO = "jobs/configs/demo.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pf") / "data")
    make_demo_dataset(root, classes=2, train_per_class=1, val_per_class=1, test_per_class=0)
    return root


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    from pdso_ray.models.dino import build_dino, save_dino_checkpoint

    url = str(tmp_path_factory.mktemp("w") / "dino.pth")
    save_dino_checkpoint(build_dino("vit_tiny_reg4", img_size=64), url)
    return url


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    from pdso_ray.models.sam import build_sam, save_sam_checkpoint
    from pdso_ray.standins import SAM_ARCH  # the demo config's

    url = str(tmp_path_factory.mktemp("w") / "sam.pth")
    save_sam_checkpoint(build_sam(SAM_ARCH, None, img_size=256), url)
    return url


class Planted:
    """Unpickling this runs code: a checkpoint holding it must be refused, never loaded."""

    def __reduce__(self):
        return (exec, ("open('/tmp/pdso-planted', 'w')",))


def _run(capsys, *overrides):
    started = time.monotonic()
    code = main(["run", DEMO, *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err.strip().splitlines()
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "preflight must fail before Ray starts"
    return code, err, time.monotonic() - started


def test_a_missing_sam_checkpoint_fails_in_seconds_without_starting_ray(capsys, data_root, dino_file, tmp_path):
    code, err, seconds = _run(capsys, f"data.root={data_root}", "data.classes=2", f"output={tmp_path}/run",
                              "models.allow_random_init=false", f"models.dino.checkpoint={dino_file}",
                              "models.sam.checkpoint=null")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: models.sam.checkpoint is not set")
    assert "sam_vit_b_01ec64.pth" in err[0] and seconds < 30
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize("override,needle", [
    ("models.sam.checkpoint={tmp}/nope.pth", "models.sam.checkpoint: checkpoint file not found at {tmp}/nope.pth"),
    ("models.sam.checkpoint={tmp}/empty.pth", "models.sam.checkpoint: {tmp}/empty.pth is empty"),
    ("models.sam.checkpoint={dino}", "models.sam.checkpoint: checkpoint {dino} does not match the model"),
    ("models.sam.checkpoint={tmp}/planted.pth", "models.sam.checkpoint: cannot read checkpoint {tmp}/planted.pth"),
    ("data.root={tmp}/nowhere", "data.root: data root not found at {tmp}/nowhere"),
    ("data.classes=7", "the imagenet_s layout's train split (data.layout=imagenet_s, data.classes=7) not found"),
    ("ray.use_gpu=true", "ray.use_gpu=true, but this machine has no GPU"),
    ("pseudo_labels.refine.method=sam_selectt", "did you mean 'sam_select'"),
    ("denoise.finetune_workers=8", "the backbone fine-tuning (Ray Train) needs 9 CPUs (denoise.finetune_workers=8 "
                                   "x denoise.finetune_cpus_per_worker=1 + 1 for the tasks that feed it), but the "
                                   "local Ray has 2 CPUs"),
    ("cluster.num_shards=3", "k-means shards needs 3 CPUs (cluster.num_shards=3 x 1 CPU each)"),
    ("features.min_actors=3", "lower features.min_actors or features.cpus_per_actor"),
    ("finetune.num_workers=4", "fine-tuning (Ray Train) needs 3 CPUs"),
    ("models.dino.arch=vit_small_patch14_dinov2",
     "models.dino.image_size=64 is not a multiple of the patch size 14 of models.dino.arch="
     "vit_small_patch14_dinov2: use 56 or 70"),
])
def test_each_misconfiguration_is_named(capsys, data_root, dino_file, sam_file, tmp_path, override, needle):
    import torch

    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"w": Planted()}, tmp_path / "planted.pth")
    base = [f"data.root={data_root}", "data.classes=2", f"output={tmp_path}/run",
            "models.allow_random_init=false", f"models.dino.checkpoint={dino_file}",
            f"models.sam.checkpoint={sam_file}", "ray.num_cpus=2", "denoise.finetune_blocks=1",
            "features.max_actors=4"]
    code, err, _ = _run(capsys, *base, override.format(tmp=tmp_path, dino=dino_file))
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert needle.format(tmp=tmp_path, dino=dino_file) in err[0]
    assert not os.path.exists("/tmp/pdso-planted")


@pytest.mark.parametrize("layout, classes, needle", [
    ("folder", 2, "data.root: no images under {empty}"),
    ("imagenet_s", 3, "data.classes=3: more categories than the 2 images under {root}/ImageNetS3/train"),
])
def test_too_few_images_for_the_classes(capsys, tmp_path, layout, classes, needle):
    empty, root = tmp_path / "empty", tmp_path / "data"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    make_demo_dataset(str(root), classes=classes, train_per_class=1, val_per_class=0, test_per_class=0)
    train = root / f"ImageNetS{classes}" / "train"
    for extra in sorted(train.glob("*/*"))[2:]:  # keep two images
        extra.unlink()
    data = empty if layout == "folder" else root
    code, err, _ = _run(capsys, f"data.root={data}", f"data.layout={layout}", f"data.classes={classes}",
                        f"output={tmp_path}/run", "models.allow_random_init=true")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {needle.format(empty=empty, root=root)}"), err


def test_backbone_tuning_on_precomputed_features_is_refused(capsys, tmp_path):
    code, err, _ = _run(capsys, f"data.features={tmp_path}", "data.classes=2", f"output={tmp_path}/run",
                        "denoise.finetune_blocks=12", "stages=features,cluster,denoise")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: denoise.finetune_blocks=12 fine-tunes the backbone on the images, but "
                             f"data.features='{tmp_path}' gives precomputed features without them")


def test_unreachable_storage_fails_fast_naming_the_url(data_root):
    cfg = load_config(DEMO, ["data.classes=2", "data.root=s3://no-such-bucket/data",
                             "storage.s3.endpoint_url=http://127.0.0.1:9", "storage.s3.key=k",
                             "storage.s3.secret=s"])
    started = time.monotonic()
    with pytest.raises(PreflightError, match=r"data.root: cannot read s3://no-such-bucket/data .*credentials"):
        preflight(cfg)
    assert time.monotonic() - started < 60


def test_a_good_config_passes_and_says_what_it_skips(data_root, tmp_path):
    cfg = load_config(DEMO, [f"data.root={data_root}", "data.classes=2", f"output={tmp_path}/run"])
    notes = preflight(cfg)
    assert any("no test split" in n for n in notes)


def test_a_cluster_request_is_checked_against_what_the_autoscaler_can_add(monkeypatch):
    """On a cluster (after connecting, before any stage): a worker group that fits neither the
    cluster now nor what its autoscaler can grow it to is an error, never a wait without end."""
    import ray
    from ray._private import state

    from pdso_ray.preflight import check_cluster

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 16.0, "GPU": 0})
    cfg = load_config(DEMO, ["data.classes=2", "ray.address=ray://head:10001", "denoise.finetune_blocks=2",
                             "denoise.finetune_workers=12", "denoise.finetune_cpus_per_worker=1"])
    check_cluster(cfg, uses_gpu=False)  # 12 + 1 CPUs: more than now, within what can be added
    cfg.denoise.finetune_workers = 20
    with pytest.raises(PreflightError, match=r"the backbone fine-tuning \(Ray Train\) needs 21 CPUs .* but the cluster "
                                             r"has 4 CPUs and 0 GPUs and its autoscaler can grow it to 16 CPUs"):
        check_cluster(cfg, uses_gpu=False)
    cfg.denoise.finetune_workers, cfg.ray.use_gpu = 1, True
    with pytest.raises(PreflightError, match="ray.use_gpu=true, but the cluster has no GPU"):
        check_cluster(cfg, uses_gpu=True)
