"""Segmentation model (heads.py) and paired augmentation (method/augment.py), without Ray."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdso_ray.config import load_config
from pdso_ray.method.augment import (
    random_resized_crop_pair,
    resize_label_nearest,
    sample_crop_box,
)
from pdso_ray.models.heads import (
    build_segmenter,
    build_segmenter_from_meta,
    foreground_to_uint8,
    load_segmenter,
    logits_to_prediction,
    model_input_size,
    segmenter_bytes,
    segmenter_meta,
)
from pdso_ray.storage import Storage

VIT_META = {"format": "pdso_ray.segmenter", "version": 1, "num_classes": 5, "backbone": "dino",
            "arch": "vit_tiny_test", "img_size": 64}


# ---- augmentation ---------------------------------------------------------------------------------
def _coordinate_pair(height=40, width=60):
    """Image whose R/G channels are 4·x / 4·y, and a label holding each pixel's y·W + x."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 4, yy * 4, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    return image, (yy * width + xx).astype(np.int32)


def test_crop_and_flip_are_identical_on_image_and_label():
    image, label = _coordinate_pair()
    width = image.shape[1]
    flipped = kept = 0
    for seed in range(40):
        out_img, out_lab = random_resized_crop_pair(image, label, 24, np.random.default_rng(seed))
        assert out_img.shape == (24, 24, 3) and out_img.dtype == np.uint8
        assert out_lab.shape == (24, 24) and out_lab.dtype == np.int32
        # Every label value is a source pixel; the image at that output pixel shows (within the
        # half-pixel of nearest vs bilinear sampling) the same source coordinates.
        lx, ly = out_lab % width, out_lab // width
        assert np.abs(out_img[..., 0] / 4 - lx).max() <= 1.0
        assert np.abs(out_img[..., 1] / 4 - ly).max() <= 1.0
        if lx[0, 0] > lx[0, -1]:
            flipped += 1
        elif lx[0, 0] < lx[0, -1]:
            kept += 1
    assert flipped > 5 and kept > 5  # both branches of the flip were exercised


def test_crop_is_reproducible_for_a_seed_and_varies_across_seeds():
    image, label = _coordinate_pair()
    a = random_resized_crop_pair(image, label, 16, np.random.default_rng(3))
    b = random_resized_crop_pair(image, label, 16, np.random.default_rng(3))
    c = random_resized_crop_pair(image, label, 16, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_crop_boxes_respect_bounds_and_area():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = sample_crop_box(50, 70, rng, scale=(0.25, 1.0))
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 70
        assert 0.2 <= h * w / (50 * 70) <= 1.05  # rounding of the sides moves the area slightly
    # A 2×100 strip cannot hold a box with aspect in [3/4, 4/3] and a quarter of its area: the
    # fallback is the largest centred box of the widest allowed aspect.
    assert sample_crop_box(2, 100, rng) == (0, 48, 2, 3)


def test_resize_label_nearest_exact():
    label = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert np.array_equal(resize_label_nearest(label, (4, 6)),
                          np.repeat(np.repeat(label, 2, axis=0), 2, axis=1))
    big = np.arange(16, dtype=np.int64).reshape(4, 4)
    # output centres 0.5, 1.5 (output px) = 1, 3 (input px): the pixels holding them are 1 and 3
    assert np.array_equal(resize_label_nearest(big, (2, 2)), big[[1, 3]][:, [1, 3]])
    assert resize_label_nearest(big, (2, 2)).dtype == np.int64


def test_bad_augment_input_raises():
    image, label = _coordinate_pair()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="share"):
        random_resized_crop_pair(image, label[:10], 8, rng)
    with pytest.raises(ValueError, match="out_size"):
        random_resized_crop_pair(image, label, 0, rng)
    with pytest.raises(ValueError, match="scale"):
        sample_crop_box(10, 10, rng, scale=(0.5, 2.0))
    with pytest.raises(ValueError, match="shape"):
        resize_label_nearest(np.zeros((2, 2, 2)), (4, 4))


def test_augment_module_is_pure():
    code = ("import sys, pdso_ray.method.augment; "
            "bad = [m for m in ('ray', 'fsspec', 'pdso_ray.storage') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---- model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta, stride", [
    (VIT_META, 8),
    ({**VIT_META, "backbone": "resnet50", "arch": "resnet50"}, 32),
])
def test_head_output_shape(meta, stride):
    model = build_segmenter_from_meta(meta).eval()
    assert model.stride == stride
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 6, 64 // stride, 96 // stride)


def test_vit_rejects_sizes_off_the_patch_grid():
    model = build_segmenter_from_meta(VIT_META)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.randn(1, 3, 60, 64))


def test_build_segmenter_loads_stage1_dino_weights(tmp_path):
    from pdso_ray.models.dino import build_dino, save_dino_checkpoint

    dino = build_dino("vit_tiny_test", img_size=64)
    ckpt = str(tmp_path / "dino.pth")
    save_dino_checkpoint(dino, ckpt)
    cfg = load_config(overrides=["models.dino.arch=vit_tiny_test", "models.dino.image_size=64",
                                 f"models.dino.checkpoint={ckpt}", "data.classes=4"])
    from pdso_ray.models.loading import DinoSource

    model = build_segmenter("dino", 4, DinoSource.from_config(cfg), Storage())
    for name, value in dino.vit.state_dict().items():
        assert torch.equal(model.backbone.vit.state_dict()[name], value), name
    assert model.head.out_channels == 5
    assert segmenter_meta(cfg, 4)["arch"] == "vit_tiny_test"


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter_from_meta(VIT_META).eval()
    url = str(tmp_path / "model.pt")
    Storage().write_bytes(url, segmenter_bytes(model.state_dict(), VIT_META))
    loaded, meta = load_segmenter(url)
    assert meta == VIT_META
    x = torch.randn(1, 3, 32, 40)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))


def test_load_segmenter_errors_name_the_file(tmp_path):
    url = str(tmp_path / "other.pt")
    torch.save({"weights": {}}, url)
    with pytest.raises(ValueError, match="other.pt is not a segmenter file"):
        load_segmenter(url)
    wrong = build_segmenter_from_meta({**VIT_META, "num_classes": 3})
    Storage().write_bytes(url, segmenter_bytes(wrong.state_dict(), VIT_META))
    with pytest.raises(ValueError, match=r"(?s)other.pt does not match.*head.weight"):
        load_segmenter(url)


# ---- prediction helpers ---------------------------------------------------------------------------
def test_logits_to_prediction_matches_the_unchunked_computation():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 6) * 3
    label, fg = logits_to_prediction(logits, (13, 17), chunk=2)
    up = F.interpolate(logits[None], size=(13, 17), mode="bilinear", align_corners=False)[0]
    assert torch.equal(label, up[1:].argmax(0) + 1)  # foreground class; background by threshold
    assert label.min() >= 1
    assert torch.allclose(fg, 1 - up.softmax(0)[0], atol=1e-6)
    assert label.shape == (13, 17) and label.dtype == torch.int64


def test_foreground_quantisation():
    assert foreground_to_uint8(np.array([[0.0, 0.5, 1.0, 0.002]])).tolist() == [[0, 128, 255, 1]]


def test_model_input_size():
    assert model_input_size(375, 500, 256, 8) == (256, 344)  # 341.3 -> 344
    assert model_input_size(500, 375, 256, 1) == (341, 256)
    assert model_input_size(10, 1000, 4, 8) == (8, 400)
    with pytest.raises(ValueError):
        model_input_size(0, 10, 256, 8)
