"""PNG outputs as files or shards (``output_format``), and make-shards: what the rest of the
pipeline (evaluate, export, finetune) reads back, and what the ``webdataset`` package reads."""

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pdso_ray.config import DataConfig, load_config
from pdso_ray.data.imagenet_s import decode_label, encode_label
from pdso_ray.data.layouts import build_layout
from pdso_ray.data.make_shards import PLAN_FILE, make_shards, shard_key
from pdso_ray.data.png_sets import PngOutputs, png_files
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.evaluation import evaluate_dirs
from pdso_ray.storage import Storage


def _label(value: int) -> bytes:
    return encode_label(np.full((5, 7), value, dtype=np.int32))


@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_png_outputs_read_back_the_same_in_either_form(tmp_path, output_format):
    storage = Storage()
    folder = str(tmp_path / "predictions" / "validation")
    ids = ["validation/n01/a", "validation/n01/b.v2", "validation/n02/c"]
    out = PngOutputs(storage, output_format)
    for k, image_id in enumerate(ids):
        out.add(folder, image_id, _label(k + 1))
    urls = out.flush({i: {"height": 5, "width": 7} for i in ids})
    found = png_files(storage, folder)
    assert sorted(found) == ["n01/a.png", "n01/b.v2.png", "n02/c.png"]
    assert [decode_label(storage.read_bytes(found[r])).max() for r in sorted(found)] == [1, 2, 3]
    assert [urls[(folder, i)] for i in ids] == [found[r] for r in sorted(found)]
    names = sorted(os.listdir(folder))
    if output_format == "files":
        assert names == ["n01", "n02"]
        return
    (tar,) = [n for n in names if n.endswith(".tar")]
    assert names == sorted([tar, tar[:-4] + ".parquet"])
    index = pq.read_table(os.path.join(folder, tar[:-4] + ".parquet")).to_pylist()
    assert [(r["id"], r["member"], r["height"]) for r in index] == [
        (i, i.split("/", 1)[1] + ".png", 5) for i in ids]
    # WebDataset readers see one sample per image, the PNG under the image's key
    samples = list(wds.WebDataset(os.path.join(folder, tar), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["n01/a", "n01/b", "n02/c"]  # a dot starts the extension
    assert decode_label(samples[2]["png"]).max() == 3
    # a shard whose index is missing (interrupted before it) does not count
    os.remove(os.path.join(folder, tar[:-4] + ".parquet"))
    assert png_files(storage, folder) == {}


def test_evaluate_reads_prediction_shards_like_files(tmp_path):
    storage = Storage()
    gt = tmp_path / "gt"
    for k, rel in enumerate(["n01/a", "n01/b", "n02/c"]):
        (gt / rel).parent.mkdir(parents=True, exist_ok=True)
        (gt / f"{rel}.png").write_bytes(_label(k % 2 + 1))
    results = []
    for output_format in ("files", "webdataset"):
        folder = str(tmp_path / output_format)
        out = PngOutputs(storage, output_format)
        for k, rel in enumerate(["n01/a", "n01/b", "n02/c"]):
            out.add(folder, f"validation/{rel}", _label(2 - k % 2))
        out.flush()
        results.append(evaluate_dirs(folder, str(gt), 2, progress=False))
    assert results[0].miou == results[1].miou and results[0].match == results[1].match == {0: 0, 1: 2, 2: 1}
    assert results[0].iou[1:] == results[1].iou[1:] and min(results[0].iou[1:]) > 99.99


def test_make_shards_keeps_ids_classes_and_masks_and_resumes(tmp_path):
    storage = Storage()
    tree = str(tmp_path / "tree")
    make_demo_dataset(tree, classes=2, train_per_class=3, val_per_class=2, test_per_class=1)
    dst = str(tmp_path / "shards")
    result = make_shards(storage, tree, dst, images_per_shard=4)
    assert (result.written, result.skipped, result.images, result.rejected) == (2 + 1 + 1, 0, 12, 0)
    source = build_layout(DataConfig(root=tree, classes=2), storage)
    shards = build_layout(DataConfig(root=dst, classes=2, layout="webdataset"), storage)
    for split in ("train", "validation", "test"):
        before, after = source.list_split(storage, split).images, shards.list_split(storage, split).images
        # ids: the shard's name, then the image's id below its split (the sample key)
        assert [r.id.split("/", 1)[1].split("/", 1)[1] for r in after] == [r.id.split("/", 1)[1] for r in before]
        assert [r.wnid for r in after] == [r.wnid for r in before]
        assert [shards.source_name(a.id) for a in after] == [source.source_name(b.id) for b in before]
        assert [storage.read_bytes(a.path) for a in after] == [storage.read_bytes(b.path) for b in before]
    gt_before = png_files(storage, source.gt_dir(storage, "validation"))
    gt_after = shards.gt_dir(storage, "validation")
    assert sorted(r.split("/", 1)[1] for r in gt_after) == sorted(gt_before)
    assert all(storage.read_bytes(gt_after[r]) == storage.read_bytes(gt_before[r.split("/", 1)[1]]) for r in gt_after)
    # each shard's index beside it gives the same listing as reading the shard
    assert os.path.exists(os.path.join(dst, "train", ".000000.tar.idx.parquet"))
    for index in ("train/.000000.tar.idx.parquet", "train/.000001.tar.idx.parquet"):
        os.remove(os.path.join(dst, index))
    scanned = build_layout(DataConfig(root=dst, classes=2, layout="webdataset"), storage)
    assert scanned.list_split(storage, "train").images == shards.list_split(storage, "train").images
    # resumable: a missing shard is written again, the others are kept
    os.remove(os.path.join(dst, "train", "000001.tar"))
    kept = os.path.getmtime(os.path.join(dst, "train", "000000.tar"))
    again = make_shards(storage, tree, dst, images_per_shard=4)
    assert (again.written, again.skipped) == (1, 3)
    assert os.path.getmtime(os.path.join(dst, "train", "000000.tar")) == kept
    with pytest.raises(ValueError, match="another conversion"):
        make_shards(storage, tree, dst, images_per_shard=3)
    assert json.loads((tmp_path / "shards" / PLAN_FILE).read_text())["images_per_shard"] == 4


def test_make_shards_from_a_folder_escapes_dots_and_reencodes_odd_formats(tmp_path):
    storage = Storage()
    src = tmp_path / "photos"
    (src / "cats").mkdir(parents=True)
    Image.fromarray(np.full((6, 8, 3), 100, np.uint8)).save(src / "cats" / "tom.v2.jpg")
    Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(src / "cats" / "old.bmp")
    (src / "notes.txt").write_text("not an image")
    dst = str(tmp_path / "out")
    result = make_shards(storage, str(src), dst, images_per_shard=10, folder_is_class=True)
    assert result.images == 2
    shards = build_layout(load_config(None, [f"data.root={dst}", "data.layout=webdataset",
                                             "data.classes=1"]).data, storage)
    records = shards.list_split(storage, "all").images
    assert [r.id for r in records] == ["all/000000/cats/old", "all/000000/cats/tom%2Ev2"]
    assert [r.wnid for r in records] == ["cats", "cats"]
    old = Image.open(io.BytesIO(storage.read_bytes(records[0].path)))
    assert old.format == "PNG" and np.asarray(old).max() == 200
    assert shards.source_name(records[1].id) == "cats/tom.v2"
    assert shard_key(records[1]) == "000000/cats/tom%252Ev2"  # a key of a key is escaped again
