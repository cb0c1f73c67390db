"""The finetune stage: the data step without Ray, then Ray Train on two CPU workers with a worker
crash after the first epoch (FailureConfig restart) and a re-run with more epochs (resume)."""

import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from pdso_ray.config import ConfigError, load_config
from pdso_ray.data.imagenet_s import IGNORE_ID, decode_label, encode_label, gt_path_for, list_split
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.models.heads import load_segmenter
from pdso_ray.stages.base import RunContext, train_storage
from pdso_ray.stages.read_decode import ImageReader
from pdso_ray.stages.finetune import (
    FinetuneStage,
    LoadTrainPairs,
    cosine_factor,
    training_dataset,
)
from pdso_ray.storage import Storage
from pdso_ray.tables import write_table

CLASSES = 3


@pytest.fixture(scope="module")
def run_setup(tmp_path_factory):
    """12 synthetic images with their GT copied in as refined pseudo labels, plus one stats row
    of an image whose labelling failed (no refined label)."""
    tmp = tmp_path_factory.mktemp("finetune")
    storage = Storage()
    make_demo_dataset(str(tmp / "data"), classes=CLASSES, train_per_class=0, val_per_class=4,
                      test_per_class=0, image_size=(40, 56))
    run = str(tmp / "run")
    records = list_split(storage, str(tmp / "data"), CLASSES, "validation").images
    ids, paths, labels = [], [], []
    for r in records:
        url = storage.join(run, "labels", "refined", r.id + ".png")
        storage.write_bytes(url, storage.read_bytes(gt_path_for(r)))
        ids.append(r.id), paths.append(r.path), labels.append(url)
    ids.append("validation/n00000001/unlabelled"), paths.append(records[0].path), labels.append("")
    write_table(storage, storage.join(run, "labels", "stats", "part-0.parquet"),
                pa.table({"id": ids, "path": paths, "label_raw": labels, "label_refined": labels}))
    return tmp, run, records


def _config(tmp, run, epochs, loss="ce"):
    return load_config(text=f"""
output: {run}
data: {{root: {tmp / 'data'}, classes: {CLASSES}}}
models: {{allow_random_init: true, dino: {{arch: vit_tiny_test, image_size: 32}}}}
finetune: {{epochs: {epochs}, batch_size: 4, crop_size: 32, num_workers: 2, cpus_per_worker: 0.5,
           use_gpu: false, max_failures: 1, lr: 0.001, loss: {loss}}}
""")


# ---- without Ray ----------------------------------------------------------------------------------
def test_load_train_pairs_puts_images_and_labels_on_canvases(run_setup, tmp_path):
    _, run, records = run_setup
    storage = Storage()
    batch = {"id": np.asarray([r.id for r in records[:3]], dtype=object),
             "path": np.asarray([r.path for r in records[:3]], dtype=object),
             "label_refined": np.asarray([Storage.join(run, "labels", "refined", r.id + ".png")
                                          for r in records[:3]], dtype=object)}
    out = LoadTrainPairs(ImageReader(storage, "/", 10**8, 10**7), canvas=48, batch_size=8)(batch)
    assert out["image"].shape == (3, 48, 48, 3) and out["image"].dtype == np.uint8
    assert out["label"].shape == (3, 48, 48) and out["label"].dtype == np.int16
    for url, label, (h, w) in zip(batch["label_refined"], out["label"], out["valid"]):
        source = decode_label(storage.read_bytes(url))
        assert max(h, w) == 48 and abs(h / w - source.shape[0] / source.shape[1]) < 0.1  # aspect kept
        assert set(np.unique(label[:h, :w])) <= set(np.unique(source)) <= {0, 1, 2, 3, IGNORE_ID}
        assert (label[h:] == IGNORE_ID).all() and (label[:, w:] == IGNORE_ID).all()  # padding

    # A label of the wrong size, and an image that no longer decodes, fail with the URL.
    bad_label = str(tmp_path / "small.png")
    storage.write_bytes(bad_label, encode_label(np.zeros((5, 5), dtype=np.int32)))
    one = {"id": batch["id"][:1], "path": batch["path"][:1],
           "label_refined": np.asarray([bad_label], dtype=object)}
    with pytest.raises(ValueError, match=r"small.png is 5×5"):
        LoadTrainPairs(ImageReader(storage, "/", 10**8, 10**7), 24, 8)(one)
    broken = str(tmp_path / "broken.JPEG")
    storage.write_bytes(broken, b"not a jpeg")
    one = {"id": batch["id"][:1], "path": np.asarray([broken], dtype=object),
           "label_refined": batch["label_refined"][:1]}
    with pytest.raises(ValueError, match="broken.JPEG no longer decodes"):
        LoadTrainPairs(ImageReader(storage, "/", 10**8, 10**7), 24, 8)(one)


def test_load_train_pairs_marks_the_pixels_spo_changed_unlabelled(run_setup, tmp_path):
    from pdso_ray.method.agmm import UNLABELLED

    _, run, records = run_setup
    storage = Storage()
    refined_url = Storage.join(run, "labels", "refined", records[0].id + ".png")
    refined = decode_label(storage.read_bytes(refined_url))
    raw = np.where(refined == IGNORE_ID, 0, refined)
    raw[: refined.shape[0] // 2] = 0  # the raw label misses the upper half
    raw_url = str(tmp_path / "raw.png")
    storage.write_bytes(raw_url, encode_label(raw))
    batch = {"id": np.asarray([records[0].id], dtype=object), "path": np.asarray([records[0].path], dtype=object),
             "label_refined": np.asarray([refined_url], dtype=object),
             "label_raw": np.asarray([raw_url], dtype=object)}
    reader = ImageReader(storage, "/", 10**8, 10**7)
    side = max(refined.shape)  # a canvas the label's own size: no resampling
    out = LoadTrainPairs(reader, canvas=side, batch_size=8, unlabelled="disagreement")(batch)
    h, w = out["valid"][0]
    label = out["label"][0, :h, :w]
    changed = (raw != refined) & (refined != IGNORE_ID)
    assert changed.any() and np.array_equal(label == UNLABELLED, changed)
    assert np.array_equal(label[~changed], refined[~changed])
    plain = LoadTrainPairs(reader, canvas=side, batch_size=8)(batch)
    assert np.array_equal(plain["label"][0, :h, :w], refined)


def test_cosine_schedule():
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0) and cosine_factor(12, 10) == pytest.approx(0.0)


def test_agmm_step_of_the_train_loop(tmp_path):
    """What the loop does per batch with finetune.loss=agmm, without Ray: one forward through the
    wrapper DDP sees, the mixture's update, a finite loss reaching backbone and head, and the
    mixture state in the checkpoint format (weights_only)."""
    import io

    import torch.nn.functional as F

    from pdso_ray.method.agmm import AgmmWeights, GaussianMixture
    from pdso_ray.models.heads import build_segmenter_from_meta
    from pdso_ray.stages.finetune import _agmm_terms, _with_features

    torch.manual_seed(0)
    segmenter = build_segmenter_from_meta({"num_classes": CLASSES, "backbone": "dino",
                                           "arch": "vit_tiny_test", "img_size": 32})
    net = _with_features(segmenter)
    assert [id(p) for p in net.parameters()] == [id(p) for p in segmenter.parameters()]  # the optimizer's order
    x = torch.randn(2, 3, 32, 32)
    target = torch.zeros(2, 32, 32, dtype=torch.int64)
    target[0, :, 16:], target[1, 8:24, 8:24], target[1, :4] = 1, 3, IGNORE_ID
    features, logits = net(x)
    logits = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    mixture = GaussianMixture(CLASSES + 1, 48)
    fc = _config(tmp_path, str(tmp_path / "run"), epochs=1, loss="agmm").finetune
    loss = _agmm_terms(features, logits, target, mixture, fc, AgmmWeights())
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert mixture.updates.tolist() == [1, 1, 0, 1]  # classes 0, 1, 3 are in the batch
    loss.backward()
    assert segmenter.head.weight.grad.abs().sum() > 0
    assert segmenter.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0

    buf = io.BytesIO()
    torch.save({"agmm": mixture.state_dict()}, buf)
    restored = GaussianMixture(CLASSES + 1, 48)
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["agmm"])
    for name, value in mixture.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)

    # an unknown loss never reaches a worker: loading the config refuses it
    with pytest.raises(ConfigError, match="finetune.loss='hinge': unknown; choose one of ce, agmm"):
        _config(tmp_path, str(tmp_path / "run"), epochs=1, loss="hinge")


def test_train_storage_paths(tmp_path, s3_bucket):
    from pyarrow.fs import PyFileSystem

    assert train_storage(Storage(), str(tmp_path / "f")) == (str(tmp_path / "f"), None)
    options, bucket = s3_bucket
    path, fs = train_storage(Storage(options), f"{bucket}/run/finetune")
    assert path == f"{bucket[len('s3://'):]}/run/finetune" and isinstance(fs, PyFileSystem)
    with pytest.raises(ValueError, match="memory://run"):
        train_storage(Storage(), "memory://run/finetune")


# ---- Ray Train ------------------------------------------------------------------------------------
def test_training_dataset_skips_images_without_a_refined_label(ray_local, run_setup, tmp_path):
    _, run, records = run_setup
    storage = Storage()
    rows = training_dataset(storage, Storage.join(run, "labels", "stats")).take_all()
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)
    assert all(r["label_refined"].endswith(r["id"] + ".png") for r in rows)
    with pytest.raises(FileNotFoundError, match="run pseudo_labels first"):
        training_dataset(storage, str(tmp_path / "empty"))


def _probed_stage(log_file, crash_marker):
    """FinetuneStage whose workers log every report of rank 0 to ``log_file`` and, while
    ``crash_marker`` does not exist, kill rank 0's process once its first checkpoint is committed."""

    def loop(config):
        import os

        import ray.train

        from pdso_ray.stages.finetune import train_loop_per_worker

        report = ray.train.report

        def probe(metrics, checkpoint=None, **kwargs):
            report(metrics, checkpoint=checkpoint, **kwargs)
            if ray.train.get_context().get_world_rank() == 0:
                with open(log_file, "a") as f:
                    f.write(f"{metrics['epoch']} {metrics['start_epoch']} {metrics['images']}\n")
                if crash_marker and not os.path.exists(crash_marker):
                    # Die once the epoch-1 checkpoint is committed: an interruption after an epoch.
                    ray.train.get_all_reported_checkpoints(
                        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
                    open(crash_marker, "w").close()
                    os._exit(1)

        ray.train.report = probe
        train_loop_per_worker(config)

    class Probed(FinetuneStage):
        train_loop = staticmethod(loop)

    return Probed()


def _check_model(storage, run, epochs):
    model_url = storage.join(run, "finetune", "model.pt")
    model, meta = load_segmenter(model_url)
    assert meta["epochs"] == epochs and meta["num_classes"] == CLASSES
    assert meta["backbone"] == "dino" and meta["arch"] == "vit_tiny_test"
    state = torch.load(os.path.join(run, "finetune", "train", f"epoch_{epochs:04d}", "state.pt"),
                       weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_finetune_survives_a_crash_and_resumes_with_more_epochs(ray_local, run_setup):
    tmp, run, _ = run_setup
    storage = Storage()
    log_file = str(tmp / "reports.txt")

    # Two epochs; rank 0's process dies right after the epoch-1 checkpoint. FailureConfig
    # restarts the workers from that checkpoint: epoch 1 is not trained twice.
    counts = _probed_stage(log_file, str(tmp / "crashed")).run(
        RunContext(_config(tmp, run, epochs=2), storage))
    with open(log_file) as f:
        assert f.read().split("\n") == ["1 1 12", "2 2 12", ""]
    assert counts["images"] == 12 and counts["epochs"] == 2 and counts["start_epoch"] == 2
    assert counts["workers"] == 2 and math.isfinite(counts["final_loss"]) and counts["final_loss"] > 0
    history = storage.read_json(storage.join(run, "finetune", "history.json"))
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["loss"] == counts["final_loss"]
    for epoch in (1, 2):
        assert os.path.exists(os.path.join(run, "finetune", "train", f"epoch_{epoch:04d}", "state.pt"))
    _check_model(storage, run, epochs=2)

    # Re-running with three epochs resumes after epoch 2 and trains only epoch 3.
    counts = _probed_stage(log_file, None).run(RunContext(_config(tmp, run, epochs=3), storage))
    with open(log_file) as f:
        assert f.read().split("\n")[2:] == ["3 3 12", ""]
    assert counts["epochs"] == 3 and counts["start_epoch"] == 3
    _check_model(storage, run, epochs=3)
    # the loss curve spans the resume: epochs 1-2 from the checkpoint, 3 from this attempt
    resumed = storage.read_json(storage.join(run, "finetune", "history.json"))
    assert resumed[:2] == history and [h["epoch"] for h in resumed] == [1, 2, 3]
    # finetune.keep_checkpoints=2 (the default): the oldest epoch's checkpoint is gone
    kept = sorted(d for d in os.listdir(os.path.join(run, "finetune", "train")) if d.startswith("epoch_"))
    assert kept == ["epoch_0002", "epoch_0003"]



def test_seeded_row_order_depends_on_the_rows_not_their_blocks(ray_local):
    import ray.data

    from pdso_ray.stages.finetune import seeded_row_order

    rows = [{"id": f"train/c/img_{i:03d}", "v": i} for i in range(50)]

    def order(items, blocks, seed):
        return [r["id"] for r in seeded_row_order(ray.data.from_items(items, override_num_blocks=blocks), seed).take_all()]

    first = order(rows, 7, seed=3)
    assert order(rows[::-1], 3, seed=3) == first  # other blocks, other input order: the same order
    assert sorted(first) == [r["id"] for r in rows] and first != sorted(first)
    assert order(rows, 7, seed=4) != first


class _WindowedShard:
    """A stand-in for a Ray Train dataset shard: ``iter_torch_batches`` over fixed rows."""

    def __init__(self, rows: int):
        self.ids = np.array([f"img_{i:03d}" for i in range(rows)])
        self.value = torch.arange(rows)
        self.windows = []

    def iter_torch_batches(self, batch_size, dtypes=None):
        for start in range(0, len(self.ids), batch_size):
            self.windows.append(batch_size)
            yield {"value": self.value[start:start + batch_size], "id": self.ids[start:start + batch_size]}


def test_shuffled_batches_cover_every_row_once_within_fixed_windows():
    from pdso_ray.stages.base import SHUFFLE_WINDOW_BATCHES, shuffled_batches

    shard = _WindowedShard(50)
    batches = list(shuffled_batches(shard, 8, (3, 1, 0), dtypes={"value": torch.int64}))
    assert set(shard.windows) == {SHUFFLE_WINDOW_BATCHES * 8}  # 32-row windows, whatever the blocks
    values = torch.cat([b["value"] for b in batches])
    assert sorted(values.tolist()) == list(range(50))  # every row once
    assert [len(b["value"]) for b in batches] == [8, 8, 8, 8, 8, 8, 2]
    assert all(b["id"].tolist() == [f"img_{v:03d}" for v in b["value"].tolist()] for b in batches)
    assert set(values[:32].tolist()) == set(range(32))  # shuffled within its window only
    assert values.tolist() != list(range(50))
    again = torch.cat([b["value"] for b in shuffled_batches(_WindowedShard(50), 8, (3, 1, 0))])
    other = torch.cat([b["value"] for b in shuffled_batches(_WindowedShard(50), 8, (3, 2, 0))])
    assert again.tolist() == values.tolist() and other.tolist() != values.tolist()
    dropped = list(shuffled_batches(_WindowedShard(50), 8, (3, 1, 0), drop_last=True))
    assert [len(b["value"]) for b in dropped] == [8] * 6
