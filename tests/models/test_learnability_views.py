"""The supervised probe's views (benchmarks/learnability.py) carry no colour: what they keep of an
image is its luminance pattern, cropped and maybe mirrored."""

import torch

from benchmarks.learnability import colour_free_views


def test_views_of_a_grey_image_stay_grey_and_keep_its_pattern():
    grey = torch.rand(4, 1, 40, 40, generator=torch.Generator().manual_seed(0)).expand(4, 3, 40, 40)
    views = colour_free_views(grey, 32, torch.Generator().manual_seed(1))
    assert views.shape == (4, 3, 32, 32)
    assert torch.allclose(views[:, 0], views[:, 1]) and torch.allclose(views[:, 1], views[:, 2])
    # every view is a 32×32 window of its image, mirrored or not
    found = [any(torch.allclose(views[i, 0], window) for t in range(9) for l in range(9)
                 for window in (grey[i, 0, t:t + 32, l:l + 32], grey[i, 0, t:t + 32, l:l + 32].flip(-1)))
             for i in range(4)]
    assert all(found)


def test_a_colour_is_not_kept_from_view_to_view():
    red = torch.zeros(1, 3, 36, 36)
    red[:, 0] = 1.0
    dominant, chroma = [], []
    for seed in range(20):
        views = colour_free_views(red.expand(16, 3, 36, 36), 32, torch.Generator().manual_seed(seed))
        mean = views.mean((2, 3))  # 16×3
        dominant.append(int(mean[0].argmax()))
        chroma.append(mean.max(1).values - mean.min(1).values)
    assert set(dominant) == {0, 1, 2}  # the channels are permuted
    chroma = torch.cat(chroma)
    assert chroma.min() < 0.1 and chroma.max() > 1.2  # from nearly grey to over-saturated
