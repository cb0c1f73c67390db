"""The optimiser-step floor of DFF's heads (method/denoise.py: step_batch_size, min_steps)."""

import math

import numpy as np
import pytest
import torch

from pdso_ray.method.denoise import ChunkedFeatures, score, step_batch_size, train_classifier


@pytest.mark.parametrize("rows,epochs,batch,min_steps,expected", [
    (102, 30, 64, 500, 6),        # the demo's g: 60 steps at batch 64 -> 30 * ceil(102 / 6) = 510
    (40_000, 15, 1024, 500, 1024),  # 40 steps per epoch * 15 = 600 >= 500: the floor does not bind
    (20_000, 50, 1024, 1000, 1024),  # exactly 1000 steps
    (100, 2, 64, 500, 1),          # 200 row visits < 500 steps: one row per step
    (102, 30, 64, 0, 64),          # 0 disables the floor
    (0, 30, 64, 500, 64),
])
def test_step_batch_size_known_answers(rows, epochs, batch, min_steps, expected):
    b = step_batch_size(rows, epochs, batch, min_steps)
    assert b == expected
    if rows * epochs >= min_steps > 0:
        assert epochs * math.ceil(rows / b) >= min_steps


def test_step_batch_size_rejects_bad_settings():
    with pytest.raises(ValueError):
        step_batch_size(10, 5, 0, 100)
    with pytest.raises(ValueError):
        step_batch_size(10, 5, 8, -1)


def test_min_steps_fits_a_small_training_set():
    # 48 rows, 3 classes, 10 epochs at batch 64: 10 Adam steps at lr 1e-3 leave the cosine head
    # near its random start; the 500-step floor (batch 9) fits it
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    labels = np.repeat(np.arange(3), 16)
    x = (centres[labels] + 0.8 * rng.normal(size=(48, 16))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = ChunkedFeatures.from_arrays(x, x.copy())
    common = dict(epochs=10, lr=1e-3, batch_size=64, seed=0, head="cosine")
    losses = {}
    for min_steps in (0, 500):
        model = train_classifier(src, labels, 3, min_steps=min_steps, **common)
        loss, pred = score(model, src, labels)
        losses[min_steps] = float(loss.mean())
        if min_steps:
            assert (pred == labels).mean() == 1.0
    assert losses[500] < 0.5 * losses[0]


@pytest.mark.parametrize("override", ["denoise.min_steps=-1", "purify.kept_distance=median"])
def test_config_rejects_bad_new_keys(override):
    from pdso_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, ["data.classes=5", override])
