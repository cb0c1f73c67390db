"""DINOv2 and DINOv3 backbones: checkpoints in the official facebookresearch layouts and timm's,
the same outputs as timm's own conversion, CLS attention through RoPE and registers, and the
real-size architectures (random init: shapes and parameter counts)."""

import pytest
import torch
from timm.models.eva import checkpoint_filter_fn as eva_filter
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

from pdso_ray.models.dino import (
    DINO_SPECS,
    DinoBackbone,
    build_dino,
    create_vit,
    load_dino_weights,
    official_state_dict,
    save_dino_checkpoint,
)

TINY_V2 = "vit_tiny_patch14_reg4_dinov2_test"
TINY_V3 = "vit_tiny_patch16_dinov3_test"
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def _randomise_layer_scale(model: DinoBackbone) -> DinoBackbone:
    """LayerScale starts at 1e-5, which would hide a mislaid gamma: draw it at random."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.normal_()
    return model


@pytest.fixture(scope="module")
def tiny_v2():
    torch.manual_seed(0)
    return _randomise_layer_scale(build_dino(TINY_V2, img_size=518))  # the official 37×37 grid


@pytest.fixture(scope="module")
def tiny_v3():
    torch.manual_seed(1)
    return _randomise_layer_scale(build_dino(TINY_V3, img_size=224))


def test_dinov2_official_layout_loads_like_timms_conversion(tiny_v2, tmp_path):
    url = str(tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    save_dino_checkpoint(tiny_v2, url, fmt="dinov2")
    sd = torch.load(url, weights_only=True)
    # facebookresearch/dinov2 DinoVisionTransformer with registers: keys and shapes as released
    assert {"cls_token", "pos_embed", "register_tokens", "mask_token", "blocks.1.ls1.gamma",
            "blocks.1.ls2.gamma", "blocks.0.attn.qkv.bias"} <= set(sd)
    assert not any(k.startswith("reg_token") or "gamma_1" in k for k in sd)
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 48) and sd["register_tokens"].shape == (1, 4, 48)
    assert sd["mask_token"].shape == (1, 48)

    loaded = build_dino(TINY_V2, checkpoint=url, img_size=224)  # the checkpoint's grid wins
    assert loaded.img_size == 518 and loaded.vit.num_prefix_tokens == 5
    reference = create_vit(TINY_V2, 518)
    reference.load_state_dict(vit_filter(dict(sd), reference), strict=True)
    x = torch.randn(2, 3, 224, 252, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.vit.forward_features(x), reference.forward_features(x))
        tokens, attention = loaded(x)
    assert tokens.shape == (2, 16, 18, 48) and attention.shape == (2, 16, 18)


def test_dinov2_without_registers_official_layout(tmp_path):
    """``dinov2_vits14_pretrain.pth``: LayerScale and a mask token, no registers (tiny dims)."""
    torch.manual_seed(2)
    spec = DINO_SPECS["vit_small_patch14_dinov2"]
    import timm

    def tiny_model():
        vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=518,
                                dynamic_img_size=True, **TINY)
        return _randomise_layer_scale(DinoBackbone(vit, "vit_small_patch14_dinov2", pretrained=False))

    source = tiny_model()
    sd = official_state_dict(source, "dinov2")
    assert "mask_token" in sd and "register_tokens" not in sd and sd["pos_embed"].shape == (1, 1 + 37 * 37, 48)
    url = str(tmp_path / "dinov2_vits14_pretrain.pth")
    torch.save(sd, url)
    target = tiny_model()
    load_dino_weights(target, url)
    x = torch.randn(1, 3, 98, 140)
    with torch.no_grad():
        assert torch.equal(target.vit.forward_features(x), source.vit.forward_features(x))


def test_dinov3_official_layout_loads_like_timms_conversion(tiny_v3, tmp_path):
    url = str(tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    save_dino_checkpoint(tiny_v3, url, fmt="dinov3")
    sd = torch.load(url, weights_only=True)
    # facebookresearch/dinov3 DinoVisionTransformer (vit_small: 4 storage tokens, masked k bias)
    assert {"cls_token", "storage_tokens", "mask_token", "rope_embed.periods", "blocks.1.ls1.gamma",
            "blocks.1.attn.qkv.bias", "blocks.1.attn.qkv.bias_mask", "norm.weight"} <= set(sd)
    assert "pos_embed" not in sd and sd["storage_tokens"].shape == (1, 4, 48)
    assert torch.equal(sd["blocks.0.attn.qkv.bias_mask"][48:96], torch.zeros(48))

    loaded = build_dino(TINY_V3, checkpoint=url, img_size=224)
    reference = create_vit(TINY_V3, 224)
    reference.load_state_dict(eva_filter(dict(sd), reference), strict=True)
    x = torch.randn(2, 3, 160, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded.vit.forward_features(x), reference.forward_features(x))


def test_dinov3_non_zero_attention_bias_is_refused(tiny_v3, tmp_path):
    sd = official_state_dict(tiny_v3, "dinov3")
    sd["blocks.0.attn.qkv.bias"] = torch.ones(3 * 48)
    url = str(tmp_path / "dinov3_other_variant.pth")
    torch.save(sd, url)
    with pytest.raises(ValueError, match=r"dinov3_other_variant.pth.*blocks.0.attn.qkv.bias.*non-zero"):
        build_dino(TINY_V3, checkpoint=url)


@pytest.mark.parametrize("arch", [TINY_V2, TINY_V3])
def test_timm_safetensors_round_trip(arch, tiny_v2, tiny_v3, tmp_path):
    source = tiny_v2 if arch == TINY_V2 else tiny_v3
    url = str(tmp_path / "model.safetensors")
    save_dino_checkpoint(source, url, fmt="timm")
    loaded = build_dino(arch, checkpoint=url)
    x = torch.randn(1, 3, 112, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], source(x)[0])


def _reference_cls_attention(model, images):
    """CLS->patch attention read from timm's own unfused attention (RoPE and registers included)."""
    attn = model.vit.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.setdefault("a", out))
    attn.fused_attn = False
    try:
        model.vit.forward_features(images)
    finally:
        attn.fused_attn = True
        handle.remove()
    return captured["a"][:, :, 0, model.vit.num_prefix_tokens:].mean(dim=1)


@pytest.mark.parametrize("which", ["v2", "v3"])
def test_cls_attention_and_features_match_timm(which, tiny_v2, tiny_v3):
    model = tiny_v2 if which == "v2" else tiny_v3
    p = model.patch_size
    x = torch.randn(2, 3, 6 * p, 4 * p, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.attention_features(x, kind="value")
        reference = _reference_cls_attention(model, x).reshape(2, 6, 4)
        tokens = model.vit.forward_features(x)[:, model.vit.num_prefix_tokens:].reshape(2, 6, 4, 48)
    torch.testing.assert_close(out.cls_attention, reference, rtol=1e-5, atol=1e-7)
    assert torch.equal(out.patch_tokens, tokens)
    assert out.features.shape == (2, 6, 4, 48)
    # a region's CLS token: masked patches get no attention
    mask = torch.zeros(2, 6, 4, dtype=torch.bool)
    mask[:, :3] = True
    with torch.no_grad():
        masked = model.attention_features(x, kind=None, patch_mask=mask)
    assert torch.all(masked.cls_attention[:, 3:] == 0) and torch.all(masked.cls_attention[:, :3] > 0)


def _expected_parameters(dim: int, depth: int, patch: int, registers: int, pos_tokens: int,
                         qkv_bias: bool) -> int:
    """A pre-norm ViT with LayerScale and an MLP ratio of 4, counted from its parts."""
    block = (2 * 2 * dim                      # norm1, norm2
             + 3 * dim * dim + (3 * dim if qkv_bias else 0)  # qkv
             + dim * dim + dim                 # proj
             + 4 * dim * dim + 4 * dim + 4 * dim * dim + dim  # mlp
             + 2 * dim)                        # ls1, ls2
    return (3 * patch * patch * dim + dim      # patch embedding
            + dim + registers * dim            # CLS, registers
            + pos_tokens * dim                 # absolute position embedding (0 with RoPE)
            + depth * block + 2 * dim)         # blocks, final norm


@pytest.mark.parametrize("arch,dim,patch,registers,pos_tokens,qkv_bias", [
    ("vit_small_patch14_dinov2", 384, 14, 0, 1 + 37 * 37, True),
    ("vit_base_patch14_dinov2", 768, 14, 0, 1 + 37 * 37, True),
    ("vit_small_patch14_reg4_dinov2", 384, 14, 4, 37 * 37, True),
    ("vit_base_patch14_reg4_dinov2", 768, 14, 4, 37 * 37, True),
    ("vit_small_patch16_dinov3", 384, 16, 4, 0, False),
    ("vit_base_patch16_dinov3", 768, 16, 4, 0, False),
])
def test_real_size_architectures(arch, dim, patch, registers, pos_tokens, qkv_bias):
    """The released sizes, randomly initialised at their native resolution (518 px for DINOv2):
    parameter counts from the architecture, and the forward's shapes on a small input."""
    native = 518 if "dinov2" in arch else 224
    model = DinoBackbone(create_vit(arch, native), arch, pretrained=False).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == _expected_parameters(dim, 12, patch, registers, pos_tokens, qkv_bias)
    assert model.patch_size == DINO_SPECS[arch].patch_size == patch
    assert model.vit.num_prefix_tokens == 1 + registers
    with torch.no_grad():
        tokens, attention = model(torch.randn(1, 3, 2 * patch, 3 * patch))
    assert tokens.shape == (1, 2, 3, dim) and attention.shape == (1, 2, 3)
    assert ("DINOv3" in DINO_SPECS[arch].license) == ("dinov3" in arch)


# DINOv2 keeps its checkpoint's 37×37 position grid; DINOv3's rotary embedding has none (the
# configured size stays)
@pytest.mark.parametrize("arch,family,grid", [(TINY_V2, "dinov2", 518), (TINY_V3, "dinov3", 112)])
def test_fine_tuning_model_from_an_official_checkpoint_saves_and_reloads(arch, family, grid, tiny_v2, tiny_v3,
                                                                          tmp_path):
    """finetune → model.pt → predict: the segmenter built on an official checkpoint (configured at
    112 px) is saved with the grid it was built with and reloads to the same logits on a non-square input."""
    from pdso_ray.config import load_config
    from pdso_ray.models.heads import (
        build_segmenter,
        load_segmenter,
        segmenter_bytes,
        segmenter_meta,
        with_native_grid,
    )
    from pdso_ray.models.loading import DinoSource
    from pdso_ray.storage import Storage

    checkpoint = str(tmp_path / f"{family}.pth")
    save_dino_checkpoint(tiny_v2 if arch == TINY_V2 else tiny_v3, checkpoint, fmt=family)
    cfg = load_config(overrides=[f"models.dino.arch={arch}", f"models.dino.checkpoint={checkpoint}",
                                 "models.dino.image_size=112", "data.classes=3"])
    torch.manual_seed(0)
    model = build_segmenter("dino", 3, DinoSource.from_config(cfg), Storage()).eval()
    meta = with_native_grid(segmenter_meta(cfg, 3), model)
    assert meta["img_size"] == grid and meta["arch"] == arch
    url = str(tmp_path / "model.pt")
    Storage().write_bytes(url, segmenter_bytes(model.state_dict(), meta))
    loaded, _ = load_segmenter(url)
    p = model.stride
    x = torch.randn(1, 3, 5 * p, 7 * p, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = loaded(x)
        assert torch.equal(logits, model(x))
    assert logits.shape == (1, 4, 5, 7)
