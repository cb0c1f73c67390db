"""``pdso-ray export RUN OUT.zip``: pack a run's test predictions for the ImageNet-S server.

The archive has the layout that LUSSeg's reference inference script (LUSSeg/PASS
``inference.py --mode test``) zips for the online benchmark, everything at the archive root::

    <wnid>/<stem>.png   one per test image: predicted ids in the label codec (R + 256·G),
                        at the image's own size, *not* matched (the server applies match.json)
    match.json          the validation matching, {"pred id": gt id}
    method.txt          "Method name: ...", "Training data: ...", "Training scheme: ...",
                        "Networks: ...", "Paper/Project link: ...", "Method description: ..."

The predictions are packed as the evaluate stage scored them: argmax over the C+1 outputs, the
official decision rule. When the run's dataset is reachable, a test image without a prediction is
an error: the server scores a whole split. The zip is written under a temporary name beside ``OUT`` and then moved into place.
"""

from __future__ import annotations

import json
import logging
import uuid
import zipfile
from dataclasses import dataclass

from pdso_ray.config import PipelineConfig
from pdso_ray.data.imagenet_s import TEST, VALIDATION
from pdso_ray.data.layouts import build_layout
from pdso_ray.data.ids import LABEL_SUFFIX, png_rel, unsafe_reason
from pdso_ray.run_layout import RunLayout, load_run_config
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")

_MAX_LISTED = 10  # missing files named in an error before the rest becomes a count


@dataclass(frozen=True)
class ExportResult:
    """What went into the archive: its URL, the number of prediction PNGs and whether completeness
    was checked against the dataset listing."""

    url: str
    images: int
    checked_against_dataset: bool


def export_submission(storage: Storage, run_url: str, out_url: str, split: str = TEST,
                      method: str = "PDSO (pdso-ray)", description: str = "null",
                      link: str = "null", results: str = "pdso") -> ExportResult:
    """Write the benchmark zip of ``split``'s predictions in ``run_url`` to ``out_url``.

    ``results``: whose predictions (``pdso``, or ``lightcluster`` for its ``lightcluster/``
    folder); ``method`` is the name written to method.txt.

    Raises ValueError when the run has no matching (the evaluate stage has not run), no
    predictions for ``split``, an unsafe file name, or (dataset reachable) test images without a
    prediction.
    """
    if split not in (TEST, VALIDATION):
        raise ValueError(f"split must be {TEST!r} or {VALIDATION!r}, got {split!r}")
    run = RunLayout(run_url, method=results)
    match_url = run.eval_file("match.json")
    if not storage.exists(match_url):
        raise ValueError(f"{match_url} not found: run the evaluate stage first (the server "
                         "needs the validation matching)")
    match = storage.read_json(match_url)

    pred_dir = run.predictions_dir(split)
    rels = sorted(storage.list_relative(pred_dir, LABEL_SUFFIX))
    if not rels:
        raise ValueError(f"no predictions under {pred_dir}")
    for rel in rels:
        problem = unsafe_reason(rel)
        if problem is not None:
            raise ValueError(f"prediction {rel!r} cannot be a zip entry: {problem}")
    cfg = load_run_config(storage, run_url, results)
    checked = _check_complete(storage, cfg, split, rels, pred_dir)
    method_txt = (f"Method name: {method}\n"
                  f"Training data: {_training_data(cfg)}\n"
                  "Training scheme: unsupervised\n"
                  f"Networks: {_networks(cfg)}\n"
                  f"Paper/Project link: {link}\n"
                  f"Method description: {description}")

    def entries():
        for rel in rels:
            yield rel, storage.read_bytes(storage.join(pred_dir, rel))
        yield "match.json", json.dumps(match).encode()
        yield "method.txt", method_txt.encode()

    _write_zip(storage, out_url, entries())
    return ExportResult(url=out_url, images=len(rels), checked_against_dataset=checked)


def _check_complete(storage: Storage, cfg: PipelineConfig | None, split: str, rels: list[str],
                    pred_dir: str) -> bool:
    """ValueError if the dataset lists ``split`` images that have no prediction; False when the
    dataset cannot be listed (no config, or its images are not reachable from here)."""
    if cfg is None:
        return False
    try:
        listing = build_layout(cfg.data).list_split(storage, split)
    except FileNotFoundError:
        log.warning("export: %s images of %s not reachable: completeness not checked",
                    split, cfg.data.root)
        return False
    have = set(rels)
    expected = [png_rel(rec.id) for rec in listing.images]
    _fail_if_missing([r for r in expected if r not in have], len(expected),
                     f"have no prediction under {pred_dir}")
    return True


def _write_zip(storage: Storage, out_url: str, entries) -> None:
    """Write ``(name, bytes)`` entries as a zip at ``out_url``, atomically: under a temporary
    name beside it, then moved (a rename locally; on object stores the upload only completes
    when the file closes and the move is a server-side copy). Streams, so a 27k-image test set
    never sits in memory; zipfile handles the unseekable S3 writer with data descriptors."""
    parent, _, name = out_url.rpartition("/")
    tmp_name = f".tmp-{uuid.uuid4().hex}-{name}"
    tmp_url = f"{parent}/{tmp_name}" if parent else tmp_name
    if parent:
        storage.makedirs(parent)
    fs, tmp_path = storage.fs(tmp_url)
    _, out_path = storage.fs(out_url)
    try:
        with storage.open(tmp_url, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            for entry, data in entries:
                zf.writestr(entry, data)
        fs.mv(tmp_path, out_path)
    finally:
        if fs.exists(tmp_path):
            fs.rm(tmp_path)


def _fail_if_missing(missing: list[str], total: int, what: str) -> None:
    if missing:
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise ValueError(f"{len(missing)} of {total} images {what}: "
                         f"{', '.join(missing[:_MAX_LISTED])}{more}")


def _training_data(cfg: PipelineConfig | None) -> str:
    return f"ImageNet-S{cfg.data.classes} train images, no labels" if cfg else "null"


def _networks(cfg: PipelineConfig | None) -> str:
    if cfg is None:
        return "null"
    if cfg.method == "lightcluster" and not cfg.lightcluster.finetune:
        return f"{cfg.models.dino.arch} (attention features; training-free clustering)"
    return f"{cfg.models.dino.arch} (features), {cfg.finetune.backbone} (segmentation)"
