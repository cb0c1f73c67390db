"""The run folder's layout: safe ids, the id <-> relative path mapping, every path from one place."""

import pytest

from pdso_ray.data.ids import check_id, class_folder, id_from_png_rel, image_id, png_rel, rel_of, split_of, unsafe_reason
from pdso_ray.run_layout import RunLayout


@pytest.mark.parametrize("relpath", [
    "n01443537/n01443537_23292", "validation/n0/ILSVRC2012_val_00000001", "a-b_c.d/e",
    "holiday 2024/IMG 0001", "caf\u00e9/cr\u00e8me br\u00fbl\u00e9e", "\u5199\u771f/\u732b",
    "a/b?c", "x" * 200,
])
def test_names_people_use_are_safe(relpath):
    assert unsafe_reason(relpath) is None


@pytest.mark.parametrize("relpath,why", [
    ("", "empty"), ("/etc/passwd", "absolute"), ("../x", "'..'"), ("a/../../x", "'..'"),
    ("a//b", "''"), ("a/./b", "'.'"), ("C:/x", "absolute"), ("a\\b", "non-POSIX"),
    ("a\x00b", "control"), ("a\nb", "control"), ("a\u202eb", "control"),
    ("a\udcffb", "not valid Unicode"), ("x" * 201, "longer than 200 bytes"),
    ("\u00e9" * 101, "longer than 200 bytes"),  # 202 bytes in UTF-8
])
def test_unsafe_names_say_why(relpath, why):
    assert why in unsafe_reason(relpath)


def test_check_id_guards_ids_read_back():
    assert check_id("all/holiday/IMG 1") == "all/holiday/IMG 1"
    with pytest.raises(ValueError, match="unsafe image id"):
        check_id("train/../../etc/passwd")
    with pytest.raises(ValueError, match="no split prefix"):
        check_id("justaname")


def test_id_mapping_round_trips():
    i = image_id("validation", "n01/x y")
    assert i == "validation/n01/x y"
    assert (split_of(i), rel_of(i), png_rel(i), class_folder(i)) == ("validation", "n01/x y", "n01/x y.png", "n01")
    assert id_from_png_rel("validation", png_rel(i)) == i
    with pytest.raises(ValueError, match="not a .png"):
        id_from_png_rel("validation", "n01/x.jpg")


def test_every_path_comes_from_the_layout():
    run = RunLayout("s3://b/run")
    assert run.config_file == "s3://b/run/config.yaml" and run.summary_file == "s3://b/run/summary.json"
    assert run.features_dir == "s3://b/run/features"
    assert RunLayout("s3://b/run", features_source="s3://b/feats").features_dir == "s3://b/feats"
    assert run.label_png("raw", "train/n01/a") == "s3://b/run/labels/raw/train/n01/a.png"
    assert run.prediction_png("all/dir/IMG 1") == "s3://b/run/predictions/all/dir/IMG 1.png"
    assert run.foreground_png("validation/n01/a") == "s3://b/run/predictions/validation_fg/n01/a.png"
    assert run.aligned_file("denoise", "s3://b/run/features/part-1.parquet") == "s3://b/run/denoise/part-1.parquet"
    with pytest.raises(ValueError, match="unsafe"):
        run.label_png("raw", "train/../../x")
    with pytest.raises(ValueError, match="kind"):
        run.label_dir("final")
