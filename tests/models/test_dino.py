"""DINO backbone: forward contract, checkpoint formats, error messages, pos_embed resampling."""

import io
import logging

import numpy as np
import pytest
import torch

from pdso_ray.models.checkpoints import check_keys, load_state_dict_from_url
from pdso_ray.models.dino import (
    DINO_REGISTRY,
    IMAGENET_MEAN,
    build_dino,
    save_dino_checkpoint,
    to_model_input,
)
from pdso_ray.storage import Storage


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_dino("vit_tiny_test", img_size=64)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _reference_cls_attention(model, images):
    """CLS->patch attention read from timm's own unfused attention (the slow, obvious way)."""
    block = model.vit.blocks[-1]
    captured = {}
    handle = block.attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.setdefault("a", out))
    block.attn.fused_attn = False
    try:
        model.vit.forward_features(images)
    finally:
        block.attn.fused_attn = True
        handle.remove()
    return captured["a"][:, :, 0, model.vit.num_prefix_tokens:].mean(dim=1)


def test_forward_matches_timm_tokens_and_unfused_attention(tiny, images):
    with torch.no_grad():
        tokens, attention = tiny(images)
        reference_tokens = tiny.vit.forward_features(images)[:, 1:].reshape(2, 8, 8, 48)
        reference_attention = _reference_cls_attention(tiny, images).reshape(2, 8, 8)
    assert tokens.shape == (2, 8, 8, 48) and tokens.dtype == torch.float32
    assert attention.shape == (2, 8, 8) and attention.dtype == torch.float32
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(attention, reference_attention, rtol=1e-5, atol=1e-7)
    # probabilities: the patches' share of the CLS row is below 1 (CLS attends to itself too)
    sums = attention.sum(dim=(1, 2))
    assert (attention >= 0).all() and (sums < 1).all() and (sums > 0.5).all()


def test_bf16_autocast_close_to_fp32(tiny, images):
    with torch.no_grad():
        tokens, attention = tiny(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens_bf, attention_bf = tiny(images)
    assert tokens_bf.dtype == torch.float32 and attention_bf.dtype == torch.float32
    torch.testing.assert_close(attention_bf, attention, rtol=0.05, atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(tokens_bf.flatten(1), tokens.flatten(1))
    assert (cos > 0.999).all()


def test_other_input_sizes_and_bad_sizes(tiny):
    with torch.no_grad():
        tokens, attention = tiny(torch.randn(1, 3, 48, 80))
    assert tokens.shape == (1, 6, 10, 48) and attention.shape == (1, 6, 10)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        tiny(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="B×3×H×W"):
        tiny(torch.randn(3, 64, 64))


def test_dino_format_has_the_official_key_layout(tiny, tmp_path):
    url = str(tmp_path / "dino_tiny_pretrain.pth")
    save_dino_checkpoint(tiny, url, fmt="dino")
    sd = torch.load(url, map_location="cpu", weights_only=True)
    # facebookresearch/dino vision_transformer.py: VisionTransformer with head=Identity
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"}
    for i in range(2):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 1 + 8 * 8, 48)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 48, 48)


@pytest.mark.parametrize("fmt,name", [
    ("dino", "dino_tiny_pretrain.pth"),
    ("dino_full", "checkpoint.pth"),
    ("timm", "timm_checkpoint.pth.tar"),
    ("timm", "model.safetensors"),
])
def test_saved_formats_reload_to_identical_outputs(tiny, images, tmp_path, fmt, name):
    url = str(tmp_path / name)
    save_dino_checkpoint(tiny, url, fmt=fmt)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    reloaded = build_dino("vit_tiny_test", checkpoint=url, img_size=64)
    assert reloaded.pretrained
    with torch.no_grad():
        a_tokens, a_attention = tiny(images)
        b_tokens, b_attention = reloaded(images)
    assert torch.equal(a_tokens, b_tokens) and torch.equal(a_attention, b_attention)


def test_checkpoint_through_object_storage_url(tiny, images):
    storage = Storage()
    url = "memory://pdso-test-dino/ckpt/dino.pth"
    save_dino_checkpoint(tiny, url, fmt="dino", storage=storage)
    reloaded = build_dino("vit_tiny_test", checkpoint=url, storage=storage, img_size=64)
    with torch.no_grad():
        assert torch.equal(tiny(images)[0], reloaded(images)[0])
    storage.remove(url)


def test_mismatched_keys_are_named(tiny, tmp_path):
    sd = {k: v.clone() for k, v in tiny.vit.state_dict().items()}
    del sd["norm.weight"]
    sd["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    url = str(tmp_path / "broken.pth")
    torch.save(sd, url)
    with pytest.raises(ValueError) as err:
        build_dino("vit_tiny_test", checkpoint=url, img_size=64)
    msg = str(err.value)
    assert url in msg
    assert "1 missing keys: norm.weight" in msg
    assert "1 unexpected keys: blocks.9.attn.qkv.weight" in msg
    assert "blocks.0.mlp.fc1.weight: checkpoint (5, 5) vs model (192, 48)" in msg


def test_check_keys_lists_at_most_ten():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(ValueError, match=r"24 missing keys: 0\.weight, .*\(\+14 more\)"):
        check_keys(model, {}, "mem://x")


def test_missing_checkpoint_names_path_and_download(tmp_path):
    missing = str(tmp_path / "nowhere" / "dino_deitsmall16_pretrain.pth")
    with pytest.raises(FileNotFoundError) as err:
        build_dino("vit_small_patch16", checkpoint=missing)
    msg = str(err.value)
    assert missing in msg
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth" in msg
    assert "models.dino.checkpoint" in msg


def test_unreadable_checkpoints_are_value_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*garbage.pth"):
        load_state_dict_from_url(str(garbage))
    # a pickle that would run code (any non-allowlisted global) is refused, not executed
    unsafe = tmp_path / "unsafe.pth"
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(1), "fn": logging.getLogger}, buf)
    unsafe.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="as weights only"):
        load_state_dict_from_url(str(unsafe))
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.ones(3), not_a_dict)
    with pytest.raises(ValueError, match="holds a Tensor, expected a dict"):
        load_state_dict_from_url(str(not_a_dict))


def test_a_checkpoint_keeps_its_grid_and_any_input_resamples_it_once(tmp_path, images):
    torch.manual_seed(0)
    big = build_dino("vit_tiny_test", img_size=224)
    url = str(tmp_path / "at224.pth")
    save_dino_checkpoint(big, url, fmt="dino")
    loaded = build_dino("vit_tiny_test", checkpoint=url, img_size=112)
    assert loaded.vit.pos_embed.shape == (1, 1 + 28 * 28, 48) and loaded.img_size == 224
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # a 112 input resamples the 28×28 grid on the fly, exactly as the 224 model does
        assert torch.equal(loaded(x)[0], big(x)[0])


def test_random_init_warns_and_unknown_arch(caplog):
    with caplog.at_level(logging.WARNING, logger="pdso_ray.models.dino"):
        model = build_dino("vit_tiny_test", img_size=32)
    assert not model.pretrained
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="unknown DINO architecture 'vit_huge'.*vit_small_patch8"):
        build_dino("vit_huge")
    assert {"vit_small_patch8", "vit_small_patch16", "vit_base_patch8", "vit_base_patch16",
            "vit_tiny_test"} <= set(DINO_REGISTRY)


def test_to_model_input():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    mean_color = np.empty((20, 50, 3), dtype=np.uint8)
    mean_color[:] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    x = to_model_input([a, mean_color], 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x[1].abs().max() < 0.01  # the ImageNet mean colour normalises to ~0
    # a batch array takes the same path as a list of the same images
    batch = np.stack([a, a])
    torch.testing.assert_close(to_model_input(batch, (32, 32)), to_model_input([a, a], 32))
    # already at size: no resampling, exact normalisation
    same = to_model_input([a], (40, 30))
    expected = (torch.from_numpy(a).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None])
    torch.testing.assert_close(same[0] * torch.tensor([0.229, 0.224, 0.225])[:, None, None], expected)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input([a.astype(np.float32)], 32)
    with pytest.raises(ValueError, match="at least one"):
        to_model_input([], 32)
