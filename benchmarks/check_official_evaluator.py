"""Check pdso-ray's evaluation against the official ImageNet-S evaluator on random data.

    python benchmarks/check_official_evaluator.py --official /path/to/ImageNet-S [--classes 10 50]

``--official`` is a checkout of github.com/LUSSeg/ImageNet-S: a work tree, or a git directory
(e.g. the ``fetch`` tool's mirror, read with ``git show HEAD:...``). Its ``evaluation/`` and
``data/`` files are copied to a temporary folder and run there, in a subprocess; nothing of it
is kept. Without ``--official`` (or when the path is missing) the check is skipped.

Random GT and predictions (sizes 16..64 px, 1-3 objects per image, ignore regions; predictions
= GT under a hidden permutation plus one noise block and one salt id, with arbitrary ids and
1000 under ignored pixels) are written as label PNGs in the official layout. Both sides then
run their own matching; ours also runs with the official matching file. Printed: the max
absolute difference of mIoU, per-class IoU, Acc and the S/MS/ML/L mIoUs, and whether the
matchings agree (where they do not, both must reach the same total co-occurrence: ties are
broken differently by ``munkres`` and scipy). Exits 1 if a difference exceeds ``--tol``.

Adaptations needed to run the official code here, none touching what is compared:
- NumPy 2 rejects its ``uint8_array * 256``; the decode line is patched to widen first, which
  is what NumPy 1 did implicitly.
- Without CUDA, ``Tensor.cuda`` returns the tensor itself.
- ``cv2`` and ``prettytable`` (boundary masks and table printing) are not installed: boundary
  masks are replaced by zeros (boundary IoU is not compared) and the table is never printed.
Needs ``munkres`` (``pip install munkres``), torch and torchvision.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pdso_ray.data.imagenet_s import IGNORE_ID, encode_label
from pdso_ray.evaluation import evaluate_dirs
from pdso_ray.method.metrics import SIZE_BIN_NAMES, SegmentationEvaluator

OFFICIAL_FILES = (
    "evaluation/evaluator.py", "evaluation/match.py", "evaluation/hungarian.py",
    "evaluation/metric.py", "evaluation/tools.py",
    "data/__init__.py", "data/data.py", "data/utils.py",
)
# (original, replacement): widen before the multiply, as NumPy 1's value-based casting did.
NUMPY2_PATCHES = (
    ("gt = gt[:, :, 1] * 256 + gt[:, :, 0]",
     "gt = gt[:, :, 1].astype(np.int64) * 256 + gt[:, :, 0]"),
    ("predict = predict[:, :, 1] * 256 + predict[:, :, 0]",
     "predict = predict[:, :, 1].astype(np.int64) * 256 + predict[:, :, 0]"),
)

# Runs inside the temporary copy; prints one JSON line with the official matching and metrics.
RUNNER = r'''
import json, sys, types
import numpy as np
import torch

root, pred_dir, gt_dir, names, classes, match_path = sys.argv[1:7]
classes = int(classes)
sys.modules["cv2"] = types.ModuleType("cv2")
table = types.ModuleType("prettytable")
table.PrettyTable = object
sys.modules["prettytable"] = table
if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
sys.path[:0] = [root + "/evaluation", root]

import data.data
data.data.EvalDataset.get_boundary_mask = lambda self, mask: np.zeros_like(mask)
from evaluator import evaluator
from match import matching
from tools import get_loader

match = matching(get_loader(pred_dir, gt_dir, name_list=names, workers=0), classes)
match[0] = 0
with open(match_path, "w") as f:
    f.write(json.dumps(match))
log = evaluator(get_loader(pred_dir, gt_dir, name_list=names, workers=0, match=match_path),
                classes)
print(json.dumps({"match": {str(k): int(v) for k, v in match.items()}, "log": log}))
'''


def copy_official(source: Path, dest: Path) -> None:
    """Copy the official evaluation code from a work tree or git directory into ``dest``."""
    for rel in OFFICIAL_FILES:
        if (source / rel).is_file():
            text = (source / rel).read_text()
        else:
            text = subprocess.run(["git", "--git-dir", str(source), "show", f"HEAD:{rel}"],
                                  check=True, capture_output=True, text=True).stdout
        if rel == "data/data.py":
            for old, new in NUMPY2_PATCHES:
                if text.count(old) != 1:
                    raise SystemExit(f"official data/data.py changed: cannot find {old!r}")
                text = text.replace(old, new)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)


def random_dataset(rng: np.random.Generator, classes: int, images: int
                   ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(wnid/name.png, pred, gt)`` triples of random label maps (see the module docstring)."""
    perm = np.concatenate([[0], rng.permutation(classes) + 1])
    out = []
    for i in range(images):
        h, w = (int(x) for x in rng.integers(16, 65, size=2))
        gt = np.zeros((h, w), dtype=np.int64)
        for cls in rng.choice(np.arange(1, classes + 1), size=rng.integers(1, 4), replace=False):
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            y1, x1 = rng.integers(y0 + 2, h + 1), rng.integers(x0 + 2, w + 1)
            gt[y0:y1, x0:x1] = cls
        if rng.random() < 0.6:
            y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            gt[y0:y0 + rng.integers(1, 8), x0:] = IGNORE_ID
        pred = perm[np.where(gt == IGNORE_ID, 0, gt)]
        y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
        pred[y0:y0 + rng.integers(2, h // 2), x0:x0 + rng.integers(2, w // 2)] = (
            rng.integers(0, classes + 1))
        # One salt id per image: salt of many ids would make every id present everywhere and
        # leave image-level matching nothing but ties.
        pred[rng.random((h, w)) < 0.03] = rng.integers(0, classes + 1)
        ignored = gt == IGNORE_ID
        # Under ignored pixels anything goes, even the ignore id: it must be dropped unseen.
        pred[ignored] = rng.choice(np.array([0, 1, classes, IGNORE_ID]), size=int(ignored.sum()))
        out.append((f"n{i % 3:08d}/img_{i:04d}.png", pred, gt))
    return out


def write_dataset(dataset, pred_dir: Path, gt_dir: Path, names: Path) -> None:
    lines = []
    for rel, pred, gt in dataset:
        for folder, label in ((pred_dir, pred), (gt_dir, gt)):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(encode_label(label))
        lines.append(f"{rel[:-4]}.JPEG {rel}")
    names.write_text("\n".join(lines) + "\n")


def max_diff(a, b) -> float:
    """Max |a - b| over paired values; NaN on both sides counts as equal, on one as infinite."""
    worst = 0.0
    for x, y in zip(np.atleast_1d(a), np.atleast_1d(b), strict=True):
        x, y = float(x), float(y)
        if math.isnan(x) or math.isnan(y):
            worst = max(worst, 0.0 if math.isnan(x) and math.isnan(y) else math.inf)
        else:
            worst = max(worst, abs(x - y))
    return worst


def compare(ours, log: dict) -> dict[str, float]:
    """Max abs differences between our result and the official log, per metric."""
    official_sizes = [log[k] for k in SIZE_BIN_NAMES]
    ours_sizes = [ours.size_miou[k] for k in SIZE_BIN_NAMES]
    return {
        "mIoU": max_diff(ours.miou, log["mIoU"]),
        "IoU": max_diff(ours.iou, log["IoUs"]),
        "Acc": max_diff(ours.image_accuracy, log["Acc"]),
        "size_mIoU": max_diff(ours_sizes, official_sizes),
    }


def check(official: Path, classes: int, images: int, seed: int, tol: float) -> bool:
    rng = np.random.default_rng(seed)
    dataset = random_dataset(rng, classes, images)
    with tempfile.TemporaryDirectory(prefix="imagenet_s_check_") as tmp:
        tmp = Path(tmp)
        copy_official(official, tmp / "official")
        pred_dir, gt_dir, names = tmp / "pred", tmp / "gt", tmp / "names.txt"
        write_dataset(dataset, pred_dir, gt_dir, names)
        official_match = tmp / "official_match.json"
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(tmp / "official"), str(pred_dir), str(gt_dir),
             str(names), str(classes), str(official_match)],
            capture_output=True, text=True, cwd=tmp / "official" / "evaluation")
        if proc.returncode != 0:
            raise SystemExit(f"official evaluator failed:\n{proc.stderr[-4000:]}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        with_their_match = evaluate_dirs(str(pred_dir), str(gt_dir), classes,
                                         match_file=str(official_match), progress=False)
        own = evaluate_dirs(str(pred_dir), str(gt_dir), classes, progress=False)

    official_match_map = {int(k): v for k, v in theirs["match"].items()}
    ev = SegmentationEvaluator(classes)
    for rel, pred, gt in dataset:
        ev.update(pred, gt, name=rel)
    cooc = ev.cooccurrence

    def total(m: dict[int, int]) -> int:
        return int(sum(cooc[p - 1, g - 1] for p, g in m.items() if p > 0))

    same_match = own.match == official_match_map
    diffs_theirs = compare(with_their_match, theirs["log"])
    diffs_own = compare(own, theirs["log"])
    print(f"C={classes} images={images} seed={seed}: official mIoU {theirs['log']['mIoU']:.4f}, "
          f"ours {own.miou:.4f}; matchings {'identical' if same_match else 'differ'} "
          f"(co-occurrence total ours {total(own.match)}, official {total(official_match_map)})")
    print("  with the official matching:  "
          + ", ".join(f"max|d {k}| {v:.2e}" for k, v in diffs_theirs.items()))
    print("  with our own matching:       "
          + ", ".join(f"max|d {k}| {v:.2e}" for k, v in diffs_own.items()))
    ok = all(v <= tol for v in diffs_theirs.values())
    ok &= total(own.match) == total(official_match_map)
    # Tied matchings may legitimately differ; then only the optimal total is required of ours.
    ok &= not same_match or all(v <= tol for v in diffs_own.values())
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", default=None,
                        help="ImageNet-S checkout (work tree or git directory)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if not args.official or not os.path.exists(args.official):
        print(f"skipped: official ImageNet-S checkout not found ({args.official!r}); "
              "pass --official PATH")
        return 0
    try:
        import munkres  # noqa: F401  (the official matching imports it)
    except ImportError:
        print("the official evaluator needs munkres: pip install munkres", file=sys.stderr)
        return 1
    ok = True
    for classes in args.classes:
        ok &= check(Path(args.official), classes, args.images, args.seed + classes, args.tol)
    print("OK" if ok else f"FAILED: a difference exceeds {args.tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
