"""Previews beside the label PNGs: where they go, what they hold, when they are written."""

import io

import numpy as np
import pytest
from PIL import Image

from pdso_ray.config import load_config
from pdso_ray.method.overlay import class_colors
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.previews import PreviewWriter, encode_colour_png, previews_wanted
from pdso_ray.storage import Storage


def test_previews_sit_beside_the_split_folder_of_their_labels(tmp_path):
    run = RunLayout(str(tmp_path / "run"))
    assert run.colour_png("raw", "train/n01/a") == f"{run.root}/labels/raw/train_colour/n01/a.png"
    assert run.overlay_jpg("refined", "all/x/y") == f"{run.root}/labels/refined/all_overlay/x/y.jpg"
    assert run.colour_png("predictions", "validation/n01/a") == f"{run.root}/predictions/validation_colour/n01/a.png"
    lightcluster = run.for_method("lightcluster")
    assert lightcluster.overlay_jpg("predictions", "all/b") == f"{run.root}/lightcluster/predictions/all_overlay/b.jpg"
    with pytest.raises(ValueError, match="preview kind"):
        run.colour_dir("saliency", "validation")


def test_writer_writes_the_label_in_the_palette_and_the_image_under_it(tmp_path):
    storage, run = Storage(), RunLayout(str(tmp_path / "run"))
    label = np.zeros((6, 8), np.int32)
    label[1:4, 2:6] = 7
    label[5, 7] = 1000
    image = np.full((12, 16, 3), 40, np.uint8)  # the writer's image may be larger than the label
    PreviewWriter(storage, run).write("predictions", "all/photo", label, image)

    colour = np.asarray(Image.open(io.BytesIO(storage.read_bytes(run.colour_png("predictions", "all/photo")))).convert("RGB"))
    assert np.array_equal(colour, class_colors()[label])
    with Image.open(io.BytesIO(storage.read_bytes(run.overlay_jpg("predictions", "all/photo")))) as im:
        assert im.format == "JPEG" and im.size == (16, 12)
        blended = np.asarray(im.convert("RGB")).astype(int)
    expected = np.rint(0.5 * 40 + 0.5 * class_colors()[7]).astype(int)
    assert np.abs(blended[4, 6] - expected).max() <= 12  # inside the object (JPEG tolerance)
    assert np.abs(blended[0, 0] - 40).max() <= 12  # background: the image as it was

    PreviewWriter(storage, run).write("raw", "all/no-image", label, None)  # colour only
    assert storage.exists(run.colour_png("raw", "all/no-image"))
    assert not storage.exists(run.overlay_jpg("raw", "all/no-image"))


def test_overlay_takes_a_device_tensor_and_shrinks_a_large_photo(tmp_path):
    import torch

    from pdso_ray.stages.previews import OVERLAY_MAX_SIDE

    storage, run = Storage(), RunLayout(str(tmp_path / "run"))
    label = np.ones((30, 40), np.int32)
    photo = torch.full((1500, 2000, 3), 90, dtype=torch.uint8)  # what the GPU decode path hands over
    PreviewWriter(storage, run).write("predictions", "all/big", label, photo)
    with Image.open(io.BytesIO(storage.read_bytes(run.overlay_jpg("predictions", "all/big")))) as im:
        assert im.size == (OVERLAY_MAX_SIDE, 768)
        centre = np.asarray(im.convert("RGB"))[384, 512].astype(int)
    assert np.abs(centre - np.rint(0.5 * 90 + 0.5 * class_colors()[1])).max() <= 12


def test_colour_png_is_paletted_up_to_256_ids_and_rgb_beyond():
    few = np.array([[0, 5], [1000, 5]], dtype=np.int32)
    many = np.arange(1, 301, dtype=np.int32).reshape(15, 20)
    for label, mode in ((few, "P"), (many, "RGB")):
        with Image.open(io.BytesIO(encode_colour_png(label))) as im:
            assert im.mode == mode
            assert np.array_equal(np.asarray(im.convert("RGB")), class_colors()[label])


@pytest.mark.parametrize("previews, output_format, wanted", [
    ("auto", "files", True), ("auto", "webdataset", False), ("files", "webdataset", True), ("none", "files", False)])
def test_previews_key_decides_with_the_output_format(previews, output_format, wanted):
    cfg = load_config(None, ["data.classes=2", f"previews={previews}", f"output_format={output_format}"])
    assert previews_wanted(cfg) is wanted
