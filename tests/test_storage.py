import json

import pytest

from pdso_ray.storage import MANIFEST_NAME, Storage


def _roundtrip(storage: Storage, root: str) -> None:
    a = storage.join(root, "x", "a.bin")
    storage.write_bytes(a, b"\x00\x01payload")
    assert storage.read_bytes(a) == b"\x00\x01payload"
    storage.write_json(storage.join(root, "x", "sub", "b.json"), {"n": 3})
    storage.write_text(storage.join(root, "y.TXT"), "hello")
    assert storage.read_json(storage.join(root, "x", "sub", "b.json")) == {"n": 3}
    files = storage.list_files(root)
    assert files == sorted(files)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.bin", "b.json", "y.TXT"]
    assert all(f.startswith(root.split("://")[0]) or "://" not in root for f in files)
    assert [f.rsplit("/", 1)[-1] for f in storage.list_files(root, suffixes=(".txt",))] == ["y.TXT"]
    assert storage.list_files(storage.join(root, "missing")) == []
    # overwrite in place, still one file
    storage.write_bytes(a, b"new")
    assert storage.read_bytes(a) == b"new"
    assert len(storage.list_files(storage.join(root, "x"))) == 2
    # manifests
    stage = storage.join(root, "stage")
    assert storage.read_manifest(stage) is None
    storage.write_manifest(stage, {"key": "abc", "counts": {"n": 2}})
    m = storage.read_manifest(stage)
    assert m["key"] == "abc" and m["counts"] == {"n": 2} and "completed_at" in m
    assert storage.exists(storage.join(stage, MANIFEST_NAME))
    storage.remove(storage.join(root, "x"), recursive=True)
    assert not storage.exists(a)
    with pytest.raises(FileNotFoundError, match="a.bin"):
        storage.read_bytes(a)


def test_local_roundtrip(tmp_path):
    _roundtrip(Storage(), str(tmp_path / "run"))


def test_file_url_roundtrip(tmp_path):
    _roundtrip(Storage(), f"file://{tmp_path}/run")


def test_memory_roundtrip():
    _roundtrip(Storage(), "memory://pdso-test/run")


def test_s3_roundtrip_through_moto(s3_bucket):
    options, bucket = s3_bucket
    storage = Storage(options)
    _roundtrip(storage, f"{bucket}/run")
    # pyarrow view of the same bucket (what Ray Data uses)
    import pyarrow.parquet as pq
    import pyarrow as pa

    fs, path = storage.arrow_fs(f"{bucket}/tbl/part-0.parquet")
    pq.write_table(pa.table({"id": ["a", "b"]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("id").to_pylist() == ["a", "b"]


def test_local_write_is_atomic_no_temp_left(tmp_path):
    storage = Storage()
    target = str(tmp_path / "d" / "f.json")
    storage.write_json(target, {"a": 1})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.json"]
    assert json.loads((tmp_path / "d" / "f.json").read_text()) == {"a": 1}


def test_storage_pickles_without_filesystems_and_hides_secrets():
    import pickle

    storage = Storage({"s3": {"key": "K", "secret": "SECRET-VALUE"}})
    storage.fs("memory://x")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.options == storage.options and clone._cache == {}
    assert "SECRET-VALUE" not in repr(storage)
