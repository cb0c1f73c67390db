"""``pdso-ray make-shards SRC DST --images-per-shard N``: any image source into WebDataset shards.

The source is read through its layout (:mod:`pdso_ray.data.layouts`: an ImageNet-S tree, a folder
of images, Parquet tables or other shards; ``auto`` recognises an ImageNet-S tree by its
``ImageNetS{C}`` folder), every URL through :class:`~pdso_ray.storage.Storage`, so both sides may
be any fsspec URL. Each split becomes ``DST/<split>/NNNNNN.tar`` (a source without splits:
``DST/NNNNNN.tar``), ``N`` images per shard in listing order, in the layout
``data.layout: webdataset`` reads:

- the sample's key is the image's id below its split (``n01443537/n01443537_10007`` for ImageNet-S),
  so its id in a run on the shards is ``<split>/<shard>/<key>``; a dot in the key's file name
  (which WebDataset would read as the start of the extension) is written ``%2E``, a ``%`` as ``%25``;
- the image's bytes as they are, under the source's suffix (``jpeg``, ``jpg``, ``png``, ``webp``);
  other formats (BMP, TIFF, GIF) are decoded and stored as PNG;
- ``cls``: its class (the class folder, or the source sample's class) when it has one;
- ``seg.png``: its ground truth when the split has some (ImageNet-S ``validation-segmentation``);

and beside each shard its index (``.NNNNNN.tar.idx.parquet``, hidden): listing the shards then
reads these small files instead of the shards' headers.

**Resumable.** The plan (which image goes into which shard) is a function of the source listing
and ``N``, recorded in ``DST/.make-shards.json`` before the first shard; each shard is written
whole (one atomic write), so a re-run writes only the shards that are missing. A re-run whose
plan differs (the source or ``N`` changed) stops with an error rather than mix two conversions.
Images the listing rejects are not copied; they are counted and listed, with their reasons, in
the plan file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from pdso_ray.config import DataConfig
from pdso_ray.data.decode import decode_image
from pdso_ray.data.layouts import build_layout
from pdso_ray.data.listing import ImageRecord
from pdso_ray.data.members import read_many
from pdso_ray.data.png_sets import png_files
from pdso_ray.data.sources import ALL, PLAN_FILE
from pdso_ray.data.tar_shards import escape_key, tar_bytes
from pdso_ray.data.webdataset import IMAGE_EXTENSIONS, write_shard_index
from pdso_ray.data.ids import png_rel, rel_of
from pdso_ray.storage import Storage, parse_range_url

log = logging.getLogger("pdso_ray")

SOURCE_LAYOUTS = ("auto", "imagenet_s", "folder", "webdataset", "parquet")
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))


@dataclass
class MakeShardsResult:
    """What a conversion did: shards ``written`` now and ``skipped`` (there from an earlier run),
    ``images`` in all the shards, images the listing ``rejected`` (not copied), images that could
    not be read now (``unreadable``: not copied, listed in the log)."""

    written: int = 0
    skipped: int = 0
    images: int = 0
    rejected: int = 0
    unreadable: list[str] = field(default_factory=list)


def source_config(storage: Storage, src: str, layout: str = "auto", classes: int | None = None,
                  folder_is_class: bool = False) -> DataConfig:
    """The data section that reads ``src``: ``auto`` takes an ImageNet-S tree when ``src`` is (or
    holds exactly one) ``ImageNetS{C}`` folder, else a folder of images."""
    if layout not in SOURCE_LAYOUTS:
        raise ValueError(f"unknown source layout {layout!r}; choose one of {', '.join(SOURCE_LAYOUTS)}")
    if not storage.exists(src):
        raise FileNotFoundError(f"source not found: {src}")
    root = src
    if layout in ("auto", "imagenet_s"):
        named = re.fullmatch(r"ImageNetS(\d+)", posixpath.basename(src.rstrip("/")))
        if named:
            root, found = posixpath.dirname(src.rstrip("/")), [int(named.group(1))]
        else:
            found = [int(m.group(1)) for d in storage.list_dirs(src)
                     if (m := re.fullmatch(r"ImageNetS(\d+)", posixpath.basename(d)))]
        if classes is not None and (classes in found or layout == "imagenet_s"):
            found = [classes]
        if len(found) == 1:
            return DataConfig(root=root, classes=found[0], layout="imagenet_s", folder_is_class=True)
        if layout == "imagenet_s":
            raise ValueError(f"{src} holds {'no' if not found else 'several'} ImageNetS{{C}} folders "
                             f"({', '.join(map(str, found)) or 'none'}): name one with --classes")
        layout = "folder"
    return DataConfig(root=root, classes=classes or 1, layout=layout, folder_is_class=folder_is_class)


def shard_key(record: ImageRecord) -> str:
    """The sample key of an image: its id below its split, dots in its file name escaped (module
    docstring, :func:`~pdso_ray.data.tar_shards.escape_key`)."""
    return escape_key(rel_of(record.id))


def image_extension(url: str, data: bytes) -> str | None:
    """The member extension for an image: its source suffix when WebDataset readers take it,
    else what its bytes are (JPEG, PNG); None when they must be re-encoded."""
    parsed = parse_range_url(url)
    name = parsed[3] if parsed and parsed[3] else url.split("#", 1)[0]  # a shard's member, a table
    suffix = posixpath.splitext(posixpath.basename(name))[1].lower().lstrip(".")
    if suffix in IMAGE_EXTENSIONS:
        return suffix
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


def make_shards(storage: Storage, src: str, dst: str, images_per_shard: int, layout: str = "auto",
                classes: int | None = None, folder_is_class: bool = False, workers: int = 8,
                progress: bool = False) -> MakeShardsResult:
    """Convert ``src`` into shards under ``dst`` (module docstring); ``workers`` shards are read
    and written at once; ``progress``: a progress bar on stderr."""
    if images_per_shard < 1:
        raise ValueError(f"--images-per-shard must be >= 1, got {images_per_shard}")
    cfg = source_config(storage, src, layout, classes, folder_is_class)
    source = build_layout(cfg, storage)
    splits = [info.split for info in source.eval_splits(storage) if info.present]
    splits = list(dict.fromkeys([source.train_split(), *splits]))
    plan, result, jobs = {"source": src, "layout": cfg.layout, "images_per_shard": images_per_shard,
                          "splits": {}}, MakeShardsResult(), []
    for split in splits:
        listing = source.list_split(storage, split)
        gt_source = source.gt_dir(storage, split) if split != source.train_split() else None
        gt = png_files(storage, gt_source) if gt_source is not None else {}
        folder = dst if split == ALL else Storage.join(dst, split)
        shards = []
        for n, start in enumerate(range(0, len(listing.images), images_per_shard)):
            records = listing.images[start:start + images_per_shard]
            url = Storage.join(folder, f"{n:06d}.tar")
            shards.append({"name": url.rsplit("/", 1)[-1],
                           "ids": hashlib.sha1("\n".join(r.id for r in records).encode()).hexdigest()})
            jobs.append((url, records, gt))
        plan["splits"][split] = {"images": len(listing.images), "shards": shards,
                                 "rejected": [{"path": r.path, "reason": r.reason} for r in listing.rejected]}
        result.rejected += len(listing.rejected)
    _claim(storage, dst, plan)
    bar = tqdm(total=len(jobs), desc="make-shards", unit="shard", file=sys.stderr, mininterval=5.0,
               disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for count, unreadable in pool.map(lambda job: _write_shard(storage, cfg, *job), jobs):
            bar.update(1)
            result.written += count is not None
            result.skipped += count is None
            result.unreadable += unreadable
    result.images = sum(s["images"] for s in plan["splits"].values()) - len(result.unreadable)
    return result


def _claim(storage: Storage, dst: str, plan: dict) -> None:
    """Record the plan in ``dst``, or check that the plan already there is this one."""
    url = Storage.join(dst, PLAN_FILE)
    if storage.exists(url):
        old = storage.read_json(url)
        if {k: old.get(k) for k in ("source", "images_per_shard", "splits")} != \
                {k: plan[k] for k in ("source", "images_per_shard", "splits")}:
            raise ValueError(f"{dst} holds shards of another conversion ({url}: source "
                             f"{old.get('source')}, {old.get('images_per_shard')} images per shard, "
                             "or another listing): write to an empty folder")
        return
    storage.write_text(url, json.dumps(plan, indent=1))


def _write_shard(storage: Storage, cfg: DataConfig, url: str, records: Sequence[ImageRecord],
                 gt: dict[str, str]) -> tuple[int | None, list[str]]:
    """Write one shard unless it is there; ``(images written or None, unreadable paths)``."""
    if storage.exists(url) and storage.size(url) > 0:
        return None, []
    datas = read_many(storage, [r.path for r in records], cfg.max_file_bytes, cfg.root)
    masks = read_many(storage, [gt[png_rel(r.id)] for r in records if png_rel(r.id) in gt])
    masks_by_id = dict(zip([r.id for r in records if png_rel(r.id) in gt], masks))
    entries, unreadable = [], []
    for record, data in zip(records, datas):
        if isinstance(data, Exception):
            unreadable.append(f"{record.path}: {data}")
            continue
        key, ext = shard_key(record), image_extension(record.path, data)
        if ext is None:  # BMP, TIFF, GIF: stored as PNG
            decoded = decode_image(data, exif_transpose=False)
            if not decoded.ok:
                unreadable.append(f"{record.path}: {decoded.reason}")
                continue
            data, ext = _png(decoded.image), "png"
        entries.append((f"{key}.{ext}", data))
        if record.wnid:
            entries.append((f"{key}.cls", record.wnid.encode()))
        mask = masks_by_id.get(record.id)
        if isinstance(mask, bytes):
            entries.append((f"{key}.seg.png", mask))
    data, members = tar_bytes(entries)
    storage.write_bytes(url, data)
    # the index after the shard: a listing that finds it finds a whole shard of its size
    write_shard_index(storage, url, len(data), members,
                      {name: text for name, text in entries if name.endswith(".cls")})
    for line in unreadable:
        log.warning("make-shards: not copied: %s", line)
    return len(records) - len(unreadable), unreadable


def _png(image) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
