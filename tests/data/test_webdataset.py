"""WebDataset shards in (``data.layout: webdataset``): shards written here with the ``webdataset``
package's own TarWriter and with Python's tarfile, read by our layout — every sample accounted
for, a corrupt member, a truncated shard, a missing mask, a duplicate key, splits, classes."""

import io
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pdso_ray.config import DataConfig
from pdso_ray.data.imagenet_s import decode_label, encode_label
from pdso_ray.data.layouts import build_layout
from pdso_ray.data.members import read_many
from pdso_ray.data.tar_shards import group_samples, scan_tar, split_member_name, tar_bytes
from pdso_ray.stages.read_decode import ImageReader
from pdso_ray.storage import Storage, parse_range_url


def _jpeg(value: int, size=(12, 16)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _mask(value: int, size=(12, 16)) -> bytes:
    return encode_label(np.full(size, value, dtype=np.int32))


def _layout(root, **data) -> tuple:
    storage = Storage()
    return storage, build_layout(DataConfig(root=str(root), classes=3, layout="webdataset", **data), storage)


def _tar(path, members):
    """A shard from ``(name, bytes)`` members in this order, as GNU tar would write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members)[0])


# ---- the conventions ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("a/b/c.jpg", ("a/b/c", "jpg")), ("x.seg.png", ("x", "seg.png")), ("dir.v2/img.JPG", ("dir.v2/img", "jpg")),
    ("k.CLS", ("k", "cls")), ("noext", None), (".hidden.jpg", None), ("d/.x.jpg", ("d/", "x.jpg"))])
def test_member_names_split_into_key_and_extension_as_webdataset_does(name, expected):
    assert split_member_name(name) == expected
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    assert (None if key is None else (key, ext.lower())) == expected


def test_tar_index_points_at_each_members_bytes_and_samples_group_consecutive_members():
    members = [("a.jpg", b"A" * 700), ("a.cls", b"2"), ("b.jpg", b"B" * 10), ("__index__", b"meta"),
               ("c.png", b"C"), ("c.json", b"{}"), ("b.jpg", b"again")]
    data, written = tar_bytes(members)
    scan = scan_tar(io.BytesIO(data), len(data))
    assert scan.problem is None and scan.skipped == 1  # the metadata member
    assert [data[m.offset:m.end] for m in scan.members] == [b for n, b in members if n != "__index__"]
    assert scan.texts == {"a.cls": b"2"}
    samples, keyless = group_samples(scan.members)
    assert [(s.key, sorted(s.members), s.problem is None) for s in samples] == [
        ("a", ["cls", "jpg"], True), ("b", ["jpg"], True), ("c", ["json", "png"], True), ("b", ["jpg"], False)]
    assert "duplicate key 'b'" in samples[-1].problem and keyless == []


@pytest.mark.parametrize("cut, problem", [
    (3000, "truncated: member 'b.jpg'"),      # inside b.jpg's data
    (2300, "corrupt or truncated tar header"),  # inside b.jpg's header (bytes 2048-2560)
    (2048, "without tar's end-of-archive blocks"),  # exactly between two members
])
def test_a_truncated_shard_keeps_its_complete_members_and_says_where_it_ends(cut, problem):
    data, _ = tar_bytes([("a.jpg", b"A" * 1500), ("b.jpg", b"B" * 2000)])
    scan = scan_tar(io.BytesIO(data[:cut]), cut)
    assert [m.name for m in scan.members] == ["a.jpg"]
    assert problem in scan.problem


# ---- the layout -----------------------------------------------------------------------------------
@pytest.fixture
def shards(tmp_path):
    """Two splits written by webdataset's TarWriter (keys with slashes and dots in folders, integer
    and named classes, masks on validation except one) and a bad train shard written by hand."""
    root = tmp_path / "shards"
    (root / "train").mkdir(parents=True)
    (root / "validation").mkdir()
    with wds.TarWriter(str(root / "train" / "000000.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"cam.a/img{i:03d}", "jpg": _jpeg(i), "cls": i % 2, "json": {"i": i}})
    with wds.TarWriter(str(root / "validation" / "000000.tar")) as sink:
        for i in range(3):
            sample = {"__key__": f"v{i}", "jpeg": _jpeg(10 + i), "cls": "tabby cat"}
            if i != 1:  # a missing mask
                sample["seg.png"] = _mask(i + 1)
            sink.write(sample)
    bad = [("k0.jpg", _jpeg(20)), ("k1.jpg", b"\xff\xd8\xff\xe0 this is no JPEG"),  # a corrupt member
           ("k2.cls", b"1"), ("k2.seg.png", _mask(1)),                               # no image
           ("k0.png", _jpeg(21)),                                                   # a duplicate key
           ("k3.txt", b"caption only"),                                             # ignored
           ("k4.jpg", _jpeg(22)), ("k4.jpg", _jpeg(23)),                             # a duplicate member
           ("../k5.jpg", _jpeg(24)),                                                # unsafe key
           ("k6.jpg", _jpeg(25)), ("k7.jpg", _jpeg(26))]                            # k7: cut below
    data, members = tar_bytes(bad)
    (root / "train" / "000001.tar").write_bytes(data[: members[-1].offset + 100])
    (root / "train" / "README.md").write_text("not a shard")
    return root


def test_every_sample_is_listed_or_rejected_with_shard_and_key(shards):
    storage, layout = _layout(shards)
    assert layout.train_split() == "train"
    listing = layout.list_split(storage, "train")
    ids = [r.id for r in listing.images]
    assert ids == [f"train/000000/cam.a/img{i:03d}" for i in range(4)] + \
        ["train/000001/k0", "train/000001/k1", "train/000001/k6"]
    assert [r.wnid for r in listing.images] == ["0", "1", "0", "1", "", "", ""]
    reasons = {(r.image_id, r.reason.split(" (")[0]) for r in listing.rejected}
    shard = str(shards / "train" / "000001.tar")
    assert all(shard in r.reason for r in listing.rejected)
    assert any(i == "train/000001/k2" and why.startswith("no image member") for i, why in reasons)
    assert any("beside its cls, seg.png" in r.reason for r in listing.rejected)
    assert any(i == "train/000001/k0" and "duplicate key 'k0'" in why for i, why in reasons)
    assert any(i == "train/000001/k4" and "duplicate member" in why for i, why in reasons)
    assert any(i is None and "path component '..'" in why for i, why in reasons)
    assert any(i == "train/000001/k7" and "truncated shard" in why for i, why in reasons)
    assert len(listing.rejected) == 5
    # ignored: the caption-only sample and a file that is not a shard (the json members of image
    # samples belong to them)
    assert [i.rsplit("/", 1)[-1] for i in listing.ignored] == ["000001.tar#bytes=6656-6668&member=k3.txt",
                                                               "README.md"]
    # the corrupt member is rejected when read, naming shard and member
    reader = ImageReader(storage, str(shards), 1 << 20, 1 << 24)
    results = reader.read_batch([r.path for r in listing.images])
    assert [r.ok for r in results] == [True] * 4 + [True, False, True]
    assert shard in results[5].reason and "k1.jpg" in results[5].reason
    assert results[0].image.shape == (12, 16, 3)


def test_ground_truth_comes_from_seg_png_and_a_missing_mask_is_noted(shards):
    storage, layout = _layout(shards)
    (info, test) = layout.eval_splits(storage)
    assert info.split == "validation" and info.present and "1 validation images have no seg.png" in info.note
    assert not test.present and "no test split" in test.note
    gt = layout.gt_dir(storage, "validation")
    assert sorted(gt) == ["000000/v0.png", "000000/v2.png"]
    assert decode_label(storage.read_bytes(gt["000000/v2.png"])).max() == 3
    listing = layout.list_split(storage, "validation")
    assert {r.wnid for r in listing.images} == {"tabby cat"}


def test_shards_named_by_split_or_without_splits(tmp_path):
    named = tmp_path / "named"
    _tar(named / "train-0000.tar", [("a.jpg", _jpeg(1))])
    _tar(named / "validation-0000.tar", [("b.jpg", _jpeg(2)), ("b.seg.png", _mask(1))])
    _tar(named / "other.tar", [("c.jpg", _jpeg(3))])
    storage, layout = _layout(named)
    assert [r.id for r in layout.list_split(storage, "train").images] == ["train/train-0000/a"]
    assert layout.list_split(storage, "train").ignored == [str(named / "other.tar")]
    assert list(layout.gt_dir(storage, "validation")) == ["validation-0000/b.png"]
    flat = tmp_path / "flat"
    _tar(flat / "part" / "000.tar", [("a.jpg", _jpeg(1))])
    storage, layout = _layout(flat)
    assert layout.train_split() == "all" and [i.split for i in layout.eval_splits(storage)] == ["all"]
    assert [r.id for r in layout.list_split(storage, "all").images] == ["all/part/000/a"]


def test_neighbouring_members_are_read_in_one_request(shards, monkeypatch):
    storage, layout = _layout(shards)
    records = layout.list_split(storage, "train").images[:4]
    calls = []
    fs = storage.fs(str(shards))[0]
    real = fs.cat_file
    monkeypatch.setattr(fs, "cat_file", lambda path, start=None, end=None, **kw: calls.append((start, end)) or
                        real(path, start=start, end=end, **kw))
    data = read_many(storage, [r.path for r in records])
    assert len(calls) == 1
    assert all(d == storage.read_bytes(r.path) for d, r in zip(data, records))
    assert parse_range_url(records[0].path)[3] == "cam.a/img000.jpg"


def test_a_shard_that_is_not_a_tar_is_one_rejection(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "000.tar").write_bytes(b"definitely not a tar file" * 40)
    storage, layout = _layout(root)
    listing = layout.list_split(storage, "all")
    assert listing.images == [] and len(listing.rejected) == 1
    assert "000.tar" in listing.rejected[0].reason and listing.rejected[0].image_id is None


def test_gnu_tar_with_long_names_reads_the_same(tmp_path):
    root = tmp_path / "gnu"
    root.mkdir()
    key = "deep/" + "x" * 120 + "/" + "y" * 90
    with tarfile.open(root / "a.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in ((f"{key}.jpg", _jpeg(5)), (f"{key}.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    storage, layout = _layout(root)
    (record,) = layout.list_split(storage, "all").images
    assert record.id == f"all/a/{key}" and record.wnid == "7"
    assert storage.read_bytes(record.path) == _jpeg(5)
    assert os.path.getsize(root / "a.tar") > 0


def test_a_shards_index_file_replaces_reading_its_headers_while_it_matches_the_shard(tmp_path):
    from pdso_ray.data.sources import index_url
    from pdso_ray.data.webdataset import write_shard_index

    root = tmp_path / "indexed"
    data, members = tar_bytes([("a.jpg", _jpeg(1)), ("a.cls", b"4"), ("b.jpg", _jpeg(2))])
    shard = root / "000.tar"
    _tar(shard, [("a.jpg", _jpeg(1)), ("a.cls", b"4"), ("b.jpg", _jpeg(2))])
    storage = Storage()
    write_shard_index(storage, str(shard), len(data), members, {"a.cls": b"4"})
    assert os.path.exists(index_url(str(shard))) and index_url(str(shard)).endswith("/.000.tar.idx.parquet")
    storage, layout = _layout(root)
    listing = layout.list_split(storage, "all")
    assert [(r.id, r.wnid) for r in listing.images] == [("all/000/a", "4"), ("all/000/b", "")]
    assert listing.ignored == []  # the index file is not counted as a stray file
    # an index the listing trusts is what it reads: a doctored one moves the image...
    doctored = [m if m.name != "b.jpg" else type(m)(m.name, members[0].offset, members[0].size) for m in members]
    write_shard_index(storage, str(shard), len(data), doctored, {})
    assert _layout(root)[1].list_split(storage, "all").images[1].path == listing.images[0].path.replace("a.jpg", "b.jpg")
    # ...and one made for a shard of another size is not trusted: the headers are read
    write_shard_index(storage, str(shard), len(data) + 1, doctored, {})
    assert [r.path for r in _layout(root)[1].list_split(storage, "all").images] == [r.path for r in listing.images]


def test_compressed_shards_are_named_in_the_error(tmp_path):
    root = tmp_path / "gz"
    root.mkdir()
    (root / "000.tar.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(FileNotFoundError, match="compressed shards .*000.tar.gz.*unpack them"):
        _layout(root)
