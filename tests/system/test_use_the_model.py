"""Using a trained model: DINOv2 and DINOv3 backbones read from their official checkpoint layouts
through features → pseudo labels → finetune → predict (one run each, tiny sizes), then
``pdso-ray segment`` on the run's own images (the run's labels, byte for byte) and on real
photographs (scikit-image's), ``pdso-ray export-model`` (with the ONNX round trip), and the
exported model segmenting a folder with the run's labels. The runs' training curves land in
``OUTPUT/tensorboard/``. The DINOv3 run (with its export under the DINOv3 licence) is in
``make test-slow``."""

import io
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pdso_ray.cli import main
from pdso_ray.config import load_config
from pdso_ray.data.imagenet_s import decode_label
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.models.dino import build_dino, save_dino_checkpoint
from pdso_ray.pipeline import run_pipeline
from pdso_ray.storage import Storage
from pdso_ray.tables import read_table
from tests.test_tracking import read_scalars

CLASSES = 3
STAGES = "features,cluster,denoise,purify,pseudo_labels,finetune,predict,evaluate"


def _photographs(folder: str) -> dict[str, tuple[int, int]]:
    """scikit-image's photographs in ``folder`` (a colour JPEG, a grey PNG, a big PNG in a
    subfolder with a space in its name), a corrupt file and a text file; returns the expected
    label size of each image file's relative path."""
    import skimage.data

    os.makedirs(os.path.join(folder, "more photos"), exist_ok=True)
    Image.fromarray(skimage.data.chelsea()).save(os.path.join(folder, "chelsea.jpg"), quality=92)
    Image.fromarray(skimage.data.camera()).save(os.path.join(folder, "camera.png"))
    Image.fromarray(skimage.data.astronaut()).save(os.path.join(folder, "more photos", "astronaut.png"))
    with open(os.path.join(folder, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a JPEG")
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")
    return {"chelsea": (300, 451), "camera": (512, 512), "more photos/astronaut": (512, 512)}


def _run(tmp, arch, checkpoint_format, size):
    """A whole tiny PDSO run from a checkpoint of ``arch`` written in its official layout."""
    root = os.path.join(tmp, "data")
    if not os.path.exists(root):
        make_demo_dataset(root, classes=CLASSES, train_per_class=5, val_per_class=1, test_per_class=1,
                          image_size=(48, 64))
    torch.manual_seed(0)
    checkpoint = os.path.join(tmp, f"{arch}.pth")
    save_dino_checkpoint(build_dino(arch, img_size=518 if "dinov2" in arch else 224), checkpoint,
                         fmt=checkpoint_format)
    output = os.path.join(tmp, f"run-{checkpoint_format}")
    cfg = load_config("jobs/configs/demo.yaml", [
        f"data.root={root}", f"output={output}", f"data.classes={CLASSES}", f"stages={STAGES}",
        f"models.dino.arch={arch}", f"models.dino.checkpoint={checkpoint}", f"models.dino.image_size={size}",
        f"pseudo_labels.image_size={2 * size}", f"finetune.crop_size={size}", "finetune.epochs=1",
        f"predict.short_side={2 * size}", "pseudo_labels.refine.method=none", "cluster.nredo=2",
        "denoise.epochs_f=2", "denoise.epochs_g=2", "denoise.epochs_h=2", "denoise.min_steps=10",
        "purify.topk=2"])
    return run_pipeline(cfg), output, root


@pytest.fixture(scope="module")
def dinov2_run(ray_local, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("use"))
    summary, output, root = _run(tmp, "vit_tiny_patch14_reg4_dinov2_test", "dinov2", 56)
    return summary, output, root, tmp


def _check_run(summary, output):
    for stage in STAGES.split(","):
        assert summary["stages"][stage]["status"] == "done", stage
    assert summary["images_ok"] == summary["images_total"] == 5 * CLASSES
    assert summary["splits"]["validation"] == {"images": CLASSES, "predicted": CLASSES, "rejected": 0}
    assert "mIoU" in summary
    # the fine-tuning curves, where TensorBoard looks: a loss per step and one per epoch
    scalars = read_scalars(Storage(), os.path.join(output, "tensorboard", "finetune"))
    assert [s for s, _ in scalars["epoch/loss"]] == [1]
    assert len(scalars["train/loss"]) == len(scalars["train/lr"]) >= 1
    assert all(np.isfinite(v) for _, v in scalars["train/loss"])


def test_dinov2_official_checkpoint_runs_the_pipeline(dinov2_run):
    summary, output, _, _ = dinov2_run
    _check_run(summary, output)
    meta = torch.load(os.path.join(output, "finetune", "model.pt"), weights_only=True)["meta"]
    assert meta["arch"] == "vit_tiny_patch14_reg4_dinov2_test" and meta["img_size"] == 518  # the checkpoint's grid


@pytest.mark.slow  # a second whole run; the default suite has DINOv3's unit tests
def test_dinov3_official_checkpoint_runs_the_pipeline_and_exports_under_its_licence(ray_local, tmp_path):
    summary, output, _ = _run(str(tmp_path), "vit_tiny_patch16_dinov3_test", "dinov3", 64)
    _check_run(summary, output)
    # its export: the rotary embedding through ONNX at the photographs' sizes, and the DINOv3 licence
    import skimage.data

    from pdso_ray.model_export import export_model

    exported = export_model(Storage(), output, str(tmp_path / "exported"), onnx=True,
                            check_images=[skimage.data.chelsea(), skimage.data.astronaut()])
    assert exported.onnx_max_abs_diff < 1e-4 and exported.config["output_stride"] == 16
    assert exported.config["backbone_license"].startswith("DINOv3 License")
    card = open(tmp_path / "exported" / "README.md").read()
    assert yaml.safe_load(card.split("---\n")[1])["license"] == "other"
    assert "DINOv3's weights are *not* Apache-2.0" in card


def _labels(folder: str) -> dict[str, bytes]:
    storage = Storage()
    return {rel: storage.read_bytes(storage.join(folder, rel)) for rel in storage.list_relative(folder, ".png")}


def test_segment_reproduces_the_runs_predictions_and_labels_photographs(dinov2_run, capsys):
    _, run, root, tmp = dinov2_run
    # the run's own images, read as the run read them: the run's labels, byte for byte
    out = os.path.join(tmp, "again")
    assert main(["segment", run, root, out, "--layout", "imagenet_s"]) == 0
    for split in ("validation", "test"):
        mine, theirs = _labels(f"{out}/predictions/{split}"), _labels(f"{run}/predictions/{split}")
        assert len(mine) == CLASSES and mine == theirs, split

    # photographs in a plain folder: every image labelled at its own size or rejected with a reason
    photos = os.path.join(tmp, "photos")
    sizes = _photographs(photos)
    out = os.path.join(tmp, "segmented")
    capsys.readouterr()
    assert main(["segment", run, photos, out, "--overlay"]) == 0
    printed = capsys.readouterr()
    assert "all: 4 images, 3 labelled, 1 rejected" in printed.out and "images/s" in printed.out
    assert "segment: 100%" in printed.err and "img/s]" in printed.err  # the progress bar
    for rel, size in sizes.items():
        label = decode_label(Storage().read_bytes(f"{out}/predictions/all/{rel}.png"))
        assert label.shape == size and label.max() <= CLASSES
        with Image.open(f"{out}/predictions/all_overlay/{rel}.jpg") as overlay:
            # the image as decoded for the model: its short side at least the model's input
            assert overlay.format == "JPEG" and min(overlay.size) >= 2 * 56
    rejected = read_table(Storage(), f"{out}/predictions/rejected_all.parquet").to_pylist()
    assert [(r["id"], bool(r["reason"])) for r in rejected] == [("all/broken", True)]
    summary = json.loads(open(f"{out}/segment.json").read())
    assert summary["processed"] == 4 and summary["images_per_second"] > 0

    # resumable: a re-run labels only what is missing
    os.remove(f"{out}/predictions/all/camera.png")
    kept = os.path.getmtime(f"{out}/predictions/all/chelsea.png")
    assert main(["segment", run, photos, out]) == 0
    assert os.path.exists(f"{out}/predictions/all/camera.png")
    assert os.path.getmtime(f"{out}/predictions/all/chelsea.png") == kept
    assert json.loads(open(f"{out}/segment.json").read())["processed"] == 2  # camera + the broken file

    # bad input is one error line
    capsys.readouterr()
    assert main(["segment", os.path.join(tmp, "no-model"), photos, out]) == 2
    assert capsys.readouterr().err.startswith("error: no model at")


def test_export_model_segments_like_the_run_and_round_trips_onnx(dinov2_run, capsys):
    import onnxruntime

    _, run, root, tmp = dinov2_run
    exported = os.path.join(tmp, "exported")
    photos = os.path.join(tmp, "photos-export")
    _photographs(photos)
    assert main(["export-model", run, exported, "--onnx", "--check-images", photos]) == 0
    printed = capsys.readouterr().out
    assert "max abs logit difference" in printed
    config = json.loads(open(f"{exported}/config.json").read())
    assert config["num_classes"] == CLASSES and config["num_outputs"] == CLASSES + 1
    assert config["background_id"] == 0 and config["output_stride"] == 14
    assert config["input"]["short_side"] == 112 and config["input"]["mean"] == [0.485, 0.456, 0.406]
    assert config["arch"] == "vit_tiny_patch14_reg4_dinov2_test" and config["backbone_license"] == "Apache-2.0"
    assert config["match"] == json.loads(open(f"{run}/eval/match.json").read())
    assert set(config["metrics"]) == {"validation", "test"}
    assert config["onnx"]["max_abs_logit_diff"] < 1e-4 and config["onnx"]["checked_images"] == 3
    card = open(f"{exported}/README.md").read()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "image-segmentation"
    assert front["model-index"][0]["results"][0]["metrics"][0]["type"] == "mean_iou"
    assert "## Licence" in card and "## Metrics" in card

    # the exported folder segments the run's images exactly as the run did
    out = os.path.join(tmp, "from-export")
    assert main(["segment", exported, root, out, "--layout", "imagenet_s"]) == 0
    assert _labels(f"{out}/predictions/validation") == _labels(f"{run}/predictions/validation")

    # the ONNX graph: another height and width than it was traced at, a batch of two photographs
    from pdso_ray.models.dino import to_model_input
    from pdso_ray.models.heads import load_segmenter

    model, _ = load_segmenter(exported)
    session = onnxruntime.InferenceSession(f"{exported}/model.onnx")
    import skimage.data

    x = to_model_input([skimage.data.chelsea(), skimage.data.coffee()], (154, 210))
    with torch.no_grad():
        np.testing.assert_allclose(session.run(["logits"], {"pixel_values": x.numpy()})[0], model(x).numpy(),
                                   atol=1e-4, rtol=0)
