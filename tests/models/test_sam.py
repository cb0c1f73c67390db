import io

import numpy as np
import pytest
import torch

from pdso_ray.method.refiners import RefineContext, RefineParams, refine_spo
from pdso_ray.models.sam import (
    SAM_REGISTRY,
    SamMaskPredictor,
    build_sam,
    resize_position_embeddings,
    save_sam_checkpoint,
)
from pdso_ray.storage import Storage

IMAGE = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
BOXES = np.array([[10, 10, 50, 50], [20, 30, 100, 90], [0, 0, 127, 95], [60, 5, 120, 40]], np.float32)


def _tiny(seed=0, img_size=None):
    """The tiny test SAM with non-trivial position embeddings (SAM initialises them to zero)."""
    torch.manual_seed(seed)
    model = build_sam("vit_tiny_test", None, img_size=img_size)
    with torch.no_grad():
        enc = model.image_encoder
        _, h, w, c = enc.pos_embed.shape
        y = (torch.arange(h) + 0.5) / h
        x = (torch.arange(w) + 0.5) / w
        # a smooth field, so that resampling it can be checked against the field itself
        field = torch.sin(2.0 * y)[:, None, None] + torch.cos(1.5 * x)[None, :, None] * torch.linspace(-1, 1, c)
        enc.pos_embed.copy_(field[None])
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
        # block 1 attends globally: a linear ramp over relative positions in its height table
        table = enc.blocks[1].attn.rel_pos_h
        table.copy_(torch.arange(table.shape[0])[:, None] * torch.linspace(-0.1, 0.1, table.shape[1]))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = _tiny()
    url = str(tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth")
    save_sam_checkpoint(model, url)
    return model, url


def test_registry_and_argument_checks():
    assert {"vit_b", "vit_l", "vit_h", "vit_tiny_test"} <= set(SAM_REGISTRY)
    assert SAM_REGISTRY["vit_b"].encoder_embed_dim == 768 and SAM_REGISTRY["vit_b"].img_size == 1024
    with pytest.raises(ValueError, match="unknown SAM arch 'vit_x'"):
        build_sam("vit_x", None)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_sam("vit_tiny_test", None, img_size=100)


def test_checkpoint_has_official_flat_layout_and_reloads_to_same_masks(checkpoint):
    model, url = checkpoint
    state = torch.load(io.BytesIO(Storage().read_bytes(url)), weights_only=True)
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert state["image_encoder.pos_embed"].shape == (1, 16, 16, 64)

    loaded = build_sam("vit_tiny_test", url)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    a, b = SamMaskPredictor(model, device="cpu"), SamMaskPredictor(loaded, device="cpu")
    a.set_image(IMAGE)
    b.set_image(IMAGE)
    for x, y in zip(a.predict(BOXES), b.predict(BOXES)):
        np.testing.assert_array_equal(x, y)


def test_other_input_size_interpolates_position_embeddings(checkpoint):
    model, url = checkpoint
    small = build_sam("vit_tiny_test", url, img_size=128)
    enc = small.image_encoder
    assert enc.pos_embed.shape == (1, 8, 8, 64)
    # resampling the smooth field at the new patch centres gives the field there
    y = (torch.arange(8) + 0.5) / 8
    x = (torch.arange(8) + 0.5) / 8
    field = torch.sin(2.0 * y)[:, None, None] + torch.cos(1.5 * x)[None, :, None] * torch.linspace(-1, 1, 64)
    assert torch.allclose(enc.pos_embed[0], field, atol=0.03)
    # block 1 attends globally: its tables shrink from 2*16-1 to 2*8-1 rows, and the ramp is
    # sampled at the new rows' centres, (i + 0.5) * 31 / 15 - 0.5 old rows
    new = enc.blocks[1].attn.rel_pos_h
    assert new.shape == (15, 32) and enc.blocks[1].attn.rel_pos_w.shape == (15, 32)
    rows = (torch.arange(15) + 0.5) * 31 / 15 - 0.5
    assert torch.allclose(new, rows[:, None] * torch.linspace(-0.1, 0.1, 32), atol=1e-5)
    # block 0 uses 8x8 windows: its tables do not depend on the input size
    assert torch.equal(enc.blocks[0].attn.rel_pos_w, model.image_encoder.blocks[0].attn.rel_pos_w)
    assert torch.equal(small.mask_decoder.state_dict()["iou_token.weight"],
                       model.mask_decoder.state_dict()["iou_token.weight"])
    pred = SamMaskPredictor(small, device="cpu")
    assert pred.low_res_size == 32
    pred.set_image(IMAGE)
    masks, iou, low = pred.predict(BOXES)
    assert masks.shape == (4, 3, 96, 128) and low.shape == (4, 3, 32, 32)
    # same size: nothing to resize, the dict passes through unchanged
    state = model.state_dict()
    same = resize_position_embeddings(state, model)
    assert all(same[k] is v for k, v in state.items())


def test_bad_checkpoints_name_the_file_and_keys(tmp_path, checkpoint):
    model, _ = checkpoint
    state = model.state_dict()
    del state["mask_decoder.iou_token.weight"]
    url = str(tmp_path / "broken.pth")
    buf = io.BytesIO()
    torch.save(state, buf)
    Storage().write_bytes(url, buf.getvalue())
    with pytest.raises(ValueError, match=r"broken\.pth[\s\S]*missing keys: mask_decoder\.iou_token\.weight"):
        build_sam("vit_tiny_test", url)
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        build_sam("vit_tiny_test", str(tmp_path / "nothing.pth"))


def test_one_decoder_call_for_n_prompts_matches_single_calls(checkpoint):
    model, _ = checkpoint
    pred = SamMaskPredictor(model, device="cpu")
    pred.set_image(IMAGE)
    calls = []
    hook = model.mask_decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        masks, iou, low = pred.predict(BOXES, multimask=True)
        assert len(calls) == 1
        calls.clear()
        assert masks.shape == (4, 3, 96, 128) and masks.dtype == bool
        assert iou.shape == (4, 3) and low.shape == (4, 3, 64, 64)
        skipped, iou_s, low_s = pred.predict(BOXES, multimask=True, return_masks=False)
        assert skipped is None
        np.testing.assert_array_equal(iou_s, iou)
        np.testing.assert_array_equal(low_s, low)
        for i in range(len(BOXES)):
            m1, iou1, low1 = pred.predict(BOXES[i : i + 1])
            np.testing.assert_allclose(low1[0], low[i], atol=1e-4)
            np.testing.assert_allclose(iou1[0], iou[i], atol=1e-5)
        # boxes with a point on one of them, plus pass-1 logits: still one call, one mask each
        calls.clear()
        points = np.zeros((4, 1, 2), np.float32)
        points[1, 0] = (60, 60)
        labels = np.array([[-1], [1], [-1], [-1]])
        best = low[np.arange(4), iou.argmax(1)][:, None]
        masks2, iou2, low2 = pred.predict(BOXES, points, labels, best, multimask=False)
        assert len(calls) == 1
        assert masks2.shape == (4, 1, 96, 128) and iou2.shape == (4, 1) and low2.shape == (4, 1, 64, 64)
    finally:
        hook.remove()


def test_predict_checks(checkpoint):
    model, _ = checkpoint
    pred = SamMaskPredictor(model, device="cpu")
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict(BOXES)
    pred.set_image(IMAGE)
    with pytest.raises(ValueError, match="N×1×64×64"):
        pred.predict(BOXES, mask_input=np.zeros((4, 1, 32, 32)))
    with pytest.raises(ValueError, match="disagree on N"):
        pred.predict(BOXES, np.zeros((3, 1, 2)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="uint8"):
        pred.set_image(IMAGE.astype(np.float32))
    masks, iou, low = pred.predict(np.zeros((0, 4), np.float32))
    assert masks.shape == (0, 3, 96, 128) and iou.shape == (0, 3)


def test_generate_automatic_and_spo_with_the_real_model(checkpoint):
    model, _ = checkpoint
    pred = SamMaskPredictor(model, device="cpu", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    auto = pred.generate_automatic(IMAGE)
    assert len(auto) >= 1
    assert all(m.shape == (96, 128) and m.dtype == bool and isinstance(s, float) for m, s in auto)

    raw = np.zeros((96, 128), np.int32)
    raw[10:40, 10:50] = 3
    raw[50:90, 60:120] = 5
    out = refine_spo(IMAGE, raw, np.ones((96, 128)), RefineContext(3, (5,), params=RefineParams(min_area=10)), pred)
    assert out.label.shape == (96, 128) and set(np.unique(out.label)) <= {0, 3, 5}
    assert out.stats["prompts"] == 2


def test_convolutional_stem_keeps_the_token_grid_and_round_trips_its_batch_norm_statistics(tmp_path):
    torch.manual_seed(0)
    linear, stem = build_sam("vit_tiny_test", None), build_sam("vit_tiny_convstem", None)
    x = torch.randn(2, 3, 256, 256)
    # the same 16×16 token grid (the stand-in's neck is 64 wide, the linear test model's 32)
    assert linear.image_encoder(x).shape == (2, 32, 16, 16) and stem.image_encoder(x).shape == (2, 64, 16, 16)
    extra = set(stem.state_dict()) - set(linear.state_dict())
    assert set(linear.state_dict()) - set(stem.state_dict()) == {
        "image_encoder.patch_embed.proj.weight", "image_encoder.patch_embed.proj.bias"}
    assert extra and all(k.startswith("image_encoder.patch_embed.proj.") for k in extra)
    assert "image_encoder.patch_embed.proj.1.running_mean" in extra

    stem.train()
    with torch.no_grad():
        stem.image_encoder(x * 3 + 1)  # moves BatchNorm's running statistics off their defaults
    stem.eval()
    url = str(tmp_path / "stem.pth")
    save_sam_checkpoint(stem, url)
    loaded = build_sam("vit_tiny_convstem", url)
    assert not torch.equal(loaded.state_dict()["image_encoder.patch_embed.proj.1.running_mean"], torch.zeros(16))
    a, b = SamMaskPredictor(stem, device="cpu"), SamMaskPredictor(loaded, device="cpu")
    a.set_image(IMAGE)
    b.set_image(IMAGE)
    for p, q in zip(a.predict(BOXES), b.predict(BOXES)):
        np.testing.assert_array_equal(p, q)
    assert build_sam("vit_tiny_convstem", url, img_size=128).image_encoder(x[:, :, :128, :128]).shape == (2, 64, 8, 8)
