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


# ---- errors name the object; failed writes leave nothing; bounded image reads ------------------
def test_a_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    import os

    storage = Storage()
    target = tmp_path / "d" / "f.bin"

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match=f"writing {target} failed.*No space left"):
        storage.write_bytes(str(target), b"payload")
    assert list((tmp_path / "d").iterdir()) == []


def test_permanent_s3_errors_name_the_object(s3_bucket, monkeypatch):
    from pdso_ray.storage import StorageError

    options, bucket = s3_bucket
    storage = Storage(options)
    url = f"{bucket}/data/img 1.jpg"
    storage.write_bytes(url, b"jpeg bytes")

    def unavailable(path, *args, **kwargs):  # what s3fs raises once botocore's retries are spent
        raise OSError(16, "Service Unavailable")

    fs, _ = storage.fs(url)
    monkeypatch.setattr(fs, "cat_file", unavailable)
    with pytest.raises(StorageError, match=r"reading s3://t-test-permanent-s3-errors-name-the-object/data/img 1\.jpg "
                                           r"failed: OSError: \[Errno 16\] Service Unavailable"):
        storage.read_bytes(url)
    with pytest.raises(StorageError, match="img 1.jpg"):
        storage.read_image_bytes(url, 10**6)


def test_image_reads_are_bounded(tmp_path):
    import os

    from pdso_ray.storage import UnreadableFile

    storage = Storage()
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x" * 100)
    os.symlink(root / "ok.jpg", root / "inside.jpg")
    (tmp_path / "secret.jpg").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.jpg", root / "outside.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "pipe.jpg")
    assert storage.read_image_bytes(str(root / "ok.jpg"), 100, root=str(root)) == b"x" * 100
    assert storage.read_image_bytes(str(root / "inside.jpg"), 100, root=str(root)) == b"x" * 100
    with pytest.raises(UnreadableFile, match="larger than 99 bytes"):
        storage.read_image_bytes(str(root / "ok.jpg"), 99, root=str(root))
    with pytest.raises(UnreadableFile, match="outside the data root"):
        storage.read_image_bytes(str(root / "outside.jpg"), 100, root=str(root))
    with pytest.raises(UnreadableFile, match="outside the data root"):
        storage.read_image_bytes(str(root / "zero.jpg"), 100, root=str(root))
    with pytest.raises(UnreadableFile, match="not a regular file"):  # never blocks on the FIFO
        storage.read_image_bytes(str(root / "pipe.jpg"), 100, root=str(root))
    with pytest.raises(UnreadableFile, match="not a regular file"):  # /dev/zero inside no root
        storage.read_image_bytes("/dev/zero", 100)


def test_create_exclusive_local_and_s3(tmp_path, s3_bucket):
    options, bucket = s3_bucket
    for storage, url in ((Storage(), str(tmp_path / "lease.json")),
                         (Storage(options), f"{bucket}/run/lease.json")):
        assert storage.create_exclusive(url, b"first") is True
        assert storage.create_exclusive(url, b"second") is False
        assert storage.read_bytes(url) == b"first"


def test_list_relative_skips_hidden_names(tmp_path):
    storage = Storage()
    for rel in ("a/x.png", "a/.tmp-1-y.png", ".hidden/z.png", "b c/\u00e9.png", "a/n.txt"):
        storage.write_bytes(str(tmp_path / rel), b"1")
    assert sorted(storage.list_relative(str(tmp_path), ".png")) == ["a/x.png", "b c/\u00e9.png"]


def test_the_retry_budget_is_the_configs(tmp_path):
    """An object store that never answers: a read fails within the budget storage.retries x
    storage.timeout_s that the config names (plus backoff), naming the URL."""
    import socket
    import time

    from pdso_ray.config import load_config
    from pdso_ray.storage import StorageError

    silent = socket.socket()  # accepts connections, never answers: every attempt times out
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    cfg = load_config(overrides=["data.classes=2", f"storage.s3.endpoint_url={endpoint}", "storage.s3.key=k",
                                 "storage.s3.secret=s", "storage.retries=2", "storage.timeout_s=1"])
    s3 = cfg.storage_options()["s3"]
    assert s3["config_kwargs"] == {"connect_timeout": 1.0, "read_timeout": 1.0,
                                   "retries": {"max_attempts": 2, "mode": "adaptive"}}
    started = time.monotonic()
    with pytest.raises(StorageError, match="s3://bucket/key"):
        Storage(cfg.storage_options()).read_bytes("s3://bucket/key")
    assert time.monotonic() - started < 30  # 2 attempts x 1 s, and s3fs's 2 tries around them
    silent.close()


def test_range_urls_name_a_members_bytes_and_neighbours_share_a_request(tmp_path, s3_bucket):
    from pdso_ray.storage import ShortRead, merge_ranges, parse_range_url, range_url

    url = range_url("s3://b/dir#1/x.tar", 512, 1536, "a#b&c/k.jpg")
    assert parse_range_url(url) == ("s3://b/dir#1/x.tar", 512, 1536, "a#b&c/k.jpg")
    assert parse_range_url("/data/photo #1.jpg") is None
    # neighbours within the gap merge, a far range gets its own request, order is kept
    assert merge_ranges([(2000, 2100), (0, 1000), (10**9, 10**9 + 5)], gap=1024) == [
        (0, 2100, [1, 0]), (10**9, 10**9 + 5, [2])]
    assert merge_ranges([(0, 10), (20, 30)], gap=100, span=15) == [(0, 10, [0]), (20, 30, [1])]
    options, bucket = s3_bucket
    for storage, root in ((Storage(), str(tmp_path)), (Storage(options), bucket)):
        blob = bytes(range(256)) * 40
        storage.write_bytes(f"{root}/blob.bin", blob)
        spans = [(3000, 3100), (10, 20), (500, 510)]
        assert storage.read_ranges(f"{root}/blob.bin", spans) == [blob[s:e] for s, e in spans]
        assert storage.read_bytes(range_url(f"{root}/blob.bin", 7, 9)) == blob[7:9]
        assert storage.exists(range_url(f"{root}/blob.bin", 7, 9))
        assert storage.read_image_bytes(range_url(f"{root}/blob.bin", 7, 9), 10, root=root) == blob[7:9]
        with pytest.raises(ShortRead, match="shorter than its index"):
            storage.read_bytes(range_url(f"{root}/blob.bin", 10000, 10300))
