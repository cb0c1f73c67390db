"""``pdso-ray export RUN OUT.zip``: pack a run's test predictions for the ImageNet-S server.

The archive has the layout that LUSSeg's reference inference script (LUSSeg/PASS
``inference.py --mode test``) zips for the online benchmark, everything at the archive root::

    <wnid>/<stem>.png   one per test image: predicted ids in the label codec (R + 256·G),
                        at the image's own size, *not* matched (the server applies match.json)
    match.json          the validation matching, {"pred id": gt id}
    method.txt          "Method name: ...", "Training data: ...", "Training scheme: ...",
                        "Networks: ...", "Paper/Project link: ...", "Method description: ..."

The predictions are packed as the evaluate stage scored them: argmax over the C+1 outputs, the
official decision rule; they are read from PNG files or from PNG shards (``output_format:
webdataset``), and the zip holds PNG files either way, each named by its image's name in the source
(a shard's sample key: shards made from an ImageNet-S tree by ``make-shards`` give the server's
``<wnid>/<stem>.png``). When the run's dataset is reachable, a test image without a prediction is
an error: the server scores a whole split. The zip is written under a temporary name beside ``OUT`` and then moved into place.
"""

from __future__ import annotations

import json
import logging
import uuid
import zipfile
from dataclasses import dataclass

from pdso_ray.config import PipelineConfig
from pdso_ray.data.ids import LABEL_SUFFIX, id_from_png_rel, png_rel, unsafe_reason
from pdso_ray.data.imagenet_s import TEST, VALIDATION
from pdso_ray.data.layouts import build_layout
from pdso_ray.data.png_sets import png_files
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
    found = png_files(storage, pred_dir)  # PNG files or PNG shards
    rels = sorted(found)
    if not rels:
        raise ValueError(f"no predictions under {pred_dir}")
    cfg = load_run_config(storage, run_url, results)
    layout = _layout(storage, cfg)
    checked = _check_complete(storage, layout, split, rels, pred_dir)
    names = _entry_names(layout, split, rels)
    method_txt = (f"Method name: {method}\n"
                  f"Training data: {_training_data(cfg)}\n"
                  "Training scheme: unsupervised\n"
                  f"Networks: {_networks(cfg)}\n"
                  f"Paper/Project link: {link}\n"
                  f"Method description: {description}")

    def entries():
        for rel in rels:
            yield names[rel], storage.read_bytes(found[rel])
        yield "match.json", json.dumps(match).encode()
        yield "method.txt", method_txt.encode()

    _write_zip(storage, out_url, entries())
    return ExportResult(url=out_url, images=len(rels), checked_against_dataset=checked)


def _layout(storage: Storage, cfg: PipelineConfig | None):
    """The run's image layout, None without a config or when its data is not reachable."""
    if cfg is None:
        return None
    try:
        return build_layout(cfg.data, storage)
    except FileNotFoundError:
        log.warning("export: %s not reachable: completeness not checked", cfg.data.root)
        return None


def _check_complete(storage: Storage, layout, split: str, rels: list[str], pred_dir: str) -> bool:
    """ValueError if the dataset lists ``split`` images that have no prediction; False when the
    dataset cannot be listed (no config, or its images are not reachable from here)."""
    if layout is None:
        return False
    try:
        listing = layout.list_split(storage, split)
    except FileNotFoundError:
        log.warning("export: %s images not reachable: completeness not checked", split)
        return False
    have = set(rels)
    expected = [png_rel(rec.id) for rec in listing.images]
    _fail_if_missing([r for r in expected if r not in have], len(expected),
                     f"have no prediction under {pred_dir}")
    return True


def _entry_names(layout, split: str, rels: list[str]) -> dict[str, str]:
    """``{rel: zip entry}``: each prediction under its image's name in the source
    (``layout.source_name``: for shards made from an ImageNet-S tree, ``<wnid>/<stem>.png``, what
    the server expects); the relative name itself when the layout is unknown. ValueError when two
    images would share an entry."""
    names = {rel: rel if layout is None else layout.source_name(id_from_png_rel(split, rel)) + LABEL_SUFFIX
             for rel in rels}
    seen: dict[str, str] = {}
    for rel, name in names.items():
        problem = unsafe_reason(name)
        if problem is not None:
            raise ValueError(f"prediction {rel!r} cannot be a zip entry {name!r}: {problem}")
        if name in seen:
            raise ValueError(f"predictions {seen[name]!r} and {rel!r} would both be {name!r} in the zip "
                             "(two shards hold the same key)")
        seen[name] = rel
    return names


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
