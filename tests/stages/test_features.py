"""Stage 1 on Ray: accounting of every image (odd, corrupt, ignored files), fault tolerance,
resume, and the step classes called directly without Ray."""

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pdso_ray.config import load_config
from pdso_ray.data.synthetic import make_demo_dataset, odd_and_corrupt_samples
from pdso_ray.pipeline import run_pipeline
from pdso_ray.stages.base import Resources, RunContext
from pdso_ray.stages.features import DinoFeatures, FeaturesStage, WriteShards
from pdso_ray.stages.read_decode import DeviceDecode, ImageReader, ReadDecode
from pdso_ray.storage import Storage
from pdso_ray.tables import read_folder

CLASSES = 3


def _cfg(root, output, *extra):
    return load_config("jobs/configs/demo.yaml", [
        f"data.root={root}", f"output={output}", f"data.classes={CLASSES}",
        "features.batch_size=4", *extra])


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    """3 classes × 3 clean images, plus every odd/corrupt sample in class 0, plus non-images."""
    root = str(tmp_path_factory.mktemp("odd") / "data")
    make_demo_dataset(root, classes=CLASSES, train_per_class=3, val_per_class=1, test_per_class=1)
    class_dir = os.path.join(root, f"ImageNetS{CLASSES}", "train", "n00000001")
    samples = odd_and_corrupt_samples()
    for name, sample in samples.items():
        with open(os.path.join(class_dir, name), "wb") as f:
            f.write(sample.data)
    for junk in (".DS_Store", "README.txt"):
        with open(os.path.join(class_dir, junk), "wb") as f:
            f.write(b"not an image")
    return root, samples


def _odd_batch(root, samples):
    """The odd and corrupt samples' names, and a batch of them as the listing would stream it."""
    class_dir = os.path.join(root, f"ImageNetS{CLASSES}", "train", "n00000001")
    names = sorted(samples)
    return names, {"id": np.asarray([f"train/n00000001/{n}" for n in names], dtype=object),
                   "path": np.asarray([os.path.join(class_dir, n) for n in names], dtype=object),
                   "split": np.asarray(["train"] * len(names), dtype=object)}


def test_steps_without_ray(odd_dataset, tmp_path):
    root, samples = odd_dataset
    cfg = _cfg(root, str(tmp_path / "run"))
    storage = Storage()
    names, batch = _odd_batch(root, samples)
    reader = ImageReader.from_config(storage, cfg.data)
    decoded = ReadDecode(reader, 64, Resources(), square=True)(batch)
    assert decoded["image"].shape == (len(names), 64, 64, 3)
    for name, reason in zip(names, decoded["reason"]):
        assert (reason == "") == samples[name].valid, (name, reason)
    step = DinoFeatures(cfg, storage)
    step.setup()
    out = step(decoded)
    ok = decoded["reason"] == ""
    norms = np.linalg.norm(out["feat"], axis=1)
    np.testing.assert_allclose(norms[ok], 1.0, rtol=1e-4)
    assert np.all(norms[~ok] == 0)
    written = WriteShards(storage, str(tmp_path / "f"), str(tmp_path / "r"), 64)(out)
    assert list(written["id"]) == list(batch["id"]) and list(written["reason"]) == list(decoded["reason"])
    assert read_folder(storage, str(tmp_path / "f")).num_rows == ok.sum()
    rejected = read_folder(storage, str(tmp_path / "r"))
    assert sorted(rejected.column("id").to_pylist()) == sorted(batch["id"][~ok])
    assert all(rejected.column("reason").to_pylist())


def test_decoding_in_the_model_step_gives_the_same_rejections_and_close_features(odd_dataset, tmp_path):
    """The GPU path (bytes to the model's actor, batched decode there), run on the CPU: the same
    images are rejected, and the features are those of the CPU path within resize tolerance (it
    resizes the full-size decode on the device, the CPU path a DCT-downscaled one in PIL)."""
    root, samples = odd_dataset
    cfg = _cfg(root, str(tmp_path / "run"))
    storage = Storage()
    _, batch = _odd_batch(root, samples)
    reader = ImageReader.from_config(storage, cfg.data)
    size = cfg.models.dino.image_size
    on_cpu = DinoFeatures(cfg, storage)
    in_model = DinoFeatures(cfg, storage, DeviceDecode(cfg.data.max_pixels, size))
    for step in (on_cpu, in_model):
        step.setup()
    expected = on_cpu(ReadDecode(reader, size, Resources(), square=True)(batch))
    encoded = ReadDecode(reader, size, Resources(), square=True, decode=False)(batch)
    assert "image" not in encoded and all(isinstance(d, bytes) for d in encoded["data"])
    got = in_model(encoded)
    assert list(got["reason"] == "") == list(expected["reason"] == "")
    ok = expected["reason"] == ""
    assert (got["height"][ok] == expected["height"][ok]).all()
    cosine = (got["feat"][ok] * expected["feat"][ok]).sum(axis=1)
    assert cosine.min() > 0.99, cosine


def test_odd_and_corrupt_files_are_all_accounted(ray_local, odd_dataset, tmp_path):
    root, samples = odd_dataset
    out = str(tmp_path / "run")
    summary = run_pipeline(_cfg(root, out, "stages=features"))
    n_valid = sum(s.valid for s in samples.values())
    n_bad = len(samples) - n_valid
    assert summary["images_total"] == 3 * CLASSES + len(samples)
    assert summary["images_ok"] == 3 * CLASSES + n_valid
    assert summary["images_rejected"] == n_bad
    assert summary["files_ignored"] == 2
    storage = Storage()
    feats = read_folder(storage, os.path.join(out, "features"))
    rejected = read_folder(storage, os.path.join(out, "rejected"))
    assert feats.num_rows == summary["images_ok"]
    assert len(set(feats.column("id").to_pylist())) == feats.num_rows
    bad = {p.rsplit("/", 1)[-1]: r for p, r in zip(rejected.column("path").to_pylist(),
                                                    rejected.column("reason").to_pylist())}
    assert set(bad) == {n for n, s in samples.items() if not s.valid}
    assert all(bad.values())
    feat = np.stack(feats.column("feat").to_numpy(zero_copy_only=False))
    assert feat.shape == (feats.num_rows, 48)
    np.testing.assert_allclose(np.linalg.norm(feat, axis=1), 1.0, rtol=1e-4)
    # a re-run is a no-op: manifest matches
    again = run_pipeline(_cfg(root, out, "stages=features"))
    assert again["stages"]["features"]["status"] == "skipped"


class CrashOnce(DinoFeatures):
    """Kills its actor process on the first batch it sees (once per test, via a marker file)."""

    marker = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


def test_killed_actor_loses_and_duplicates_nothing(ray_local, tmp_path):
    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=CLASSES, train_per_class=8, val_per_class=1, test_per_class=1)
    cfg = _cfg(root, str(tmp_path / "run"))
    marker = str(tmp_path / "crashed")

    class Stage(FeaturesStage):
        feature_step = type("CrashOnceHere", (CrashOnce,), {"marker": marker})

    counts = Stage().run(RunContext(cfg=cfg, storage=Storage()))
    assert os.path.exists(marker)  # the crash did happen
    assert counts["images_ok"] == 8 * CLASSES and counts["images_rejected"] == 0
    ids = read_folder(Storage(), os.path.join(cfg.output, "features")).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 8 * CLASSES


def test_resume_skips_written_ids(ray_local, tmp_path):
    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=CLASSES, train_per_class=4, val_per_class=1, test_per_class=1)
    cfg = _cfg(root, str(tmp_path / "run"), "data.limit=5")
    first = FeaturesStage().run(RunContext(cfg=cfg, storage=Storage()))
    assert first["images_ok"] == 5
    cfg.data.limit = None
    # same folder, more images: only the new ones are processed, nothing is duplicated
    second = FeaturesStage().run(RunContext(cfg=cfg, storage=Storage()))
    assert second["images_ok"] == 4 * CLASSES
    ids = read_folder(Storage(), os.path.join(cfg.output, "features")).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4 * CLASSES


def test_a_rerun_computes_exactly_the_images_that_changed(ray_local, tmp_path, caplog):
    """Images added to (and removed from, and replaced in) a finished run's folder: the re-run's
    features computes exactly the new and replaced ones, keeps every other row and file as it
    was, drops the removed ones, and the stages after it run again."""
    data = tmp_path / "data"
    make_demo_dataset(str(data), classes=CLASSES, train_per_class=4, val_per_class=0, test_per_class=0)
    train = data / f"ImageNetS{CLASSES}" / "train"
    spare = tmp_path / "spare"
    make_demo_dataset(str(spare), classes=CLASSES, train_per_class=6, val_per_class=0, test_per_class=0, seed=1)
    folder = ["data.layout=folder", "features.rows_per_file=4", "stages=features,cluster"]
    out = str(tmp_path / "run")
    first = run_pipeline(_cfg(str(train), out, *folder))
    assert first["stages"]["features"]["counts"]["images_computed"] == 4 * CLASSES
    features = tmp_path / "run" / "features"
    before = {p.name: p.read_bytes() for p in features.glob("*.parquet")}

    images = sorted(train.glob("*/*.png")) or sorted(train.glob("*/*.*"))
    removed, replaced = images[0], images[-1]
    removed.unlink()
    extra = sorted((spare / f"ImageNetS{CLASSES}" / "train").glob("*/*.*"))[-2:]
    added = [train / "new" / f"added_{i}{p.suffix}" for i, p in enumerate(extra)]
    for src, dst in zip(extra, added):
        dst.parent.mkdir(exist_ok=True)
        dst.write_bytes(src.read_bytes())
    replaced.write_bytes(extra[0].read_bytes())
    stamp = replaced.stat().st_mtime + 10
    os.utime(replaced, (stamp, stamp))

    caplog.set_level("INFO", logger="pdso_ray")
    second = run_pipeline(_cfg(str(train), out, *folder))
    counts = second["stages"]["features"]["counts"]
    assert second["stages"]["features"]["status"] == "done"
    assert counts["images_computed"] == len(added) + 1  # the new ones and the replaced one
    assert counts["images_total"] == second["images_ok"] == 4 * CLASSES - 1 + len(added)
    assert second["stages"]["cluster"]["status"] == "done"
    assert second["stages"]["cluster"]["counts"]["images"] == 4 * CLASSES - 1 + len(added)

    def rel_id(path):
        return "all/" + str(path.relative_to(train).with_suffix(""))

    ids = read_folder(Storage(), str(features)).column("id").to_pylist()
    assert sorted(ids) == sorted(rel_id(p) for p in train.glob("*/*.*"))
    assert rel_id(removed) not in ids and all(rel_id(p) in ids for p in added)
    touched = {rel_id(removed), rel_id(replaced)}
    kept = 0
    for name, data_bytes in before.items():
        if not touched & set(pq.read_table(io.BytesIO(data_bytes), columns=["id"]).column("id").to_pylist()):
            assert (features / name).read_bytes() == data_bytes  # untouched files stay as they were
            kept += 1
    assert kept >= len(before) - 2
    assert sum("this run replaces features, cluster" in r.getMessage() for r in caplog.records) == 1
