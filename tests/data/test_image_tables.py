"""Parquet image tables in (``data.layout: parquet``): tables written here with pyarrow (several
row-group sizes), pandas and in Hugging Face's image-struct form, read by our layout — bytes and
paths, ids given or derived, classes, masks, splits by folder, file name or column, and every row
accounted for."""

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pdso_ray.config import DataConfig
from pdso_ray.data.imagenet_s import decode_label, encode_label
from pdso_ray.data.layouts import build_layout
from pdso_ray.data.members import read_many
from pdso_ray.stages.read_decode import ImageReader
from pdso_ray.storage import Storage


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _layout(root):
    storage = Storage()
    return storage, build_layout(DataConfig(root=str(root), classes=2, layout="parquet"), storage)


@pytest.mark.parametrize("row_group_size", [1, 3, 1000])
def test_image_bytes_with_ids_classes_and_masks_in_any_row_groups(tmp_path, row_group_size):
    root = tmp_path / "tables"
    (root / "train").mkdir(parents=True)
    (root / "validation").mkdir()
    pq.write_table(pa.table({"id": [f"img{i}" for i in range(7)], "image": [_png(i) for i in range(7)],
                             "cls": [i % 3 for i in range(7)]}),
                   root / "train" / "part-0.parquet", row_group_size=row_group_size)
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [_png(10), _png(11), _png(12)],
                             "seg": [encode_label(np.full((6, 9), 2)), None, encode_label(np.ones((6, 9), np.int32))]}),
                   root / "validation" / "v.parquet", row_group_size=row_group_size)
    storage, layout = _layout(root)
    listing = layout.list_split(storage, "train")
    assert [r.id for r in listing.images] == [f"train/img{i}" for i in range(7)]
    assert [r.wnid for r in listing.images] == ["0", "1", "2", "0", "1", "2", "0"]
    data = read_many(storage, [r.path for r in listing.images])
    assert data == [_png(i) for i in range(7)]
    (val, test) = layout.eval_splits(storage)
    assert sorted(val.gt_dir) == ["a.png", "c.png"] and "1 validation images have no seg value" in val.note
    assert decode_label(read_many(storage, [val.gt_dir["a.png"]])[0]).max() == 2
    assert not test.present


def test_paths_relative_to_the_table_pandas_written_and_derived_ids(tmp_path):
    root = tmp_path / "by path"
    (root / "images" / "sub").mkdir(parents=True)
    (root / "images" / "sub" / "x.png").write_bytes(_png(1))
    (root / "images" / "y.jpg.png").write_bytes(_png(2))
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(3))
    pd.DataFrame({"path": ["images/sub/x.png", "images/y.jpg.png", "../outside.png", str(outside), None],
                  "label": ["cat", "dog", "cat", "dog", "cat"]}).to_parquet(root / "t.parquet")
    storage, layout = _layout(root)
    listing = layout.list_split(storage, "all")
    assert [r.id for r in listing.images] == ["all/images/sub/x", "all/images/y.jpg", "all/t/00000003"]
    assert [r.wnid for r in listing.images] == ["cat", "dog", "dog"]
    reasons = sorted(r.reason for r in listing.rejected)
    assert len(reasons) == 2 and "no image bytes and no path" in reasons[0] and "'..'" in reasons[1]
    assert all(f"table {root / 't.parquet'}" in r for r in reasons)
    reader = ImageReader(storage, str(root), 1 << 20, 1 << 24)
    results = reader.read_batch([r.path for r in listing.images])
    assert [r.ok for r in results] == [True, True, False]  # an absolute path outside data.root
    assert "outside the data root" in results[2].reason


def test_hugging_face_image_structs_split_files_and_a_split_column(tmp_path):
    hf = tmp_path / "hf" / "data"
    hf.mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, n in (("train", 4), ("validation", 2)):
        rows = [{"bytes": _png(i), "path": f"{i}.png"} for i in range(n)]
        pq.write_table(pa.table({"image": pa.array(rows, image), "label": list(range(n))}),
                       hf / f"{split}-00000-of-00001.parquet", row_group_size=3)
    storage, layout = _layout(tmp_path / "hf")
    listing = layout.list_split(storage, "train")
    assert [r.id for r in listing.images] == [f"train/data/train-00000-of-00001/{i:08d}" for i in range(4)]
    assert read_many(storage, [r.path for r in listing.images]) == [_png(i) for i in range(4)]
    assert len(layout.list_split(storage, "validation").images) == 2
    # one table, a split column; rows of another split are ignored, and counted
    col = tmp_path / "col"
    col.mkdir()
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "jpg": [_png(1), _png(2), None, _png(4)],
                             "split": ["train", "validation", "train", "extra"]}), col / "all.parquet")
    storage, layout = _layout(col)
    train = layout.list_split(storage, "train")
    assert layout.train_split() == "train" and [r.id for r in train.images] == ["train/a", "train/c"]
    assert len(train.ignored) == 1
    assert [r.id for r in layout.list_split(storage, "validation").images] == ["validation/b"]
    reader = ImageReader(storage, str(col), 1 << 20, 1 << 24)
    assert [r.ok for r in reader.read_batch([r.path for r in train.images])] == [True, False]
    assert "no image bytes" in reader.read_batch([train.images[1].path])[0].reason


def test_duplicate_ids_and_unreadable_tables_are_rejected(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "image": [_png(1), _png(2)]}), root / "1.parquet")
    pq.write_table(pa.table({"id": ["b", "../c"], "image": [_png(3), _png(4)]}), root / "2.parquet")
    (root / "3.parquet").write_bytes(b"PAR1 broken")
    storage, layout = _layout(root)
    listing = layout.list_split(storage, "all")
    assert [r.id for r in listing.images] == ["all/a", "all/b"]
    reasons = sorted(r.reason for r in listing.rejected)
    assert len(reasons) == 3
    assert any("duplicate id 'all/b'" in r for r in reasons)
    assert any("path component '..'" in r and "2.parquet, row 1" in r for r in reasons)
    assert any(r.startswith(f"unreadable table {root / '3.parquet'}") for r in reasons)


def test_tables_and_their_images_read_from_s3(s3_bucket):
    options, bucket = s3_bucket
    storage = Storage(options)
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "image": [_png(1), None, _png(3)],
                             "path": [None, "images/b.png", None]}), buf, row_group_size=2)
    storage.write_bytes(f"{bucket}/t/train/x.parquet", buf.getvalue())
    storage.write_bytes(f"{bucket}/t/train/images/b.png", _png(2))
    layout = build_layout(DataConfig(root=f"{bucket}/t", classes=2, layout="parquet"), storage)
    records = layout.list_split(storage, "train").images
    assert [r.id for r in records] == ["train/a", "train/b", "train/c"]
    assert read_many(storage, [r.path for r in records]) == [_png(1), _png(2), _png(3)]  # b: by its path
