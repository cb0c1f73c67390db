"""Synthetic ImageNet-S (both worlds): exact layout, ground truth, determinism, re-run behaviour."""

import os

import numpy as np
import pytest

from pdso_ray.data.decode import decode_image
from pdso_ray.data.imagenet_s import IGNORE_ID, class_index, decode_label, gt_path_for, list_split
from pdso_ray.data.synthetic import WORLDS, make_demo_dataset, wnid_for
from pdso_ray.data.synthetic.hue import class_style, render_sample
from pdso_ray.storage import Storage

SMALL = dict(classes=3, train_per_class=4, val_per_class=2, test_per_class=1, image_size=(40, 56))


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_layout_is_exact(tmp_path):
    root = make_demo_dataset(str(tmp_path), **SMALL)
    assert root == str(tmp_path / "ImageNetS3")
    wnids = ["n00000001", "n00000002", "n00000003"]
    expected = {"classes.txt", "synthetic.json"}
    layout = [("train", 4, None), ("validation", 2, "validation-segmentation"), ("test", 1, "test-segmentation")]
    for split, n, gt in layout:
        for w in wnids:
            for i in range(n):
                expected.add(f"{split}/{w}/{w}_{i}.JPEG")
                if gt:
                    expected.add(f"{gt}/{w}/{w}_{i}.png")
    files = _files(root)
    assert set(files) == expected
    assert files["classes.txt"].decode() == "n00000001\nn00000002\nn00000003\n"
    assert class_index(files["classes.txt"].decode()) == {w: k for k, w in enumerate(wnids, start=1)}

    storage = Storage()
    for split, n in [("train", 4), ("validation", 2), ("test", 1)]:
        listing = list_split(storage, str(tmp_path), 3, split)
        assert len(listing.images) == 3 * n and not listing.rejected and not listing.ignored


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_images_decode_and_ground_truth_matches(tmp_path, world):
    make_demo_dataset(str(tmp_path), world=world, **SMALL)
    storage = Storage()
    for split in ("validation", "test"):
        for rec in list_split(storage, str(tmp_path), 3, split).images:
            k = int(rec.wnid[1:])
            res = decode_image(storage.read_bytes(rec.path))
            assert res.ok and 40 <= res.image.shape[0] <= 56 and 40 <= res.image.shape[1] <= 56
            gt = decode_label(storage.read_bytes(gt_path_for(rec)))
            assert gt.shape == res.image.shape[:2]
            assert set(np.unique(gt).tolist()) <= {0, k, IGNORE_ID} and (gt == k).any()


def test_render_sample_ignore_band():
    rng = np.random.default_rng(0)
    _, label = render_sample(rng, 2, 4, (64, 64), ignore_border=0)
    assert set(np.unique(label).tolist()) == {0, 2}
    for width in (1, 2):
        _, banded = render_sample(np.random.default_rng(0), 2, 4, (64, 64), ignore_border=width)
        band = banded == IGNORE_ID
        # The band covers the object's outline from both sides and nothing far from it.
        assert (label[band] == 2).any() and (label[band] == 0).any()
        assert (banded[~band] == label[~band]).all()
    thin = render_sample(np.random.default_rng(0), 2, 4, (64, 64), ignore_border=1)[1] == IGNORE_ID
    thick = render_sample(np.random.default_rng(0), 2, 4, (64, 64), ignore_border=2)[1] == IGNORE_ID
    assert thick.sum() > thin.sum() and (thick | ~thin).all()


def test_hue_world_classes_are_distinguishable_by_object_colour(tmp_path):
    """Nearest class-mean of the object's mean colour recovers every image's class."""
    root = make_demo_dataset(str(tmp_path), classes=6, train_per_class=0, val_per_class=4, test_per_class=0,
                             world="hue")
    storage = Storage()
    feats, labels = [], []
    for rec in list_split(storage, str(tmp_path), 6, "validation").images:
        img = decode_image(storage.read_bytes(rec.path)).image.astype(np.float64)
        gt = decode_label(storage.read_bytes(gt_path_for(rec)))
        k = int(rec.wnid[1:])
        feats.append(img[gt == k].mean(0))
        labels.append(k)
    feats, labels = np.array(feats), np.array(labels)
    means = np.stack([feats[labels == k].mean(0) for k in range(1, 7)])
    pred = np.argmin(((feats[:, None] - means[None]) ** 2).sum(-1), axis=1) + 1
    assert (pred == labels).all()
    assert root.endswith("ImageNetS6")
    styles = [class_style(k, 6) for k in range(1, 7)]
    assert len({(s.texture, s.shape) for s in styles}) == 6


def test_deterministic_and_seed_dependent(tmp_path):
    a = _files(make_demo_dataset(str(tmp_path / "a"), **SMALL))
    b = _files(make_demo_dataset(str(tmp_path / "b"), **SMALL))
    c = _files(make_demo_dataset(str(tmp_path / "c"), seed=1, **SMALL))
    assert a == b
    images = [k for k in a if k.endswith((".JPEG", ".png"))]
    assert all(a[k] != c[k] for k in images)


def test_images_do_not_depend_on_counts(tmp_path):
    small = _files(make_demo_dataset(str(tmp_path / "s"), **SMALL))
    more = _files(make_demo_dataset(str(tmp_path / "m"), **{**SMALL, "train_per_class": 6, "val_per_class": 3}))
    shared = [k for k in small if k.endswith((".JPEG", ".png"))]
    assert all(small[k] == more[k] for k in shared)
    assert len([k for k in more if k.startswith("train/")]) == 18


def test_rerun_reuses_replaces_or_refuses(tmp_path):
    root = make_demo_dataset(str(tmp_path), **SMALL)
    probe = os.path.join(root, "train", "n00000001", "n00000001_0.JPEG")
    stamp = os.stat(probe).st_mtime_ns
    assert make_demo_dataset(str(tmp_path), **SMALL) == root
    assert os.stat(probe).st_mtime_ns == stamp  # same parameters: nothing rewritten

    make_demo_dataset(str(tmp_path), **{**SMALL, "train_per_class": 1})
    assert sorted(os.listdir(os.path.join(root, "train", "n00000001"))) == ["n00000001_0.JPEG"]

    foreign = tmp_path / "other" / "ImageNetS3"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not made by make_demo_dataset"):
        make_demo_dataset(str(tmp_path / "other"), **SMALL)
    assert (foreign / "mine.txt").read_text() == "user data"


def test_writes_through_storage_urls():
    storage = Storage()
    root = make_demo_dataset("memory://synthetic-test/out", storage=storage, **SMALL)
    assert root == "memory://synthetic-test/out/ImageNetS3"
    assert len(list_split(storage, "memory://synthetic-test/out", 3, "train").images) == 12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"world": "colour"}, "world"),
        ({"world": "shapes", "pool": "train"}, "pool"),
        ({"classes": 0}, "classes"),
        ({"classes": 1000}, "classes"),
        ({"train_per_class": -1}, "train"),
        ({"image_size": (4, 8)}, "image_size"),
        ({"image_size": (64, 32)}, "image_size"),
        ({"ignore_border": -1}, "ignore_border"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_demo_dataset(str(tmp_path), **kwargs)


def test_wnids_are_wordnet_shaped():
    assert wnid_for(1) == "n00000001" and wnid_for(919) == "n00000919"
