"""Evaluating folders of label PNGs: pairing, match files, errors, the CLI entry."""

import json
import uuid

import numpy as np
import pytest

from pdso_ray.data.imagenet_s import IGNORE_ID, encode_label
from pdso_ray.cli import main as cli_main
from pdso_ray.evaluation import evaluate_dirs, pair_files
from pdso_ray.storage import Storage

C = 3
# GT id -> predicted id: the model's clusters are a relabelling of the true classes.
PERM = np.array([0, 2, 3, 1])


def _gt_maps():
    """Four 8x10 GT maps covering every id 0..C, with ignore pixels."""
    maps = {}
    for i, rel in enumerate(["n001/a.png", "n001/b.png", "n002/c.png", "n003/d.png"]):
        gt = np.zeros((8, 10), dtype=np.int64)
        gt[2:6, 1:7] = 1 + i % C
        gt[7, :] = IGNORE_ID
        maps[rel] = gt
    return maps


def _write(storage, root, maps):
    for rel, label in maps.items():
        storage.write_bytes(storage.join(root, rel), encode_label(label))


def _dataset(storage, root, pred_fn=lambda gt: PERM[np.where(gt == IGNORE_ID, 0, gt)]):
    gts = _gt_maps()
    _write(storage, f"{root}/gt", gts)
    _write(storage, f"{root}/pred", {rel: pred_fn(gt) for rel, gt in gts.items()})
    return f"{root}/pred", f"{root}/gt"


def test_permuted_predictions_score_100_and_match_file_is_written(tmp_path):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    match_file = str(tmp_path / "eval" / "match.json")
    res = evaluate_dirs(pred, gt, C, match_file=match_file, storage=storage, progress=False)
    assert res.miou == pytest.approx(100.0)
    assert res.num_images == 4 and res.num_pixels == 4 * 7 * 10
    expected = {str(int(PERM[g])): g for g in range(C + 1)}
    assert json.loads((tmp_path / "eval" / "match.json").read_text()) == expected
    assert res.to_json()["match"] == expected


def test_existing_match_file_is_reused(tmp_path):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    match_file = str(tmp_path / "match.json")
    # An identity match on permuted predictions: only a read (not recomputed) match scores 0.
    (tmp_path / "match.json").write_text(json.dumps({str(i): i for i in range(C + 1)}))
    res = evaluate_dirs(pred, gt, C, match_file=match_file, storage=storage, progress=False)
    assert res.match == {i: i for i in range(C + 1)}
    assert res.iou[1:] == pytest.approx([0.0] * C)
    # Validation writes the matching, test reuses it.
    val_match = str(tmp_path / "val_match.json")
    evaluate_dirs(pred, gt, C, match_file=val_match, storage=storage, progress=False)
    written = (tmp_path / "val_match.json").read_text()
    res = evaluate_dirs(pred, gt, C, match_file=val_match, storage=storage, progress=False)
    assert res.miou == pytest.approx(100.0)
    assert (tmp_path / "val_match.json").read_text() == written


def test_bad_match_file_is_an_error(tmp_path):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    (tmp_path / "match.json").write_text(json.dumps({"1": 9}))
    with pytest.raises(ValueError, match=r"match\.json.*outside 0..3"):
        evaluate_dirs(pred, gt, C, match_file=str(tmp_path / "match.json"), storage=storage,
                      progress=False)


def test_missing_predictions_are_listed(tmp_path):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    (tmp_path / "pred" / "n001" / "b.png").unlink()
    (tmp_path / "pred" / "n003" / "d.png").unlink()
    with pytest.raises(ValueError, match=r"2 of 4 ground-truth files .*: n001/b\.png, n003/d\.png"):
        evaluate_dirs(pred, gt, C, storage=storage, progress=False)


def test_missing_prediction_list_is_capped_at_ten(tmp_path):
    storage = Storage()
    _write(storage, str(tmp_path / "gt"), {f"n1/{i:02d}.png": np.zeros((2, 2), int)
                                           for i in range(13)})
    with pytest.raises(ValueError, match=r"13 of 13 .*n1/09\.png and 3 more$"):
        pair_files(storage, str(tmp_path / "pred"), str(tmp_path / "gt"))


def test_size_mismatch_names_the_file_unless_resizing(tmp_path):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    small = encode_label(np.zeros((4, 5), dtype=np.int64))
    storage.write_bytes(f"{pred}/n002/c.png", small)
    with pytest.raises(ValueError, match=r"n002/c\.png.*\(4, 5\).*\(8, 10\)"):
        evaluate_dirs(pred, gt, C, storage=storage, progress=False)
    res = evaluate_dirs(pred, gt, C, storage=storage, progress=False, resize="nearest")
    assert res.resized == ["n002/c.png"]
    assert res.miou < 100.0


def test_empty_gt_and_corrupt_png_are_errors(tmp_path):
    storage = Storage()
    with pytest.raises(ValueError, match="no ground-truth"):
        evaluate_dirs(str(tmp_path / "p"), str(tmp_path / "g"), C, storage=storage,
                      progress=False)
    pred, gt = _dataset(storage, str(tmp_path))
    (tmp_path / "pred" / "n001" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"n001/a\.png: not a readable label PNG"):
        evaluate_dirs(pred, gt, C, storage=storage, progress=False, workers=2)


def test_extra_predictions_and_hidden_files_are_ignored(tmp_path):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    storage.write_bytes(f"{pred}/n009/extra.png", encode_label(np.ones((3, 3), int)))
    storage.write_bytes(f"{gt}/n001/.tmp-x-a.png", b"partial write")
    pairs = pair_files(storage, pred, gt)
    assert [f.rel for f in pairs] == ["n001/a.png", "n001/b.png", "n002/c.png", "n003/d.png"]


def test_memory_urls_and_single_thread(tmp_path):
    storage = Storage()
    root = f"memory://eval-{uuid.uuid4().hex}"
    pred, gt = _dataset(storage, root)
    res = evaluate_dirs(pred, gt, C, match_file=f"{root}/m.json", storage=storage,
                        progress=False, workers=1)
    assert res.miou == pytest.approx(100.0)
    assert storage.read_json(f"{root}/m.json") == {str(int(PERM[g])): g for g in range(C + 1)}


def _cli(argv):
    return cli_main(["evaluate", *argv])


def test_cli_json_prints_one_line(tmp_path, capsys):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    assert _cli(["--pred", pred, "--gt", gt, "--classes", str(C), "--json", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    payload = json.loads(out)
    assert payload["mIoU"] == pytest.approx(100.0)
    assert payload["IoU"] == pytest.approx([100.0] * (C + 1))
    assert payload["match"] == {str(int(PERM[g])): g for g in range(C + 1)}


def test_cli_table_and_error_status(tmp_path, capsys):
    storage = Storage()
    pred, gt = _dataset(storage, str(tmp_path))
    assert _cli(["--pred", pred, "--gt", gt, "--classes", str(C), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mIoU 100.00" in out and out.strip().endswith("3  100.00")
    assert _cli(["--pred", str(tmp_path / "nope"), "--gt", gt, "--classes", str(C),
                 "--quiet"]) == 2
    assert "4 of 4 ground-truth files have no prediction" in capsys.readouterr().err
