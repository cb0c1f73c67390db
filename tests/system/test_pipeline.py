"""Stages 1–4 through the pipeline on the synthetic dataset with tiny models: from a local folder
and from S3 (moto's server), with manifests, skip on re-run and exact image accounting."""

import os

import numpy as np
import pytest

from pdso_ray.config import load_config
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.pipeline import run_pipeline
from pdso_ray.stages.base import PipelineError
from pdso_ray.storage import Storage
from pdso_ray.tables import read_folder
from tests.conftest import S3_SECRET

CLASSES = 3
PER_CLASS = 6
STAGES = "stages=features,cluster,denoise,purify"


def _overrides(root, output, *extra):
    return [f"data.root={root}", f"output={output}", f"data.classes={CLASSES}",
            "features.batch_size=8", "purify.topk=2", *extra]


def _check_run(storage: Storage, output: str, summary: dict) -> None:
    n = CLASSES * PER_CLASS
    assert summary["images_total"] == summary["images_ok"] == n
    assert summary["images_rejected"] == 0
    for stage in ("features", "cluster", "denoise", "purify"):
        assert summary["stages"][stage]["status"] == "done"
        assert storage.read_manifest(storage.join(output, stage))["counts"]
    purify = read_folder(storage, storage.join(output, "purify"))
    features = read_folder(storage, storage.join(output, "features"), columns=["id"])
    assert sorted(purify.column("id").to_pylist()) == sorted(features.column("id").to_pylist())
    topk = np.stack(purify.column("topk").to_numpy(zero_copy_only=False))
    dist = np.stack(purify.column("topk_dist").to_numpy(zero_copy_only=False))
    cluster = purify.column("cluster").to_numpy()
    assert topk.shape == (n, 2) and np.all((topk >= 0) & (topk < CLASSES))
    assert np.array_equal(topk[:, 0], cluster)          # nearest first
    assert np.all(np.diff(dist, axis=1) >= 0)
    kept = purify.column("kept").to_numpy(zero_copy_only=False)
    assert 0 < kept.sum() <= n
    centroids = np.load(storage.open(storage.join(output, "purify", "centroids.npy")))
    assert centroids.shape[0] == CLASSES
    denoise = read_folder(storage, storage.join(output, "denoise"), columns=["emb", "clean"])
    emb = np.stack(denoise.column("emb").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)
    assert centroids.shape[1] == emb.shape[1]


def _check_labels(storage: Storage, output: str) -> None:
    """Stage 5: a raw and a refined label PNG per image, of the image's size, ids in 0..C/1000;
    beside each, its colour preview (the label in the palette, pixel for pixel) and its overlay."""
    import io

    from PIL import Image

    from pdso_ray.data.decode import decode_image
    from pdso_ray.data.imagenet_s import decode_label
    from pdso_ray.method.overlay import class_colors
    from pdso_ray.run_layout import RunLayout

    run = RunLayout(output)

    stats = read_folder(storage, storage.join(output, "labels", "stats"))
    assert stats.num_rows == CLASSES * PER_CLASS
    assert not any(stats.column("reason").to_pylist())
    assert sum(stats.column("prompts").to_pylist()) > 0  # SPO did prompt SAM
    for row in stats.to_pylist():
        image = decode_image(storage.read_bytes(row["path"])).image
        for key in ("label_raw", "label_refined"):
            label = decode_label(storage.read_bytes(row[key]))
            assert label.shape == image.shape[:2]
            assert set(np.unique(label)) <= set(range(CLASSES + 1)) | {1000}
            kind = key.split("_")[1]
            colour = np.asarray(Image.open(io.BytesIO(storage.read_bytes(run.colour_png(kind, row["id"])))).convert("RGB"))
            assert np.array_equal(colour, class_colors()[label])
            with Image.open(io.BytesIO(storage.read_bytes(run.overlay_jpg(kind, row["id"])))) as overlay:
                assert overlay.format == "JPEG" and overlay.size == (image.shape[1], image.shape[0])


def test_stages_1_to_5_local(ray_local, tmp_path):
    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=1, test_per_class=1)
    output = str(tmp_path / "run")
    cfg = load_config("jobs/configs/demo.yaml", _overrides(root, output, STAGES + ",pseudo_labels"))
    summary = run_pipeline(cfg)
    _check_run(Storage(), output, summary)
    _check_labels(Storage(), output)
    assert os.path.exists(os.path.join(output, "summary.json"))
    # a re-run skips every stage (and keeps pseudo_labels, made from the same purify outputs)
    again = run_pipeline(load_config("jobs/configs/demo.yaml", _overrides(root, output, STAGES)))
    assert {again["stages"][s]["status"] for s in ("features", "cluster", "denoise", "purify")} == {"skipped"}
    assert again["stages"]["pseudo_labels"]["status"] == "skipped"
    # changing the purify settings re-runs purify only, and removes the pseudo labels made from
    # the purify outputs it replaces: the folder holds one run, and its summary says so
    changed = run_pipeline(load_config("jobs/configs/demo.yaml",
                                       _overrides(root, output, STAGES, "purify.alpha=1.5")))
    assert changed["stages"]["purify"]["status"] == "done"
    assert changed["stages"]["denoise"]["status"] == "skipped"
    assert "pseudo_labels" not in changed["stages"]
    assert not os.path.exists(os.path.join(output, "pseudo_labels")) and not os.path.exists(os.path.join(output, "labels"))
    on_disk = Storage().read_json(os.path.join(output, "summary.json"))
    assert on_disk["stages"].keys() == changed["stages"].keys()
    # the plain profile: k-means #1's clusters and centroids (in feature space) pass on unchanged
    plain = run_pipeline(load_config("jobs/configs/demo.yaml",
                                     _overrides(root, output, STAGES, "denoise.profile=plain")))
    assert plain["stages"]["cluster"]["status"] == "skipped" and plain["stages"]["purify"]["status"] == "done"
    purify = read_folder(Storage(), os.path.join(output, "purify"))
    kmeans1 = read_folder(Storage(), os.path.join(output, "cluster"), columns=["id", "cluster"])
    assert purify.column("id").to_pylist() == kmeans1.column("id").to_pylist()
    first = kmeans1.column("cluster").to_numpy()
    assert np.array_equal(purify.column("cluster").to_numpy(), first)
    assert all(purify.column("kept").to_pylist())
    feats = np.stack(read_folder(Storage(), os.path.join(output, "features"), columns=["feat"])
                     .column("feat").to_numpy(zero_copy_only=False))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    centroids = np.load(os.path.join(output, "purify", "centroids.npy"))
    np.testing.assert_allclose(centroids, [feats[first == c].mean(0) for c in range(CLASSES)], atol=1e-5)
    # precomputed features (data.features) stand in for stage 1
    reuse = str(tmp_path / "reuse")
    pre = run_pipeline(load_config("jobs/configs/demo.yaml", _overrides(
        root, reuse, "stages=cluster", f"data.features={output}/features")))
    assert pre["stages"]["features"]["status"] == "precomputed"
    assert pre["images_total"] == pre["images_ok"] == CLASSES * PER_CLASS
    assert read_folder(Storage(), os.path.join(reuse, "cluster")).num_rows == CLASSES * PER_CLASS
    # a stage whose inputs were never produced is a clear error
    with pytest.raises(PipelineError, match="pseudo_labels.*purify|purify"):
        run_pipeline(load_config("jobs/configs/demo.yaml",
                                 _overrides(root, str(tmp_path / "empty"), "stages=purify")))


def test_stages_1_to_4_on_s3(ray_local, s3_bucket, tmp_path):
    options, bucket = s3_bucket
    storage = Storage(options)
    root = f"{bucket}/data"
    make_demo_dataset(root, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=1,
                      test_per_class=1, storage=storage)
    output = f"{bucket}/run"
    s3 = options["s3"]
    cfg = load_config("jobs/configs/demo.yaml", _overrides(
        root, output, STAGES, f"storage.s3.endpoint_url={s3['endpoint_url']}",
        f"storage.s3.key={s3['key']}", f"storage.s3.secret={s3['secret']}"))
    summary = run_pipeline(cfg)
    _check_run(storage, output, summary)
    # the planted secret never reaches the run folder (config.yaml is redacted)
    for url in storage.list_files(output):
        assert S3_SECRET.encode() not in storage.read_bytes(url), url
    assert "***" in storage.read_text(f"{output}/config.yaml")


def test_denoise_fine_tunes_the_backbone_and_resumes(ray_local, tmp_path):
    """denoise.finetune_blocks: the last block is tuned with h, every image is embedded again
    with it (and later stages load it); a run interrupted after the training resumes without
    training again and re-embeds only the files it had not finished."""
    import pyarrow.parquet as pq
    import torch

    from pdso_ray.models.loading import DinoSource
    from pdso_ray.stages.base import RunContext
    from pdso_ray.stages.denoise import EMBEDDING_KEY

    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=1, test_per_class=1)
    output = str(tmp_path / "run")
    tuning = ["denoise.finetune_blocks=1", "denoise.finetune_epochs=2", "denoise.finetune_batch_size=8",
              "features.rows_per_file=8"]
    cfg = load_config("jobs/configs/demo.yaml", _overrides(root, output, STAGES, *tuning))
    summary = run_pipeline(cfg)
    _check_run(Storage(), output, summary)
    counts = summary["stages"]["denoise"]["counts"]["tuning"]
    files = sorted(f for f in os.listdir(os.path.join(output, "features")) if f.endswith(".parquet"))
    assert len(files) >= 2  # 18 images, at most 8 per feature file
    assert sorted(f for f in os.listdir(os.path.join(output, "denoise")) if f.endswith(".parquet")) == files
    assert counts["epochs"] == 2 and [r["epoch"] for r in counts["history"]] == [1, 2]
    assert counts["reembedded_files"] == len(files) and counts["reembedded_images"] == CLASSES * PER_CLASS
    assert counts["kept_frozen_embedding"] == 0
    tuned = torch.load(os.path.join(output, "denoise", "backbone.pth"), weights_only=True)
    original = torch.load(cfg.models.dino.checkpoint, weights_only=True)
    assert torch.equal(tuned["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    assert not torch.equal(tuned["blocks.1.attn.qkv.weight"], original["blocks.1.attn.qkv.weight"])
    for name in files:
        meta = pq.read_schema(os.path.join(output, "denoise", name)).metadata
        assert meta[EMBEDDING_KEY] == b"tuned"
    ctx = RunContext(cfg, Storage())
    assert DinoSource.for_embedding(cfg, ctx.run).checkpoint == ctx.run.denoise_backbone

    # interrupted after the training, during the re-embedding: one file not yet re-embedded
    os.remove(os.path.join(output, "denoise", "_SUCCESS.json"))
    os.remove(os.path.join(output, "denoise", "backbone.pth"))
    first = os.path.join(output, "denoise", files[0])
    table = pq.read_table(first)
    pq.write_table(table.replace_schema_metadata({}), first)
    untouched = os.path.getmtime(os.path.join(output, "denoise", files[1]))
    again = run_pipeline(cfg)
    counts = again["stages"]["denoise"]["counts"]["tuning"]
    assert again["stages"]["denoise"]["status"] == "done"
    assert [r["epoch"] for r in counts["history"]] == [1, 2]  # resumed after epoch 2: no new epoch
    assert counts["reembedded_files"] == 1 and counts["reembedded_images"] == table.num_rows
    assert os.path.getmtime(os.path.join(output, "denoise", files[1])) == untouched
    assert torch.equal(torch.load(os.path.join(output, "denoise", "backbone.pth"), weights_only=True)
                       ["blocks.1.attn.qkv.weight"], tuned["blocks.1.attn.qkv.weight"])
