"""The predict stage: the steps on a tiny batch without Ray, then the stage on local Ray Data."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pdso_ray.config import load_config
from pdso_ray.data.imagenet_s import decode_label, list_split
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.method.overlay import class_colors
from pdso_ray.models.dino import to_model_input
from pdso_ray.models.heads import (
    build_segmenter_from_meta,
    foreground_to_uint8,
    logits_to_prediction,
    model_input_size,
    segmenter_bytes,
)
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.base import Resources, RunContext
from pdso_ray.stages.predict import PredictStage, Predictor
from pdso_ray.stages.read_decode import ImageReader, ReadDecode
from pdso_ray.storage import Storage
from pdso_ray.tables import read_table

CLASSES = 3
SHORT_SIDE = 32
META = {"format": "pdso_ray.segmenter", "version": 1, "num_classes": CLASSES, "backbone": "dino",
        "arch": "vit_tiny_test", "img_size": 32}


def _rotated_jpeg(height, width):
    """A JPEG stored as height×width whose EXIF orientation (6) asks viewers to rotate it."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo data (3 classes, 2 validation and 1 test image each) plus, in validation, a corrupt
    JPEG, an EXIF-rotated JPEG and a file whose name is refused (a control character); a random
    model at model.pt."""
    tmp = tmp_path_factory.mktemp("predict")
    storage = Storage()
    root = make_demo_dataset(str(tmp / "data"), classes=CLASSES, train_per_class=0, val_per_class=2,
                             test_per_class=1, image_size=(40, 56))
    storage.write_bytes(f"{root}/validation/n00000001/corrupt.JPEG", b"\xff\xd8\xff\xe0 truncated")
    storage.write_bytes(f"{root}/validation/n00000002/rotated.JPEG", _rotated_jpeg(40, 56))
    storage.write_bytes(f"{root}/validation/n00000003/bad\x07name.JPEG", _rotated_jpeg(8, 8))
    run = str(tmp / "run")
    torch.manual_seed(0)
    model = build_segmenter_from_meta(META).eval()
    storage.write_bytes(f"{run}/finetune/model.pt", segmenter_bytes(model.state_dict(), META))
    cfg = load_config(text=f"""
output: {run}
data: {{root: {tmp / 'data'}, classes: {CLASSES}}}
predict: {{short_side: {SHORT_SIDE}, batch_size: 4, max_actors: 1}}
""")
    return cfg, storage, model


def _batch(records):
    return {"id": np.asarray([r.id for r in records], dtype=object),
            "path": np.asarray([r.path for r in records], dtype=object),
            "split": np.asarray([r.split for r in records], dtype=object)}


# ---- without Ray ----------------------------------------------------------------------------------
def test_steps_write_the_models_prediction_at_the_original_size(setup, tmp_path):
    cfg, storage, model = setup
    records = list_split(storage, cfg.data.root, CLASSES, "validation").images
    reader = ImageReader(storage, cfg.data.root, 10**8, 10**7)
    decoded = ReadDecode(reader, SHORT_SIDE, Resources(), exif_transpose=False)(_batch(records))
    reasons = dict(zip(decoded["id"], decoded["reason"]))
    assert "corrupt" in reasons["validation/n00000001/corrupt"]
    assert sum(1 for r in reasons.values() if r) == 1

    run = RunLayout(str(tmp_path / "run"))
    storage.write_bytes(run.finetune_model, storage.read_bytes(RunLayout(cfg.output).finetune_model))
    step = Predictor(storage, run, SHORT_SIDE, Resources(), foreground_rule=True, previews=True)
    step.setup()
    out = step(decoded)
    assert list(out["id"]) == list(decoded["id"]) and list(out["reason"]) == list(decoded["reason"])

    sizes = set()
    for i, image_id in enumerate(decoded["id"]):
        label_url, fg_url = run.prediction_png(image_id), run.foreground_png(image_id)
        fgclass_url = run.foreground_label_png(image_id)
        if decoded["reason"][i]:
            assert not storage.exists(label_url) and not storage.exists(fg_url)
            continue
        image = decoded["image"][i]
        orig = (int(decoded["height"][i]), int(decoded["width"][i]))
        size = model_input_size(*image.shape[:2], SHORT_SIDE, 8)
        sizes.add(size)
        with torch.inference_mode():
            logits = model(to_model_input(image[None], size))[0]
        pred = logits_to_prediction(logits, orig)
        written = decode_label(storage.read_bytes(label_url))  # argmax over C+1: the official rule
        assert written.shape == orig and np.array_equal(written, pred.label.numpy())
        assert written.min() >= 0 and written.max() <= CLASSES
        fgclass = decode_label(storage.read_bytes(fgclass_url))
        assert np.array_equal(fgclass, pred.foreground_label.numpy()) and fgclass.min() >= 1
        fg_png = np.asarray(Image.open(io.BytesIO(storage.read_bytes(fg_url))))
        assert np.array_equal(fg_png, foreground_to_uint8(pred.foreground.numpy()))
        # beside it, the prediction in colour and over the image as decoded for the model
        colour = np.asarray(Image.open(io.BytesIO(storage.read_bytes(run.colour_png("predictions", image_id)))).convert("RGB"))
        assert np.array_equal(colour, class_colors()[written])
        with Image.open(io.BytesIO(storage.read_bytes(run.overlay_jpg("predictions", image_id)))) as im:
            assert im.format == "JPEG" and im.size == (image.shape[1], image.shape[0])
    assert len(sizes) > 1  # the batch held several input sizes, each run as its own group
    # Stored orientation, not the EXIF-rotated one: the GT is drawn on the stored pixels.
    assert decode_label(storage.read_bytes(
        run.prediction_png("validation/n00000002/rotated"))).shape == (40, 56)


# ---- on Ray ---------------------------------------------------------------------------------------
def test_stage_predicts_every_listed_image_or_rejects_it(ray_local, setup):
    cfg, storage, _ = setup
    ctx = RunContext(cfg, storage)
    run = ctx.run
    counts = PredictStage().run(ctx)
    # validation: 6 demo images + rotated + corrupt + one refused name; test: 3 demo images.
    assert counts == {"splits": {"validation": {"images": 9, "predicted": 7, "rejected": 2},
                                 "test": {"images": 3, "predicted": 3, "rejected": 0}}, "notes": []}
    for split in ("validation", "test"):
        for r in list_split(storage, cfg.data.root, CLASSES, split).images:
            if r.id.endswith("corrupt"):
                continue
            with Image.open(io.BytesIO(storage.read_bytes(r.path))) as im:
                width, height = im.size
            label = decode_label(storage.read_bytes(run.prediction_png(r.id)))
            assert label.shape == (height, width) and 0 <= label.min() and label.max() <= CLASSES
            assert not storage.exists(run.foreground_png(r.id))  # predict.background: argmax
    rejected = read_table(storage, f"{cfg.output}/predictions/rejected_validation.parquet").to_pylist()
    by_path = {r["path"].rsplit("/", 1)[-1]: r for r in rejected}
    assert set(by_path) == {"corrupt.JPEG", "bad\x07name.JPEG"}
    assert by_path["corrupt.JPEG"]["id"] == "validation/n00000001/corrupt"
    assert by_path["bad\x07name.JPEG"]["id"] is None and "control" in by_path["bad\x07name.JPEG"]["reason"]
    assert read_table(storage, f"{cfg.output}/predictions/rejected_test.parquet").num_rows == 0

    # A re-run predicts only images missing a PNG: a kept file is untouched, a deleted one redone.
    kept_url = run.prediction_png("test/n00000001/n00000001_0")
    storage.write_bytes(kept_url, b"kept")
    redo = run.prediction_png("test/n00000002/n00000002_0")
    storage.remove(redo)
    assert PredictStage().run(ctx) == counts
    assert storage.read_bytes(kept_url) == b"kept" and storage.exists(redo)
