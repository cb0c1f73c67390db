"""Segmentation model (heads.py) and paired augmentation (method/augment.py), without Ray."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdso_ray.config import load_config
from pdso_ray.method.augment import (
    pad_to_canvas,
    random_resized_crop_batch,
    resize_label_nearest,
    sample_crop_boxes,
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
def _coordinate_batch(height=40, width=60, canvas=64):
    """Canvases whose image R/G channels are 4·x / 4·y and whose label holds y·W + x of the same
    pixel, the valid region ``height×width`` (the rest ignore)."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((canvas, canvas, 3), np.uint8)
    label = np.full((canvas, canvas), -1, np.int64)
    image[:height, :width, 0], image[:height, :width, 1] = xx * 4, yy * 4
    label[:height, :width] = yy * width + xx
    b = 40
    return (torch.from_numpy(np.stack([image] * b)), torch.from_numpy(np.stack([label] * b)),
            torch.tensor([[height, width]] * b))


def test_batch_crop_and_flip_are_identical_on_image_and_label():
    images, labels, valid = _coordinate_batch()
    width = 60
    out_img, out_lab = random_resized_crop_batch(images, labels, valid, 24, torch.Generator().manual_seed(0))
    assert out_img.shape == (40, 24, 24, 3) and out_img.dtype == torch.uint8
    assert out_lab.shape == (40, 24, 24) and out_lab.dtype == torch.int64
    out_img, out_lab = out_img.numpy(), out_lab.numpy()
    assert out_lab.min() >= 0  # crops stay inside the valid region
    lx, ly = out_lab % width, out_lab // width
    # the image at each output pixel shows (within the half pixel of nearest vs bilinear) the
    # source coordinates its label came from
    assert np.abs(out_img[..., 0] / 4 - lx).max() <= 1.0
    assert np.abs(out_img[..., 1] / 4 - ly).max() <= 1.0
    flipped = (lx[:, 0, 0] > lx[:, 0, -1]).sum()
    kept = (lx[:, 0, 0] < lx[:, 0, -1]).sum()
    assert flipped > 5 and kept > 5  # both branches of the flip were exercised
    spans = lx.max(axis=(1, 2)) - lx.min(axis=(1, 2))
    assert len(set(spans.tolist())) > 5 and spans.max() > 40 and spans.min() < 40  # the boxes differ


def test_batch_crop_is_reproducible_for_a_seed_and_varies_across_seeds():
    images, labels, valid = _coordinate_batch()
    a = random_resized_crop_batch(images, labels, valid, 16, torch.Generator().manual_seed(3))
    b = random_resized_crop_batch(images, labels, valid, 16, torch.Generator().manual_seed(3))
    c = random_resized_crop_batch(images, labels, valid, 16, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_crop_boxes_respect_bounds_and_area():
    valid = torch.tensor([[50, 70]] * 200)
    boxes = sample_crop_boxes(valid, torch.Generator().manual_seed(0), scale=(0.25, 1.0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (top + h <= 50).all() and (left >= 0).all() and (left + w <= 70).all()
    assert ((h * w / (50 * 70)) >= 0.2).all() and ((h * w / (50 * 70)) <= 1.05).all()
    # A 2×100 strip cannot hold a box with aspect in [3/4, 4/3] and a quarter of its area: the
    # fallback is the largest centred box of the widest allowed aspect.
    (strip,) = sample_crop_boxes(torch.tensor([[2, 100]]), torch.Generator().manual_seed(0))
    assert strip.tolist() == [0, 48, 2, 3]


def test_pad_to_canvas_keeps_the_aspect_and_pads_with_ignore():
    image = np.full((30, 60, 3), 200, np.uint8)
    label = np.full((30, 60), 3, np.int16)
    out_image, out_label, (h, w) = pad_to_canvas(image, label, 40, 1000)
    assert (h, w) == (20, 40) and out_image.shape == (40, 40, 3)
    assert (out_label[:20] == 3).all() and (out_label[20:] == 1000).all() and (out_image[20:] == 0).all()


def test_resize_label_nearest_exact():
    label = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert np.array_equal(resize_label_nearest(label, (4, 6)),
                          np.repeat(np.repeat(label, 2, axis=0), 2, axis=1))
    big = np.arange(16, dtype=np.int64).reshape(4, 4)
    # output centres 0.5, 1.5 (output px) = 1, 3 (input px): the pixels holding them are 1 and 3
    assert np.array_equal(resize_label_nearest(big, (2, 2)), big[[1, 3]][:, [1, 3]])
    assert resize_label_nearest(big, (2, 2)).dtype == np.int64


def test_bad_augment_input_raises():
    images, labels, valid = _coordinate_batch()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="labels"):
        random_resized_crop_batch(images, labels[:, :10], valid, 8, g)
    with pytest.raises(ValueError, match="out_size"):
        random_resized_crop_batch(images, labels, valid, 0, g)
    with pytest.raises(ValueError, match="scale"):
        sample_crop_boxes(valid, g, scale=(0.5, 2.0))
    with pytest.raises(ValueError, match="share"):
        pad_to_canvas(np.zeros((4, 4, 3), np.uint8), np.zeros((3, 4), np.int16), 8, 1000)
    with pytest.raises(ValueError, match="shape"):
        resize_label_nearest(np.zeros((2, 2, 2)), (4, 4))


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


@pytest.mark.parametrize("meta", [VIT_META, {**VIT_META, "backbone": "resnet50", "arch": "resnet50"}])
def test_features_and_logits_is_forward_plus_the_feature_map(meta):
    torch.manual_seed(0)
    model = build_segmenter_from_meta(meta).eval()
    x = torch.randn(2, 3, 64, 96)
    features, logits = model.features_and_logits(x)
    s = model.stride
    assert features.shape == (2, model.backbone.out_channels, 64 // s, 96 // s)
    with torch.no_grad():
        assert torch.equal(logits, model(x))
        assert torch.equal(logits, model.head(features))
    # one graph: a loss on the features reaches the backbone, one on the logits the head too
    features.square().mean().backward(retain_graph=True)
    assert model.head.weight.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    logits.mean().backward()
    assert model.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="B×3×H×W"):
        model.features_and_logits(x[:, :2])


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
    pred = logits_to_prediction(logits, (13, 17), chunk=2)
    up = F.interpolate(logits[None], size=(13, 17), mode="bilinear", align_corners=False)[0]
    assert torch.equal(pred.label, up.argmax(0))  # the official rule: argmax over C+1
    assert torch.equal(pred.foreground_label, up[1:].argmax(0) + 1)  # PASS's threshold rule's class
    assert pred.foreground_label.min() >= 1
    assert torch.allclose(pred.foreground, 1 - up.softmax(0)[0], atol=1e-6)
    assert pred.label.shape == (13, 17) and pred.label.dtype == torch.int64


def test_argmax_predictions_hold_background_where_the_head_says_so():
    logits = torch.zeros(3, 2, 2)
    logits[0, 0, :] = 5.0  # background wins the top row
    logits[2, 1, 0] = 5.0  # class 2 bottom left
    logits[1, 1, 1] = 5.0  # class 1 bottom right
    pred = logits_to_prediction(logits, (2, 2))
    assert pred.label.tolist() == [[0, 0], [2, 1]]
    assert pred.foreground_label[0].min() >= 1  # the foreground rule always names a class


def test_foreground_quantisation():
    assert foreground_to_uint8(np.array([[0.0, 0.5, 1.0, 0.002]])).tolist() == [[0, 128, 255, 1]]


def test_model_input_size():
    assert model_input_size(375, 500, 256, 8) == (256, 344)  # 341.3 -> 344
    assert model_input_size(500, 375, 256, 1) == (341, 256)
    assert model_input_size(10, 1000, 4, 8) == (8, 400)
    with pytest.raises(ValueError):
        model_input_size(0, 10, 256, 8)
