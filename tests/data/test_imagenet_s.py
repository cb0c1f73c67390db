"""ImageNet-S layout: label codec, class index, safe ids, split listing, GT paths."""

import io

import numpy as np
import pytest
from PIL import Image

from pdso_ray.data.imagenet_s import (
    IGNORE_ID,
    class_index,
    dataset_dir,
    decode_label,
    encode_label,
    gt_path_for,
    list_split,
    parse_class_list,
)
from pdso_ray.data.listing import ImageRecord
from pdso_ray.storage import Storage

# ---- label codec -----------------------------------------------------------------------------


def test_label_roundtrip_and_channel_layout():
    label = np.array([[0, 1, 255], [256, IGNORE_ID, 65535]], dtype=np.int64)
    data = encode_label(label)
    rgb = np.asarray(Image.open(io.BytesIO(data)))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], label % 256)
    np.testing.assert_array_equal(rgb[..., 1], label // 256)
    assert (rgb[..., 2] == 0).all()
    assert rgb[1, 1].tolist() == [232, 3, 0]  # 1000 = 232 + 3 * 256

    out = decode_label(data)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, label)


def test_encode_label_accepts_bool_and_small_ints():
    mask = np.array([[True, False]])
    np.testing.assert_array_equal(decode_label(encode_label(mask)), [[1, 0]])
    np.testing.assert_array_equal(decode_label(encode_label(np.array([[7]], dtype=np.uint8))), [[7]])


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([[-1, 0]]), r"\[-1, 0\]"),
        (np.array([[65536]]), "65536"),
        (np.zeros((2, 2), dtype=np.float32), "float32"),
        (np.zeros((2, 2, 3), dtype=np.int32), r"\(2, 2, 3\)"),
        (np.zeros((0, 4), dtype=np.int32), r"\(0, 4\)"),
    ],
)
def test_encode_label_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        encode_label(bad)


def test_decode_label_single_channel_pngs():
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 3, 200]], dtype=np.uint8)).save(buf, "PNG")
    np.testing.assert_array_equal(decode_label(buf.getvalue()), [[0, 3, 200]])
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 1000, 40000]], dtype=np.uint16)).save(buf, "PNG")
    np.testing.assert_array_equal(decode_label(buf.getvalue()), [[0, 1000, 40000]])


def test_decode_label_rejects_non_png():
    with pytest.raises(ValueError, match="not a readable label PNG"):
        decode_label(b"not a png")
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "JPEG")
    with pytest.raises(ValueError, match="not a readable label PNG"):
        decode_label(buf.getvalue())


# ---- class index -----------------------------------------------------------------------------


def test_class_index_sorted_from_names_and_from_file_text():
    assert class_index(["n02", "n01", "n03"]) == {"n01": 1, "n02": 2, "n03": 3}
    # The benchmark's class-list files are unsorted; ids still follow the sorted wnids.
    text = "n04346328\nn01532829\n\n  n12998815  \n"
    assert parse_class_list(text) == ["n04346328", "n01532829", "n12998815"]
    assert class_index(text) == {"n01532829": 1, "n04346328": 2, "n12998815": 3}
    assert class_index(text, keep_order=True) == {"n04346328": 1, "n01532829": 2, "n12998815": 3}


@pytest.mark.parametrize(
    "classes, match",
    [
        ([], "empty"),
        ("\n\n", "empty"),
        (["n01", "n01"], "duplicate class name 'n01'"),
        (["n01", "../etc"], r"'\.\./etc'"),
        (["a/b"], "'a/b'"),
        ("n01 goldfish\n", "line 1"),
        ([f"c{i}" for i in range(1000)], "1000 classes"),
    ],
)
def test_class_index_rejects_bad_lists(classes, match):
    with pytest.raises(ValueError, match=match):
        class_index(classes)


def test_class_index_allows_999_classes():
    idx = class_index([f"c{i:04d}" for i in range(999)])
    assert min(idx.values()) == 1 and max(idx.values()) == 999


def test_dataset_dir():
    assert dataset_dir("s3://bkt/data/", 50) == "s3://bkt/data/ImageNetS50"
    assert dataset_dir("/data", 919) == "/data/ImageNetS919"
    with pytest.raises(ValueError, match="0"):
        dataset_dir("/data", 0)


# ---- listing ---------------------------------------------------------------------------------

GOOD = {
    "n01/n01_1.JPEG": "validation/n01/n01_1",
    "n01/n01_2.jpg": "validation/n01/n01_2",
    "n01/n01_3.Png": "validation/n01/n01_3",
    "n02/n02_1.webp": "validation/n02/n02_1",
    "n02/sub/deep.TIFF": "validation/n02/sub/deep",
    "n02/good name.JPEG": "validation/n02/good name",  # spaces and non-ASCII letters are normal
    "n02/caf\u00e9.gif": "validation/n02/caf\u00e9",
}
IGNORED = ["n01/.DS_Store", "n01/README.txt", "n01/._n01_1.JPEG", ".hidden/x.JPEG", "n02/.tmp-ab12-n02_9.JPEG", "notes"]
REJECTED = {
    "n02/bad\x07name.JPEG": "control character",
    "n02/" + "x" * 201 + ".jpg": "longer than 200 bytes",
    "loose.JPEG": "not inside a class folder",
    "n01/n01_1.png": "duplicate id 'validation/n01/n01_1'",
}


def _write_tree(storage, split_url):
    for rel in [*GOOD, *IGNORED, *REJECTED]:
        storage.write_bytes(storage.join(split_url, rel), b"x")


@pytest.mark.parametrize("scheme", ["local", "memory", "relative"])
def test_list_split_accounts_for_every_file(tmp_path, monkeypatch, scheme):
    storage = Storage()
    if scheme == "local":
        root = str(tmp_path)
    elif scheme == "memory":
        root = f"memory://{tmp_path.name}/data"
    else:
        monkeypatch.chdir(tmp_path)
        root = "rel/data"
    split_url = storage.join(dataset_dir(root, 2), "validation")
    _write_tree(storage, split_url)

    listing = list_split(storage, root, 2, "validation")

    assert [r.id for r in listing.images] == sorted(GOOD.values())
    assert len(listing.images) + len(listing.rejected) + len(listing.ignored) == len(GOOD) + len(IGNORED) + len(
        REJECTED
    )
    for rec in listing.images:
        assert rec.split == "validation"
        assert rec.wnid == rec.id.split("/")[1]
        assert storage.read_bytes(rec.path) == b"x"  # a real, readable URL
        assert rec.path.rsplit(".", 1)[0].endswith(rec.id)
    assert sorted(u.rsplit("validation/", 1)[1] for u in listing.ignored) == sorted(IGNORED)
    reasons = {r.path.rsplit("validation/", 1)[1]: r.reason for r in listing.rejected}
    assert set(reasons) == set(REJECTED)
    for rel, expected in REJECTED.items():
        assert expected in reasons[rel]


def test_list_split_errors(tmp_path):
    storage = Storage()
    with pytest.raises(FileNotFoundError, match="ImageNetS5/test"):
        list_split(storage, str(tmp_path), 5, "test")
    with pytest.raises(ValueError, match="'val'"):
        list_split(storage, str(tmp_path), 5, "val")


def test_gt_path_for():
    rec = ImageRecord(
        id="validation/n01/n01_1", path="s3://b/d/ImageNetS5/validation/n01/n01_1.JPEG", split="validation", wnid="n01"
    )
    assert gt_path_for(rec) == "s3://b/d/ImageNetS5/validation-segmentation/n01/n01_1.png"
    rec = ImageRecord(id="test/n02/a.b", path="/d/ImageNetS5/test/n02/a.b.jpg", split="test", wnid="n02")
    assert gt_path_for(rec) == "/d/ImageNetS5/test-segmentation/n02/a.b.png"
    with pytest.raises(ValueError, match="no ground truth"):
        gt_path_for(ImageRecord(id="train/n01/x", path="/d/train/n01/x.JPEG", split="train", wnid="n01"))
    with pytest.raises(ValueError, match="does not end with its id"):
        gt_path_for(ImageRecord(id="validation/n01/x", path="/d/validation/n01/y.JPEG", split="validation", wnid="n01"))
