"""Listing a user's own folder: names people use are fine, every file is accounted for, and files
that must not be read (devices, FIFOs, symlinks out of the data root, huge files) are rejected."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from pdso_ray.config import DataConfig
from pdso_ray.data.decode import decode_image
from pdso_ray.data.layouts import ALL, build_layout
from pdso_ray.data.listing import list_tree
from pdso_ray.storage import Storage


def _png(h=8, w=10):
    buf = io.BytesIO()
    noise = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "My Photos"
    files = {"top.jpg": _png(), "vacation 2024/caf\u00e9 \u5199\u771f.png": _png(),
             "vacation 2024/sub dir/IMG_0001.JPG": _png(), "vacation 2024/notes.txt": b"hi",
             ".DS_Store": b"junk", "big.png": _png(64, 64)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (tmp_path / "elsewhere.png").write_bytes(_png())
    os.symlink(root / "top.jpg", root / "link inside.jpg")
    os.symlink(tmp_path / "elsewhere.png", root / "link outside.png")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "pipe.jpg")
    os.symlink(root / "missing.png", root / "dangling.png")
    return root


def test_a_plain_folder_lists_every_file_once(tree):
    storage = Storage()
    layout = build_layout(DataConfig(root=str(tree), classes=3, layout="folder", max_file_bytes=1000))
    assert layout.train_split() == ALL and not layout.folder_is_class
    listing = layout.list_split(storage, ALL)
    assert sorted(r.id for r in listing.images) == sorted([
        "all/top", "all/vacation 2024/caf\u00e9 \u5199\u771f", "all/vacation 2024/sub dir/IMG_0001",
        "all/link inside"])
    assert all(r.wnid == "" and r.split == ALL for r in listing.images)
    reasons = {os.path.basename(r.path): r.reason for r in listing.rejected}
    assert set(reasons) == {"link outside.png", "zero.jpg", "pipe.jpg", "dangling.png", "big.png"}
    assert "outside the data root" in reasons["link outside.png"]
    assert "outside the data root" in reasons["zero.jpg"]
    assert "not a regular file" in reasons["pipe.jpg"] and "not a regular file" in reasons["dangling.png"]
    assert "larger than 1000 bytes" in reasons["big.png"]
    assert sorted(os.path.basename(u) for u in listing.ignored) == [".DS_Store", "notes.txt"]
    assert listing.total == len(listing.images) + len(listing.rejected) == 9
    # no split or ground truth: every image is predicted, none evaluated
    (info,) = layout.eval_splits(storage)
    assert info.present and info.gt_dir is None and "no ground truth" in info.note


def test_missing_split_or_ground_truth_is_a_note_not_an_error(tmp_path):
    from pdso_ray.data.synthetic import make_demo_dataset

    storage = Storage()
    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=2, train_per_class=1, val_per_class=1, test_per_class=0)
    storage.remove(f"{root}/ImageNetS2/validation-segmentation", recursive=True)
    infos = {i.split: i for i in build_layout(DataConfig(root=root, classes=2)).eval_splits(storage)}
    assert infos["validation"].present and infos["validation"].gt_dir is None
    assert "no ground truth" in infos["validation"].note
    assert not infos["test"].present and "no test split" in infos["test"].note


def test_list_tree_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_tree(Storage(), str(tmp_path / "nope"), ALL, class_folders=False)


def test_a_gif_decodes_to_its_first_frame():
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    result = decode_image(buf.getvalue())
    assert result.ok and result.image.shape == (4, 6, 3)
    assert tuple(result.image[0, 0]) == (255, 0, 0)


def test_symlinked_folders_are_read_inside_the_data_root_and_accounted_for_otherwise(tmp_path):
    """A class folder that is a symlink: into the data root, its images are listed under the link's
    name; out of it, or at a folder listed already (a loop), it is one rejected record with the
    reason — never "a non-image file ignored"."""
    from pdso_ray.data.listing import count_images

    root, outside = tmp_path / "data", tmp_path / "outside"
    train = root / "ImageNetS2" / "train"
    for folder, names in ((train / "n01", ["a.jpg"]), (root / "extra" / "n02", ["b.jpg", "c.jpg"]),
                          (outside / "n03", ["d.jpg"])):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(_png())
    os.symlink(root / "extra" / "n02", train / "n02")  # inside the data root, outside the split
    os.symlink(outside / "n03", train / "n03")         # out of the data root
    os.symlink(train, train / "n01" / "loop")          # back up: listed already
    listing = list_tree(Storage(), str(train), "train", class_folders=True, data_root=str(root))
    assert [r.id for r in listing.images] == ["train/n01/a", "train/n02/b", "train/n02/c"]
    assert listing.images[1].path == str(train / "n02" / "b.jpg")
    reasons = {r.path: r.reason for r in listing.rejected}
    assert set(reasons) == {str(train / "n03"), str(train / "n01" / "loop")}
    assert "outside the data root" in reasons[str(train / "n03")]
    assert "listed already" in reasons[str(train / "n01" / "loop")]
    assert listing.ignored == []
    # the preflight's quick count walks the same folders, and stops when it has seen enough
    assert count_images(Storage(), str(train), class_folders=True, data_root=str(root)) == 3
    assert count_images(Storage(), str(train), class_folders=True, data_root=str(root), enough=2) == 2
