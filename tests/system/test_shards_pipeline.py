"""The whole pipeline from WebDataset shards on S3 (moto's server) with shard outputs: make-shards
from an ImageNet-S tree to the bucket, a corrupt sample added by hand, every stage, then
``pdso-ray evaluate`` and ``export`` reading the PNG shards (issue #25)."""

import io
import json
import zipfile

import pyarrow.parquet as pq
import webdataset as wds

from pdso_ray.cli import main
from pdso_ray.config import load_config
from pdso_ray.data.imagenet_s import decode_label
from pdso_ray.data.make_shards import make_shards
from pdso_ray.data.png_sets import png_files
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.data.tar_shards import tar_bytes
from pdso_ray.pipeline import run_pipeline
from pdso_ray.storage import Storage, parse_range_url
from pdso_ray.tables import read_folder

CLASSES, PER_CLASS = 3, 4
FAST = ["features.batch_size=4", "purify.topk=2", "finetune.epochs=1", "denoise.epochs_f=3",
        "denoise.epochs_g=3", "denoise.epochs_h=3", "pseudo_labels.batch_size=4", "predict.batch_size=2"]


def test_webdataset_shards_on_s3_in_and_png_shards_out(ray_local, s3_bucket, tmp_path, capsys, monkeypatch):
    options, bucket = s3_bucket
    storage = Storage(options)
    tree = str(tmp_path / "tree")
    make_demo_dataset(tree, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=1, test_per_class=1)
    shards = f"{bucket}/shards"
    converted = make_shards(storage, tree, shards, images_per_shard=5)
    assert (converted.written, converted.images) == (3 + 1 + 1, CLASSES * (PER_CLASS + 2))
    bad = f"{shards}/train/999999.tar"
    storage.write_bytes(bad, tar_bytes([("broken.jpg", b"\xff\xd8\xff\xe0 not a JPEG"), ("broken.cls", b"x")])[0])

    output = f"{bucket}/run"
    s3 = options["s3"]
    cfg_overrides = [
        "data.layout=webdataset", f"data.root={shards}", f"data.classes={CLASSES}", f"output={output}",
        "output.format=webdataset", f"storage.s3.endpoint_url={s3['endpoint_url']}",
        f"storage.s3.key={s3['key']}", f"storage.s3.secret={s3['secret']}", *FAST]
    summary = run_pipeline(load_config("jobs/configs/demo.yaml", cfg_overrides))

    # every image accounted for; the corrupt member names its shard and key
    train = CLASSES * PER_CLASS
    assert (summary["images_total"], summary["images_ok"], summary["images_rejected"]) == (train + 1, train, 1)
    assert summary["files_ignored"] == 0  # make-shards' plan and shard indexes are not stray files
    (rejected,) = read_folder(storage, f"{output}/rejected").to_pylist()
    assert rejected["id"] == "train/999999/broken" and bad in rejected["reason"] and "broken.jpg" in rejected["reason"]
    assert summary["stages"]["cluster"]["counts"]["diagnostics"]["image"]["cluster"]["images"] == train
    assert summary["mIoU"] > 0 and summary["stages"]["evaluate"]["counts"]["validation_images"] == CLASSES

    # outputs are PNG shards with their indexes, no loose PNGs
    for folder in ("labels/raw/train", "labels/refined/train", "predictions/validation", "predictions/test"):
        files = storage.list_files(f"{output}/{folder}")
        assert files and not [f for f in files if f.endswith(".png")], folder
        assert {f.rsplit(".", 1)[1] for f in files} == {"tar", "parquet"}, folder
        # previews: auto writes no per-image files beside shards
        assert not storage.exists(f"{output}/{folder}_colour") and not storage.exists(f"{output}/{folder}_overlay")
    page = storage.read_text(f"{output}/report/index.html")  # which says why there are none
    assert "output_format: webdataset writes none unless previews: files" in page
    assert "validation_predictions.png" in page and "confusion_matrix.png" in page  # drawn from the shards
    stats = read_folder(storage, f"{output}/labels/stats").to_pylist()
    assert len(stats) == train and all(parse_range_url(row["label_refined"]) for row in stats)
    index = pq.read_table(io.BytesIO(storage.read_bytes(
        next(f for f in storage.list_files(f"{output}/predictions/validation") if f.endswith(".parquet")))))
    assert {"id", "member", "offset", "size", "height", "width", "classes"} <= set(index.column_names)

    # the prediction shards are plain WebDataset: the webdataset package reads them
    tar_url = next(f for f in storage.list_files(f"{output}/predictions/validation") if f.endswith(".tar"))
    local = tmp_path / "pred.tar"
    local.write_bytes(storage.read_bytes(tar_url))
    samples = list(wds.WebDataset(str(local), shardshuffle=False))
    assert samples and all(set(s) >= {"__key__", "png"} for s in samples)
    assert decode_label(samples[0]["png"]).ndim == 2

    # resume: a prediction shard whose index never landed (a crash in between) is predicted again,
    # the whole shards are skipped (not rewritten)
    indexes = [f for f in storage.list_files(f"{output}/predictions/validation") if f.endswith(".parquet")]
    assert len(indexes) == 2  # 3 images, batches of 2
    fs = storage.fs(output)[0]
    kept = fs.info(storage.fs(indexes[1])[1])["LastModified"]
    storage.remove(indexes[0])
    storage.remove(f"{output}/predict/_SUCCESS.json")
    again = run_pipeline(load_config("jobs/configs/demo.yaml", [*cfg_overrides, "stages=predict"]))
    assert again["stages"]["predict"]["counts"]["splits"]["validation"]["predicted"] == CLASSES
    assert len(png_files(storage, f"{output}/predictions/validation")) == CLASSES
    assert fs.info(storage.fs(indexes[1])[1])["LastModified"] == kept

    # `pdso-ray evaluate` on the prediction shards against the seg.png members of the input shards
    # gives the evaluate stage's number; `pdso-ray export` packs the test shards as PNG files under
    # the images' names in the ImageNet-S tree
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3["endpoint_url"])  # the commands' storage has no options
    capsys.readouterr()
    assert main(["evaluate", "--pred", f"{output}/predictions/validation", "--gt", shards,
                 "--gt-layout", "webdataset", "--classes", str(CLASSES), "--json", "--quiet"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["mIoU"] - summary["mIoU"]) < 1e-9
    zip_path = tmp_path / "test.zip"
    assert main(["export", output, str(zip_path)]) == 0
    with zipfile.ZipFile(zip_path) as zf:
        pngs = sorted(n for n in zf.namelist() if n.endswith(".png"))
        # named as the server expects: the sample keys make-shards kept, <wnid>/<name>.png
        assert pngs == [f"n{k:08d}/n{k:08d}_0.png" for k in range(1, CLASSES + 1)]
        assert all(decode_label(zf.read(n)).ndim == 2 for n in pngs)
