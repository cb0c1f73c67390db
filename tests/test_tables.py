"""Parquet artifacts: readers ignore temporary and empty leftovers, so they never change a result."""

import pyarrow as pa

from pdso_ray.storage import Storage
from pdso_ray.tables import count_rows, parquet_files, read_folder, shard_name, write_table


def test_planted_temp_and_empty_files_do_not_change_what_is_read(tmp_path):
    storage = Storage()
    folder = str(tmp_path / "features")
    ids = [f"train/n01/img_{i}" for i in range(5)]
    write_table(storage, f"{folder}/{shard_name(ids)}", pa.table({"id": ids}))
    real = parquet_files(storage, folder)
    # A complete copy left under a temporary name, an empty file from a full disk, a hidden file.
    (tmp_path / "features" / f".tmp-0123-{shard_name(ids)}").write_bytes(open(real[0], "rb").read())
    (tmp_path / "features" / "part-0000000000.parquet").write_bytes(b"")
    (tmp_path / "features" / ".DS_Store.parquet").write_bytes(b"junk")
    assert parquet_files(storage, folder) == real
    assert count_rows(storage, folder) == 5
    assert read_folder(storage, folder).column("id").to_pylist() == ids


def test_id_order_sorts_the_rows_of_all_files_by_id(tmp_path):
    from pdso_ray.tables import id_order

    storage = Storage()
    files = [str(tmp_path / "b.parquet"), str(tmp_path / "a.parquet")]
    write_table(storage, files[0], pa.table({"id": ["train/n2/x", "train/n1/z"]}))
    write_table(storage, files[1], pa.table({"id": ["train/n1/a", "train/n3/b", "train/n1/y"]}))
    # global rows: 0 n2/x, 1 n1/z, 2 n1/a, 3 n3/b, 4 n1/y
    assert id_order(storage, files).tolist() == [2, 4, 1, 0, 3]
