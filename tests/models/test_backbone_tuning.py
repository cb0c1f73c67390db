"""DFF's backbone fine-tuning (models/backbone_tuning.py): what trains, that it learns, resume."""

import io

import numpy as np
import pytest
import torch

from pdso_ray.method.denoise import Classifier
from pdso_ray.models.backbone_tuning import BackboneTuner, pooled_embedding, unfreeze_last_blocks
from pdso_ray.models.dino import build_dino

SIZE = 32


def _backbone(seed=0):
    torch.manual_seed(seed)
    return build_dino("vit_tiny_reg4", img_size=SIZE)


def _head(dim=48, classes=2, seed=1):
    torch.manual_seed(seed)
    return Classifier(dim, classes, hidden_dim=16, head="cosine")


def _images(n_per_class=8, seed=0):
    """Two classes told apart by colour: a red or a blue square on a grey, noisy background."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, channel in enumerate((0, 2)):
        for _ in range(n_per_class):
            img = rng.integers(90, 140, (SIZE, SIZE, 3)).astype(np.uint8)
            y, x = rng.integers(0, SIZE // 2, 2)
            img[y:y + SIZE // 2, x:x + SIZE // 2] = 40
            img[y:y + SIZE // 2, x:x + SIZE // 2, channel] = 230
            images.append(img)
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def _tuner(blocks, total_steps=40, backbone_lr=1e-3, head_lr=1e-2):
    return BackboneTuner(_backbone(), _head(), blocks=blocks, image_size=SIZE, backbone_lr=backbone_lr,
                         head_lr=head_lr, total_steps=total_steps)


def test_only_the_last_blocks_and_the_final_norm_train():
    tuner = _tuner(blocks=1)
    before = {k: v.clone() for k, v in tuner.backbone.vit.state_dict().items()}
    images, labels = _images()
    tuner.step(images, labels)
    changed = {k for k, v in tuner.backbone.vit.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(k.startswith(("blocks.1.", "norm.")) for k in changed), sorted(changed)
    assert any(k.startswith("blocks.1.") for k in changed)


def test_blocks_at_least_the_depth_train_everything():
    backbone = _backbone()
    trainable = unfreeze_last_blocks(backbone, blocks=5)
    assert len(trainable) == len(list(backbone.vit.parameters()))
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        unfreeze_last_blocks(backbone, 0)


def test_tuning_learns_to_separate_two_colour_classes():
    images, labels = _images()
    tuner = _tuner(blocks=2, total_steps=30)
    losses = [tuner.step(images, labels) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    emb = pooled_embedding(tuner.backbone, tuner.head, images, SIZE)
    assert emb.shape == (len(images), 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # the tuned embedding puts every image nearer its own class mean than the other one
    means = np.stack([emb[labels == c].mean(0) for c in (0, 1)])
    nearest = np.argmin(((emb[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() == 1.0


def test_resume_from_the_state_gives_the_same_next_step():
    images, labels = _images()
    a = _tuner(blocks=1)
    for _ in range(3):
        a.step(images, labels)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    next_a = a.step(images, labels)
    b = _tuner(blocks=1)
    b.load_state_dict(state)
    assert b.step_count == 3
    assert b.step(images, labels) == pytest.approx(next_a, rel=1e-6)
