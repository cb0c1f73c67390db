import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.models.sam import SamMaskPredictor, build_sam
from pdso_ray.standins import SAM_ARCH, SAM_ASSET
from pdso_ray.standins.sam_evaluation import tree_scenes
from pdso_ray.standins.sam_training import (
    Scene,
    SceneBatch,
    TrainConfig,
    batch_loss,
    evaluate,
    heldout_scenes,
    render_scene,
    sample_box,
    train,
)


@pytest.fixture(scope="module")
def predictor():
    return SamMaskPredictor(build_sam(SAM_ARCH, SAM_ASSET), device="cpu")


def _validation(root: str, world: str) -> list[Scene]:
    """The validation split of 5 demo-sized classes of ``world`` (``make_demo_dataset(classes=5,
    seed=0)``: the demo's own images in the ``hue`` world) with its ground truth."""
    ds = make_demo_dataset(root, classes=5, train_per_class=0, test_per_class=0, seed=0, world=world)
    return tree_scenes(ds, "validation")


def test_asset_is_small_and_has_the_official_flat_layout():
    assert os.path.getsize(SAM_ASSET) < 3 * 2**20
    state = torch.load(SAM_ASSET, map_location="cpu", weights_only=True)
    expected = build_sam(SAM_ARCH, None).state_dict()
    assert set(state) == set(expected)
    assert {k.split(".", 1)[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert all(state[k].shape == expected[k].shape and state[k].dtype == expected[k].dtype for k in state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("world, bar", [("shapes", 0.65), ("hue", 0.8)])
def test_asset_segments_held_out_synthetic_objects_from_boxes(predictor, world, bar):
    # the held-out stream, which no training run draws from; shapes scenes of the eval pool's
    # classes and photographs, which training never sees
    scenes = heldout_scenes(24, seed=1, world=world)
    assert sum(len(s.masks) for s in scenes) >= 40
    for protocol in ("box", "box_spo"):
        assert evaluate(predictor, scenes, protocol).mean() >= bar, protocol


@pytest.mark.parametrize("world, bar", [("hue", 0.95), ("shapes", 0.8)])
def test_asset_segments_the_validation_objects_of_both_worlds(predictor, tmp_path, world, bar):
    scenes = _validation(str(tmp_path), world)
    assert sum(len(s.masks) for s in scenes) >= 20
    for protocol in ("box", "box_spo"):
        ious = evaluate(predictor, scenes, protocol)
        assert ious.mean() >= bar and np.median(ious) >= bar, protocol


def test_random_init_sam_does_not_pass_the_same_bar():
    torch.manual_seed(0)
    random_predictor = SamMaskPredictor(build_sam(SAM_ARCH, None), device="cpu")
    assert evaluate(random_predictor, heldout_scenes(4, seed=1), "box").mean() < 0.5


def test_scenes_hold_disjoint_visible_masks_and_boxes_stay_inside():
    rng = np.random.default_rng(3)
    for _ in range(10):
        scene = render_scene(rng)
        h, w = scene.image.shape[:2]
        assert scene.image.dtype == np.uint8 and scene.masks.shape[1:] == (h, w)
        assert (scene.masks.sum(axis=0) <= 1).all() and (scene.masks.sum(axis=(1, 2)) >= 40).all()
        for m in scene.masks:
            x0, y0, x1, y1 = sample_box(rng, m)
            assert 0 <= x0 <= x1 <= w - 1 and 0 <= y0 <= y1 <= h - 1


def test_short_training_lowers_the_loss_and_is_deterministic():
    cfg = TrainConfig(seed=5, steps=12, images_per_step=2, warmup_steps=5, lr=3e-3, size_range=(64, 96))
    fixed = heldout_scenes(4, seed=5, size_range=(64, 96))

    def fresh():
        torch.manual_seed(cfg.seed)
        return build_sam(SAM_ARCH, None)

    def fixed_loss(model):
        with torch.no_grad():
            batch = SceneBatch(fixed, np.random.default_rng(0), cfg, model.image_encoder.img_size)
            return float(batch_loss(model, batch, cfg)[0])

    model = fresh()
    before = fixed_loss(model)
    train(model, cfg, log_every=0)
    after = fixed_loss(model)
    assert after < 0.75 * before, (before, after)

    a, b = fresh(), fresh()
    short = TrainConfig(seed=5, steps=2, images_per_step=2)
    train(a, short, log_every=0)
    train(b, short, log_every=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_training_module_does_not_import_ray():
    code = "import sys, pdso_ray.standins.sam_training; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
